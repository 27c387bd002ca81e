"""Inference speed and fidelity of DFNet along each path of `dfnet.accelerate`, on this machine.

    python bench/inference.py [--models official shipped] [--sizes 512] [--batches 1]
                              [--paths before fp32 eager compile compile-bf16 int8 int8-bf16]
                              [--photos 8] [--device cpu|cuda] [--doc docs/performance.md]

For each model and (size, batch), every path is built and warmed up (compiled paths compile
here; their first call is reported apart), then all are timed round-robin, the order rotating
every round, so load from other processes falls on all of them alike. It prints ms/image
(median), the ratios to `fp32` (today's eager model, `DFNet.complete`) and to `before` (the
eager model as issue 11 found it) measured in the same run, and, at batch 1, the *validated*
quality: every path completes `--photos` held-out test photos (centre crops of the size, one
evaluation mask of each bin from 20 % up) and is scored against the ground truth like `fp32`
is: hole ℓ1 and BPE (in % of 8-bit, on uint8 outputs), their relative difference to fp32's, and
the largest pixel difference from fp32's output.

Paths: `before` is the eager model as issue 11 found it (an explicit `F.pad` before every conv,
each decoder block upsampling, then copying the upsampled tensor again into the concat, and the
shipped model's pre-fill at radius 3; the pre-fill's own code is today's, which made it faster,
so this baseline is if anything quicker than the code as found): the baseline the eager changes
are judged by; `fp32` the eager model as it is (`DFNet.complete`); `eager` adds BatchNorm
folding and channels_last; `compile`, `compile-bf16`, `int8` and `int8-bf16` are
dfnet.accelerate's paths (int8 calibrated on training photos, never test ones); `onnxruntime`
and `onnxruntime-int8` run the network exported to ONNX (dfnet.onnx) in ONNX Runtime, fp32 and
static int8. The path that `optimize_for_inference(model)` picks here is marked "auto".

ISA caps: ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY limit torch only. ONNX Runtime picks its
kernels from CPUID when it loads and has no switch to limit them, so in a capped section its rows
still run the CPU's full ISA (the section says so).

Models: `official` is the paper's architecture with random weights whose BatchNorm statistics
come from real photos (the layout of the authors' checkpoints: speed and numerical fidelity are
what it measures; its ℓ1 against the truth means nothing); `shipped` is the pretrained model
(small preset + Navier–Stokes pre-fill). Photos come from the DVC `prepare` stage (data/).

`--doc` writes the machine's table into docs/performance.md (one section per CPU and device).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_name, write_doc  # bench/'s shared helpers

from dfnet.accelerate import INFERENCE_PATHS, InferencePath, InferenceRunner, choose_path, optimize_for_inference
from dfnet.masks import HOLE_BINS, evaluation_masks
from dfnet.metrics import band_width_for, bpe
from dfnet.model import Conv2dSame, DecoderBlock, DFNet, build_model
from dfnet.params import load_params
from dfnet.storage import load_photos

PLAIN = dict(channels_last=False, fold_bn=False)
BENCH_PATHS: dict[str, InferencePath] = {
    "before": InferencePath("before", **PLAIN),
    "fp32": InferencePath("fp32", **PLAIN),
    **INFERENCE_PATHS,
}
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
FIRST_BIN = 2  # validate on holes of 20 % and more, where methods differ


class TwoPassDecoderBlock(DecoderBlock):
    """The decoder block as it was: upsample into one tensor, then copy it again with the skip."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.act(self.norm(self.conv(torch.cat([x, skip], dim=1))))


def as_before(model: DFNet) -> DFNet:
    """A copy of `model` that runs the eager forward as it was before issue 11: `F.pad` before
    every conv, even where nn.Conv2d's own symmetric padding gives the same numbers without
    copying the input, the two-pass upsample + concat in every decoder block, and OpenCV's
    pre-fill at radius 3 (the shipped model's then; it runs at 2 now)."""
    before = copy.deepcopy(model)
    before.config = dataclasses.replace(model.config, prefill_radius=3)
    for module in before.modules():
        if isinstance(module, Conv2dSame) and module.same_pad is None:
            pad = module.padding[0]
            module.padding = (0, 0)
            module.same_pad = (pad, pad, pad, pad)
        if isinstance(module, DecoderBlock):
            module.__class__ = TwoPassDecoderBlock
    return before


def progress(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- inputs
def crops(photos: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Centre size×size crops (the photos are scaled to a short side of `size` already)."""
    out = []
    for photo in photos:
        top, left = (photo.shape[0] - size) // 2, (photo.shape[1] - size) // 2
        out.append(np.ascontiguousarray(photo[top : top + size, left : left + size]))
    return out


def as_tensors(photos: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float().div(255)
    known = torch.from_numpy(np.stack(masks)).float()[:, None]
    return image, known


def validation_pairs(photos: list[np.ndarray], size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (image, mask) per photo, batch 1, cycling through the bins from 20 % up."""
    bins = evaluation_masks(1, size, size, seed)
    masks = [bins[FIRST_BIN + i % (len(HOLE_BINS) - FIRST_BIN)][0] for i in range(len(photos))]
    return [as_tensors([p], [m]) for p, m in zip(photos, masks)]


@torch.no_grad()
def calibrated_official(photos: list[np.ndarray], seed: int) -> DFNet:
    """The official architecture, random weights, BatchNorm statistics from photos with holes."""
    torch.manual_seed(seed)
    model = build_model("official")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over the passes
    model.train()
    pairs = validation_pairs(crops(photos, 256), 256, seed)
    for first, second in zip(pairs[::2], pairs[1::2]):  # batches of 2: the 1×1 bottleneck needs > 1 value
        model(torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]))
    return model.eval()


# --------------------------------------------------------------------------- timing and scoring
def timed(runner: InferenceRunner, image: torch.Tensor, mask: torch.Tensor) -> float:
    start = time.perf_counter()
    runner(image, mask)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - start


def quality(
    runner: InferenceRunner, pairs: list[tuple[torch.Tensor, torch.Tensor]], band_at_256: int
) -> dict[str, Any]:
    """Hole ℓ1 and BPE (% of 8-bit, uint8 outputs, the evaluate stage's band) over the pairs,
    and the outputs."""
    l1s, bpes, outputs = [], [], []
    for image, mask in pairs:
        out = runner(image, mask).cpu().clamp(0, 1).mul(255).round().div(255)
        hole = (1 - mask).expand_as(image)
        l1s.append(((out - image).abs() * hole).sum().item() / hole.sum().item() * 100)
        bpes.append(bpe(out, image, mask, band_width_for(*image.shape[-2:], width_at_256=band_at_256)).item())
        outputs.append(out)
    return {"l1": float(np.mean(l1s)), "bpe": float(np.mean(bpes)), "outputs": outputs}


def bench_model(
    name: str, model: DFNet, paths: list[str], args: argparse.Namespace, photos: dict[str, list[np.ndarray]]
) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    auto = choose_path(device)[0].name
    records = []
    for size in args.sizes:
        test = crops(photos[f"test{size}"], size)
        pairs = [(i.to(device), m.to(device)) for i, m in validation_pairs(test, size, args.seed)]
        calibration = validation_pairs(crops(photos[f"train{size}"], size), size, args.seed + 1)
        for batch in args.batches:
            torch._dynamo.reset()  # each shape starts with an empty dynamo cache (its recompile limit)
            image = torch.cat([pairs[i % len(pairs)][0] for i in range(batch)])
            mask = torch.cat([pairs[i % len(pairs)][1] for i in range(batch)])
            runners: dict[str, InferenceRunner] = {}
            first: dict[str, float] = {}
            for path in paths:
                progress(f"[{name} {size}² batch {batch}] building {path} ...")
                source = as_before(model) if path == "before" else model
                start = time.perf_counter()
                runners[path] = optimize_for_inference(
                    source, device=device, path=BENCH_PATHS[path], calibration=calibration
                )
                timed(runners[path], image, mask)
                first[path] = time.perf_counter() - start  # build + quantise + compile + first call
            times: dict[str, list[float]] = {p: [] for p in paths}
            prefill: list[float] = []  # OpenCV's pre-fill, run eagerly by every path
            for round_index in range(args.repeats):
                shift = round_index % len(paths)
                for path in paths[shift:] + paths[:shift]:
                    times[path].append(timed(runners[path], image, mask))
                if model.config.opencv_prefill:
                    start = time.perf_counter()
                    model.fill_holes(image, mask)
                    prefill.append(time.perf_counter() - start)
            scores = {p: quality(runners[p], pairs, args.band_width) for p in paths} if batch == 1 else {}
            base_ms = statistics.median(times["fp32"]) * 1000 / batch
            before_ms = statistics.median(times["before"]) * 1000 / batch if "before" in times else None
            for path in paths:
                ms = statistics.median(times[path]) * 1000 / batch
                record = {
                    "model": name, "size": size, "batch": batch, "path": path, "auto": path == auto,
                    "ms": ms, "ratio": base_ms / ms, "first_s": first[path],
                    "ratio_before": before_ms / ms if before_ms else None,
                    "compiled": runners[path].compiled, "repeats": args.repeats,
                    "prefill_ms": statistics.median(prefill) * 1000 / batch if prefill else 0.0,
                }  # fmt: skip
                if scores:
                    ref, own = scores["fp32"], scores[path]
                    record.update(
                        l1=own["l1"], bpe=own["bpe"],
                        l1_rel=own["l1"] / ref["l1"] - 1, bpe_rel=own["bpe"] / ref["bpe"] - 1,
                        max_diff=max((a - b).abs().max().item() for a, b in zip(own["outputs"], ref["outputs"])) * 255,
                    )  # fmt: skip
                records.append(record)
                progress("    " + row(record))
            del runners
            gc.collect()
    return records


# --------------------------------------------------------------------------- reporting
def machine(device: torch.device) -> dict[str, str]:
    info = Path("/proc/cpuinfo")
    flags = set(re.findall(r"\w+", info.read_text())) if info.is_file() else set()
    return {
        "cpu": cpu_name(),
        "flags": " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + ", ".join(CPU_FLAGS),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        # an ISA cap makes this CPU run what an older one would (e.g. AVX2 only)
        "isa": " ".join(f"{k}={os.environ[k]}" for k in ISA_CAPS if k in os.environ) or "native",
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "threads": str(torch.get_num_threads()),
        "load": f"{os.getloadavg()[0]:.1f}",  # other processes on the machine, at the start
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


HEADER = (
    "| model | size | batch | path | ms/image | × fp32 | × before | first call s "
    "| hole ℓ1 | Δℓ1 | BPE | ΔBPE | max diff /255 |\n"
    "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def row(r: dict[str, Any]) -> str:
    label = r["path"] + (" (auto)" if r["auto"] else "")
    if BENCH_PATHS[r["path"]].compile and not r["compiled"]:
        label += " (compile failed: eager)"
    cells = [r["model"], f"{r['size']}²", str(r["batch"]), label]
    before = f"{r['ratio_before']:.2f}×" if r["ratio_before"] else ""
    cells += [f"{r['ms']:.1f}", f"{r['ratio']:.2f}×", before, f"{r['first_s']:.1f}"]
    if "l1" in r:
        cells += [f"{r['l1']:.3f}", f"{r['l1_rel']:+.2%}", f"{r['bpe']:.3f}", f"{r['bpe_rel']:+.2%}"]
        cells.append(f"{r['max_diff']:.2f}")
    else:
        cells += [""] * 5
    return "| " + " | ".join(cells) + " |"


def goal_lines(records: list[dict[str, Any]]) -> list[str]:
    """The goals, checked on this run's figures (512² batch 1): eager vs `before` (issue 11);
    the auto path ≥ 2× today's eager fp32 without native bf16, ≥ 4× with it; int8 paths ≥ 5×;
    each with held-out hole ℓ1 and BPE within 1 % of fp32's. Speed-ups are given against both
    baselines: `before` and today's eager fp32, which the eager changes made faster."""
    lines = []
    eager = {r["model"]: r["ms"] for r in records if r["path"] == "eager" and r["size"] == 512 and r["batch"] == 1}

    def versus(r: dict[str, Any], goal: float, quality_ok: bool) -> str:
        parts = [f"{r['ratio']:.2f}× today's eager fp32 ({'met' if r['ratio'] >= goal and quality_ok else 'NOT met'})"]
        if r["ratio_before"]:
            met = r["ratio_before"] >= goal and quality_ok
            parts.append(f"{r['ratio_before']:.2f}× the eager model before ({'met' if met else 'NOT met'})")
        quality = f"held-out ℓ1 {r.get('l1_rel', float('nan')):+.2%}, BPE {r.get('bpe_rel', float('nan')):+.2%}"
        return ", ".join(parts) + f"; {quality}" + ("" if quality_ok else " (quality NOT within 1 %)")

    for r in records:
        if r["size"] != 512 or r["batch"] != 1:
            continue
        quality_ok = abs(r.get("l1_rel", 0)) <= 0.01 and abs(r.get("bpe_rel", 0)) <= 0.01
        if r["path"] == "before":
            line = f"- {r['model']}: eager vs the eager model before (goal ≥ 1.25×): "
            line += f"the model itself (fp32) {1 / r['ratio']:.2f}×"
            if r["model"] in eager:
                line += f", the `eager` path (BN folded, channels_last) {r['ms'] / eager[r['model']]:.2f}×"
            lines.append(line)
        if r["auto"]:
            goal = 4.0 if BENCH_PATHS[r["path"]].dtype == torch.bfloat16 else 2.0  # native bf16 or not
            lines.append(f"- {r['model']}: auto path `{r['path']}` (goal ≥ {goal:.0f}×): {versus(r, goal, quality_ok)}")
            if r["prefill_ms"]:
                fp32 = r["ms"] * r["ratio"]
                lines.append(
                    f"  - of which OpenCV's pre-fill, eager on every path: {r['prefill_ms']:.1f} ms; the network "
                    f"alone: {(fp32 - r['prefill_ms']) / (r['ms'] - r['prefill_ms']):.2f}× eager fp32; with this "
                    f"pre-fill no path can pass {fp32 / r['prefill_ms']:.2f}× eager fp32, however fast its network"
                )
        if BENCH_PATHS[r["path"]].int8:
            lines.append(f"- {r['model']}: {r['path']} (goal ≥ 5×): {versus(r, 5.0, quality_ok)}")
    return lines


ORT_UNCAPPED = (
    " The ISA cap limits torch only: ONNX Runtime picks its kernels from CPUID at load and has no"
    " switch to limit them, so its rows here ran this CPU's full ISA."
)


def section(env: dict[str, str], records: list[dict[str, Any]], command: str, photos: int) -> str:
    return "\n".join(
        [
            f"### {env['cpu']} · {env['device']} · ISA {env['isa']}",
            "",
            f"torch {env['torch']}, ONNX Runtime {env['onnxruntime']}, {env['threads']} threads, "
            f"CPU flags: {env['flags']}; load average {env['load']} at the start, {os.getloadavg()[0]:.1f} at the end. "
            f"`{command}`; quality on {photos} held-out photos per size (batch 1)."
            + (ORT_UNCAPPED if env["isa"] != "native" and any(r["path"].startswith("onnx") for r in records) else ""),
            "",
            HEADER,
            *(row(r) for r in records),
            "",
            *goal_lines(records),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["official", "shipped"], default=["official", "shipped"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512], help="square input sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--paths", nargs="+", choices=list(BENCH_PATHS), default=None)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per shape")
    parser.add_argument("--photos", type=int, default=8, help="held-out photos validated per size")
    parser.add_argument("--params", default="params.yaml", help="where the prepared photos are (data.out_dir)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--doc", type=Path, default=None, help="write this machine's table here")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = machine(device)
    progress(f"machine: {env}")
    paths = args.paths or [p for p in BENCH_PATHS if not (BENCH_PATHS[p].int8 and device.type != "cpu")]
    paths = ["fp32"] + [p for p in paths if p != "fp32"]  # the baseline always runs
    params = load_params(args.params)
    data_dir, args.band_width = params.data.out_dir, params.evaluate.band_width
    photos = {}
    for size in args.sizes:
        photos[f"test{size}"] = list(load_photos(data_dir, "test", size, args.photos).values())
        photos[f"train{size}"] = list(load_photos(data_dir, "train", size, 4).values())
    models = {
        "official": lambda: calibrated_official(photos[f"train{args.sizes[0]}"], args.seed),
        "shipped": lambda: DFNet.from_pretrained("pretrained"),
    }
    records = []
    for name in args.models:
        records += bench_model(name, models[name](), paths, args, photos)
    command = " ".join(["python bench/inference.py", *(sys.argv[1:] if argv is None else argv)])
    text = section(env, records, command, args.photos)
    print("\n" + text)
    if args.doc is not None:
        key = re.sub(r"[^a-z0-9]+", "-", f"{env['cpu']} {env['device']} {env['isa']}".lower()).strip("-")
        write_doc(args.doc, f"inference:{key}", text)
        progress(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
