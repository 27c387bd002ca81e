"""DVC stage ``masks``: the training mask pool.

    python -m pipelines.make_masks --params params.yaml

Writes ``masks.out``, a bit-packed ``.npz`` whose ``pool`` holds ``masks.size``² free-form masks
drawn like a whole photo's; :func:`dfnet.data.training_mask` augments them and cuts each at its
crop's scale. Beside it: ``masks_summary.json`` (hole ratios) and ``masks_preview.png``.
Evaluation draws its own masks at each photo's size (:mod:`dfnet.evaluation`).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from dfnet.masks import hole_ratio, mask_pool, save_masks
from dfnet.params import MaskParams
from dfnet.storage import filesystem_for
from pipelines import stage_params

log = logging.getLogger("pipelines.make_masks")

PREVIEW_COLUMNS = 8
_GAP = 2  # grey pixels between preview tiles


def preview_grid(rows: list[np.ndarray], columns: int = PREVIEW_COLUMNS) -> Image.Image:
    """Tile rows of ``(n, H, W)`` 0/1 masks into one grey image (white = known, black = hole)."""
    height, width = rows[0].shape[1:]
    canvas = np.full(
        (len(rows) * (height + _GAP) + _GAP, columns * (width + _GAP) + _GAP), 128, np.uint8
    )
    for r, masks in enumerate(rows):
        for c, mask in enumerate(masks[:columns]):
            top, left = _GAP + r * (height + _GAP), _GAP + c * (width + _GAP)
            canvas[top : top + height, left : left + width] = mask * 255
    return Image.fromarray(canvas)


def _ratio_stats(masks: np.ndarray) -> dict[str, float | int]:
    ratios = [hole_ratio(m) for m in masks]
    if not ratios:
        return {"count": 0}
    return {
        "count": len(ratios),
        "hole_ratio_mean": round(float(np.mean(ratios)), 4),
        "hole_ratio_min": round(float(np.min(ratios)), 4),
        "hole_ratio_max": round(float(np.max(ratios)), 4),
    }


def make_masks(masks: MaskParams) -> dict[str, Any]:
    """Generate, store and summarise the pool of ``masks.size``² masks; returns the summary.

    ``masks.out`` may be a local path or a URI such as ``s3://bucket/masks.npz``.
    """
    if masks.size < 1 or masks.pool_size < 1:
        raise ValueError("need masks.size >= 1 and masks.pool_size >= 1")
    log.info("drawing %d pool masks at %dx%d", masks.pool_size, masks.size, masks.size)
    pool = mask_pool(masks.pool_size, masks.size, masks.size, masks.seed)
    arrays = {"pool": pool}
    fs, out_path = filesystem_for(masks.out)
    folder = posixpath.dirname(out_path)
    if isinstance(fs, pafs.LocalFileSystem):  # object stores need (and want) no directories
        fs.create_dir(folder, recursive=True)
    buffer = io.BytesIO()
    save_masks(buffer, arrays)
    with fs.open_output_stream(out_path) as stream:
        stream.write(buffer.getvalue())

    summary: dict[str, Any] = {
        "out": masks.out,
        "size": masks.size,
        "seed": masks.seed,
        "pool": _ratio_stats(pool),
    }
    with fs.open_output_stream(posixpath.join(folder, "masks_summary.json")) as stream:
        stream.write((json.dumps(summary, indent=2) + "\n").encode("utf-8"))

    rows = [pool[i : i + PREVIEW_COLUMNS] for i in range(0, min(len(pool), 4 * PREVIEW_COLUMNS), PREVIEW_COLUMNS)]
    png = io.BytesIO()
    preview_grid(rows).save(png, format="PNG")
    with fs.open_output_stream(posixpath.join(folder, "masks_preview.png")) as stream:
        stream.write(png.getvalue())
    log.info("wrote %s, masks_summary.json and masks_preview.png", masks.out)
    return summary


def main(argv: list[str] | None = None) -> None:
    params = stage_params(__doc__, argv)
    summary = make_masks(params.masks)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
