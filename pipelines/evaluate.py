"""DVC stage `evaluate`: the trained DFNet against baselines on whole held-out photos.

    python -m pipelines.evaluate [--params params.yaml]

For every short side in `evaluate.sizes`, test photos are scaled to it and completed whole, the
way users run the model, by the trained DFNet, the shipped model it was fine-tuned from, the
untrained network (what training bought) and OpenCV's Telea and Navier–Stokes
(`dfnet.evaluation.evaluate_heldout`, the scoring validation and the Tune search use too).

Each photo meets one bin's mask, the bins cycling over the photos: every photo with every mask
multiplies the cost by the number of bins, which `bench/heldout.py --every-bin` pays instead.
Writes metrics/eval.json (`dvc metrics show`), eval_bins.csv, eval_metrics.png and eval_grid.png,
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
