"""The prepare and masks stages: Ray Data over a folder, the bundled sample photos and S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import split_table
from PIL import Image

from dfnet import data, storage
from dfnet.images import decode_image
from dfnet.masks import hole_ratio, load_masks
from dfnet.params import DataParams, MaskParams, load_params
from pipelines.make_masks import make_masks
from pipelines.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def _data(**changes: object) -> DataParams:
    """params.yaml's data section with `changes`."""
    return load_params(REPO / "params.yaml", {"data": changes}).data


def _masks(**changes: object) -> MaskParams:
    return load_params(REPO / "params.yaml", {"masks": changes}).masks


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    """A gradient plus noise: smooth structure and texture, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (height + width)], -1)
    noisy = base + rng.normal(0, 25, (height, width, 3)) + rng.uniform(-60, 60, 3)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


# key (path relative to the source root) -> file bytes
GOOD = {
    "a.png": _encoded(_photo(60, 90, 1), "PNG"),
    "b.PNG": _encoded(_photo(100, 70, 2), "PNG"),
    "c.jpg": _encoded(_photo(80, 80, 3), "JPEG"),
    "sub/d.jpeg": _encoded(_photo(50, 120, 4), "JPEG"),
    "sub/deeper/e.png": _encoded(_photo(20, 24, 5), "PNG"),  # smaller than SIZE: kept as it is
}
BAD = {
    "broken.png": np.random.default_rng(9).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    "sub/truncated.jpg": _encoded(_photo(90, 90, 6), "JPEG")[:700],
    "notes.png": b"these are my notes, not an image\n",
}
IGNORED = {"README.txt": b"not read at all: no image extension\n"}


def _write_folder(root: Path) -> Path:
    for name, blob in (GOOD | BAD | IGNORED).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return root


def _read_all(out_dir: str) -> dict[str, pa.Table]:
    return {split: split_table(out_dir, split) for split in storage.SPLITS}


def _check_tables(tables: dict[str, pa.Table], expected_split: dict[str, str], originals: dict[str, bytes]) -> None:
    """One row per photo, each in its expected split and nowhere else, scaled to the stored
    short side (never up), its pixels those of the original (through JPEG)."""
    seen_keys: set[str] = set()
    for split, table in tables.items():
        assert table.schema.equals(storage.PARQUET_SCHEMA)
        rows = table.to_pylist()
        for row in rows:
            assert row["split"] == split == expected_split[row["source"]]
            assert row["key"] == row["source"]
            expected = data.resize_short_side(data.decode_photo(originals[row["key"]]), SIZE, upscale=False)
            image = decode_image(row["image"])
            assert image.shape == expected.shape and (row["height"], row["width"]) == expected.shape[:2]
            # The stored pixels are exactly the scaled original through the stage's JPEG encoding.
            np.testing.assert_array_equal(image, decode_image(data.encode_jpeg(expected)))
        seen_keys.update(table.column("key").to_pylist())
    assert len(seen_keys) == sum(t.num_rows for t in tables.values())  # a photo lands once


def test_prepare_folder_skips_bad_files_and_is_deterministic(ray_local, tmp_path):
    raw = _write_folder(tmp_path / "raw")
    params = _data(
        source=str(raw),
        image_size=SIZE,
        store_short_side=SIZE,
        val_fraction=0.3,
        test_fraction=0.3,
        shard_rows=2,
        out_dir=str(tmp_path / "out1"),
    )
    report = prepare(params)

    assert report["num_skipped"] == 3
    assert {s["file"] for s in report["skipped"]} == set(BAD)
    assert all(s["reason"] for s in report["skipped"])
    assert report["files_read"] == len(GOOD) + len(BAD)
    assert sum(s["images"] for s in report["splits"].values()) == len(GOOD)
    on_disk = json.loads((tmp_path / "out1" / "report.json").read_text())
    assert on_disk["skipped"] == report["skipped"] and on_disk["splits"] == report["splits"]

    tables = _read_all(params.out_dir)
    expected = {key: data.split_of(key, 0.3, 0.3) for key in GOOD}
    _check_tables(tables, expected, GOOD)
    assert {r["source"] for t in tables.values() for r in t.to_pylist()} == set(GOOD)
    for split, info in report["splits"].items():  # shards hold at most shard_rows rows
        parts = sorted((tmp_path / "out1" / split).glob("*.parquet"))
        assert len(parts) == info["shards"] == max(1, -(-info["images"] // 2))

    # A second run (into a folder holding stale shards of another run) writes the same tables.
    second = DataParams(**{**params.__dict__, "out_dir": str(tmp_path / "out2")})
    stale = tmp_path / "out2" / "train"
    stale.mkdir(parents=True)
    (stale / "part-99.parquet").write_bytes(b"stale")
    assert prepare(second)["splits"] == report["splits"]
    again = _read_all(second.out_dir)
    assert all(again[s].equals(tables[s]) for s in storage.SPLITS)
    for split in storage.SPLITS:  # the same shards, byte for byte, each in key order
        first_parts = sorted((tmp_path / "out1" / split).glob("*.parquet"))
        assert [p.name for p in first_parts] == sorted(p.name for p in (tmp_path / "out2" / split).glob("*.parquet"))
        for part in first_parts:
            assert part.read_bytes() == (tmp_path / "out2" / split / part.name).read_bytes()
            keys = pq.read_table(part).column("key").to_pylist()
            assert keys == sorted(keys)


def test_prepare_sample_source(ray_local, tmp_path):
    params = _data(source="sample", image_size=SIZE, store_short_side=SIZE, out_dir=str(tmp_path))
    report = prepare(params)
    photos = data.sample_photos()
    assert report["num_skipped"] == 0 and report["files_read"] == len(photos)
    quotas = data.quota_splits(photos, params.val_fraction, params.test_fraction)
    for split, info in report["splits"].items():
        assert info["images"] == sum(v == split for v in quotas.values()) >= 1
    _check_tables(_read_all(str(tmp_path)), quotas, {k: Path(p).read_bytes() for k, p in photos.items()})


def test_prepare_s3_to_s3(ray_local, s3_server):
    uploads = {
        "raw/x.png": GOOD["a.png"],
        "raw/y/z.jpg": GOOD["c.jpg"],
        "raw/bad.png": BAD["notes.png"],
    }
    uploads |= {"elsewhere/not-read.png": GOOD["b.PNG"]}  # outside the source prefix
    for key, blob in uploads.items():
        s3_server.client.put_object(Bucket=s3_server.bucket, Key=key, Body=blob)
    params = _data(
        source=s3_server.uri("raw"),
        image_size=SIZE,
        store_short_side=SIZE,
        val_fraction=0.0,
        test_fraction=0.0,
        out_dir=s3_server.uri("prepared"),
    )
    report = prepare(params)
    assert [s["file"] for s in report["skipped"]] == ["bad.png"]
    assert report["splits"]["train"]["images"] == 2
    tables = _read_all(params.out_dir)
    _check_tables(tables, {"x.png": "train", "y/z.jpg": "train"}, {"x.png": GOOD["a.png"], "y/z.jpg": GOOD["c.jpg"]})
    assert tables["val"].num_rows == tables["test"].num_rows == 0
    stored = s3_server.client.get_object(Bucket=s3_server.bucket, Key="prepared/report.json")
    assert json.loads(stored["Body"].read())["splits"] == report["splits"]


def test_make_masks(tmp_path):
    params = _masks(pool_size=12, seed=4, size=48, out=str(tmp_path / "m" / "masks.npz"))
    summary = make_masks(params)
    stored = load_masks(params.out)
    assert set(stored) == {"pool"}
    assert stored["pool"].shape == (12, 48, 48) and stored["pool"].dtype == np.uint8
    assert all(hole_ratio(m) > 0 for m in stored["pool"])
    assert 0 < summary["pool"]["hole_ratio_mean"] < 0.6
    assert json.loads((tmp_path / "m" / "masks_summary.json").read_text()) == summary
    preview = Image.open(tmp_path / "m" / "masks_preview.png")
    assert preview.width > 48 * 8 and preview.height > 48 * 2  # two rows of eight

    # Seeded: the same seed repeats exactly, another seed does not.
    make_masks(MaskParams(**{**params.__dict__, "out": str(tmp_path / "again.npz")}))
    np.testing.assert_array_equal(load_masks(tmp_path / "again.npz")["pool"], stored["pool"])
    make_masks(MaskParams(**{**params.__dict__, "seed": 5, "out": str(tmp_path / "o.npz")}))
    assert not np.array_equal(load_masks(tmp_path / "o.npz")["pool"], stored["pool"])


@pytest.mark.parametrize("bad", [{"store_short_side": 16, "image_size": 32}, {"shard_rows": 0}])
def test_prepare_rejects_bad_params(bad, tmp_path):
    with pytest.raises(ValueError):
        prepare(_data(**({"out_dir": str(tmp_path)} | bad)))
