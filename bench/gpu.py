"""GPU figures in one short run: every inference path, and the training step with AMP.

    python bench/gpu.py [--models official shipped] [--size N] [--batches N ...] [--json gpu.json]

Without CUDA it measures nothing and exits with the test drivers' "skipped" status.
Inference: each GPU path of `dfnet.accelerate`, timed round-robin after a warm-up that compiles,
as the median per image beside plain fp32 in the same run and its largest output difference.
Inputs are synthetic, as speed does not depend on the content. Training: the official preset's
step with and without AMP, the paper's losses on a random VGG16 (the same work as ImageNet's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a bare GPU box has the project's files, not the installed package

from dfnet.accelerate import InferencePath, optimize_for_inference  # noqa: E402
from dfnet.losses import DFNetLoss  # noqa: E402
from dfnet.model import DFNet, build_model  # noqa: E402
from dfnet.params import load_params  # noqa: E402
from dfnet.training import _step  # noqa: E402

SKIPPED = 77
PRETRAINED = "pretrained"
PATHS = [
    InferencePath("fp32", channels_last=False, fold_bn=False),  # the baseline: DFNet.complete
    InferencePath("eager-nchw", channels_last=False),
    InferencePath("eager"),  # BatchNorm folded, channels_last
    InferencePath("eager-fp16", dtype=torch.float16),
    InferencePath("compile-nchw", compile=True, channels_last=False),
    InferencePath("compile", compile=True),
    InferencePath("compile-bf16", compile=True, dtype=torch.bfloat16),
    InferencePath("compile-fp16", compile=True, dtype=torch.float16),
]


def inputs(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth noise images (N3HW in [0, 1]) and masks with one hole of a quarter of the area."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    photos = np.stack([cv2.GaussianBlur(n, (0, 0), size / 64) for n in noise])
    image = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255
    mask = torch.ones(batch, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 0.0
    return image, mask


def timed(call: Any, *args: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    call(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_inference(name: str, model: DFNet, args: argparse.Namespace) -> list[dict[str, Any]]:
    paths = [p for p in PATHS if p.dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()]
    rows = []
    for batch in args.batches:
        image, mask = (t.cuda() for t in inputs(batch, args.size))
        runners = {}
        for path in paths:
            runners[path.name] = optimize_for_inference(model, device="cuda", path=path)
            first = timed(runners[path.name], image, mask)  # compiles the compiled paths
            print(f"[{name} batch {batch}] {path.name}: first call {first:.1f} s", flush=True)
            for _ in range(3):
                runners[path.name](image, mask)
        times: dict[str, list[float]] = {p: [] for p in runners}
        for round_index in range(args.repeats):
            order = list(runners)[round_index % len(runners) :] + list(runners)[: round_index % len(runners)]
            for path_name in order:
                times[path_name].append(timed(runners[path_name], image, mask))
        reference = runners["fp32"](image, mask)
        base = statistics.median(times["fp32"]) * 1000 / batch
        for path_name, runner in runners.items():
            ms = statistics.median(times[path_name]) * 1000 / batch
            diff = (runner(image, mask) - reference).abs().max().item() * 255
            rows.append(
                {"model": name, "size": args.size, "batch": batch, "path": path_name, "ms_per_image": ms,
                 "vs_fp32": base / ms, "max_diff_levels": diff, "compiled": runner.compiled}
            )  # fmt: skip
            print(f"  {path_name:14s} {ms:8.2f} ms/image  {base / ms:5.2f}× fp32  max diff {diff:.2f}/255", flush=True)
        del runners
        torch.cuda.empty_cache()
    return rows


def bench_training(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The official preset's training step, with and without AMP."""
    rows = []
    image, mask = (t.cuda() for t in inputs(args.train_batch, args.train_size, seed=1))
    for amp in (False, True):
        torch.manual_seed(0)
        model = build_model("official").cuda()
        # The paper's (p, q) for the official preset; a random VGG where ImageNet weights are absent.
        loss = load_params(ROOT / "params.yaml", {"loss": {"p": 6, "q": 3, "texture_fallback": "random"}}).loss
        loss_fn = DFNetLoss(loss).cuda()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda") if amp and not torch.cuda.is_bf16_supported() else None
        step = (model, loss_fn, optimizer, image, mask, scaler, amp)
        for _ in range(3):
            _step(*step)
        seconds = [timed(_step, *step) for _ in range(args.repeats)]
        rate = args.train_batch / statistics.median(seconds)
        dtype = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if amp else "fp32"
        rows.append({"preset": "official", "amp": amp, "dtype": dtype, "batch": args.train_batch,
                     "size": args.train_size, "images_per_s": rate})  # fmt: skip
        print(f"training step, official, {args.train_size}² batch {args.train_batch}, {dtype}: {rate:.1f} img/s")
        del model, loss_fn, optimizer
        torch.cuda.empty_cache()
    rows[1]["vs_fp32"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["official", "shipped"], default=["official", "shipped"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        reason = f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)"
        print(f"skipped: {reason}; bench/gpu.py measures GPUs only")
        if args.json:
            args.json.write_text(json.dumps({"skipped": reason}) + "\n")
        return SKIPPED
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    models = {"official": lambda: build_model("official").eval(), "shipped": lambda: DFNet.from_pretrained(PRETRAINED)}
    inference = [row for name in args.models for row in bench_inference(name, models[name](), args)]
    result = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
              "inference": inference, "training": bench_training(args)}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
