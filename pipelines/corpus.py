"""DVC stage ``corpus``: real photographs from Debian packages, fetched without installing anything.

    python -m pipelines.corpus --params params.yaml

Downloads the packages of :data:`dfnet.corpus.DEFAULT_SELECTIONS` (kept, so a rerun downloads
nothing) and writes their selected photographs, oriented, downscaled and de-duplicated, under
``{corpus.out_dir}/photos`` (a folder source for ``data.source``), with each package's copyright
file, ``report.json`` and the ``corpus.manifest`` TSV. Without apt it warns once and stores the
bundled sample photos instead.
"""

from __future__ import annotations

import json
from typing import Any

from dfnet.corpus import build_corpus
from pipelines import stage_params


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the per-package skip details: what a person wants on the terminal."""
    packages = {name: entry["photos"] for name, entry in report["packages"].items()}
    keys = ("source", "total_photos", "skipped", "failed_packages", "download_bytes", "elapsed_s")
    return {key: report[key] for key in keys if key in report} | {"photos_per_package": packages}


def main(argv: list[str] | None = None) -> None:
    params = stage_params(__doc__, argv)
    report = build_corpus(params.corpus)
    print(json.dumps(_summary(report), indent=2))


if __name__ == "__main__":
    main()
