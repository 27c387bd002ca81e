"""Quality evidence for DFNet: its ablations and classical baselines, trained on equal budgets.

    python bench/quality.py [--params params.yaml] [--recipe R] [--seeds N] [--model NAME=DIR ...] [--out FILE]

Each variant changes one thing from `dfnet` (one fusion block, hard composition, plain U-Net) and
is trained per seed by the project's one loop; the variants, OpenCV and any `--model` are scored
by the evaluate stage's scoring. `--out` gets mean ± spread over seeds and where the paper's
claims hold; the folder beside it the figures and `quality.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cpu_name, plot_alphas, prepared_data  # bench/'s shared helpers

from dfnet.evaluation import (
    LOWER_IS_BETTER,
    METRICS,
    Heldout,
    Method,
    baseline_methods,
    better,
    comparison_grid,
    dfnet_method,
    evaluate_heldout,
)
from dfnet.losses import DFNetLoss
from dfnet.model import DFNet
from dfnet.params import FusionMode, Params, load_params
from dfnet.storage import count_rows
from dfnet.training import train

log = logging.getLogger("dfnet.bench.quality")

TITLES = {"l1": "ℓ1 (%) ↓", "bpe": "BPE (%) ↓", "psnr": "PSNR (dB) ↑", "ssim": "SSIM ↑"}
DECIMALS = {"l1": 2, "bpe": 2, "psnr": 2, "ssim": 3}
#: The paper's Table 1, DFNet on Places2 at 512²: {bin: (ℓ1 %, BPE)}, for reference only.
PAPER_TABLE1 = {"0-10%": (1.40, 0.15), "10-20%": (3.91, 0.33), "20-30%": (6.50, 0.55), "30-40%": (9.89, 0.74),
                "40-50%": (11.96, 1.42)}  # fmt: skip
#: {method: {size: {bin: {metric: {"mean", "std", "values"}}}}}
Table = dict[str, dict[str, dict[str, dict[str, dict[str, Any]]]]]


@dataclass(frozen=True)
class Variant:
    """A trained method: what it changes in params.yaml's model and loss."""

    name: str
    title: str
    fusion: FusionMode
    one_block: bool  # a single fusion block and P = Q = {finest}

    def params(self, base: Params, seed: int) -> Params:
        """`base` with this variant's network and loss scales, trained from scratch from `seed`
        with the paper's zero-filled holes (the claims are the paper's; the shipped model's
        pre-fill is measured against its own baseline by bench/heldout.py)."""
        levels = 1 if self.one_block else base.model.fusion_levels
        loss = replace(base.loss, p=1, q=1) if self.one_block else base.loss
        model = replace(base.model, fusion=self.fusion, fusion_levels=levels, prefill="none")
        return replace(base, model=model, loss=loss, train=replace(base.train, seed=seed, init_from=None))


VARIANTS = (
    Variant("dfnet", "DFNet: learned fusion blocks, multi-scale loss", "blend", False),
    Variant("dfnet-1blk", "DFNet with one fusion block, P = Q = {1}", "blend", True),
    Variant("hard", "known pixels pasted with the binary mask (no α)", "hard", False),
    Variant("unet", "U-Net: the decoder's image is the output", "none", False),
)
BASELINES = {"telea": "OpenCV Telea, radius 3 (no training)", "ns": "OpenCV Navier–Stokes, radius 3 (no training)"}
#: (claim, winner, loser): the paper's claims, checked on BPE (the boundary) and ℓ1.
CLAIMS = (
    ("the learned fusion blends better than hard composition", "dfnet", "hard"),
    ("the learned fusion beats the plain U-Net output", "dfnet", "unet"),
    ("fusion on several scales with the (p, q) loss beats one block", "dfnet", "dfnet-1blk"),
    ("even one learned fusion block beats hard composition", "dfnet-1blk", "hard"),
    ("DFNet beats OpenCV Telea", "dfnet", "telea"),
    ("DFNet beats OpenCV Navier–Stokes", "dfnet", "ns"),
)


# ------------------------------------------------------------------------------ statistics
def aggregate(runs: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    """{size: {bin: {metric: {"mean", "std", "values"}}}} from one {size: {bin: {metric}}} per
    seed; std is the sample standard deviation over seeds (None for a single run)."""

    def stats(values: list[float]) -> dict[str, Any]:
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        return {"mean": float(np.mean(values)), "std": std, "values": values}

    return {
        size: {label: {m: stats([run[size][label][m] for run in runs]) for m in METRICS} for label in bins}
        for size, bins in runs[0].items()
    }


def compare(results: Table, winner: str, loser: str, metric: str) -> tuple[int, int, int]:
    """(cells where `winner` beats `loser` on `metric` by the mean, cells where it does in every
    seed, cells) over every (size, bin). A deterministic method's one value meets every seed."""
    by_mean = every_seed = cells = 0
    for size, bins in results[winner].items():
        for label, entry in bins.items():
            a, b = entry[metric], results[loser][size][label][metric]
            cells += 1
            by_mean += better(metric, a["mean"], b["mean"])
            every_seed += all(better(metric, x, y) for x, y in _paired(a["values"], b["values"]))
    return by_mean, every_seed, cells


def _paired(a: list[float], b: list[float]) -> list[tuple[float, float]]:
    """Seed-paired values, or every combination when one side is a single deterministic run."""
    return list(zip(a, b)) if len(a) == len(b) else [(x, y) for x in a for y in b]


def verdict(by_mean: int, every_seed: int, cells: int, seeds: int) -> str:
    """A plain word for a comparison's outcome."""
    if by_mean == cells:
        return "holds" if seeds == 1 or every_seed == cells else "holds on average (not in every seed)"
    if by_mean == 0:
        return "does not hold"
    return "mostly holds" if by_mean >= math.ceil(cells / 2) else "mostly does not hold"


# ------------------------------------------------------------------------------ the run
def train_variant(variant: Variant, params: Params, seed: int, device: str) -> tuple[DFNet, dict[str, Any]]:
    """`variant` trained from `seed` by the project's training loop, and what the report says of it."""
    tick, vparams = time.perf_counter(), variant.params(params, seed)
    state = train(vparams, device)
    model = DFNet.from_params(vparams.model).to(device)
    model.load_state_dict(state["model"])
    info = {
        "title": variant.title, "fusion": variant.fusion, "fusion_blocks": len(model.fusion), "steps": state["step"],
        "pq": [vparams.loss.p, vparams.loss.q], "parameters": model.num_parameters(),
        "seconds": round(time.perf_counter() - tick, 1),
    }  # fmt: skip
    log.info("%s seed %d: %d steps in %.0f s", variant.name, seed, state["step"], info["seconds"])
    return model.eval(), info


def run_quality(
    params: Params, seeds: int, out_md: Path, extra_models: dict[str, str], command: str, device: str = "cpu"
) -> dict[str, Any]:
    """Train every variant for every seed, score everything, write the report; returns what is
    also written to `quality.json` beside it."""
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    figures = out_md.with_suffix("")  # docs/results.md -> docs/results/
    figures.mkdir(parents=True, exist_ok=True)
    seed_list = [params.train.seed + i for i in range(seeds)]
    with tempfile.TemporaryDirectory(prefix="dfnet-quality-") as scratch:
        params = prepared_data(params, Path(scratch))
        fixed: dict[str, Method] = dict(baseline_methods(radii=(3,))) | {
            name: dfnet_method(DFNet.from_pretrained(d, map_location=device)) for name, d in extra_models.items()
        }
        heldouts: list[Heldout] = []
        infos: list[dict[str, dict[str, Any]]] = []
        eval_seconds = 0.0
        for seed in seed_list:
            trained = {v.name: train_variant(v, params, seed, device) for v in VARIANTS}
            first = not heldouts  # the first seed's models also meet the fixed methods and draw the figures
            methods = {name: dfnet_method(model) for name, (model, _) in trained.items()} | (fixed if first else {})
            tick = time.perf_counter()
            rows = params.evaluate.grid_rows if first else 0
            heldouts.append(evaluate_heldout(params, methods, rows, every_bin=True))
            eval_seconds += time.perf_counter() - tick
            infos.append({name: info for name, (_, info) in trained.items()})
            if first:
                alpha_model = trained["dfnet"][0]
        photos = {f"{split}_photos": count_rows(params.data.out_dir, split) for split in ("train", "val")}

    results: Table = {v.name: aggregate([h.results[v.name] for h in heldouts]) for v in VARIANTS}
    results |= {name: aggregate([heldouts[0].results[name]]) for name in fixed}
    smallest = min(e.pair.short_side for e in heldouts[0].examples)  # the figures show one size
    examples = [e for e in heldouts[0].examples if e.pair.short_side == smallest]
    comparison_grid(examples, list(results), height=128).save(figures / "grid.png")
    plot_alphas(alpha_model, [e.pair for e in examples], figures / "alphas.png")
    train_seconds = {v.name: [info[v.name]["seconds"] for info in infos] for v in VARIANTS}
    summary = {
        "command": command,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "train_seconds": round(sum(map(sum, train_seconds.values())), 1),
        "eval_seconds": round(eval_seconds, 1),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": device,
            "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        },  # fmt: skip
        "seeds": seed_list,
        "data": asdict(params.data) | photos | {"test_photos": heldouts[0].photos},
        "train": asdict(params.train),
        "loss": asdict(params.loss) | {"vgg": DFNetLoss(params.loss).provenance},
        "band_width_at_256": params.evaluate.band_width,
        "methods": infos[0]
        | {n: {"title": BASELINES.get(n, f"model directory `{extra_models.get(n)}`")} for n in fixed},  # fmt: skip
        "train_seconds_per_method": train_seconds,
        "results": results,
    }
    (figures / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    out_md.write_text(render_report(summary, figures.name))
    log.info("wrote %s and %s/ in %.0f s", out_md, figures, summary["wall_seconds"])
    return summary


# ------------------------------------------------------------------------------ the report
def cell(entry: dict[str, Any], metric: str, bold: bool = False) -> str:
    """A table cell: the mean (bold when best) ± the spread over seeds, if there is one."""
    text = f"{entry['mean']:.{DECIMALS[metric]}f}"
    text = f"**{text}**" if bold else text
    return text if entry["std"] is None else f"{text} ± {entry['std']:.{DECIMALS[metric]}f}"


def method_row(name: str, info: dict[str, Any], seconds: list[float] | None) -> str:
    """A row of the methods table; untrained methods have only a title."""
    if seconds is None:
        return f"| `{name}` | {info['title']} | — | — | — | — | — | — |"
    return (f"| `{name}` | {info['title']} | {info['fusion']} | {info['fusion_blocks']} | {tuple(info['pq'])} | "
            f"{info['parameters']:,} | {info['steps']} | {np.mean(seconds):.0f} |")  # fmt: skip


def results_table(results: Table, size: str) -> str:
    """The paper's Table 1 layout for one size: a block per metric, a row per hole-ratio bin, a
    column per method; the best mean of each row in bold."""
    names = list(results)
    lines = ["| hole ratio | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for metric in METRICS:
        lines.append(f"| **{TITLES[metric]}** |" + " |" * len(names))
        for label in results["dfnet"][size]:
            entries = [results[n][size][label][metric] for n in names]
            best = (min if metric in LOWER_IS_BETTER else max)(e["mean"] for e in entries)
            lines.append(f"| {label} | " + " | ".join(cell(e, metric, e["mean"] == best) for e in entries) + " |")
    return "\n".join(lines)


def claims_section(results: Table, seeds: int) -> str:
    """Where the paper's claims hold in this run, computed from the numbers."""
    lines = [
        "| claim | comparison | metric | better by mean | in every seed | verdict |",
        "|---|---|---|---:|---:|---|",
    ]
    for claim, winner, loser in CLAIMS:
        for metric in ("bpe", "l1"):
            by_mean, every, cells = compare(results, winner, loser, metric)
            every_text = f"{every}/{cells}" if seeds > 1 else "— (1 seed)"
            lines.append(f"| {claim} | `{winner}` vs `{loser}` | {TITLES[metric]} | {by_mean}/{cells} | "
                         f"{every_text} | {verdict(by_mean, every, cells, seeds)} |")  # fmt: skip
    return "\n".join(lines)


def render_report(s: dict[str, Any], figures: str) -> str:
    """The markdown report; everything in it comes from the run's summary `s`."""
    d, t, m, loss, results, seeds = s["data"], s["train"], s["machine"], s["loss"], s["results"], s["seeds"]
    sizes, ref = list(results["dfnet"]), max(results["dfnet"], key=int)
    spread = (f"mean ± sample standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
              if len(seeds) > 1 else f"one seed ({seeds[0]}): no spread measured")  # fmt: skip
    vgg_on = loss["vgg"].startswith("imagenet")
    texture = f"on ({loss['vgg']})" if vgg_on else f"**{loss['vgg']}**"
    rows = "\n".join(method_row(n, info, s["train_seconds_per_method"].get(n)) for n, info in s["methods"].items())
    tables = "\n\n".join(f"### {size} px short side ({d['test_photos'][size]} test photos)\n\n"
                         + results_table(results, size) for size in sizes)  # fmt: skip
    paper = "\n".join(f"| {b} | {PAPER_TABLE1[b][0]:.2f} | {PAPER_TABLE1[b][1]:.2f} | {cell(e['l1'], 'l1')} | "
                      f"{cell(e['bpe'], 'bpe')} |" for b, e in results["dfnet"][ref].items())  # fmt: skip
    return f"""# Quality evidence: DFNet, its ablations and classical baselines

*Generated by `bench/quality.py`; do not edit by hand. Numbers: `{figures}/quality.json`.*

- **Command:** `{s["command"]}` (from the repository root), **wall time** {s["wall_seconds"] / 60:.1f} min
  ({s["train_seconds"]:.0f} s training, {s["eval_seconds"]:.0f} s scoring).
- **Machine:** {m["cpu"]}, {m["cores"]} cores, {m["torch_threads"]} torch threads, torch {m["torch"]}, device
  `{m["device"]}`; load average {m["load_average"][0]} at the start, {m["load_average"][1]} at the end (above the
  core count the machine was shared and the times are inflated).

## Set-up

- **Data:** `data.source = {d["source"]}`, {d["train_photos"]} training and {d["val_photos"]} validation photos
  stored at a {d["store_short_side"]} px short side; training draws fresh {d["image_size"]}² crops every epoch.
  Scoring completes whole held-out test photos scaled to a {", ".join(sizes)} px short side, with one fixed mask
  per hole-ratio bin: the same photos and masks for every method.
- **Training, each method and seed:** `dfnet.training.train`, {t["epochs"]} epoch(s) × {t["crops_per_photo"]} crops
  of every training photo, batch {t["batch_size"]}, Adam at lr {t["lr"]:g} ×{t["lr_decay_gamma"]:g} every
  {t["lr_decay_epochs"]} epochs. One seed gives every method the same encoder/decoder start, crops and masks.
- **Loss:** λ_l1 = {loss["l1"]:g}, λ_p = {loss["perceptual"]:g}, λ_s = {loss["style"]:g}, λ_tv = {loss["tv"]:g};
  perceptual and style terms {texture}.
- **Metrics:** ℓ1 and BPE in percent of the 8-bit range (BPE band {s["band_width_at_256"]} px at a 256 px short
  side, scaled with the photo), PSNR in dB, SSIM, on 8-bit completions with the known pixels kept.

| method | what | fusion | fusion blocks | (p, q) | parameters | steps | training s |
|---|---|---|---:|---|---:|---:|---:|
{rows}

Each ablation changes one thing from `dfnet`. `hard` and `unet` complete alike at test time (their image in
the hole, the known pixels pasted back); in training `unet`'s loss also asks it to reproduce the known pixels.

## Results

{spread[0].upper() + spread[1:]} (OpenCV methods are deterministic: one run); bold = best mean in the row.

{tables}

![completions of every method]({figures}/grid.png)

*Every method on the same whole test photos at a {min(sizes, key=int)} px short side (first seed's models; grey =
hole).*

![alpha maps]({figures}/alphas.png)

*Alpha maps of `dfnet` (first seed; the paper's Figure 3) beside each photo's mask (black = hole): α_k averaged
over its channels, α_1 the finest; white = generated content, black = known pixels. In the hole α must be near
1; at its boundary α sets how the two mix.*

## Where the paper's claims hold here

Counted over every (size, bin) cell; "in every seed" pairs each seed's models; "holds" = in every cell (and seed).
Mind the scale: {d["train_photos"]} training photos, {t["epochs"]} epoch(s) of {d["image_size"]}² crops, perceptual
and style terms {"on" if vgg_on else "off"}, against the paper's 1.8 M Places2 photos, 512² crops, 20 epochs and the
full loss; differences within the spread can change sign with the seed.

{claims_section(results, len(seeds))}

## The paper's Table 1 for reference

| hole ratio | paper ℓ1 (%) | paper BPE | `dfnet` here ℓ1 (%), {ref} px | BPE (%) |
|---|---:|---:|---:|---:|
{paper}

Other data, network, training and loss: not comparable number for number. The paper's BPE lies below its ℓ1,
which a mean error over the hole boundary cannot: its normalisation differs; compare our BPE between methods.

## Reproducing

The command above; `--model places2=models/places2` adds the authors' Places2 weights (CC BY-NC 4.0) after
`dfnet import-official model_places2.pth models/places2`. The paper's setting (Places2, `model.preset: official`,
`loss.p: 6`, `loss.q: 3`, ImageNet VGG16 weights, about 3 days on 8 GPUs): the README's "Scaling up".
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--recipe", help="an overlay on --params, e.g. recipes/pretrained.yaml")
    parser.add_argument("--epochs", type=int, help="training epochs per method and seed (default: params.yaml)")
    parser.add_argument("--crops-per-photo", type=int, help="crops of every photo per epoch (default: params.yaml)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per trained method")
    parser.add_argument("--max-photos", type=int, help="test photos per size (default: evaluate.max_photos)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="also score this model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="docs/results.md", help="figures and quality.json go beside it")
    args = parser.parse_args(argv)
    if min(args.seeds, args.epochs or 1, args.crops_per_photo or 1) < 1:
        parser.error("--seeds, --epochs and --crops-per-photo must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line; returns the run's summary."""
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = {"train": {"epochs": args.epochs, "crops_per_photo": args.crops_per_photo},
             "evaluate": {"max_photos": args.max_photos}}  # fmt: skip
    overrides = {s: {k: v for k, v in f.items() if v is not None} for s, f in flags.items()}
    params = load_params(args.params, overrides, recipe=args.recipe)
    extra = dict(item.split("=", 1) for item in args.model if "=" in item)
    if len(extra) != len(args.model) or set(extra) & ({v.name for v in VARIANTS} | set(BASELINES)):
        raise SystemExit(f"--model expects new NAME=DIR pairs, got {args.model}")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or saved_threads)
    try:
        command = shlex.join(["python", "bench/quality.py", *raw])
        return run_quality(params, args.seeds, Path(args.out), extra, command, args.device)
    finally:
        torch.set_num_threads(saved_threads)


if __name__ == "__main__":
    main()
