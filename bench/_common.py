"""Helpers the bench scripts share (bench/ is a folder of scripts; each imports this sibling).

The CPU a run was timed on, data to run on in a fresh checkout, and the paper's alpha figure.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dfnet.evaluation import Pair
from dfnet.masks import load_masks
from dfnet.model import DFNet
from dfnet.params import Params
from dfnet.storage import count_rows, filesystem_for

log = logging.getLogger("dfnet.bench")


def cpu_name() -> str:
    """The CPU's model name and, on x86, its family and model numbers (/proc/cpuinfo), so a reader
    can tell what the times were on: virtual machines often report only "AMD EPYC", which covers
    Zen 4 (family 25) and Zen 5 (family 26) alike."""
    info = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in info.read_text().splitlines() if info.is_file() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def write_doc(doc: Path, key: str, text: str) -> None:
    """Replace (or append) a benchmark's section of `doc` between its own markers; the rest of
    the file belongs to other benchmarks."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    old = doc.read_text() if doc.is_file() else "# Performance\n\nWritten by the benchmarks in bench/.\n"
    block = f"{start}\n{text}\n{end}"
    if start in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


def prepared_data(params: Params, scratch: Path) -> Params:
    """`params` when its prepared data and mask pool are there and fit it, else `params` pointed
    at the bundled sample photos prepared into `scratch`: a benchmark runs on a fresh checkout and
    never writes into the pipeline's data/."""
    try:
        fs, root = filesystem_for(params.data.out_dir)
        with fs.open_input_stream(f"{root.rstrip('/')}/report.json") as stream:
            source = json.loads(stream.read()).get("source", params.data.source)
        has_splits = all(count_rows(params.data.out_dir, split) for split in ("train", "test"))
        size = params.masks.size
        if has_splits and load_masks(params.masks.out)["pool"].shape[1:] == (size, size):
            return replace(params, data=replace(params.data, source=source))  # what the data came from
    except OSError:  # FileNotFoundError included
        pass
    from pipelines.make_masks import make_masks
    from pipelines.prepare import prepare

    log.info("no prepared data at %s: preparing the sample photos in %s", params.data.out_dir, scratch)
    data = replace(params.data, source="sample", out_dir=str(scratch / "prepared"))
    masks = replace(params.masks, out=str(scratch / "masks.npz"))
    prepare(data)
    make_masks(masks)
    return replace(params, data=data, masks=masks)


@torch.no_grad()
def plot_alphas(model: DFNet, pairs: list[Pair], path: Path) -> None:
    """The paper's Figure 3 on whole test photos: mask | input | α_k per fused scale (mean over
    channels, finest first) | completion | truth. Photos are cropped to the network's multiple."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device, multiple, blocks = next(model.parameters()).device, model.config.size_multiple, len(model.fusion)
    columns = ["mask", "input", *[f"α_{k + 1}" for k in range(blocks)], "completion", "truth"]
    fig, axes = plt.subplots(len(pairs), len(columns), figsize=(1.9 * len(columns), 1.7 * len(pairs)), squeeze=False)
    for r, pair in enumerate(pairs):
        h, w = (side - side % multiple for side in pair.known.shape)
        image = torch.from_numpy(pair.image[:h, :w].copy()).permute(2, 0, 1)[None].float().div(255).to(device)
        known = torch.from_numpy(pair.known[:h, :w].astype(np.float32))[None, None].to(device)
        output = model.eval()(image, known)
        completed = (image * known + output.results[0] * (1 - known))[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        alphas = [alpha[0].mean(0).cpu().numpy() for alpha in output.alphas]
        panels = [pair.known[:h, :w], pair.masked_input[:h, :w], *alphas, completed, pair.image[:h, :w]]
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            if c == 0 or 2 <= c < 2 + blocks:  # the mask and the alphas: 0..1 in grey
                grey = ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(panel)
            ax.set(xticks=[], yticks=[], title=columns[c] if r == 0 else "")
    fig.colorbar(grey, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="α (1 = generated), mask (1 = known)")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
