"""Quality evidence for DFNet: its ablations and classical baselines, trained on the same budget.

    python bench/quality.py [--params params.yaml] [--steps 1000] [--batch 16] [--seeds 3]
                            [--lr LR] [--pairs-per-bin N] [--model NAME=DIR ...]
                            [--out docs/results.md] [--threads N]

On the data set named by params.yaml (the embedded default: crops of the photos bundled with
scikit-image / scikit-learn, 64², the `small` preset) this trains, with the same steps, batch,
learning-rate schedule, data order and masks for each:

- `dfnet`      DFNet: fusion blocks on every fused scale, the loss on params.yaml's (p, q)
               (the paper's (6, 3) scaled to the preset's fusion levels: (4, 2) for `small`);
- `dfnet-1blk` DFNet with a single fusion block, P = Q = {finest};
- `hard`       the same U-Net, the known pixels pasted with the binary mask (no learned alpha);
- `unet`       the same U-Net, its last layer's image is the output (no fusion), loss on it;

and evaluates them, OpenCV's Telea and Navier–Stokes (no training) and any `--model` directory
(e.g. the authors' Places2 weights after `dfnet import-official`) with pipelines/evaluate.py on
the fixed test pairs of every hole-ratio bin. It writes `docs/results.md` (the per-bin table in
the layout of the paper's Table 1, mean ± spread over seeds, where the paper's claims hold),
its figures under `docs/results/` and the numbers in `docs/results/quality.json`.

Training is a plain single-process loop around `dfnet.training.train_step`, the step the Ray
Train workers of `pipelines/train.py` run, so the numbers measure the model and loss, not Ray.

Time: the default budget (4 models x 3 seeds x 1000 steps of batch 16) takes about 20 minutes
on an idle 2-core CPU (~0.08 s per step); the report records the time of its own run. Not part
of the test suite (tests/test_quality.py runs the same code on a 3-step budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from dfnet.data import MaskSampler, decode_png_batch, read_split  # noqa: E402
from dfnet.losses import DFNetLoss  # noqa: E402
from dfnet.masks import HOLE_BINS, load_masks  # noqa: E402
from dfnet.metrics import default_band_width  # noqa: E402
from dfnet.model import DFNet, FusionMode, build_model  # noqa: E402
from dfnet.params import Params, load_params  # noqa: E402
from dfnet.training import make_optimizer, to_batch, train_step  # noqa: E402
from pipelines.evaluate import (  # noqa: E402
    METRICS,
    bin_label,
    comparison_grid,
    dfnet_method,
    evaluate,
    evaluation_pairs,
    opencv_method,
)

log = logging.getLogger("dfnet.bench.quality")

LOG_EVERY = 10  # steps between training-curve points
# Lower is better for these metrics; higher for PSNR and SSIM.
LOWER_IS_BETTER = {"l1": True, "bpe": True, "psnr": False, "ssim": False, "fid": True}
METRIC_TITLES = {
    "l1": "ℓ1 (%) ↓",
    "bpe": "BPE (%) ↓",
    "psnr": "PSNR (dB) ↑",
    "ssim": "SSIM ↑",
    "fid": "FID ↓",
}
DECIMALS = {"l1": 2, "bpe": 2, "psnr": 2, "ssim": 3, "fid": 1}
# The paper's Table 1, DFNet on Places2 at 512² (bins [0,10%) ... [40,50%)), for reference.
PAPER_TABLE1 = {
    "l1": (1.40, 3.91, 6.50, 9.89, 11.96),
    "bpe": (0.15, 0.33, 0.55, 0.74, 1.42),
    "fid": (12.27, 34.64, 65.25, 127.58, 136.22),
}


@dataclass(frozen=True)
class Variant:
    """A trained method: the fusion mode after the decoder and the scales the loss sees."""

    name: str
    title: str
    fusion: FusionMode
    single_scale: bool  # one fusion block and P = Q = {finest}; else params.yaml's (p, q)

    def loss_scales(self, params: Params) -> tuple[int, int]:
        return (1, 1) if self.single_scale else (params.loss.p, params.loss.q)


VARIANTS: tuple[Variant, ...] = (
    Variant("dfnet", "DFNet (fusion blocks, multi-scale loss)", "blend", False),
    Variant("dfnet-1blk", "DFNet, one fusion block (P = Q = {1})", "blend", True),
    Variant("hard", "U-Net + hard mask composition", "hard", True),
    Variant("unet", "U-Net, no fusion (last layer → image)", "none", True),
)
BASELINES = {
    "telea": ("OpenCV Telea (no training)", cv2.INPAINT_TELEA),
    "ns": ("OpenCV Navier–Stokes (no training)", cv2.INPAINT_NS),
}


@dataclass(frozen=True)
class Budget:
    """The training budget every variant gets (per seed)."""

    steps: int = 1000
    batch: int = 16
    seeds: int = 3
    lr: float | None = None  # None = params.yaml's train.lr


@dataclass
class Trained:
    """One trained variant for one seed."""

    model: DFNet
    seconds: float
    vgg_provenance: str
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, hole ℓ1 % on the batch)


def build_variant(params: Params, variant: Variant) -> DFNet:
    """The variant's network. Single-scale variants build one fusion block only: with P = Q =
    {finest} the coarser blocks would get no gradient and never touch the output, so dropping
    them trains the same function with less compute and an honest parameter count."""
    overrides: dict[str, Any] = {"fusion": variant.fusion}
    if variant.single_scale:
        overrides["fusion_levels"] = 1
    return build_model(params.model.preset, **overrides)


def ensure_data(params: Params) -> None:
    """Run the prepare and masks stages' functions when their outputs are missing."""
    try:
        read_split(params.data.out_dir, "test")
    except FileNotFoundError:
        from pipelines.prepare import prepare

        log.info("no prepared data in %s: running the prepare stage", params.data.out_dir)
        prepare(params.data)
    if "://" not in params.masks.out and not Path(params.masks.out).is_file():
        from pipelines.make_masks import make_masks

        log.info("no masks at %s: running the masks stage", params.masks.out)
        make_masks(params.masks, params.data.image_size)


def _batches(count: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Indices of training batches: shuffled passes over the data, every crop once per pass."""
    order = rng.permutation(count)
    position = 0
    while True:
        if position + batch > count:
            order, position = rng.permutation(count), 0
        yield order[position : position + batch]
        position += batch


def train_variant(
    params: Params,
    variant: Variant,
    budget: Budget,
    seed: int,
    images: np.ndarray,
    pool: np.ndarray,
) -> Trained:
    """Train one variant from scratch with `train_step` (the Ray Train workers' step).

    The same `seed` gives every variant the same initial encoder/decoder weights, the same
    batches and the same augmented masks, so the variants differ only in what they are.
    Learning-rate schedule: params.yaml's, compressed into the budget (×gamma every
    `lr_decay_epochs` of `epochs` "epochs" of `steps / epochs` steps).
    """
    torch.manual_seed(seed)
    device = torch.device("cpu")
    model = build_variant(params, variant).to(device)
    p, q = variant.loss_scales(params)
    loss_fn = DFNetLoss(dataclasses.replace(params.loss, p=p, q=q))
    train = dataclasses.replace(params.train, lr=budget.lr or params.train.lr)
    optimizer, scheduler = make_optimizer(model, train)
    steps_per_epoch = max(1, budget.steps // max(1, params.train.epochs))
    batch = min(budget.batch, len(images))
    rng = np.random.default_rng(seed)
    sampler = MaskSampler(pool, seed=seed)
    batches = _batches(len(images), batch, rng)
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    start = time.perf_counter()
    for step in range(1, budget.steps + 1):
        image_t, mask_t = to_batch(images[next(batches)], sampler.sample(batch), device)
        result = train_step(model, loss_fn, optimizer, image_t, mask_t)
        with torch.no_grad():  # error inside the hole: comparable across variants
            hole = 1.0 - mask_t
            error = ((result.output.results[0] - image_t).abs() * hole).sum()
            window.append(float(error / (hole.sum() * 3).clamp_min(1)) * 100)
        if step % LOG_EVERY == 0 or step == budget.steps:
            curve.append((step, float(np.mean(window))))
            window = []
        if step % steps_per_epoch == 0:
            scheduler.step()
        if step % 100 == 0 or step == budget.steps:
            log.info(
                "%s seed %d step %d/%d loss %.4f (%.3f s/step)",
                variant.name,
                seed,
                step,
                budget.steps,
                result.losses["total"],
                (time.perf_counter() - start) / step,
            )
    return Trained(model.eval(), time.perf_counter() - start, loss_fn.provenance, curve)


# ------------------------------------------------------------------------------ aggregation
def aggregate(per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{bin: {metric: {"mean", "std", "values"}}} from one {bin: {metric: value}} per seed.

    std is the sample standard deviation over seeds (None with one seed). Metrics that are None
    in any seed (FID without its weights) stay None.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label in per_seed[0]:
        out[label] = {}
        for metric in per_seed[0][label]:
            values = [run[label][metric] for run in per_seed]
            if any(v is None for v in values):
                out[label][metric] = {"mean": None, "std": None, "values": values}
                continue
            array = np.asarray(values, dtype=np.float64)
            std = float(array.std(ddof=1)) if len(array) > 1 else None
            out[label][metric] = {"mean": float(array.mean()), "std": std, "values": values}
    return out


def compare(
    table: dict[str, dict[str, dict[str, dict[str, Any]]]], better: str, worse: str, metric: str
) -> tuple[int, int, int]:
    """How often `better` beats `worse` on `metric`: (bins by the mean, bins in every seed
    (paired by seed; a deterministic method's single value is compared with each seed), bins)."""
    lower = LOWER_IS_BETTER[metric]

    def wins(x: float, y: float) -> bool:
        return x < y if lower else x > y

    by_mean = every_seed = 0
    labels = list(table[better])
    for label in labels:
        a, b = table[better][label][metric], table[worse][label][metric]
        if a["mean"] is None or b["mean"] is None:
            continue
        by_mean += wins(a["mean"], b["mean"])
        va, vb = a["values"], b["values"]
        if len(vb) == 1:
            vb = vb * len(va)
        if len(va) == 1:
            va = va * len(vb)
        every_seed += all(wins(x, y) for x, y in zip(va, vb))
    return by_mean, every_seed, len(labels)


def verdict(by_mean: int, every_seed: int, bins: int, seeds: int) -> str:
    """A plain word for a comparison's outcome."""
    if by_mean == bins and (seeds == 1 or every_seed == bins):
        return "holds"
    if by_mean == bins:
        return "holds on average (not in every seed)"
    if by_mean == 0:
        return "does not hold"
    if by_mean >= math.ceil(bins / 2):
        return "mostly holds"
    return "mostly does not hold"


# ------------------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(table: dict, metrics: list[str], path: Path) -> None:
    """Each metric vs hole ratio, every method, error bars = spread over seeds."""
    plt = _plt()
    labels = [bin_label(b) for b in range(len(HOLE_BINS))]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    axes = np.atleast_1d(axes)
    x = np.arange(len(labels))
    names = list(table)
    for ax, metric in zip(axes, metrics):
        for i, name in enumerate(names):
            means = [table[name][b][metric]["mean"] for b in labels]
            stds = [table[name][b][metric]["std"] or 0.0 for b in labels]
            offset = (i - (len(names) - 1) / 2) * 0.04  # keep the error bars apart
            ax.errorbar(x + offset, means, yerr=stds, marker="o", capsize=3, label=name)
        ax.set_xticks(x, labels, rotation=30)
        ax.set(title=METRIC_TITLES[metric], xlabel="hole ratio")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], path: Path) -> None:
    """Training-batch hole ℓ1 vs step, mean over seeds, per variant."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, runs in curves.items():
        steps = [s for s, _ in runs[0]]
        values = np.mean([[v for _, v in run] for run in runs], axis=0)
        ax.plot(steps, values, label=name)
    ax.set(xlabel="step", ylabel="hole ℓ1 (%) on the training batch")
    ax.set_title("Training: error inside the hole (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alphas(model: DFNet, images: np.ndarray, known: np.ndarray, path: Path) -> None:
    """The paper's Figure 3: mask | masked input | α_k per fused scale (mean over channels,
    finest first) | completion | ground truth, one row per input."""
    plt = _plt()
    image_t, mask_t = to_batch(images, known[:, None].astype(np.float32), torch.device("cpu"))
    with torch.no_grad():
        output = model.eval()(image_t, mask_t)
        completed = image_t * mask_t + output.results[0] * (1 - mask_t)
    n_alpha = len(output.alphas)
    columns = ["mask", "input", *[f"α_{k + 1}" for k in range(n_alpha)], "completion", "truth"]
    rows = len(images)
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.6 * len(columns), 1.7 * rows))
    axes = np.atleast_2d(axes)
    for r in range(rows):
        masked = np.where(known[r, ..., None] == 1, images[r], 128).astype(np.uint8)
        panels: list[tuple[np.ndarray, bool]] = [
            (known[r].astype(np.float32), True),
            (masked, False),
        ]
        for alpha in output.alphas:
            panels.append((alpha[r].mean(0).numpy(), True))
        done = completed[r].clamp(0, 1).permute(1, 2, 0).numpy()
        panels += [(done, False), (images[r], False)]
        for c, (panel, grey) in enumerate(panels):
            ax = axes[r, c]
            if grey:
                shown = ax.imshow(panel, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        axes[r, 0].set_ylabel(bin_label(r) if rows == len(HOLE_BINS) else "", fontsize=8)
    fig.colorbar(
        shown, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="α (1 = generated)"
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------ the run
def run_quality(
    params: Params,
    budget: Budget,
    out_md: str | Path,
    extra_models: dict[str, str] | None = None,
    command: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train every variant for every seed, evaluate everything, write the report.

    `threads` sets torch's intra-op threads for the run (restored afterwards); None keeps
    torch's default. On a CPU shared with other jobs 1 thread can be several times faster than
    2 (threads waiting on each other at every op while the other core is busy).
    Returns the summary that is also written to `<out_md without .md>/quality.json`.
    """
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_quality(params, budget, Path(out_md), extra_models or {}, command)
    finally:
        torch.set_num_threads(saved_threads)


def _run_quality(
    params: Params,
    budget: Budget,
    out_md: Path,
    extra_models: dict[str, str],
    command: str | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    figures = out_md.with_suffix("")  # docs/results.md -> docs/results/
    figures.mkdir(parents=True, exist_ok=True)
    ensure_data(params)

    table = read_split(params.data.out_dir, "train")
    images = decode_png_batch(table.column("image").to_pylist())
    pool = load_masks(params.masks.out)["pool"]
    seeds = [params.train.seed + s for s in range(budget.seeds)]

    per_seed: dict[str, list[dict]] = {v.name: [] for v in VARIANTS}
    curves: dict[str, list] = {v.name: [] for v in VARIANTS}
    seconds: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    param_counts: dict[str, int] = {}
    grid_results: dict[str, Any] = {}
    examples: dict[str, list[np.ndarray]] = {}
    dfnet_first: DFNet | None = None
    vgg_provenance = ""
    train_seconds = eval_seconds = 0.0
    for seed in seeds:
        trained: dict[str, Trained] = {}
        for variant in VARIANTS:
            trained[variant.name] = train_variant(params, variant, budget, seed, images, pool)
            t = trained[variant.name]
            seconds[variant.name].append(t.seconds)
            curves[variant.name].append(t.curve)
            param_counts[variant.name] = t.model.num_parameters()
            vgg_provenance = t.vgg_provenance
            train_seconds += t.seconds
        tick = time.perf_counter()
        results, seed_examples = evaluate(
            params, {name: dfnet_method(t.model) for name, t in trained.items()}
        )
        eval_seconds += time.perf_counter() - tick
        for name in trained:
            per_seed[name].append(results[name])
        if seed == seeds[0]:  # the grid and the alpha maps show the first seed's models
            grid_results, examples = results, seed_examples
            dfnet_first = trained["dfnet"].model

    fixed: dict[str, Any] = {name: opencv_method(flag) for name, (_, flag) in BASELINES.items()}
    for name, directory in extra_models.items():
        fixed[name] = dfnet_method(DFNet.from_pretrained(directory))
    tick = time.perf_counter()
    fixed_results, fixed_examples = evaluate(params, fixed)
    eval_seconds += time.perf_counter() - tick
    fid_status = fixed_results["_fid"]

    summary_table = {name: aggregate(runs) for name, runs in per_seed.items()}
    summary_table |= {name: aggregate([fixed_results[name]]) for name in fixed}

    # Completions grid: pipelines/evaluate.py's own grid, for every method on the same inputs.
    merged_examples = examples | {name: fixed_examples[name] for name in fixed}
    methods = [m for m in grid_results if not m.startswith("_")] + list(fixed)
    comparison_grid(merged_examples, methods).save(figures / "grid.png")

    metrics = list(METRICS) + (["fid"] if fid_status["available"] else [])
    plot_metrics(summary_table, metrics, figures / "metrics.png")
    plot_curves(curves, figures / "training.png")
    pairs = evaluation_pairs(params)
    assert dfnet_first is not None
    # One pair per bin, stepping through the test crops so the rows show different photos.
    picks = {b: b * len(pairs[b][0]) // len(pairs) for b in pairs}
    plot_alphas(
        dfnet_first,
        np.stack([pairs[b][0][i] for b, i in picks.items()]),
        np.stack([pairs[b][1][i] for b, i in picks.items()]),
        figures / "alphas.png",
    )

    summary = {
        "command": command or "python bench/quality.py",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
        },
        "budget": dataclasses.asdict(budget) | {"lr": budget.lr or params.train.lr},
        "seeds": seeds,
        "params": {
            "preset": params.model.preset,
            "image_size": params.data.image_size,
            "source": params.data.source,
            "train_crops": len(images),
            "pairs_per_bin": min(params.evaluate.pairs_per_bin, len(pairs[0][0])),
            "band_width_px": default_band_width(
                params.data.image_size, params.data.image_size, params.evaluate.band_width
            ),
            "band_width_at_256": params.evaluate.band_width,
            "loss": dataclasses.asdict(params.loss),
            "vgg_provenance": vgg_provenance,
            "lr_schedule": {
                "decay_every_steps": max(1, budget.steps // max(1, params.train.epochs))
                * params.train.lr_decay_epochs,
                "gamma": params.train.lr_decay_gamma,
            },
        },
        "fid": fid_status,
        "methods": {
            **{
                v.name: {
                    "title": v.title,
                    "fusion": v.fusion,
                    "pq": list(v.loss_scales(params)),
                    "parameters": param_counts[v.name],
                    "train_seconds": [round(s, 1) for s in seconds[v.name]],
                    "seconds_per_step": round(float(np.mean(seconds[v.name])) / budget.steps, 4),
                }
                for v in VARIANTS
            },
            **{name: {"title": BASELINES[name][0]} for name in BASELINES},
            **{name: {"title": f"model directory `{d}`"} for name, d in extra_models.items()},
        },
        "results": summary_table,
    }
    (figures / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    out_md.write_text(render_report(summary, figures.name))
    log.info("wrote %s and %s/ in %.1f s", out_md, figures, summary["wall_seconds"])
    return summary


# ------------------------------------------------------------------------------ the report
def _cell(entry: dict[str, Any], metric: str, bold: bool) -> str:
    if entry["mean"] is None:
        return "n/a"
    d = DECIMALS[metric]
    text = f"{entry['mean']:.{d}f}"
    if bold:
        text = f"**{text}**"
    if entry["std"] is not None:
        text += f" ± {entry['std']:.{d}f}"
    return text


def results_table(results: dict, metrics: list[str]) -> str:
    """Markdown in the layout of the paper's Table 1: a block of rows per metric, one row per
    hole-ratio bin, one column per method; the best mean of each row in bold."""
    names = list(results)
    labels = [bin_label(b) for b in range(len(HOLE_BINS))]
    lines = ["| hole ratio | " + " | ".join(f"`{n}`" for n in names) + " |"]
    lines.append("|---|" + "---:|" * len(names))
    for metric in metrics:
        lines.append(f"| **{METRIC_TITLES[metric]}** |" + " |" * len(names))
        for label in labels:
            entries = [results[n][label][metric] for n in names]
            means = [e["mean"] for e in entries if e["mean"] is not None]
            best = (min if LOWER_IS_BETTER[metric] else max)(means) if means else None
            cells = [_cell(e, metric, e["mean"] is not None and e["mean"] == best) for e in entries]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims_section(summary: dict[str, Any]) -> str:
    """Where the paper's claims hold on this run, computed from the numbers."""
    results = summary["results"]
    seeds = len(summary["seeds"])
    checks = [
        (
            "DFNet completes better than the classical methods (the paper's Table 1)",
            [("dfnet", base, m) for base in BASELINES for m in ("l1", "bpe", "psnr", "ssim")],
        ),
        (
            "The learned fusion block blends the boundary better than hard composition and than "
            "the plain U-Net output (the paper's fusion-block ablation; BPE measures the boundary)",
            [("dfnet-1blk", other, m) for other in ("hard", "unet") for m in ("bpe", "l1")],
        ),
        (
            "Fusion blocks on several scales with the (p, q) loss beat a single block "
            "(the paper's ablation over the number of blocks and (p, q): (6, 3) is best)",
            [("dfnet", "dfnet-1blk", m) for m in ("l1", "bpe", "psnr", "ssim")],
        ),
    ]
    lines = []
    for claim, comparisons in checks:
        lines += [f"**{claim}.**", ""]
        lines.append("| comparison | metric | better by mean | in every seed | verdict |")
        lines.append("|---|---|---:|---:|---|")
        words = []
        for better, worse, metric in comparisons:
            by_mean, every, bins = compare(results, better, worse, metric)
            every_text = f"{every}/{bins}" if seeds > 1 else "— (1 seed)"
            words.append(verdict(by_mean, every, bins, seeds))
            lines.append(
                f"| `{better}` vs `{worse}` | {METRIC_TITLES[metric]} | {by_mean}/{bins} bins | "
                f"{every_text} | {words[-1]} |"
            )
        held, failed = words.count("holds"), words.count("does not hold")
        lines += [
            "",
            f"In short: holds in {held} of {len(words)} comparisons, fails outright (no bin) in "
            f"{failed}, partly holds in {len(words) - held - failed}.",
            "",
        ]
    # Errors should grow with the hole: a sanity check of the data and metrics, not a claim.
    labels = [bin_label(b) for b in range(len(HOLE_BINS))]
    monotone = [
        name
        for name, per_bin in results.items()
        if all(
            per_bin[a]["l1"]["mean"] < per_bin[b]["l1"]["mean"] for a, b in zip(labels, labels[1:])
        )
    ]
    lines.append(
        f"Sanity check: ℓ1 grows with the hole ratio in every bin for {len(monotone)} of "
        f"{len(results)} methods ({', '.join(f'`{n}`' for n in monotone) or 'none'})."
    )
    return "\n".join(lines)


def render_report(summary: dict[str, Any], figures: str) -> str:
    """docs/results.md from the summary (everything in it is measured by the run)."""
    p, b, m = summary["params"], summary["budget"], summary["machine"]
    methods, results = summary["methods"], summary["results"]
    seeds = summary["seeds"]
    fid = summary["fid"]
    metrics = list(METRICS) + (["fid"] if fid["available"] else [])
    spread = (
        f"mean ± sample standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
        if len(seeds) > 1
        else f"one seed ({seeds[0]}): no spread could be measured"
    )
    loss = p["loss"]
    provenance = p["vgg_provenance"]
    if provenance.startswith("imagenet"):
        texture = f"on, ImageNet VGG16 ({provenance.split(':', 1)[1]})"
    elif provenance.startswith("random"):
        texture = "on, but with a **randomly initialised** VGG16 (a weak proxy): " + provenance
    else:
        texture = (
            f"**off** (`loss.texture_fallback: {loss['texture_fallback']}` and no ImageNet "
            "VGG16 weights found; TV is still on)"
        )
    method_rows = []
    for name, info in methods.items():
        if "fusion" in info:
            method_rows.append(
                f"| `{name}` | {info['title']} | {info['fusion']} | {tuple(info['pq'])} | "
                f"{info['parameters']:,} | {info['seconds_per_step']:.3f} |"
            )
        else:
            method_rows.append(f"| `{name}` | {info['title']} | — | — | — | — |")
    ours = results.get("dfnet", {})
    labels = [bin_label(i) for i in range(len(HOLE_BINS))]
    paper_rows = [
        f"| {label} | {PAPER_TABLE1['l1'][i]:.2f} | {PAPER_TABLE1['bpe'][i]:.2f} | "
        f"{PAPER_TABLE1['fid'][i]:.2f} | {ours[label]['l1']['mean']:.2f} | "
        f"{ours[label]['bpe']['mean']:.2f} |"
        for i, label in enumerate(labels)
    ]
    minutes = summary["wall_seconds"] / 60
    fid_text = (
        f"computed ({fid['reason']}); with this few images per bin it is very noisy"
        if fid["available"]
        else f"not available here — {fid['reason']}"
    )
    vgg_on = provenance.startswith("imagenet")
    texture_short = "the ImageNet VGG texture terms" if vgg_on else "no VGG texture terms"
    data_short = (
        "crops of a dozen bundled photos" if p["source"] == "sample" else f"`{p['source']}`"
    )
    return f"""# Quality evidence: DFNet, its ablations and classical baselines

*Generated by `bench/quality.py`; do not edit by hand. Numbers: `{figures}/quality.json`.*

- **Command:** `{summary['command']}` (from the repository root)
- **Wall time:** {minutes:.1f} min ({summary['train_seconds']:.0f} s training,
  {summary['eval_seconds']:.0f} s evaluation) on {m['cpus']} CPU cores ({m['torch_threads']}
  torch threads, torch {m['torch']}, {m['platform']}); load average {m['load_average_start']} at
  the start and {m['load_average_end']} at the end (above {m['cpus']} means the machine was shared
  and the times are inflated).

## Set-up

- **Data:** `data.source = {p['source']}` at {p['image_size']}², {p['train_crops']} training
  crops; evaluation on the fixed test pairs of `pipelines/evaluate.py` (test crops come from
  photos training never saw), {p['pairs_per_bin']} (image, mask) pairs per hole-ratio bin, the
  same pairs for every method. Completions are 8-bit images with the known pixels pasted back.
- **Model:** the `{p['preset']}` preset for every trained method.
- **Training budget (each method, each seed):** {b['steps']} steps of batch {b['batch']}, Adam at
  lr {b['lr']:g} ×{p['lr_schedule']['gamma']:g} every {p['lr_schedule']['decay_every_steps']}
  steps (params.yaml's schedule compressed into the budget). A plain single-process loop around
  `dfnet.training.train_step`, the same step the Ray Train workers of `pipelines/train.py` run.
  For one seed every method starts from the same encoder/decoder weights and sees the same
  batches and the same augmented masks, so differences come from the method, not the draw.
- **Loss:** params.yaml's `loss` section: λ_l1 = {loss['l1']:g}, λ_p = {loss['perceptual']:g},
  λ_s = {loss['style']:g}, λ_tv = {loss['tv']:g}. Perceptual and style terms: {texture}. Without
  torchvision's ImageNet VGG16 weights (they cannot be downloaded on an offline machine) only the
  structure ℓ1 and the TV term train the networks, and texture is not what the paper's loss
  would give.
- **Spread:** {spread}. OpenCV methods are deterministic (one run).
- **Metrics:** ℓ1 and BPE in percent of the [0, 1] range; BPE band {p['band_width_px']} px at
  {p['image_size']}² ({p['band_width_at_256']} px at 256², scaled); PSNR in dB; SSIM. FID:
  {fid_text}.

| method | what | fusion | (p, q) | parameters | s / training step |
|---|---|---|---|---:|---:|
{chr(10).join(method_rows)}

Single-scale methods (`dfnet-1blk`, `hard`, `unet`) build one fusion block: with P = Q = {{1}}
the coarser blocks would receive no gradient and never touch the output, so leaving them out
trains the same function. `hard` and `unet` produce the same kind of completion at test time
(raw output inside the hole, known pixels pasted back); they differ in training: `hard`'s loss
sees only the hole, `unet`'s loss also asks it to reproduce the known pixels.

## Results per hole-ratio bin

{spread[0].upper() + spread[1:]}; bold = best mean in the row.

{results_table(results, metrics)}

![each metric vs hole ratio]({figures}/metrics.png)

*Each metric vs hole ratio (error bars: spread over seeds).*

![completions of every method]({figures}/grid.png)

*The same inputs for every method (first seed's models): one row per hole-ratio bin; grey =
hole.*

![alpha maps]({figures}/alphas.png)

*Learned alpha maps of `dfnet` (the paper's Figure 3): α_k averaged over its three channels,
α_1 the finest; white = the generated content C_k is used, black = the known pixels I_k. Inside
the hole I_k is zero, so α must be near 1 there; near the boundary α sets how the two mix.*

![training curves]({figures}/training.png)

*Error inside the hole on the training batches (mean over seeds).*

## Where the paper's claims hold here

Counted over the {len(labels)} hole-ratio bins; "in every seed" compares each seed's models
(paired by seed). A claim "holds" only when it holds in every bin (and every seed).

{claims_section(summary)}

Read these with the scale of the experiment in mind: {p['train_crops']} training crops
({data_short}) at {p['image_size']}², {b['steps']} steps, a `{p['preset']}` network and
{texture_short}, against the paper's 1.8 M Places2 photos at 512², 20 epochs and the full
loss. At this budget small differences between trained methods can change sign from seed to
seed (the "in every seed" column says where they did not); texture quality and FID need the VGG
terms and the FID weights (see Set-up) and are only as tested as those were.

## The paper's Table 1 for reference

DFNet on Places2 at 512² (the paper's Table 1) next to `dfnet` here:

| hole ratio | paper ℓ1 (%) | paper BPE | paper FID | here ℓ1 (%) | here BPE (%) |
|---|---:|---:|---:|---:|---:|
{chr(10).join(paper_rows)}

Not comparable number for number: different data (Places2 scenes vs {data_short}),
resolution (512² vs {p['image_size']}²), network (`official` vs `{p['preset']}`), training
(20 epochs on 8 GPUs vs {b['steps']} steps here) and loss (the paper's VGG terms vs
{texture_short} here).
BPE: ours is the mean absolute error over the band ×100; the paper's BPE values are *smaller*
than its ℓ1 values, which a mean over the hole boundary cannot be, so its normalisation
(unpublished) differs — compare our BPE between methods only.

## Reproducing Table 1 on Places2

With the authors' released weights (CC BY-NC 4.0, not part of this project):

```bash
dfnet import-official model_places2.pth models/places2   # checks names/shapes, BGR -> RGB
python bench/quality.py --model places2=models/places2   # adds it as a method to this report
```

On the embedded 64² data the imported model runs on reflect-padded 256² inputs, which says
little about Places2. For the paper's setting, change `params.yaml`:

- `data.source`: a folder or `s3://` prefix with the Places2 images (prepare takes one centred
  crop per photo), `data.image_size: 512`; to evaluate only, `data.test_fraction: 1.0` and
  `data.val_fraction: 0.0` put every photo in the test split;
- `masks.eval_per_bin`: a few hundred; `evaluate.pairs_per_bin`: a few thousand (FID needs
  thousands of images per set), `evaluate.band_width` as you define BPE;
- `model.preset: official`; `loss.p: 6`, `loss.q: 3`, `loss.vgg_weights:` the path of
  torchvision's `vgg16-397923af.pth`, `loss.texture_fallback: error` (never train without them);
- `train`: `epochs: 20`, `steps_per_epoch:` training images / (6 × workers), `batch_size: 6`,
  `num_workers: 8`, `use_gpu: true`, `lr: 0.0002` (the release; the paper quotes 2e-3),
  `lr_decay_epochs: 5`; `train.out_dir: models/places2` to evaluate the imported weights;
- FID: `pip install -e '.[fid]'` (a torchvision matching your torch) and pytorch-fid's
  `pt_inception-2015-12-05-*.pth` in the torch hub cache's `checkpoints/`.

Then `dvc repro` (or `python -m pipelines.prepare`, `python -m pipelines.make_masks`,
`python -m pipelines.evaluate` for the imported weights only). Hardware: training took the
authors about 3 days on 8 RTX 2080 Ti (batch 6 per GPU, 512²); evaluating the released model
needs one GPU (on 2 CPU cores a 512² image takes ~0.4 s in fp32, ~0.13 s compiled in bf16).

## Reproducing this report

`python bench/quality.py` (defaults: {Budget().steps} steps, batch {Budget().batch},
{Budget().seeds} seeds, lr from params.yaml) regenerates this file and `{figures}/` from
scratch — it runs the prepare and masks stages itself when `data/` is missing — in about 20
minutes on an idle 2-core CPU (about 0.08 s per training step for the `small` preset at 64²).
On a machine shared with other jobs add `--threads 1`: two torch threads that wait on each other
at every op while the other core is busy can be several times slower than one. It is not part
of the test suite; `tests/test_quality.py` runs the same code on a 3-step budget.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=Budget.steps, help="training steps")
    parser.add_argument("--batch", type=int, default=Budget.batch, help="training batch size")
    parser.add_argument("--seeds", type=int, default=Budget.seeds, help="seeds per method")
    parser.add_argument("--lr", type=float, default=None, help="default: params.yaml train.lr")
    parser.add_argument(
        "--pairs-per-bin", type=int, default=None, help="default: params.yaml evaluate"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also evaluate this model directory (e.g. imported official weights); repeatable",
    )
    parser.add_argument("--out", default="docs/results.md", help="figures go beside it")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own choice)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seeds < 1:
        parser.error("--steps, --batch and --seeds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    raw_argv = sys.argv[1:] if argv is None else argv
    args = parse_args(raw_argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    overrides = {}
    if args.pairs_per_bin is not None:
        overrides["evaluate"] = {"pairs_per_bin": args.pairs_per_bin}
    params = load_params(args.params, overrides)
    extra = {}
    for item in args.model:
        name, sep, directory = item.partition("=")
        if not sep or not name or name in {v.name for v in VARIANTS} | set(BASELINES):
            raise SystemExit(f"--model expects a new NAME=DIR, got {item!r}")
        extra[name] = directory
    budget = Budget(steps=args.steps, batch=args.batch, seeds=args.seeds, lr=args.lr)
    command = shlex.join(["python", "bench/quality.py", *raw_argv])
    run_quality(params, budget, args.out, extra_models=extra, command=command, threads=args.threads)


if __name__ == "__main__":
    main()
