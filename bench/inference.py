"""Inference speed of the `official` DFNet along each path of `dfnet.accelerate`.

    python bench/inference.py [--sizes 256 512] [--batches 1 8] [--repeats N] [--device cpu|cuda]
                              [--paths fp32 channels_last ...] [--json out.json]

For every (size, batch) it times fp32 eager first (the baseline), then each path, and prints
ms/image (median over the timed repeats, after warm-up), the speed-up over the baseline measured
in the same run, and the largest |difference| of the completed image from the baseline in units
of 1/255. The first call of each path is reported apart (it includes compilation). No
assertions: this is a measurement, and on a shared machine it is a noisy one.

Weights are random, but BatchNorm statistics are calibrated on random images and the BN affine
parameters perturbed, so the outputs are not trivial and BN folding changes real numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dfnet.accelerate import InferenceRunner, optimize_for_inference
from dfnet.model import DFNet, build_model

# name → (description for the table, optimize_for_inference keyword arguments)
PATHS: dict[str, tuple[str, dict[str, Any]]] = {
    "fp32": ("fp32 eager (baseline)", {"channels_last": False, "fold_bn": False}),
    "channels_last": ("channels_last", {"channels_last": True, "fold_bn": False}),
    "fold_cl": ("bn-fold + channels_last", {"channels_last": True, "fold_bn": True}),
    "bf16": ("bf16 autocast + bn-fold + cl", {"dtype": torch.bfloat16}),
    "fp16": ("fp16 autocast + bn-fold + cl", {"dtype": torch.float16}),
    "compile": ("compile (freezing) + cl", {"compile": True}),
    "compile_bf16": ("compile + bf16", {"compile": True, "dtype": torch.bfloat16}),
    "compile_fp16": ("compile + fp16", {"compile": True, "dtype": torch.float16}),
}
DEFAULT_PATHS = {
    "cpu": ["fp32", "channels_last", "fold_cl", "bf16", "compile", "compile_bf16"],
    "cuda": list(PATHS),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 512], help="square input sizes"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per path (default: as many as fit in --budget-s, between 3 and 15)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=4.0, help="rough timing budget per path and shape"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=None)
    parser.add_argument("--preset", default="official")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@torch.no_grad()
def calibrated_model(preset: str, seed: int) -> DFNet:
    """A randomly initialised model whose BatchNorms carry realistic, non-trivial statistics.

    Running statistics come from training-mode passes over random images (so activations stay in
    a sensible range through all levels, unlike statistics drawn at random), and γ/β are moved
    off their 1/0 initialisation so folding has an affine part to fold.
    """
    torch.manual_seed(seed)
    model = build_model(preset)
    size = model.config.size_multiple
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration passes
    model.train()
    for _ in range(3):
        image = torch.rand(2, 3, size, size)
        mask = (torch.rand(2, 1, size, size) > 0.25).float()
        model(image, mask)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.uniform_(0.7, 1.3)
            module.bias.normal_(0.0, 0.1)
    return model.eval()


def make_inputs(batch: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random image and one rectangular hole per item (about a quarter of the pixels)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=generator)
    mask = torch.ones(batch, 1, size, size)
    for i in range(batch):
        top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        mask[i, :, top : top + size // 2, left : left + size // 2] = 0.0
    return image, mask


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(runner: InferenceRunner, image: torch.Tensor, mask: torch.Tensor) -> float:
    start = time.perf_counter()
    runner(image, mask)
    synchronize(runner.device)
    return time.perf_counter() - start


def bench_shape(
    model: DFNet, paths: list[str], size: int, batch: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Time every path at one (size, batch).

    All runners are built and warmed up first, then timed round-robin (the order rotating every
    round), so that load from other processes on a shared machine falls on all paths alike
    instead of on whichever happened to run during a busy spell.
    """
    device = torch.device(args.device)
    image, mask = make_inputs(batch, size, args.seed + 1)
    image, mask = image.to(device), mask.to(device)  # host→device copies stay out of the timing
    # Compiled runners share one traced function and so one dynamo cache, whose recompile limit
    # (8 entries) would be reached over many shapes × paths: start each shape with it empty.
    torch._dynamo.reset()
    runners: dict[str, InferenceRunner] = {}
    first_s: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    warm_s = 0.0
    for name in paths:
        label, options = PATHS[name]
        progress(f"[{size}² batch {batch}] preparing {label} ...")
        runner = optimize_for_inference(model, device=device, **options)
        start = time.perf_counter()
        outputs[name] = runner(image, mask).float().cpu()
        first_s[name] = time.perf_counter() - start  # includes compilation
        warm_s += timed_call(runner, image, mask)  # warm-up: allocator, primitive caches
        runners[name] = runner
    repeats = args.repeats
    if repeats is None:
        repeats = max(3, min(15, int(args.budget_s * len(paths) / max(warm_s, 1e-4))))
    times: dict[str, list[float]] = {name: [] for name in paths}
    progress(f"[{size}² batch {batch}] timing {len(paths)} paths × {repeats} rounds ...")
    for round_index in range(repeats):
        shift = round_index % len(paths)
        for name in paths[shift:] + paths[:shift]:
            times[name].append(timed_call(runners[name], image, mask))
    baseline_ms = statistics.median(times["fp32"]) * 1000.0 / batch
    records = []
    for name in paths:
        label = PATHS[name][0]
        ms = statistics.median(times[name]) * 1000.0 / batch
        diff = (outputs[name] - outputs["fp32"]).abs().max().item() * 255.0
        record = {
            "size": size,
            "batch": batch,
            "path": name,
            "label": label,
            "ms_per_image": ms,
            "min_ms_per_image": min(times[name]) * 1000.0 / batch,
            "speedup": baseline_ms / ms,
            "max_diff_255": diff,
            "first_call_s": first_s[name],
            "repeats": repeats,
            "times_ms": [t * 1000.0 for t in times[name]],
            "compiled": runners[name].compiled,
            "folded_batchnorms": runners[name].folded_batchnorms,
        }
        records.append(record)
        progress(
            f"    {label:30s} {ms:8.1f} ms/image (min {record['min_ms_per_image']:.1f})  "
            f"×{record['speedup']:.2f}  max diff {diff:.3f}/255  first call {first_s[name]:.1f} s"
        )
    del runners, outputs
    gc.collect()
    return records


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    paths = args.paths or DEFAULT_PATHS.get(device.type, DEFAULT_PATHS["cpu"])
    paths = ["fp32"] + [p for p in paths if p != "fp32"]  # the baseline always runs
    progress(f"calibrating the {args.preset} model's BatchNorm statistics ...")
    model = calibrated_model(args.preset, args.seed)
    records: list[dict[str, Any]] = []
    for size in args.sizes:
        for batch in args.batches:
            records += bench_shape(model, paths, size, batch, args)
    return records


def markdown_table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| size | batch | path | ms/image (median) | min | speed-up | max diff (/255) "
        "| first call (s) | repeats |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        note = "" if r["compiled"] or "compile" not in r["path"] else " (fell back to eager)"
        lines.append(
            f"| {r['size']}² | {r['batch']} | {r['label']}{note} | {r['ms_per_image']:.1f} | "
            f"{r['min_ms_per_image']:.1f} | {r['speedup']:.2f}× | {r['max_diff_255']:.3f} | "
            f"{r['first_call_s']:.1f} | {r['repeats']} |"
        )
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)
    env = environment(device)
    progress(f"environment: {env}")
    records = run(args)
    print(
        f"\nDFNet `{args.preset}` inference, {env['device']}, torch {env['torch']}, "
        f"{env['threads']} threads\n"
    )
    print(markdown_table(records))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "results": records}, indent=2) + "\n")
        progress(f"wrote {args.json}")


if __name__ == "__main__":
    main()
