"""DVC stage ``corpus``: real photographs from Debian packages, fetched without installing anything.

    python -m pipelines.corpus --params params.yaml

Downloads the packages of :data:`dfnet.corpus.DEFAULT_SELECTIONS` into ``corpus.download_dir``
(``apt-get download``; kept, so a rerun downloads nothing), unpacks them with ``dpkg-deb`` and
writes, from the explicitly selected photographs only,

- ``{corpus.out_dir}/photos/{package}/{name}.jpg``: oriented, RGB, short side at most
  ``corpus.max_short_side``, JPEG quality 95, duplicates removed (the folder source for
  ``data.source``),
- ``{corpus.out_dir}/copyright/{package}``: each package's copyright file,
- ``{corpus.out_dir}/report.json``: photos and skipped files per package, download size, time,
- ``corpus.manifest`` (TSV): key, package, version, path inside the package, licence, size, sha256.

Without apt (or when no package can be downloaded) it warns once and stores the sample photos
bundled with scikit-image and scikit-learn instead.
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
