"""DVC stage `evaluate`: the trained DFNet against baselines on whole held-out photos.

    python -m pipelines.evaluate [--params params.yaml]

For every short side in `evaluate.sizes`, up to `evaluate.max_photos` test photos (evenly spaced
over the split) are scaled to it, never cropped, and completed whole, the way users run the model
(`dfnet.evaluation.evaluate_heldout`, the scoring that training validation and the Tune
search use too). The methods: the trained DFNet, the shipped model it was fine-tuned from,
the same architecture untrained (what training bought; with a pre-fill it returns exactly that
pre-fill), and OpenCV's Telea and Navier–Stokes at radius 3. Completions are 8-bit images,
as a user gets them.

Each photo is scored with one fixed mask, the bins cycling over the sorted photo keys, so every
bin gets a fifth of the photos. With 24 photos at 256 and 512 px this takes about a minute of
CPU (the two networks ~45%, scoring, mostly SSIM and BPE, ~35%, OpenCV ~20%; 80% of it at 512 px);
every photo with every bin's mask would take five times as long. `bench/heldout.py --every-bin`
does that, with radius 5 as well.

Writes metrics/eval.json (`dvc metrics show`: {method: {size: {bin: {metric}}, "mean": {metric}},
"settings": {...}}), metrics/eval_bins.csv (one row per size and bin), metrics/eval_metrics.png
(each metric against the hole ratio) and metrics/eval_grid.png (example photos of every size),
and prints one markdown table per size.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from dfnet.evaluation import evaluate_heldout, stage_methods
from dfnet.reports import markdown_tables, settings_of, write_evaluation_report
from pipelines import stage_params

log = logging.getLogger("pipelines.evaluate")


def main(argv: list[str] | None = None) -> None:
    params = stage_params(__doc__, argv)
    start = time.perf_counter()
    heldout = evaluate_heldout(params, stage_methods(params, params.train.out_dir), params.evaluate.grid_rows)
    out_dir = Path(params.evaluate.out_dir)
    write_evaluation_report(heldout.results, heldout.examples, out_dir, settings_of(params, heldout))
    log.info("evaluated %d methods in %.1fs", len(heldout.results), time.perf_counter() - start)
    print(markdown_tables(heldout.results))


if __name__ == "__main__":
    main()
