"""The pipeline's reports: what the train and evaluate stages write for `dvc metrics` and
`dvc plots` (JSON, CSV, PNG) and the markdown tables the evaluate stage prints.

Plain Python and matplotlib (Agg): no Ray, no MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dfnet.evaluation import METRICS, PSNR_CAP_DB, Example, Heldout, Results, bin_label, comparison_grid, overall_mean
from dfnet.masks import HOLE_BINS
from dfnet.params import Params

__all__ = ["markdown_tables", "settings_of", "summary", "write_evaluation_report", "write_training_report"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_training_report(history: list[dict[str, Any]], out_dir: Path, elapsed_s: float) -> dict[str, Any]:
    """metrics/train.json (for `dvc metrics`), train_history.csv (for `dvc plots`) and a PNG curve."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [h for h in history if "loss_total" in h]
    vals = [h for h in history if "val_l1" in h]
    with open(out_dir / "train_history.csv", "w") as f:
        f.write("step,loss_total,loss_structure,loss_texture,images_per_s,data_wait\n")
        for h in steps:
            texture = h["loss_perceptual"] + h["loss_style"] + h["loss_tv"]
            f.write(
                f"{h['step']},{h['loss_total']:.6f},{h['loss_structure']:.6f},{texture:.6f},{h['images_per_s']:.2f},"
                f"{h['data_wait']:.4f}\n"
            )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([h["step"] for h in steps], [h["loss_total"] for h in steps], label="total")
    ax1.plot([h["step"] for h in steps], [h["loss_structure"] for h in steps], label="structure")
    ax1.set(xlabel="step", ylabel="training loss", yscale="log", title="Training loss")
    ax1.legend()
    ax2.plot([h["step"] for h in vals], [h["val_l1"] for h in vals], "o-", label="val ℓ1 (%)")
    ax2.plot([h["step"] for h in vals], [h["val_bpe"] for h in vals], "s-", label="val BPE (%)")
    ax2.set(xlabel="step", title="Validation")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "train_curve.png", dpi=110)
    plt.close(fig)
    summary = {
        "steps": steps[-1]["step"] if steps else 0,
        "first_loss": steps[0]["loss_total"] if steps else None,
        "final_loss": steps[-1]["loss_total"] if steps else None,
        "final_val_l1": vals[-1]["val_l1"] if vals else None,
        "final_val_bpe": vals[-1]["val_bpe"] if vals else None,
        "median_images_per_s": float(np.median([h["images_per_s"] for h in steps])) if steps else None,
        # The share of training time spent waiting for batches (mean over the log intervals, each
        # epoch's start-up included): near 0 when the data keeps up.
        "mean_data_wait": float(np.mean([h["data_wait"] for h in steps])) if steps else None,
        "elapsed_s": round(elapsed_s, 1),
    }
    (out_dir / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summary(results: Results, settings: dict[str, Any]) -> dict[str, Any]:
    """eval.json: the results with each method's overall mean, and the settings that made them."""
    return {
        **{name: {**per_size, "mean": overall_mean(per_size)} for name, per_size in results.items()},
        "settings": settings,
    }


def _sizes(results: Results) -> list[str]:
    return list(next(iter(results.values())))


def markdown_tables(results: Results) -> str:
    """One markdown table per size: a row per method and metric, a column per bin and the mean."""
    methods = list(results)
    blocks = []
    for size in _sizes(results):
        labels = list(results[methods[0]][size])
        lines = [
            f"**{size} px short side**",
            "",
            f"| method | metric | {' | '.join(labels)} | mean |",
            "|---|---|" + "---:|" * (len(labels) + 1),
        ]
        for metric in METRICS:
            for name in methods:
                values = [results[name][size][label][metric] for label in labels]
                cells = " | ".join(f"{v:.3f}" for v in [*values, float(np.mean(values))])
                lines.append(f"| {name} | {metric} | {cells} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def write_evaluation_report(results: Results, examples: list[Example], out_dir: Path, settings: dict[str, Any]) -> None:
    """eval.json, eval_bins.csv, eval_metrics.png and eval_grid.png under `out_dir`."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(summary(results, settings), indent=2) + "\n")

    methods, sizes = list(results), _sizes(results)
    with open(out_dir / "eval_bins.csv", "w") as f:
        f.write("size,hole_ratio," + ",".join(f"{m}_{k}" for m in methods for k in METRICS) + "\n")
        for size in sizes:
            for label in results[methods[0]][size]:
                values = ",".join(f"{results[m][size][label][k]:.4f}" for m in methods for k in METRICS)
                f.write(f"{size},{label},{values}\n")

    styles = ["-", "--", ":", "-."]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.8))
    for ax, metric in zip(axes, METRICS):
        for m in methods:
            for s, size in enumerate(sizes):
                labels = list(results[m][size])
                ax.plot(labels, [results[m][size][b][metric] for b in labels], marker="o", markersize=3,
                        linestyle=styles[s % len(styles)], color=colours[m])  # fmt: skip
        ax.set(title=metric, xlabel="hole ratio")
        ax.tick_params(axis="x", labelrotation=30)
    handles = [Line2D([], [], color=colours[m], label=m) for m in methods]
    handles += [Line2D([], [], color="black", linestyle=styles[s % len(styles)], label=f"{size} px")
                for s, size in enumerate(sizes)]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out_dir / "eval_metrics.png", dpi=110)
    plt.close(fig)

    if examples:
        comparison_grid(examples, methods).save(out_dir / "eval_grid.png")


def settings_of(params: Params, heldout: Heldout) -> dict[str, Any]:
    """What eval.json records beside the numbers, so a reader knows what they measure."""
    return {
        "sizes_short_side_px": [int(s) for s in heldout.photos],
        "photos_per_size": heldout.photos,
        "max_photos": params.evaluate.max_photos,
        "mask_seed": params.evaluate.mask_seed,
        "bins": [bin_label(b) for b in range(len(HOLE_BINS))],
        "bpe_band_px_at_256": params.evaluate.band_width,
        "units": "l1 and bpe in percent of the 8-bit range, psnr in dB (capped), ssim in [0, 1]",
        "psnr_cap_db": PSNR_CAP_DB,
        "pairs": "one mask per photo, the bins cycling over the sorted keys",
        "opencv_radius": 3,
        "fid": "not computed: a few dozen whole photos per bin are far too few for FID",
    }
