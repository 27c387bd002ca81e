"""The offline photo corpus (dfnet.corpus, pipelines/corpus.py) on synthetic packages, no network.

The .deb files are built here with ``dpkg-deb --build`` and handed to ``build_corpus`` directly,
so apt is never asked; the rcc reader is checked against bundles written by a tiny writer below.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dfnet.corpus import (
    MANIFEST_COLUMNS,
    PackageSelection,
    archives,
    build_corpus,
    dep5_licence,
    download_packages,
    parse_dep5,
    parse_readme_licences,
    read_rcc,
)
from dfnet.params import CorpusParams, load_params

REPO = Path(__file__).resolve().parents[1]
needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian tools)")


def _photo(seed: int, width: int, height: int) -> Image.Image:
    """A smooth random colour field: photo-like, and unlike any other seed's (no near-dups)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _upright_portrait() -> Image.Image:
    """300x400 (portrait) with a pure red top band: where "up" is after orientation."""
    image = _photo(7, 300, 400)
    image.paste((255, 0, 0), (0, 0, 300, 60))
    return image


def _left_band_landscape() -> bytes:
    """320x240 with a red band along the left edge: turned 90° clockwise, the band is on top."""
    image = _photo(3, 320, 240)
    image.paste((255, 0, 0), (0, 0, 45, 240))
    return _encode(image, quality=90)


def _red_on_top(path: Path) -> bool:
    with Image.open(path) as image:
        top = np.asarray(image.convert("RGB"))[:20].reshape(-1, 3).mean(axis=0)
    return bool(top[0] > 200 and top[1] < 60 and top[2] < 60)


def _exif_rotated_jpeg() -> bytes:
    """The portrait stored sideways (400x300 pixels) with EXIF orientation 6 ("turn 90° CW")."""
    stored = _upright_portrait().transpose(Image.Transpose.ROTATE_90)  # 90° counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(stored, quality=95, exif=exif.tobytes())


DEP5 = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: photos-test

Files: *
Copyright: 2024 Someone
License: GPL-2+

Files: photos/*
Copyright: 2024 A Photographer
License: CC-BY-4.0
 The licence text would follow here.
 .
 More text.

Files:
 photos/rot*
 photos/never-matches-\\*
Copyright: 2024 Another Photographer
License: CC0-1.0

License: GPL-2+
 A standalone licence paragraph: no Files, never matched.
"""


def _build_deb(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A real .deb holding ``files`` (paths inside the package), built with dpkg-deb."""
    root = folder / f"{package}-root"
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
        "Description: test photos\n"
    )
    deb = folder / f"{package}_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)], check=True, capture_output=True
    )
    return deb


PHOTOS = "usr/share/photos/"
SELECTION = PackageSelection(
    package="photos-test",
    include=(PHOTOS + "*.jpg", PHOTOS + "*.png"),
    exclude=(PHOTOS + "logo.jpg",),
    licence="documented-licence",
    name_root=PHOTOS,
    source_root=("usr/share/", ""),
    min_short_side=128,
    rotations=((PHOTOS + "Weird name@2x.jpg", 90),),  # a turn recorded outside EXIF
    licence_overrides=((PHOTOS + "Weird name@2x.jpg", "override-licence"),),
)
PLAIN = PackageSelection(
    package="plain-test",
    include=("usr/share/plain/*.jpg",),
    licence="CC-BY-SA-3.0",
    name_root="usr/share/plain/",
    source_root=("usr/share/", ""),  # ignored: the copyright file is not machine-readable
)


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb (Debian tools)")
    folder = tmp_path_factory.mktemp("debs")
    original = _encode(_photo(1, 400, 300), quality=95)
    decoded = Image.open(io.BytesIO(original)).convert("RGB")
    photos = {
        PHOTOS + "a.jpg": original,
        PHOTOS + "copy.png": _encode(decoded, "PNG"),  # the same pixels, another file: exact dup
        # Sorts before a.jpg, so only "keep the larger" makes a.jpg the one kept.
        PHOTOS + "a-small.jpg": _encode(decoded.resize((200, 150), Image.Resampling.LANCZOS), quality=80),
        PHOTOS + "rotated.jpg": _exif_rotated_jpeg(),
        PHOTOS + "Weird name@2x.jpg": _left_band_landscape(),
        PHOTOS + "broken.jpg": original[:200] + b"\x00" * 50,  # a truncated JPEG
        PHOTOS + "logo.jpg": _encode(_photo(4, 300, 300)),  # excluded: "not a photo"
        PHOTOS + "tiny.jpg": _encode(_photo(5, 100, 80)),  # under min_short_side
        PHOTOS + "README": b"not an image, not counted",
        "usr/share/other/icon.png": _encode(_photo(6, 256, 256), "PNG"),  # not selected
        "usr/share/doc/photos-test/copyright": DEP5.encode(),
    }
    plain = {
        "usr/share/plain/meadow.jpg": _encode(_photo(8, 500, 400), quality=92),
        "usr/share/doc/plain-test/copyright": b"This package was debianized by someone.\nPhotos: CC-BY-SA 3.0.\n",
    }
    broken = folder / "broken-test_1.0_all.deb"
    broken.write_bytes(b"!<arch>\nthis is no debian package")
    return {
        "photos-test": _build_deb(folder, "photos-test", "1.2-3", photos),
        "plain-test": _build_deb(folder, "plain-test", "2:0.5", plain),
        "broken-test": broken,
    }


def _params(tmp_path: Path, max_short_side: int = 200) -> CorpusParams:
    corpus = {
        "out_dir": str(tmp_path / "corpus"),
        "manifest": str(tmp_path / "docs" / "manifest.tsv"),
        "download_dir": str(tmp_path / "debs"),
        "max_short_side": max_short_side,
    }
    return load_params(REPO / "params.yaml", {"corpus": corpus}).corpus


def _read_manifest(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return header, [dict(zip(header, line.split("\t"))) for line in lines[1:]]


BROKEN = PackageSelection(package="broken-test", include=("*",), licence="x")


@needs_dpkg
def test_corpus_from_local_debs(tmp_path: Path, debs: dict[str, Path]) -> None:
    params = _params(tmp_path)
    report = build_corpus(params, selections=[SELECTION, PLAIN, BROKEN], debs=debs)

    entry = report["packages"]["photos-test"]
    assert entry["version"] == "1.2-3"
    assert entry["photos"] == 3  # a.jpg, rotated.jpg, Weird name@2x.jpg
    assert entry["skipped"] == {"not selected": 1, "not a photo": 1, "too small": 1, "duplicate": 2, "unreadable": 1}
    assert report["packages"]["plain-test"]["photos"] == 1
    # One broken package is reported, not fatal.
    assert report["failed_packages"] == ["broken-test"]
    assert report["packages"]["broken-test"]["error"]
    assert report["total_photos"] == 4
    assert report["download_bytes"] == 0  # local .debs: nothing was downloaded
    assert (Path(params.out_dir) / "report.json").is_file()

    header, rows = _read_manifest(params.manifest)
    assert header == list(MANIFEST_COLUMNS)
    keys = [row["key"] for row in rows]
    assert keys == sorted(keys)
    assert keys == [
        "photos-test/Weird_name_2x.jpg",
        "photos-test/a.jpg",
        "photos-test/rotated.jpg",
        "plain-test/meadow.jpg",
    ]
    by_key = {row["key"]: row for row in rows}

    # Licences: DEP-5 stanzas, the last match winning; the documented licence without DEP-5.
    assert by_key["photos-test/a.jpg"]["licence"] == "CC-BY-4.0"
    assert by_key["photos-test/rotated.jpg"]["licence"] == "CC0-1.0"
    assert by_key["plain-test/meadow.jpg"]["licence"] == "CC-BY-SA-3.0"
    assert by_key["photos-test/Weird_name_2x.jpg"]["licence"] == "override-licence"
    assert by_key["photos-test/a.jpg"]["path_in_package"] == "usr/share/photos/a.jpg"
    assert by_key["plain-test/meadow.jpg"]["package_version"] == "2:0.5"

    # Sizes: short side capped at max_short_side; the EXIF-rotated photo comes out portrait.
    assert (by_key["photos-test/a.jpg"]["width"], by_key["photos-test/a.jpg"]["height"]) == ("267", "200")
    assert (by_key["photos-test/rotated.jpg"]["width"], by_key["photos-test/rotated.jpg"]["height"]) == ("200", "267")
    weird = by_key["photos-test/Weird_name_2x.jpg"]
    assert (weird["width"], weird["height"]) == ("200", "267")  # 320x240, turned by the selection
    photos = Path(params.out_dir) / "photos"
    # The red bands are on top: both turned the right way (by EXIF, by the selection).
    assert _red_on_top(photos / "photos-test/rotated.jpg")
    assert _red_on_top(photos / "photos-test/Weird_name_2x.jpg")

    for row in rows:
        stored_bytes = (photos / row["key"]).read_bytes()
        assert hashlib.sha256(stored_bytes).hexdigest() == row["sha256"]
        with Image.open(io.BytesIO(stored_bytes)) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (int(row["width"]), int(row["height"]))
    assert sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg")) == keys

    copyright_copy = Path(params.out_dir) / "copyright" / "photos-test"
    assert copyright_copy.read_text() == DEP5


@needs_dpkg
def test_rerun_is_identical_and_clears_old_photos(tmp_path: Path, debs: dict[str, Path]) -> None:
    params = _params(tmp_path, max_short_side=160)
    selections = [SELECTION, PLAIN]
    build_corpus(params, selections=selections, debs=debs)
    first_manifest = Path(params.manifest).read_bytes()
    photos = Path(params.out_dir) / "photos"
    first = {p.relative_to(photos): p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    stray = photos / "photos-test" / "left-over.jpg"
    stray.write_bytes(b"from an earlier selection")

    # Candidates are visited largest first whatever the order of the selections.
    build_corpus(params, selections=selections[::-1], debs=debs)
    assert not stray.exists()
    assert Path(params.manifest).read_bytes() == first_manifest
    assert {p.relative_to(photos): p.read_bytes() for p in photos.rglob("*") if p.is_file()} == first


def test_fallback_without_apt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dfnet.data import sample_photos
    from pipelines import corpus as stage

    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # no apt-get, no dpkg-deb
    params_yaml = tmp_path / "params.yaml"
    corpus = {"out_dir": str(tmp_path / "corpus"), "manifest": str(tmp_path / "manifest.tsv"),
              "download_dir": str(tmp_path / "debs"), "max_short_side": 128}  # fmt: skip
    params_yaml.write_text(yaml.safe_dump(load_params(REPO / "params.yaml", {"corpus": corpus}).to_dict()))
    with caplog.at_level(logging.INFO):
        stage.main(["--params", str(params_yaml)])

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "apt-get" in message and "sample" in message
    assert not (tmp_path / "debs").exists()  # nothing was tried

    header, rows = _read_manifest(tmp_path / "manifest.tsv")
    assert header == list(MANIFEST_COLUMNS)
    samples = sample_photos()
    assert len(rows) == len(samples)
    assert {row["package"] for row in rows} == {f"sample:{key.split('/')[0]}" for key in samples}
    by_path = {(row["package"], row["path_in_package"].rsplit("/", 1)[-1]): row for row in rows}
    if "skimage/astronaut.png" in samples:
        assert by_path[("sample:skimage", "astronaut.png")]["licence"] == "public-domain"
    if "sklearn/china.jpg" in samples:
        assert by_path[("sample:sklearn", "china.jpg")]["licence"] == "CC-BY-2.0"
    for row in rows:
        assert row["key"].startswith("sample/")
        stored = tmp_path / "corpus" / "photos" / row["key"]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"]
        assert min(int(row["width"]), int(row["height"])) <= 128
    report = (tmp_path / "corpus" / "report.json").read_text()
    assert '"source": "sample"' in report


@needs_dpkg
def test_download_skips_debs_already_there(
    tmp_path: Path, debs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "debs"
    folder.mkdir()
    shutil.copy(debs["photos-test"], folder)

    def no_apt(*args: object, **kwargs: object) -> None:
        raise AssertionError("apt-get download was called for a package that is already there")

    monkeypatch.setattr(archives, "_apt_download", no_apt)
    result = download_packages(["photos-test"], folder)
    assert result.debs == {"photos-test": folder / debs["photos-test"].name}
    assert result.failed == {} and result.downloaded_bytes == 0


# ---------------------------------------------------------------------------------------------
# DEP-5 and README licences


def test_dep5_last_matching_stanza_wins() -> None:
    stanzas = parse_dep5(DEP5)
    assert stanzas is not None and len(stanzas) == 3
    assert dep5_licence(stanzas, "photos/a.jpg") == "CC-BY-4.0"
    assert dep5_licence(stanzas, "photos/rotated.jpg") == "CC0-1.0"
    assert dep5_licence(stanzas, "photos/sub/dir/x.jpg") == "CC-BY-4.0"  # "*" crosses "/"
    assert dep5_licence(stanzas, "src/main.c") == "GPL-2+"
    assert dep5_licence(stanzas, "photos/never-matches-*") == "CC0-1.0"  # the escaped star itself
    assert dep5_licence(stanzas[1:], "src/main.c") is None


def test_dep5_question_mark_and_non_machine_readable() -> None:
    text = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\nFiles: a?b\nLicense: MIT\n"
    stanzas = parse_dep5(text)
    assert stanzas is not None
    assert dep5_licence(stanzas, "a b") == "MIT"
    assert dep5_licence(stanzas, "ab") is None
    assert parse_dep5("This package was debianized by someone.\n\nFiles: *\nLicense: MIT\n") is None


def test_readme_licences() -> None:
    text = (
        "Copyright: Someone\nLicense: CC-BY-SA 4.0\nFiles:\nwonders/a.webp\nwonders/b.webp\n\n"
        "Copyright: Other\nSource: https://example.org/x.jpg\nLicense: Public domain\nFiles: c.webp\n\n"
        "Files: d.webp\nLicense: CC0-1.0\nComments: cropping\n"
    )
    assert parse_readme_licences(text) == {
        "wonders/a.webp": "CC-BY-SA-4.0",
        "wonders/b.webp": "CC-BY-SA-4.0",
        "c.webp": "public-domain",
        "d.webp": "CC0-1.0",
    }


# ---------------------------------------------------------------------------------------------
# Qt .rcc bundles


def _rcc(files: dict[str, tuple[bytes, str]], version: int = 3) -> bytes:
    """A Qt binary resource bundle of ``path -> (data, "zlib" | "plain" | "zstd")``.

    Layout as rcc writes it: header, tree (breadth first, a directory's children contiguous),
    names, payload. The "zstd" entries carry the zstd flag over plain bytes: enough to be skipped.
    """
    tree: dict = {}
    for path, entry in files.items():
        parts = path.strip("/").split("/")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = entry
    nodes: list[tuple[str, object]] = [("", tree)]
    children: dict[int, tuple[int, int]] = {}
    index = 0
    while index < len(nodes):
        entry = nodes[index][1]
        if isinstance(entry, dict):
            children[index] = (len(entry), len(nodes))
            nodes.extend(sorted(entry.items()))
        index += 1

    names, payload, records = bytearray(), bytearray(), bytearray()
    for index, (name, entry) in enumerate(nodes):
        name_offset = len(names)
        names += struct.pack(">HI", len(name), 0) + name.encode("utf-16-be")
        if isinstance(entry, dict):
            count, first = children[index]
            records += struct.pack(">IHII", name_offset, 0x02, count, first)
        else:
            data, kind = entry
            flags = {"plain": 0, "zlib": 0x01, "zstd": 0x04}[kind]
            blob = struct.pack(">I", len(data)) + zlib.compress(data) if kind == "zlib" else data
            records += struct.pack(">IHHHI", name_offset, flags, 0, 1, len(payload))
            payload += struct.pack(">I", len(blob)) + blob
        if version >= 2:
            records += struct.pack(">Q", 1_700_000_000_000)
    header_size = 24 if version >= 3 else 20
    tree_offset = header_size
    names_offset = tree_offset + len(records)
    payload_offset = names_offset + len(names)
    header = b"qres" + struct.pack(">IIII", version, tree_offset, payload_offset, names_offset)
    if version >= 3:
        header += struct.pack(">I", 0)
    return header + bytes(records) + bytes(names) + bytes(payload)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_read_rcc_plain_and_zlib_entries(version: int) -> None:
    webp = _encode(_photo(9, 64, 48), "WEBP", quality=80)
    text = b"Files: pic.webp\nLicense: CC0-1.0\n" * 20
    bundle_bytes = _rcc(
        {
            "/app/res/pic.webp": (webp, "plain"),
            "/app/res/README": (text, "zlib"),
            "/app/deep/er/notes.txt": (b"hello", "zlib"),
            "/app/packed.webp": (webp, "zstd"),
        },
        version,
    )
    bundle = read_rcc(bundle_bytes)
    assert bundle.version == version
    assert bundle.files == {"/app/res/pic.webp": webp, "/app/res/README": text, "/app/deep/er/notes.txt": b"hello"}
    assert bundle.unsupported == {"/app/packed.webp": "zstd-compressed"}
    with Image.open(io.BytesIO(bundle.files["/app/res/pic.webp"])) as image:
        assert image.size == (64, 48)


def test_read_rcc_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="qres"):
        read_rcc(b"PK\x03\x04 not a bundle at all")
    good = _rcc({"/a.txt": (b"x" * 100, "zlib")})
    with pytest.raises(ValueError):
        read_rcc(good[:-30])  # truncated payload


@needs_dpkg
def test_rcc_members_selected_inside_a_deb(tmp_path: Path) -> None:
    big = _encode(_photo(10, 400, 320), "WEBP", quality=90)
    small = _encode(_photo(11, 64, 64), "WEBP", quality=90)
    readme = b"Copyright: X\nLicense: CC-BY-SA 4.0\nFiles:\nbig.webp\nsmall.webp\n"
    bundle = _rcc(
        {
            "/game/act/res/big.webp": (big, "plain"),
            "/game/act/res/small.webp": (small, "zlib"),  # a sprite: too small
            "/game/act/res/README": (readme, "zlib"),
            "/game/act/icon.webp": (small, "plain"),  # outside the member patterns
            "/game/act/res/packed.webp": (big, "zstd"),
        }
    )
    deb = _build_deb(
        tmp_path, "bundle-test", "1", {"usr/share/game/rcc/act.rcc": bundle, "usr/share/game/rcc/other.rcc": b"x"}
    )
    selection = PackageSelection(
        package="bundle-test",
        include=("usr/share/game/rcc/act.rcc",),
        members=("/game/*/res/*.webp",),
        licence="documented",
        name_root="/game/",
        min_short_side=100,
    )
    report = build_corpus(_params(tmp_path, max_short_side=256), selections=[selection], debs={"bundle-test": deb})
    assert report["packages"]["bundle-test"]["photos"] == 1
    assert report["packages"]["bundle-test"]["skipped"] == {
        "not selected": 1,
        "too small": 1,
        "unsupported compression": 1,
    }
    _, rows = _read_manifest(tmp_path / "docs" / "manifest.tsv")
    assert [(row["key"], row["licence"], row["path_in_package"]) for row in rows] == [
        ("bundle-test/act_res_big.jpg", "CC-BY-SA-4.0", "usr/share/game/rcc/act.rcc:/game/act/res/big.webp")
    ]
    assert (rows[0]["width"], rows[0]["height"]) == ("320", "256")
