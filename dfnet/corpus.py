"""The offline photo corpus: real photographs taken out of Debian packages, nothing installed.

The bundled sample photos (about fifteen) are too few to teach inpainting; Debian's archive holds
several hundred real photographs in packages of wallpapers, game art and demo data (see
``/work/shared/docs/photo-corpus.md``). This module fetches those packages with
``apt-get download``, unpacks them with ``dpkg-deb``, keeps only the files chosen by an explicit
per-package selection (:data:`DEFAULT_SELECTIONS`, checked by eye on contact sheets), and stores
each photo as ``{out_dir}/photos/{package}/{name}.jpg`` with a manifest row naming its package,
path and licence. Without apt (not a Debian-family machine, no registry) it falls back, with one
warning, to the sample photos bundled with scikit-image and scikit-learn.

Everything here is plain Python, Pillow and numpy (no Ray, no MLflow): ``pipelines/corpus.py``
is the DVC stage around :func:`build_corpus`. Tests call :func:`build_corpus` with local ``.deb``
files and their own selections, so they need neither apt nor a network.

Same inputs give the same files and the same manifest: packages, files and duplicates are
visited in sorted order and JPEG encoding is deterministic for a given Pillow build. Only the
timing and download figures in ``report.json`` change between runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from dfnet.data import decode_photo, encode_jpeg, resize_short_side, sample_photos
from dfnet.images import is_image_file

if TYPE_CHECKING:  # dfnet.params imports the model (and torch); the corpus needs neither
    from dfnet.params import CorpusParams

__all__ = [
    "DEFAULT_SELECTIONS",
    "MANIFEST_COLUMNS",
    "SKIP_REASONS",
    "Candidate",
    "Dep5Stanza",
    "DownloadResult",
    "PackageHarvest",
    "PackageSelection",
    "RccBundle",
    "apt_available",
    "build_corpus",
    "build_sample_corpus",
    "contact_sheet",
    "deb_field",
    "deduplicate",
    "dep5_licence",
    "download_packages",
    "find_deb",
    "harvest_package",
    "manifest_rows",
    "parse_dep5",
    "parse_readme_licences",
    "read_rcc",
    "write_corpus",
    "write_manifest",
]

log = logging.getLogger("dfnet.corpus")

#: Why a file did not become a corpus photo (the counts in ``report.json``).
SKIP_REASONS: tuple[str, ...] = (
    "not selected",  # an image file outside the package's include patterns
    "not a photo",  # matched the include patterns but explicitly excluded (patterns, logos, UI art)
    "too small",  # short side below the selection's min_short_side
    "duplicate",  # the same picture again (exact or near), or a smaller resolution of a wallpaper
    "unreadable",  # does not decode
    "unsupported compression",  # an .rcc entry compressed with something other than zlib
)

#: The manifest's columns, in order.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "key", "package", "package_version", "path_in_package", "licence", "width", "height", "sha256",
)  # fmt: skip

#: Near-duplicates: mean absolute difference of the 16x16 grey thumbnails (0-255 levels) and of
#: the log aspect ratios below which two photos count as one picture. Copies of corpus photos
#: resized to 30-80 % and re-encoded at quality 60-90 measured at most 1.2 levels; the closest
#: two distinct photos of the Debian corpus 13.7.
NEAR_DUPLICATE_LEVELS = 4.0
NEAR_DUPLICATE_ASPECT = 0.02
_THUMB_SIDE = 16

JPEG_QUALITY = 95


# ---------------------------------------------------------------------------------------------
# Which files of which package are photographs


@dataclass(frozen=True)
class PackageSelection:
    """The real photographs of one Debian package, chosen explicitly (judged on contact sheets).

    Patterns are globs on paths inside the package (``usr/share/...``, no leading slash) where
    ``*`` and ``?`` stay within one path segment. When ``members`` is set, ``include`` selects
    Qt ``.rcc`` resource bundles and ``members``/``member_exclude`` select files inside them
    (paths like ``/gcompris/src/...``).
    """

    package: str
    include: tuple[str, ...]
    licence: str  # the licence to record where the copyright files say nothing per file
    exclude: tuple[str, ...] = ()
    #: Stripped from the path (or member path) to name the stored photo: short, stable names.
    name_root: str = ""
    #: ``(installed prefix, source prefix)``: maps a path in the package to the source-tree path
    #: the DEP-5 ``Files:`` patterns are written against. None: do not use the copyright file.
    source_root: tuple[str, str] | None = None
    members: tuple[str, ...] = ()
    member_exclude: tuple[str, ...] = ()
    min_short_side: int = 256
    #: Wallpapers shipped at many resolutions: keep only the largest file of each folder.
    largest_per_folder: bool = False
    #: ``(path, degrees clockwise)`` turns applied after the EXIF orientation, for photos whose
    #: rotation is recorded elsewhere (KPhotoAlbum keeps it in its index.xml, not in EXIF).
    rotations: tuple[tuple[str, int], ...] = ()
    #: ``(path or member path, licence)`` for files the licence sources get wrong or miss.
    licence_overrides: tuple[tuple[str, str], ...] = ()


_PLASMA_WALLPAPERS = (
    "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
    "Kite", "OneStandsOut", "Path", "summer_1am",
)  # fmt: skip
_LXQT_PHOTOS = (
    "Butterfly-Kenneth-Wimer.jpg", "Valendas.png", "after-the-rain.jpg", "appleflower.png", "beam.png",
    "butterfly.png", "cloud.png", "drop.png", "flowers.png", "fog.jpg", "this-is-not-windows.jpg",
)  # fmt: skip
_GCOMPRIS_BUNDLES = (
    "erase", "explore_world_animals", "explore_farm_animals", "explore_monuments", "explore_world_music",
    "clickgame",
)  # fmt: skip
_ENDLESS_SKY = "usr/share/games/endless-sky/plugins/endless-sky-high-dpi/"

#: The corpus: the packages of photo-corpus.md except enlightenment-data (401 MB for 14 photos)
#: and endless-sky-data (endless-sky-high-dpi holds the same photos at twice the size).
DEFAULT_SELECTIONS: tuple[PackageSelection, ...] = (
    PackageSelection(
        package="endless-sky-high-dpi",
        include=(_ENDLESS_SKY + "images/land/*.jpg",),
        licence="public-domain / CC-BY-SA-3.0 / CC-BY-SA-4.0 (per file)",
        name_root=_ENDLESS_SKY + "images/land/",
        source_root=(_ENDLESS_SKY, ""),
    ),
    PackageSelection(
        package="forensics-samples-files",
        include=("usr/share/forensics-samples/original-files/pic*/IMG*",),
        licence="CC-BY-SA-4.0",
        name_root="usr/share/forensics-samples/original-files/",
        source_root=("usr/share/forensics-samples/", ""),
    ),
    PackageSelection(
        package="gcompris-qt-data",
        include=tuple(f"usr/share/gcompris-qt/rcc/{name}.rcc" for name in _GCOMPRIS_BUNDLES),
        members=("/gcompris/src/activities/*/resource/*.webp", "/gcompris/src/activities/*/resource/*/*.webp"),
        licence="CC0-1.0 / public-domain / CC-BY / CC-BY-SA-4.0 (per file)",
        name_root="/gcompris/src/activities/",
        # Licences come from the READMEs inside the bundles; debian/copyright is not used: it
        # still lists the .jpg/.png originals, so every .webp would fall to "Files: *" (GPL-3+).
        source_root=None,
        # Its README lists it as "germany/audaPalatina.webp" (a typo): Public Domain.
        licence_overrides=(
            ("/gcompris/src/activities/explore_monuments/resource/germany/aulaPalatina.webp", "public-domain"),
        ),
        min_short_side=300,  # the clickgame fish and other sprites are far smaller
    ),
    PackageSelection(
        package="kphotoalbum",
        include=("usr/share/kphotoalbum/demo/*.jpg",),
        exclude=("usr/share/kphotoalbum/demo/qt-logo.jpg",),
        licence="GPL-2+",
        name_root="usr/share/kphotoalbum/demo/",
        # The demo database's angle="..." attributes (usr/share/kphotoalbum/demo/index.xml).
        rotations=(
            ("usr/share/kphotoalbum/demo/grand_canyon_1.jpg", 180),
            ("usr/share/kphotoalbum/demo/new_wave_1.jpg", 90),
            ("usr/share/kphotoalbum/demo/pool_2.jpg", 270),
            ("usr/share/kphotoalbum/demo/wayne.jpg", 90),
        ),
    ),
    PackageSelection(
        package="lomiri-wallpapers-16.04",
        include=("usr/share/backgrounds/*.jpg",),
        # A texture and a colour gradient, not photographs (checked on the contact sheet).
        exclude=(
            "usr/share/backgrounds/analogpattern_by_Peter_Nerlich.jpg",
            "usr/share/backgrounds/umang_by_Abhishek_Mudgal.jpg",
        ),
        licence="CC-BY-4.0 / CC-BY-SA-4.0 / CC0-1.0",
        name_root="usr/share/backgrounds/",
        source_root=("usr/share/backgrounds/", "16.04/"),
    ),
    PackageSelection(
        package="lomiri-wallpapers-20.04",
        include=("usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",),
        licence="CC-BY-SA-3.0",
        name_root="usr/share/backgrounds/",
        source_root=("usr/share/backgrounds/", "20.04/"),
    ),
    PackageSelection(
        package="lxqt-themes",
        include=tuple(f"usr/share/lxqt/wallpapers/{name}" for name in _LXQT_PHOTOS),
        licence="CC-BY-SA-3.0",
        name_root="usr/share/lxqt/wallpapers/",
        source_root=("usr/share/lxqt/", ""),
    ),
    PackageSelection(
        package="palapeli-data",
        include=("usr/share/palapeli/collection/*.jpg",),
        licence="public-domain / GFDL",
        name_root="usr/share/palapeli/collection/",
        source_root=("usr/share/palapeli/collection/", "puzzles/"),
    ),
    PackageSelection(
        package="plasma-workspace-data",
        include=("usr/share/plasma/avatars/photos/*.png",),
        licence="CC0-1.0",
        name_root="usr/share/plasma/avatars/photos/",
        source_root=("usr/share/plasma/avatars/", "kcms/users/avatars/"),
    ),
    PackageSelection(
        package="plasma-workspace-wallpapers",
        include=tuple(f"usr/share/wallpapers/{name}/contents/images/*" for name in _PLASMA_WALLPAPERS),
        licence="LGPL-3",  # metadata.json of each wallpaper; debian/copyright says GPL-2+ for all
        name_root="usr/share/wallpapers/",
        source_root=("usr/share/wallpapers/", ""),
        largest_per_folder=True,
    ),
    PackageSelection(
        package="sddm-theme-maldives",
        include=("usr/share/sddm/themes/maldives/background.jpg",),
        licence="CC-BY-3.0",
        name_root="usr/share/sddm/themes/",
        source_root=("usr/share/sddm/themes/", "data/themes/"),
    ),
    PackageSelection(
        package="tuxpaint-data",
        include=("usr/share/tuxpaint/templates/*.jpg",),
        licence="GPL-2+",
        name_root="usr/share/tuxpaint/templates/",
        source_root=("usr/share/tuxpaint/", ""),
    ),
)


@functools.lru_cache(maxsize=512)
def _segment_glob(pattern: str) -> re.Pattern[str]:
    """A compiled regex for a path glob whose ``*`` and ``?`` never cross a ``/``."""
    parts = []
    for char in pattern:
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts))


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(_segment_glob(pattern).fullmatch(path) for pattern in patterns)


def _photo_name(path: str, root: str) -> str:
    """A stable file name from a path inside the package: root and extension dropped, folders
    joined with ``_``, and only ``[A-Za-z0-9._-]`` kept."""
    relative = path[len(root) :] if root and path.startswith(root) else path
    stem, dot, suffix = relative.rpartition(".")
    if dot and "/" not in suffix:
        relative = stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", relative.strip("/").replace("/", "_"))
    return name.strip("._") or "photo"


# ---------------------------------------------------------------------------------------------
# Qt resource bundles (.rcc)

_RCC_COMPRESSED = 0x01
_RCC_DIRECTORY = 0x02
_RCC_COMPRESSED_ZSTD = 0x04


@dataclass
class RccBundle:
    """The files of one Qt binary resource bundle: ``path -> bytes`` (paths start with ``/``)."""

    version: int
    files: dict[str, bytes] = field(default_factory=dict)
    #: Entries that could not be unpacked, ``path -> reason`` (zstd or unknown compression).
    unsupported: dict[str, str] = field(default_factory=dict)


def read_rcc(data: bytes) -> RccBundle:
    """Unpack a Qt binary resource bundle (``rcc --binary`` output, format versions 1-3).

    Layout (big-endian): ``"qres"``, version, tree offset, data offset, names offset (and, from
    version 3, global flags). The tree is an array of 14-byte nodes (22 from version 2: a 64-bit
    modification time follows): name offset, flags, then for a directory its child count and
    first child index, for a file territory, language and data offset. A name is a 16-bit length,
    a 32-bit hash and UTF-16BE text; a file's data is a 32-bit size and the bytes, which for
    zlib-compressed entries start with the 4-byte big-endian uncompressed length (qCompress).
    zstd-compressed entries (version 3) are listed in ``unsupported`` instead: no zstd here.

    Raises ValueError for data that is not a readable bundle.
    """
    if len(data) < 20 or data[:4] != b"qres":
        raise ValueError("not a Qt resource bundle (no 'qres' magic)")
    version, tree, payload, names = struct.unpack_from(">IIII", data, 4)
    if version not in (1, 2, 3):
        raise ValueError(f"unsupported rcc format version {version}")
    node_size = 14 if version == 1 else 22
    bundle = RccBundle(version=version)

    def node(index: int) -> tuple[int, int, int, int]:
        name_offset, flags, a, b = struct.unpack_from(">IHII", data, tree + index * node_size)
        return name_offset, flags, a, b

    def name(offset: int) -> str:
        (length,) = struct.unpack_from(">H", data, names + offset)
        start = names + offset + 6
        if start + 2 * length > len(data):
            raise ValueError("rcc name runs past the end of the file")
        return data[start : start + 2 * length].decode("utf-16-be")

    try:
        stack: list[tuple[int, str]] = [(0, "")]
        seen: set[int] = set()
        while stack:
            index, path = stack.pop()
            if index in seen:  # a corrupt tree could loop
                raise ValueError("rcc tree refers to a node twice")
            seen.add(index)
            _, flags, a, b = node(index)
            if flags & _RCC_DIRECTORY:
                count, first = a, b
                for child in range(first, first + count):
                    stack.append((child, f"{path}/{name(node(child)[0])}"))
                continue
            # A file node: territory and language share the first u32, then the data offset.
            data_offset = b
            (size,) = struct.unpack_from(">I", data, payload + data_offset)
            start = payload + data_offset + 4
            blob = data[start : start + size]
            if len(blob) != size:
                raise ValueError(f"rcc entry {path} runs past the end of the file")
            if path in bundle.files or path in bundle.unsupported:
                continue  # another language/territory variant of the same file: keep the first
            if flags & _RCC_COMPRESSED_ZSTD:
                bundle.unsupported[path] = "zstd-compressed"
            elif flags & ~(_RCC_COMPRESSED | _RCC_DIRECTORY):
                bundle.unsupported[path] = f"unknown flags 0x{flags:x}"
            elif flags & _RCC_COMPRESSED:
                if size < 4:
                    raise ValueError(f"rcc entry {path} is too short for a compressed entry")
                (expected,) = struct.unpack_from(">I", blob, 0)
                unpacked = zlib.decompress(blob[4:])
                if len(unpacked) != expected:
                    raise ValueError(f"rcc entry {path}: {len(unpacked)} bytes, header says {expected}")
                bundle.files[path] = unpacked
            else:
                bundle.files[path] = blob
    except (struct.error, zlib.error, UnicodeDecodeError) as exc:
        raise ValueError(f"corrupt rcc bundle: {exc}") from exc
    return bundle


# ---------------------------------------------------------------------------------------------
# Licences: DEP-5 copyright files and licence READMEs


@dataclass(frozen=True)
class Dep5Stanza:
    """One ``Files:`` paragraph of a machine-readable debian/copyright."""

    patterns: tuple[str, ...]
    licence: str  # the short name: the first line of ``License:``


def _deb822_paragraphs(text: str) -> list[dict[str, str]]:
    """Paragraphs of ``Field: value`` lines (continuations indented), field names lower-cased."""
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, last = {}, ""
        elif line.startswith("#"):
            continue
        elif line[0] in " \t":
            if last:
                current[last] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            last = key.strip().lower()
            current[last] = value.strip()
    if current:
        paragraphs.append(current)
    return paragraphs


def parse_dep5(text: str) -> list[Dep5Stanza] | None:
    """The ``Files:`` stanzas of a machine-readable (DEP-5) copyright file, in file order.

    Returns None when the file is not machine-readable (no ``Format:`` naming the
    copyright-format), so callers fall back to a licence they know from elsewhere.
    """
    paragraphs = _deb822_paragraphs(text)
    if not paragraphs or "copyright-format" not in paragraphs[0].get("format", ""):
        return None
    stanzas = []
    for paragraph in paragraphs[1:]:
        if "files" in paragraph:
            licence = paragraph.get("license", "").split("\n")[0].strip()
            stanzas.append(Dep5Stanza(tuple(paragraph["files"].split()), licence))
    return stanzas


@functools.lru_cache(maxsize=4096)
def _dep5_glob(pattern: str) -> re.Pattern[str]:
    """DEP-5 wildcards: ``*`` is any run of characters (slashes too), ``?`` one character,
    ``\\`` escapes ``*``, ``?`` and itself."""
    pattern = pattern.removeprefix("./")
    parts, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            parts.append(re.escape(pattern[index + 1]))
            index += 2
            continue
        parts.append(".*" if char == "*" else "." if char == "?" else re.escape(char))
        index += 1
    return re.compile("".join(parts), re.DOTALL)


def dep5_licence(stanzas: Sequence[Dep5Stanza], source_path: str) -> str | None:
    """The licence of ``source_path`` (a path in the source tree): the last stanza whose
    ``Files:`` patterns match wins, as the copyright-format specification says."""
    found = None
    for stanza in stanzas:
        if any(_dep5_glob(pattern).fullmatch(source_path) for pattern in stanza.patterns):
            found = stanza.licence or found
    return found


def _normalise_licence(text: str) -> str:
    """``"CC-BY-SA 4.0"`` -> ``"CC-BY-SA-4.0"``, ``"Public Domain"`` -> ``"public-domain"``."""
    name = re.sub(r"\s+", "-", text.strip())
    return "public-domain" if name.lower() == "public-domain" else name


def parse_readme_licences(text: str) -> dict[str, str]:
    """``file -> licence`` from a GCompris-style resource README.

    Those READMEs are paragraphs of ``Copyright:``, ``License:``, ``Source:`` and ``Files:``,
    where the file names follow ``Files:`` on the same line and/or on the lines after it
    (unindented, unlike DEP-5). File names are relative to the README's folder.
    """
    result: dict[str, str] = {}
    for block in re.split(r"\n\s*\n", text):
        licence, files, in_files = None, [], False
        for raw in block.splitlines():
            line = raw.strip()
            key = re.match(r"([A-Za-z][A-Za-z-]*):(.*)$", line)
            if key and not re.search(r"\.\w+$", key.group(1)):
                field_name, value = key.group(1).lower(), key.group(2).strip()
                in_files = field_name == "files"
                if field_name == "license":
                    licence = _normalise_licence(value)
                elif in_files and value:
                    files.extend(value.split())
            elif in_files and line:
                files.extend(line.split())
        if licence:
            for name in files:
                result.setdefault(name, licence)
    return result


def _rcc_readme_licences(bundle: RccBundle) -> dict[str, str]:
    """``member path -> licence`` from every README inside a bundle."""
    licences: dict[str, str] = {}
    for path, blob in sorted(bundle.files.items()):
        if path.rsplit("/", 1)[-1].upper() in ("README", "README.TXT", "README.MD"):
            folder = path.rsplit("/", 1)[0]
            text = blob.decode("utf-8", errors="replace")
            for name, licence in parse_readme_licences(text).items():
                licences.setdefault(f"{folder}/{name}", licence)
    return licences


def _licence_for(
    selection: PackageSelection, path: str, dep5: Sequence[Dep5Stanza] | None, readmes: Mapping[str, str]
) -> str:
    """The recorded licence of one photo: an explicit override, else a README beside it, else
    the DEP-5 stanza of its source path, else the selection's (the documented) licence."""
    overrides = dict(selection.licence_overrides)
    if path in overrides:
        return overrides[path]
    if path in readmes:
        return readmes[path]
    if dep5 is not None and selection.source_root is not None:
        installed, source = selection.source_root
        if path.startswith(installed):
            found = dep5_licence(dep5, source + path[len(installed) :])
            if found:
                return found
    return selection.licence


# ---------------------------------------------------------------------------------------------
# apt and dpkg


def apt_available() -> bool:
    """Whether ``apt-get`` (to download) and ``dpkg-deb`` (to unpack) are on PATH."""
    return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


def deb_field(deb: Path, name: str) -> str:
    """One control field of a ``.deb`` (``Package``, ``Version`` ...), via ``dpkg-deb --field``."""
    done = subprocess.run(["dpkg-deb", "--field", str(deb), name], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def _dpkg_newer(a: tuple[str, Path], b: tuple[str, Path]) -> int:
    if a[0] == b[0]:
        return 0
    newer = subprocess.run(["dpkg", "--compare-versions", a[0], "gt", b[0]], check=False).returncode == 0
    return 1 if newer else -1


def find_deb(package: str, folder: Path) -> Path | None:
    """An already downloaded ``.deb`` of ``package`` in ``folder`` (the newest if several), so a
    rerun downloads nothing. Names are checked against the control file: ``foo_*.deb`` alone
    would not tell ``foo`` from a renamed file."""
    found = []
    for path in sorted(folder.glob(f"{package}_*.deb")):
        try:
            if deb_field(path, "Package") == package:
                found.append((deb_field(path, "Version"), path))
        except (subprocess.CalledProcessError, OSError):
            log.warning("ignoring unreadable %s", path)
    if not found:
        return None
    return max(found, key=functools.cmp_to_key(_dpkg_newer))[1]


def _apt_lists_empty() -> bool:
    lists = Path("/var/lib/apt/lists")
    return not any(lists.glob("*_Packages*")) if lists.is_dir() else True


@dataclass
class DownloadResult:
    """What :func:`download_packages` found or fetched."""

    debs: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # package -> why
    downloaded_bytes: int = 0  # fetched in this call (0 when every .deb was there already)


def _apt_download(packages: Sequence[str], folder: Path) -> subprocess.CompletedProcess[str]:
    command = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:  # root: skip apt's "unsandboxed download" warning; the folder is ours
        command += ["-o", "APT::Sandbox::User=root"]
    return subprocess.run([*command, *packages], cwd=folder, capture_output=True, text=True, check=False)


def download_packages(packages: Sequence[str], download_dir: str | Path) -> DownloadResult:
    """``apt-get download`` every package whose ``.deb`` is not in ``download_dir`` yet.

    Runs ``apt-get update`` once first when apt has no package lists and we are root. One call
    downloads all missing packages (fast); if it fails, each package is tried alone so one bad
    name does not lose the others. Nothing is installed.
    """
    folder = Path(download_dir)
    folder.mkdir(parents=True, exist_ok=True)
    result = DownloadResult()
    missing = []
    for package in sorted(set(packages)):
        deb = find_deb(package, folder)
        if deb is None:
            missing.append(package)
        else:
            result.debs[package] = deb
            log.info("%s: %s already downloaded", package, deb.name)
    if not missing:
        return result
    if _apt_lists_empty() and os.geteuid() == 0:
        log.info("apt has no package lists: running apt-get update once")
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, check=False)
    before = {path.name for path in folder.glob("*.deb")}
    for package in missing:
        log.info("%s: downloading", package)
    outcomes: dict[str, str] = {}
    if _apt_download(missing, folder).returncode != 0:
        for package in missing:
            done = _apt_download([package], folder)
            if done.returncode != 0:
                outcomes[package] = (done.stderr.strip().splitlines() or ["apt-get download failed"])[-1]
    for package in missing:
        deb = find_deb(package, folder)
        if deb is None:
            result.failed[package] = outcomes.get(package, "apt-get download gave no .deb")
            log.error("%s: download failed: %s", package, result.failed[package])
        else:
            result.debs[package] = deb
    result.downloaded_bytes = sum(path.stat().st_size for path in folder.glob("*.deb") if path.name not in before)
    return result


def _read_inside(root: Path, relative: str) -> bytes | None:
    """A file of an unpacked package, following symlinks as the package means them (an absolute
    link is relative to the package root, not to this machine)."""
    path = root / relative
    for _ in range(16):
        if path.is_symlink():
            target = os.readlink(path)
            path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
            continue
        return path.read_bytes() if path.is_file() else None
    return None


def _package_files(root: Path) -> Iterator[str]:
    """Regular files of an unpacked package as sorted posix paths relative to ``root``."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path.relative_to(root).as_posix()


# ---------------------------------------------------------------------------------------------
# Photos


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
    thumb: np.ndarray  # 16x16 grey, float32, for near-duplicates
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


def _make_candidate(
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

    Every image file of the package is counted: taken, or skipped with a reason from
    :data:`SKIP_REASONS` (duplicates across packages are decided later, by
    :func:`deduplicate`). Raises (CalledProcessError, ValueError) when the package itself is
    unusable: not a .deb, or another package than the selection's.
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
        harvest.copyright = _read_inside(root, f"usr/share/doc/{package}/copyright")
        dep5 = parse_dep5(harvest.copyright.decode("utf-8", errors="replace")) if harvest.copyright else None
        sources: list[tuple[str, bytes]] = []  # (path naming the photo, encoded bytes)
        readmes: dict[str, str] = {}
        for path in _package_files(root):
            chosen = _matches(path, selection.include) and not _matches(path, selection.exclude)
            if selection.members and chosen:
                sources += _select_members(path, (root / path).read_bytes(), selection, harvest, readmes)
            elif is_image_file(path):
                if chosen:
                    sources.append((path, (root / path).read_bytes()))
                else:
                    excluded = _matches(path, selection.include)
                    harvest.skipped["not a photo" if excluded else "not selected"] += 1
    if selection.largest_per_folder:
        sources, dropped = _largest_per_folder(sources)
        harvest.skipped["duplicate"] += dropped
    names: dict[str, str] = {}
    rotations = dict(selection.rotations)
    jobs = []
    for path, data in sources:
        naming_path = path.split(":", 1)[1] if selection.members else path
        key = f"{package}/{_photo_name(naming_path, selection.name_root)}.jpg"
        if key in names:
            raise ValueError(f"{package}: {path} and {names[key]} would both be stored as {key}")
        names[key] = path
        short = _short_side(data)
        if short is not None and short < selection.min_short_side:
            harvest.skipped["too small"] += 1
            continue
        licence = _licence_for(selection, naming_path, dep5, readmes)
        jobs.append(
            functools.partial(
                _make_candidate, data, key=key, package=package, version=harvest.version, path=path,
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
    readmes.update(_rcc_readme_licences(bundle))
    for member, why in sorted(bundle.unsupported.items()):
        if is_image_file(member):
            log.warning("%s: %s:%s skipped (%s)", harvest.package, bundle_path, member, why)
            harvest.skipped["unsupported compression"] += 1
    chosen = []
    for member, blob in sorted(bundle.files.items()):
        if not is_image_file(member):
            continue
        if not _matches(member, selection.members):
            harvest.skipped["not selected"] += 1
        elif _matches(member, selection.member_exclude):
            harvest.skipped["not a photo"] += 1
        else:
            chosen.append((f"{bundle_path}:{member}", blob))
    return chosen


def deduplicate(candidates: Iterable[Candidate]) -> tuple[list[Candidate], list[tuple[Candidate, Candidate]]]:
    """Drop exact and near duplicates, keeping the larger copy of each picture.

    Exact: the same decoded, oriented pixels (sha256). Near: the same picture at another size or
    re-encoded, i.e. 16x16 grey thumbnails within :data:`NEAR_DUPLICATE_LEVELS` and aspect ratios
    within :data:`NEAR_DUPLICATE_ASPECT`. Candidates are visited largest first (ties by key), so
    the result does not depend on the input order. Returns ``(kept sorted by key, [(dropped,
    the kept copy it duplicates), ...])``.
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


# ---------------------------------------------------------------------------------------------
# Output


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


# ---------------------------------------------------------------------------------------------
# The stage


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

    ``debs`` (``package -> .deb path``) skips apt entirely, for tests and offline mirrors.
    Otherwise the packages are downloaded into ``params.download_dir`` (kept, so a rerun
    downloads nothing); without apt, or when every download fails, the bundled sample photos
    are stored instead (:func:`build_sample_corpus`) after one warning. A package that fails on
    its own is reported in ``failed_packages``; the others still make the corpus.
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
        made = _make_candidate(
            Path(path).read_bytes(), key=f"sample/{_photo_name(key, '')}.jpg", package=package, version=version,
            path=inside, licence=_SAMPLE_LICENCES.get(key, "BSD-3-Clause"), max_short_side=params.max_short_side,
        )  # fmt: skip
        if isinstance(made, str):
            entry["skipped"][made] += 1
        else:
            candidates.append(made)
        licence_text = _distribution_licence_file(distribution)
        if licence_text is not None:
            copyrights[_photo_name(package, "")] = licence_text
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
