"""The corpus stage's work: download, harvest each package, de-duplicate, write photos,
copyright files, the manifest and ``report.json`` (or the bundled sample photos without apt)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from dfnet.corpus.archives import DownloadResult, apt_available, download_packages
from dfnet.corpus.photos import SKIP_REASONS, Candidate, deduplicate, harvest_package, make_candidate
from dfnet.corpus.selection import DEFAULT_SELECTIONS, PackageSelection, photo_name
from dfnet.data import sample_photos

if TYPE_CHECKING:  # dfnet.params imports the model (and torch); the corpus needs neither
    from dfnet.params import CorpusParams

log = logging.getLogger(__name__)


#: The manifest's columns, in order.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "key", "package", "package_version", "path_in_package", "licence", "width", "height", "sha256",
)  # fmt: skip


def manifest_rows(kept: Iterable[Candidate]) -> list[dict[str, str]]:
    """One manifest row per stored photo, sorted by key; ``sha256`` is the stored JPEG's."""
    rows = []
    for candidate in sorted(kept, key=lambda c: c.key):
        width, height = candidate.size
        rows.append(
            {
                "key": candidate.key,
                "package": candidate.package,
                "package_version": candidate.package_version,
                "path_in_package": candidate.path_in_package,
                "licence": candidate.licence,
                "width": str(width),
                "height": str(height),
                "sha256": hashlib.sha256(candidate.jpeg).hexdigest(),
            }
        )
    return rows


def _tsv_cell(value: str) -> str:
    return re.sub(r"[\t\r\n]+", " ", value)


def write_manifest(rows: Sequence[Mapping[str, str]], path: str | Path) -> None:
    """The manifest TSV: a header of :data:`MANIFEST_COLUMNS`, then ``rows`` sorted by key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(MANIFEST_COLUMNS)]
    for row in sorted(rows, key=lambda r: r["key"]):
        lines.append("\t".join(_tsv_cell(str(row[column])) for column in MANIFEST_COLUMNS))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_corpus(
    kept: Sequence[Candidate], copyrights: Mapping[str, bytes], out_dir: str | Path, manifest: str | Path
) -> list[dict[str, str]]:
    """Replace ``{out_dir}/photos`` and ``{out_dir}/copyright`` with ``kept`` and ``copyrights``
    (``name -> text``), write the manifest; returns its rows. Clearing first makes reruns give
    exactly the same tree (no photo of an earlier selection is left behind)."""
    out = Path(out_dir)
    for folder in ("photos", "copyright"):
        shutil.rmtree(out / folder, ignore_errors=True)
    for candidate in kept:
        target = out / "photos" / candidate.key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(candidate.jpeg)
    (out / "copyright").mkdir(parents=True, exist_ok=True)
    for name, text in sorted(copyrights.items()):
        (out / "copyright" / name).write_bytes(text)
    rows = manifest_rows(kept)
    write_manifest(rows, manifest)
    return rows


def contact_sheet(images: Sequence[tuple[str, Image.Image]], columns: int = 8, tile: int = 192) -> Image.Image:
    """Labelled thumbnails of ``(label, image)`` on one grey sheet, to check a selection by eye."""
    rows = max(1, -(-len(images) // columns))
    label_height = 14
    sheet = Image.new("RGB", (columns * tile, rows * (tile + label_height)), (96, 96, 96))
    draw = ImageDraw.Draw(sheet)
    for index, (label, image) in enumerate(images):
        thumb = image.convert("RGB")
        thumb.thumbnail((tile - 4, tile - 4), Image.Resampling.BICUBIC)
        left = (index % columns) * tile
        top = (index // columns) * (tile + label_height)
        sheet.paste(thumb, (left + (tile - thumb.width) // 2, top + (tile - thumb.height) // 2))
        draw.text((left + 2, top + tile), label[-(tile // 6) :], fill=(255, 255, 255))
    return sheet


def _skip_totals(packages: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for entry in packages.values():
        totals.update(entry.get("skipped", {}))
    return {reason: totals[reason] for reason in SKIP_REASONS if totals[reason]}


def _write_report(report: dict[str, Any], out_dir: str | Path) -> None:
    path = Path(out_dir) / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_corpus(
    params: CorpusParams,
    selections: Sequence[PackageSelection] = DEFAULT_SELECTIONS,
    debs: Mapping[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Build the corpus described by ``params`` from ``selections``; returns the report.

    ``debs`` (``package -> .deb path``) skips apt, for tests and offline mirrors. Without apt, or
    when every download fails, the sample photos are stored instead; a package that fails alone
    is reported in ``failed_packages`` and the others still make the corpus.
    """

    started = time.monotonic()
    if params.source not in ("debian", "sample"):
        raise ValueError(f"corpus.source must be 'debian' or 'sample', got {params.source!r}")
    if params.source == "sample" and debs is None:
        return build_sample_corpus(params, "corpus.source is 'sample'")
    if debs is None:
        if not apt_available():
            return build_sample_corpus(params, "apt-get/dpkg-deb not on PATH (not a Debian-family machine?)")
        download = download_packages([s.package for s in selections], params.download_dir)
        if not download.debs:
            return build_sample_corpus(params, "apt-get download failed for every package (no package registry?)")
    else:
        download = DownloadResult(debs={name: Path(path) for name, path in debs.items()})

    packages: dict[str, dict[str, Any]] = {}
    candidates: list[Candidate] = []
    copyrights: dict[str, bytes] = {}
    for selection in sorted(selections, key=lambda s: s.package):
        name = selection.package
        entry: dict[str, Any] = {"photos": 0, "skipped": {}, "version": None, "deb": None, "error": None}
        packages[name] = entry
        deb = download.debs.get(name)
        if deb is None:
            entry["error"] = download.failed.get(name, "no .deb")
            continue
        entry["deb"], entry["deb_bytes"] = deb.name, deb.stat().st_size
        try:
            harvest = harvest_package(deb, selection, params.max_short_side)
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:
            stderr = getattr(exc, "stderr", None) or ""
            detail = (stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr).strip()
            entry["error"] = f"{type(exc).__name__}: {exc} {detail}".strip()
            log.error("%s: failed: %s", name, entry["error"])
            continue
        entry["version"] = harvest.version
        entry["skipped"] = dict(harvest.skipped)
        candidates += harvest.candidates
        if harvest.copyright is not None:
            copyrights[name] = harvest.copyright
        else:
            log.warning("%s: no usr/share/doc/%s/copyright in the package", name, name)
        log.info("%s: %d candidate photos", name, len(harvest.candidates))

    kept, dropped = deduplicate(candidates)
    for duplicate, original in dropped:
        log.info("duplicate: %s is %s", duplicate.key, original.key)
        skipped = packages[duplicate.package]["skipped"]
        skipped["duplicate"] = skipped.get("duplicate", 0) + 1
    for candidate in kept:
        packages[candidate.package]["photos"] += 1
    for name, entry in packages.items():
        entry["skipped"] = {reason: entry["skipped"][reason] for reason in SKIP_REASONS if entry["skipped"].get(reason)}
        if entry["error"] is None:
            log.info("%s: %d photos", name, entry["photos"])
    write_corpus(kept, copyrights, params.out_dir, params.manifest)

    report = {
        "source": "debian",
        "total_photos": len(kept),
        "packages": packages,
        "skipped": _skip_totals(packages),
        "failed_packages": sorted(name for name, entry in packages.items() if entry["error"]),
        "download_bytes": download.downloaded_bytes,
        "deb_bytes": sum(entry.get("deb_bytes", 0) for entry in packages.values()),
        "manifest": str(params.manifest),
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    _write_report(report, params.out_dir)
    log.info(
        "%d photos from %d packages (%d failed), %.1f MB downloaded, %.1f s",
        len(kept), len(packages) - len(report["failed_packages"]), len(report["failed_packages"]),
        download.downloaded_bytes / 1e6, report["elapsed_s"],
    )  # fmt: skip
    return report


# Licences of the bundled sample photos, from the scikit-image docstrings and scikit-learn's
# datasets/images/README.txt; anything not listed is recorded under the project's BSD-3-Clause
# (moon and the Middlebury motorcycle state no licence of their own).
_SAMPLE_LICENCES = {
    "skimage/astronaut.png": "public-domain",
    "skimage/brick.png": "CC0-1.0",
    "skimage/camera.png": "CC0-1.0",
    "skimage/chelsea.png": "CC0-1.0",
    "skimage/coffee.png": "CC0-1.0",
    "skimage/coins.png": "public-domain",  # Brooklyn Museum: no known copyright restrictions
    "skimage/grass.png": "CC0-1.0",
    "skimage/gravel.png": "CC0-1.0",
    "skimage/hubble_deep_field.jpg": "public-domain",
    "skimage/ihc.png": "public-domain",  # CMMI: no known copyright restrictions
    "skimage/rocket.jpg": "public-domain",
    "sklearn/china.jpg": "CC-BY-2.0",
    "sklearn/flower.jpg": "CC-BY-2.0",
}
_SAMPLE_DISTRIBUTIONS = {"skimage": "scikit-image", "sklearn": "scikit-learn"}


def _distribution_licence_file(distribution: str) -> bytes | None:
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in sorted(files, key=str):
        if file.name.upper().startswith(("LICENSE", "COPYING")):
            path = Path(str(file.locate()))
            if path.is_file():
                return path.read_bytes()
    return None


def build_sample_corpus(params: CorpusParams, reason: str) -> dict[str, Any]:
    """The fallback corpus: :func:`dfnet.data.sample_photos` stored like Debian photos, under
    ``photos/sample/``, with ``sample:skimage``/``sample:sklearn`` manifest rows. Logs ``reason``
    as the one warning that says the Debian corpus could not be built."""
    started = time.monotonic()
    log.warning("no Debian photo corpus: %s; storing the bundled sample photos instead", reason)
    candidates: list[Candidate] = []
    packages: dict[str, dict[str, Any]] = {}
    copyrights: dict[str, bytes] = {}
    for key, path in sample_photos().items():
        module = key.split("/", 1)[0]
        package = f"sample:{module}"
        distribution = _SAMPLE_DISTRIBUTIONS.get(module, module)
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = ""
        entry = packages.setdefault(package, {"photos": 0, "skipped": Counter(), "version": version, "error": None})
        spec = importlib.util.find_spec(module)
        module_root = (
            Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
        )
        try:
            inside = Path(path).relative_to(module_root).as_posix() if module_root else Path(path).name
        except ValueError:
            inside = Path(path).name
        made = make_candidate(
            Path(path).read_bytes(), key=f"sample/{photo_name(key, '')}.jpg", package=package, version=version,
            path=inside, licence=_SAMPLE_LICENCES.get(key, "BSD-3-Clause"), max_short_side=params.max_short_side,
        )  # fmt: skip
        if isinstance(made, str):
            entry["skipped"][made] += 1
        else:
            candidates.append(made)
        licence_text = _distribution_licence_file(distribution)
        if licence_text is not None:
            copyrights[photo_name(package, "")] = licence_text
    kept, dropped = deduplicate(candidates)
    for duplicate, _ in dropped:
        packages[duplicate.package]["skipped"]["duplicate"] += 1
    for candidate in kept:
        packages[candidate.package]["photos"] += 1
    for entry in packages.values():
        entry["skipped"] = {reason: entry["skipped"][reason] for reason in SKIP_REASONS if entry["skipped"][reason]}
    write_corpus(kept, copyrights, params.out_dir, params.manifest)
    report = {
        "source": "sample",
        "fallback_reason": reason,
        "total_photos": len(kept),
        "packages": packages,
        "skipped": _skip_totals(packages),
        "failed_packages": [],
        "download_bytes": 0,
        "deb_bytes": 0,
        "manifest": str(params.manifest),
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    _write_report(report, params.out_dir)
    log.info("%d sample photos stored", len(kept))
    return report
