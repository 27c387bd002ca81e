"""Training throughput: the pipeline's Ray Train loop against a plain single-process PyTorch loop.

    python bench/train_throughput.py [--preset small] [--size 64] [--batch 16] [--steps 60]
                                     [--warmup 10] [--workers 1 2] [--device cpu|cuda]
                                     [--threads N] [--json out.json]

Both sides train the same model (`model.preset`, the loss of params.yaml) on the same prepared
crops (`data.out_dir` when it holds crops of `--size`, else a fresh `sample` preparation in a
temporary folder) with the same masks and the same `dfnet.training.train_step`; every step
decodes its PNG crops and draws its masks, as the Ray worker does.

- plain: one process, `torch.set_num_threads(--threads)`, default the thread count a single Ray
  Train worker gets (`threads_per_worker` of `build_trainer`: the cluster's CPUs / workers). It
  runs before and after the Ray runs and its windows are pooled, so a load change on a shared
  machine shows up on both sides.
- ray: `pipelines.train.build_trainer(params).fit()` with `--workers` workers (per-worker batch
  `--batch`), one epoch, MLflow off. Rates come from the `images_per_s` the worker itself logs
  every LOG_EVERY steps (cumulative since the epoch started), differenced into per-window rates,
  so Ray's start-up, dataset planning and the end-of-epoch checkpoint are excluded.

Both report the median over windows of LOG_EVERY steps after `--warmup` steps, and the overall
rate over those windows (their harmonic mean: total images / total time), which also counts the
occasional slow window, e.g. where Ray Data starts a new pass over a small dataset. Goal: Ray
Train with 1 worker within 10% of the plain loop (by the median). No assertions: this is a
measurement on a possibly shared machine; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from dfnet.data import MaskSampler, decode_png_batch, read_split  # noqa: E402
from dfnet.losses import DFNetLoss  # noqa: E402
from dfnet.masks import load_masks  # noqa: E402
from dfnet.params import Params, load_params  # noqa: E402
from dfnet.training import make_optimizer, to_batch, train_step  # noqa: E402
from pipelines.train import LOG_EVERY, build_trainer, load_checkpoint_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.10  # Ray Train with one worker may be at most this much slower than the plain loop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--size", type=int, default=64, help="training crop side")
    parser.add_argument("--batch", type=int, default=16, help="batch size per worker")
    parser.add_argument("--steps", type=int, default=60, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="plain loop threads (default: as 1 Ray worker)"
    )
    parser.add_argument("--address", default="local", help="Ray address (default: a new local Ray)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def _round_up(n: int) -> int:
    return max(LOG_EVERY, math.ceil(n / LOG_EVERY) * LOG_EVERY)


def bench_params(args: argparse.Namespace, data_dir: str, masks: str, storage: str) -> Params:
    warmup, steps = _round_up(args.warmup), _round_up(args.steps)
    return load_params(
        args.params,
        {
            "data": {"image_size": args.size, "out_dir": data_dir},
            "masks": {"out": masks},
            "model": {"preset": args.preset},
            "train": {
                "epochs": 1,
                "steps_per_epoch": warmup + steps,
                "batch_size": args.batch,
                "use_gpu": args.device == "cuda",
                "storage_path": storage,
                "resume": False,
                "max_failures": 0,
            },
        },
    )


def ensure_data(args: argparse.Namespace, params: Params, scratch: Path) -> tuple[str, str]:
    """(prepared data folder, masks file) at `--size`: the pipeline's own if they fit."""
    report = Path(params.data.out_dir) / "report.json"
    masks = Path(params.masks.out)
    fits = report.is_file() and masks.is_file()
    fits = fits and json.loads(report.read_text()).get("image_size") == args.size
    if fits and load_masks(masks)["pool"].shape[-1] == args.size:
        return str(Path(params.data.out_dir).resolve()), str(masks.resolve())
    from dataclasses import replace

    from pipelines.make_masks import make_masks
    from pipelines.prepare import prepare

    print(f"preparing sample crops at {args.size}² in {scratch}", flush=True)
    data = replace(params.data, source="sample", image_size=args.size, out_dir=str(scratch / "d"))
    prepare(data)
    mask_params = replace(params.masks, out=str(scratch / "masks.npz"))
    make_masks(mask_params, args.size)
    return data.out_dir, mask_params.out


def window_rates(step_ends: list[tuple[int, float]], images_per_step: int, warmup: int) -> list[float]:
    """Images/s over consecutive windows, from (step, seconds since the loop started) pairs."""
    rates = []
    for (s0, t0), (s1, t1) in zip(step_ends, step_ends[1:]):
        if s0 >= warmup and t1 > t0:
            rates.append((s1 - s0) * images_per_step / (t1 - t0))
    return rates


def plain_loop(params: Params, threads: int, device: torch.device, warmup: int) -> list[float]:
    """The same steps as a Ray Train worker, in this process; window rates after warm-up."""
    torch.set_num_threads(threads)
    torch.manual_seed(params.train.seed)
    blobs = read_split(params.data.out_dir, "train").column("image").to_pylist()
    order = np.random.default_rng(params.train.seed).permutation(len(blobs))
    sampler = MaskSampler(load_masks(params.masks.out)["pool"], seed=params.train.seed)
    model = params.model.build().to(device)
    loss_fn = DFNetLoss(params.loss).to(device)
    optimizer, _ = make_optimizer(model, params.train)
    use_amp = params.train.amp and device.type == "cuda"
    scaler = (
        torch.amp.GradScaler("cuda") if use_amp and not torch.cuda.is_bf16_supported() else None
    )
    batch, total = params.train.batch_size, params.train.steps_per_epoch
    per_pass = len(blobs) // batch  # drop_last, like the worker's iter_batches
    start, ends = time.perf_counter(), [(0, 0.0)]
    for step in range(total):
        picks = order[(step % per_pass) * batch : (step % per_pass + 1) * batch]
        images, masks = to_batch(
            decode_png_batch([blobs[i] for i in picks]), sampler.sample(batch), device
        )
        train_step(model, loss_fn, optimizer, images, masks, scaler=scaler, amp=use_amp)
        if (step + 1) % LOG_EVERY == 0:
            ends.append((step + 1, time.perf_counter() - start))
    return window_rates(ends, batch, warmup)


def ray_loop(params: Params, warmup: int) -> tuple[list[float], int]:
    """Fit with the pipeline's trainer; window rates from the history the worker logged."""
    trainer = build_trainer(params, extra_config={"tracking_uri": ""})  # MLflow off
    threads = trainer.train_loop_config["threads_per_worker"]
    result = trainer.fit()
    _, history = load_checkpoint_state(result.checkpoint)
    records = [h for h in history if "images_per_s" in h and h["epoch"] == 0]
    global_batch = params.train.batch_size * params.train.num_workers
    # The logged rate is images since the epoch began over the time since then: recover the
    # time of each record and difference consecutive ones.
    ends = [(0, 0.0)] + [
        (h["step"], h["step"] * global_batch / h["images_per_s"]) for h in records
    ]
    return window_rates(ends, global_batch, warmup), threads


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warmup = _round_up(args.warmup)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="dfnet-bench-") as scratch:
        defaults = load_params(args.params)
        data_dir, masks = ensure_data(
            args, bench_params(args, defaults.data.out_dir, defaults.masks.out, ""), Path(scratch)
        )
        if not ray.is_initialized():
            ray.init(address=args.address, log_to_driver=False, include_dashboard=False)
        cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        threads = args.threads or max(1, cpus // 1)  # what one Ray Train worker computes with
        print(
            f"device {args.device}, {cpus} CPUs in Ray, preset {args.preset}, {args.size}², "
            f"batch {args.batch}/worker, {warmup} warm-up + {_round_up(args.steps)} timed steps, "
            f"load average {load_average()}",
            flush=True,
        )

        def plain() -> list[float]:
            return plain_loop(bench_params(args, data_dir, masks, ""), threads, device, warmup)

        rows: list[dict[str, Any]] = []
        plain_rates = plain()
        print(f"plain loop (first pass): {statistics.median(plain_rates):.1f} img/s", flush=True)
        for workers in args.workers:
            params = bench_params(args, data_dir, masks, str(Path(scratch) / "runs"))
            params.train.num_workers = workers
            params.train.run_name = f"bench-w{workers}"
            rates, worker_threads = ray_loop(params, warmup)
            print(f"ray train, {workers} worker(s): {statistics.median(rates):.1f} img/s", flush=True)
            rows.append(
                {
                    "setup": "Ray Train",
                    "workers": workers,
                    "threads_per_worker": worker_threads,
                    "rates": rates,
                }
            )
        second = plain()
        print(f"plain loop (second pass): {statistics.median(second):.1f} img/s", flush=True)
        rows.insert(
            0,
            {
                "setup": "plain PyTorch loop",
                "workers": 1,
                "threads_per_worker": threads,
                "rates": plain_rates + second,
            },
        )
    baseline = statistics.median(rows[0]["rates"])
    for row in rows:
        row["images_per_s"] = statistics.median(row["rates"])
        row["overall_images_per_s"] = statistics.harmonic_mean(row["rates"])
        row["ratio"] = row["images_per_s"] / baseline
        row["windows"] = len(row["rates"])
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nTraining throughput, preset {args.preset}, {args.size}², batch {args.batch} per "
        f"worker, device {args.device} ({platform.processor() or platform.machine()}), "
        f"load average {load_average()}\n"
    )
    overall = rows[0]["overall_images_per_s"]
    print("| setup | workers | threads/worker | images/s (median) | vs plain | images/s (overall) | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['setup']} | {row['workers']} | {row['threads_per_worker']} | "
            f"{row['images_per_s']:.1f} | {row['ratio']:.2f}× | "
            f"{row['overall_images_per_s']:.1f} | {row['overall_images_per_s'] / overall:.2f}× |"
        )
    one = [r for r in rows if r["setup"] == "Ray Train" and r["workers"] == 1]
    if one:
        met = one[0]["ratio"] >= 1 - GOAL
        print(
            f"\nGoal (Ray Train, 1 worker, within {GOAL:.0%} of the plain loop): "
            f"{'met' if met else 'NOT met'} ({one[0]['ratio']:.2f}×)"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"params": str(args.params),
                                                              "json": str(args.json)},
                                         "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
