"""DVC stage `evaluate`: the trained DFNet against baselines on whole held-out photos.

    python -m pipelines.evaluate [--params params.yaml]

At every `evaluate.sizes` short side, the trained DFNet, the shipped model it started from, the
untrained network (what training bought) and OpenCV complete whole test photos, as users run
them (`dfnet.evaluation.evaluate_heldout`). Each photo meets one bin's mask, as every mask would
multiply the cost by the number of bins (`bench/heldout.py --every-bin` pays that). Writes
metrics/eval.json, eval_bins.csv and two figures, and prints one table per size.
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
