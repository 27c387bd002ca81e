"""Training throughput: the project's training loop in this process against the same loop in Ray Train.

    python bench/train_throughput.py [--params params.yaml] [--workers N ...] [--json out.json]

Both setups run `dfnet.training.train` with the same params and data for one epoch of
`--warmup` + `--steps` steps per worker: in this process with one Ray worker's threads (before
and after the Ray runs, so a load change shows on both sides), and as the pipeline's
TorchTrainer for each `--workers` count. Rates are the median of the windows between the loop's
own history records after the warm-up, so start-up, validation and checkpoints fall outside.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch
from _common import cpu_name, prepared_data  # bench/'s shared helpers

from dfnet.params import Params, load_params
from dfnet.storage import count_rows
from dfnet.training import train
from pipelines.train import build_trainer, load_checkpoint_state

MLFLOW_OFF = {"tracking_uri": ""}  # build_trainer's config: no MLflow run for a measurement


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=60, help="timed steps of one worker (after warm-up)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="plain loop threads (default: what one Ray worker gets)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def bench_params(params: Params, args: argparse.Namespace, workers: int, storage: Path) -> Params:
    """`params` for one fresh (never resumed) epoch of `--warmup` + `--steps` steps per worker."""
    photos = count_rows(params.data.out_dir, "train")
    crops = math.ceil((args.warmup + args.steps) * params.train.batch_size * workers / photos)
    return replace(params, train=replace(
        params.train, epochs=1, crops_per_photo=crops, num_workers=workers, val_max_photos=1,
        use_gpu=args.device == "cuda", resume=False, max_failures=0, storage_path=str(storage / f"workers-{workers}"),
    ))  # fmt: skip


def window_rates(history: list[dict[str, Any]], images_per_step: int, warmup: int) -> list[float]:
    """Images/s of each window between consecutive training records that starts after `warmup`
    steps. A record holds images since the epoch began / seconds since then, so (one epoch) it
    was written step × images_per_step / images_per_s seconds into the epoch."""
    points = [(h["step"], h["step"] * images_per_step / h["images_per_s"]) for h in history if "images_per_s" in h]
    return [
        (s1 - s0) * images_per_step / (t1 - t0)
        for (s0, t0), (s1, t1) in zip(points, points[1:])
        if s0 >= warmup and t1 > t0
    ]


def plain(params: Params, threads: int, device: str, warmup: int) -> list[float]:
    """Window rates of the training loop run in this process with `threads` torch threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        state = train(params, device)
    finally:
        torch.set_num_threads(saved)
    return window_rates(state["history"], params.train.batch_size, warmup)


def ray_train(params: Params, warmup: int) -> tuple[list[float], int]:
    """(window rates, threads per worker) of the pipeline's TorchTrainer."""
    trainer = build_trainer(params, MLFLOW_OFF)
    state = load_checkpoint_state(trainer.fit().checkpoint)
    rates = window_rates(state["history"], params.train.batch_size * params.train.num_workers, warmup)
    return rates, trainer.train_loop_config["threads_per_worker"]


def run(params: Params, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Plain, each Ray Train worker count, plain again: one row per setup."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="dfnet-throughput-") as scratch:
        params = prepared_data(params, Path(scratch))
        one_worker = bench_params(params, args, 1, Path(scratch))
        threads = args.threads or build_trainer(one_worker, MLFLOW_OFF).train_loop_config["threads_per_worker"]
        first = plain(one_worker, threads, args.device, args.warmup)
        print(f"plain loop (first pass): {statistics.median(first):.1f} img/s", flush=True)
        for workers in args.workers:
            rates, per_worker = ray_train(bench_params(params, args, workers, Path(scratch)), args.warmup)
            print(f"Ray Train, {workers} worker(s): {statistics.median(rates):.1f} img/s", flush=True)
            rows.append({"setup": "Ray Train", "workers": workers, "threads_per_worker": per_worker, "rates": rates})
        second = plain(one_worker, threads, args.device, args.warmup)
        print(f"plain loop (second pass): {statistics.median(second):.1f} img/s", flush=True)
    rows.insert(0, {"setup": "plain loop", "workers": 1, "threads_per_worker": threads, "rates": first + second})
    for row in rows:
        row["windows"], row["images_per_s"] = len(row["rates"]), statistics.median(row["rates"])
        row["ratio"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure, print a markdown table and optionally write it as JSON."""
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)
    params, load_start = load_params(args.params), os.getloadavg()[0]
    rows = run(params, args)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "device": args.device,
               "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)]}  # fmt: skip
    print(f"\nTraining throughput: preset {params.model.preset}, {params.data.image_size}² crops, batch "
          f"{params.train.batch_size} per worker, device {args.device}; {machine['cpu']}, {machine['cores']} "
          f"cores, torch {machine['torch']}; load average {machine['load_average'][0]} at the start, "
          f"{machine['load_average'][1]} at the end\n")  # fmt: skip
    print("| setup | workers | threads/worker | windows | images/s (median) | vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['setup']} | {row['workers']} | {row['threads_per_worker']} | {row['windows']} | "
              f"{row['images_per_s']:.1f} | {row['ratio']:.2f}× |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "machine": machine,
                                         "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
