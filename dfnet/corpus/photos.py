"""Photos out of one package: decode, orient, downscale, encode, and drop duplicates across packages."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dfnet.corpus.archives import deb_field, package_files, read_inside, read_rcc
from dfnet.corpus.licences import licence_for, parse_dep5, rcc_readme_licences
from dfnet.corpus.selection import PackageSelection, matches, photo_name
from dfnet.data import decode_photo, encode_jpeg, resize_short_side
from dfnet.images import is_image_file

log = logging.getLogger(__name__)


#: Why a file did not become a corpus photo (the counts in ``report.json``).
SKIP_REASONS: tuple[str, ...] = (
    "not selected",  # an image file outside the package's include patterns
    "not a photo",  # matched the include patterns but explicitly excluded (patterns, logos, UI art)
    "too small",  # short side below the selection's min_short_side
    "duplicate",  # the same picture again (exact or near), or a smaller resolution of a wallpaper
    "unreadable",  # does not decode
    "unsupported compression",  # an .rcc entry compressed with something other than zlib
)

#: Near-duplicates: mean absolute difference of the grey thumbnails (0-255 levels) and of the log
#: aspect ratios below which two photos count as one picture. The level threshold sits well above
#: what resizing and re-encoding a photo changes and well below the closest distinct photos.
NEAR_DUPLICATE_LEVELS = 4.0
NEAR_DUPLICATE_ASPECT = 0.02
_THUMB_SIDE = 16

JPEG_QUALITY = 95


@dataclass
class Candidate:
    """One photo, decoded, oriented, downscaled and JPEG-encoded, waiting for de-duplication."""

    key: str  # "{package}/{name}.jpg", the path under {out_dir}/photos
    package: str
    package_version: str
    path_in_package: str  # "usr/share/..."; inside a bundle "usr/share/...rcc:/member/path"
    licence: str
    source_width: int  # oriented size before downscaling: the larger copy of a picture wins
    source_height: int
    pixel_sha256: str  # of the decoded, oriented pixels
    thumb: np.ndarray  # grey thumbnail, float32, for near-duplicates
    jpeg: bytes

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the stored JPEG (read from its header)."""
        with Image.open(io.BytesIO(self.jpeg)) as image:
            return image.size


@dataclass
class PackageHarvest:
    """What one package gave: candidates, skip counts by reason, its copyright file."""

    package: str
    version: str
    candidates: list[Candidate] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    copyright: bytes | None = None


def _grey_thumb(pixels: np.ndarray) -> np.ndarray:
    grey = Image.fromarray(pixels).convert("L").resize((_THUMB_SIDE, _THUMB_SIDE), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.float32).ravel()


def make_candidate(
    data: bytes,
    *,
    key: str,
    package: str,
    version: str,
    path: str,
    licence: str,
    max_short_side: int,
    rotate_cw: int = 0,
) -> Candidate | str:
    """A :class:`Candidate` from encoded bytes (EXIF-oriented, then turned ``rotate_cw`` degrees
    clockwise), or the skip reason ``"unreadable"``."""
    try:
        pixels = decode_photo(data)
    except ValueError as exc:
        log.warning("%s: %s is unreadable: %s", package, path, exc)
        return "unreadable"
    if rotate_cw % 360:
        if rotate_cw % 90:
            raise ValueError(f"{path}: rotations must be multiples of 90 degrees, not {rotate_cw}")
        pixels = np.ascontiguousarray(np.rot90(pixels, k=-(rotate_cw // 90)))
    height, width = pixels.shape[:2]
    digest = hashlib.sha256(f"{width}x{height}:".encode() + pixels.tobytes()).hexdigest()
    stored = resize_short_side(pixels, max_short_side, upscale=False)
    return Candidate(
        key=key,
        package=package,
        package_version=version,
        path_in_package=path,
        licence=licence,
        source_width=width,
        source_height=height,
        pixel_sha256=digest,
        thumb=_grey_thumb(pixels),
        jpeg=encode_jpeg(stored, quality=JPEG_QUALITY),
    )


def _short_side(data: bytes) -> int | None:
    """The oriented short side from the header alone (cheap), or None when it does not open."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return min(image.size)
    except Exception:  # any failure: let the full decode report it as unreadable
        return None


def _area(data: bytes) -> int:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[0] * image.size[1]
    except Exception:  # unreadable: the decode step counts it
        return 0


def _largest_per_folder(sources: list[tuple[str, bytes]]) -> tuple[list[tuple[str, bytes]], int]:
    """Keep the largest image of each folder (ties: the first path); returns (kept, dropped)."""
    best: dict[str, tuple[int, str, bytes]] = {}
    for path, data in sources:
        folder = path.rsplit("/", 1)[0]
        area = _area(data)
        if folder not in best or area > best[folder][0]:
            best[folder] = (area, path, data)
    kept = sorted((path, data) for _, path, data in best.values())
    return kept, len(sources) - len(kept)


def harvest_package(deb: str | Path, selection: PackageSelection, max_short_side: int) -> PackageHarvest:
    """Unpack ``deb`` into a temporary folder and turn the selected files into candidates.

    Every image file is taken or counted under a :data:`SKIP_REASONS` reason. Raises
    (CalledProcessError, ValueError) when the package is not a .deb or not the selection's.
    """

    deb = Path(deb)
    package = deb_field(deb, "Package")
    if package != selection.package:
        raise ValueError(f"{deb.name} holds package {package!r}, not {selection.package!r}")
    harvest = PackageHarvest(package=package, version=deb_field(deb, "Version"))
    with tempfile.TemporaryDirectory(prefix="dfnet-corpus-") as tmp:
        root = Path(tmp)
        log.info("%s: extracting %s", package, deb.name)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True)
        harvest.copyright = read_inside(root, f"usr/share/doc/{package}/copyright")
        dep5 = parse_dep5(harvest.copyright.decode("utf-8", errors="replace")) if harvest.copyright else None
        sources: list[tuple[str, bytes]] = []  # (path naming the photo, encoded bytes)
        readmes: dict[str, str] = {}
        for path in package_files(root):
            chosen = matches(path, selection.include) and not matches(path, selection.exclude)
            if selection.members and chosen:
                sources += _select_members(path, (root / path).read_bytes(), selection, harvest, readmes)
            elif is_image_file(path):
                if chosen:
                    sources.append((path, (root / path).read_bytes()))
                else:
                    excluded = matches(path, selection.include)
                    harvest.skipped["not a photo" if excluded else "not selected"] += 1
    if selection.largest_per_folder:
        sources, dropped = _largest_per_folder(sources)
        harvest.skipped["duplicate"] += dropped
    names: dict[str, str] = {}
    rotations = dict(selection.rotations)
    jobs = []
    for path, data in sources:
        naming_path = path.split(":", 1)[1] if selection.members else path
        key = f"{package}/{photo_name(naming_path, selection.name_root)}.jpg"
        if key in names:
            raise ValueError(f"{package}: {path} and {names[key]} would both be stored as {key}")
        names[key] = path
        short = _short_side(data)
        if short is not None and short < selection.min_short_side:
            harvest.skipped["too small"] += 1
            continue
        licence = licence_for(selection, naming_path, dep5, readmes)
        jobs.append(
            functools.partial(
                make_candidate, data, key=key, package=package, version=harvest.version, path=path,
                licence=licence, max_short_side=max_short_side, rotate_cw=rotations.get(path, 0),
            )
        )  # fmt: skip
    # Pillow decodes, resizes and encodes without the GIL: threads use the cores, and map()
    # returns results in job order, so the outcome does not depend on scheduling.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for made in pool.map(lambda job: job(), jobs):
            if isinstance(made, str):
                harvest.skipped[made] += 1
            else:
                harvest.candidates.append(made)
    return harvest


def _select_members(
    bundle_path: str, data: bytes, selection: PackageSelection, harvest: PackageHarvest, readmes: dict[str, str]
) -> list[tuple[str, bytes]]:
    """The selected image members of one .rcc bundle, as ``("bundle:member", bytes)``; counts
    the others and collects the bundle's README licences into ``readmes``."""
    try:
        bundle = read_rcc(data)
    except ValueError as exc:
        log.warning("%s: %s is not a readable rcc bundle: %s", harvest.package, bundle_path, exc)
        harvest.skipped["unreadable"] += 1
        return []
    readmes.update(rcc_readme_licences(bundle))
    for member, why in sorted(bundle.unsupported.items()):
        if is_image_file(member):
            log.warning("%s: %s:%s skipped (%s)", harvest.package, bundle_path, member, why)
            harvest.skipped["unsupported compression"] += 1
    chosen = []
    for member, blob in sorted(bundle.files.items()):
        if not is_image_file(member):
            continue
        if not matches(member, selection.members):
            harvest.skipped["not selected"] += 1
        elif matches(member, selection.member_exclude):
            harvest.skipped["not a photo"] += 1
        else:
            chosen.append((f"{bundle_path}:{member}", blob))
    return chosen


def deduplicate(candidates: Iterable[Candidate]) -> tuple[list[Candidate], list[tuple[Candidate, Candidate]]]:
    """Drop exact and near duplicates, keeping the larger copy of each picture.

    Exact: the same decoded pixels; near: thumbnails and aspect ratios within the
    ``NEAR_DUPLICATE_*`` thresholds. Largest first, so the input order does not matter. Returns
    ``(kept sorted by key, [(dropped, the kept copy it duplicates), ...])``.
    """
    order = sorted(candidates, key=lambda c: (-c.source_width * c.source_height, c.key))
    kept: list[Candidate] = []
    by_sha: dict[str, Candidate] = {}
    thumbs = np.empty((0, _THUMB_SIDE * _THUMB_SIDE), np.float32)
    aspects = np.empty((0,), np.float64)
    dropped: list[tuple[Candidate, Candidate]] = []
    for candidate in order:
        if candidate.pixel_sha256 in by_sha:
            dropped.append((candidate, by_sha[candidate.pixel_sha256]))
            continue
        aspect = np.log(candidate.source_width / candidate.source_height)
        if len(kept):
            distance = np.abs(thumbs - candidate.thumb).mean(axis=1)
            near = (distance <= NEAR_DUPLICATE_LEVELS) & (np.abs(aspects - aspect) <= NEAR_DUPLICATE_ASPECT)
            if near.any():
                dropped.append((candidate, kept[int(np.flatnonzero(near)[0])]))
                continue
        kept.append(candidate)
        by_sha[candidate.pixel_sha256] = candidate
        thumbs = np.vstack([thumbs, candidate.thumb[None]])
        aspects = np.append(aspects, aspect)
    return sorted(kept, key=lambda c: c.key), dropped
