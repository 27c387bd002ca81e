"""Reading packages: Qt ``.rcc`` resource bundles, ``.deb`` files (``dpkg-deb``), ``apt-get download``.

Nothing is installed: packages are downloaded into a folder and unpacked into temporary ones.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


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

    The layout is Qt's (big-endian header, a tree of fixed-size nodes, UTF-16BE names, payloads
    with a size prefix; zlib entries carry qCompress's length prefix). zstd entries go to
    ``unsupported``, as there is no zstd here. Raises ValueError for an unreadable bundle.
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

    One call fetches them all; if it fails, each package is tried alone so one bad name does not
    lose the others. Runs ``apt-get update`` first when apt has no lists and we are root.
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


def read_inside(root: Path, relative: str) -> bytes | None:
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


def package_files(root: Path) -> Iterator[str]:
    """Regular files of an unpacked package as sorted posix paths relative to ``root``."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path.relative_to(root).as_posix()
