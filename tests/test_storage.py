"""Prepared photos in storage: filesystems, shard listing, streaming reads and seeded subsets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dfnet import data, storage
from dfnet.images import encode_png


def _noise(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _rows(prefix: str, count: int) -> pa.Table:
    return pa.table(
        {
            "key": [f"{prefix}#{i:05d}" for i in range(count)],
            "source": [prefix] * count,
            "split": ["val"] * count,
            "image": [encode_png(_noise(16, 16, seed)) for seed in range(count)],
            "height": [16] * count,
            "width": [16] * count,
        },
        schema=storage.PARQUET_SCHEMA,
    )


@pytest.fixture
def shards(tmp_path):
    """A val split in three shards; file names sort differently as text and as numbers."""
    (tmp_path / "val").mkdir()
    tables = {"part-10.parquet": _rows("b", 4), "part-9.parquet": _rows("a", 3), "part-2.parquet": _rows("c", 5)}
    for name, table in tables.items():
        pq.write_table(table, tmp_path / "val" / name, row_group_size=2)  # several row groups each
    (tmp_path / "val" / "notes.txt").write_text("not a shard")
    return tmp_path, tables


def test_split_files_and_streamed_rows(shards):
    root, tables = shards
    fs, files = storage.split_files(str(root), "val")
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-10.parquet", "part-2.parquet", "part-9.parquet"]
    batches = list(storage.iter_rows(fs, files))
    assert max(b.num_rows for b in batches) == 2  # one row group at a time, never a whole shard
    keys = [k for b in batches for k in b.column(0).to_pylist()]
    names = ("part-10.parquet", "part-2.parquet", "part-9.parquet")
    expected = [k for name in names for k in tables[name]["key"].to_pylist()]
    assert keys == expected and batches[0].schema.names == ["key", "image"]
    assert storage.count_rows(str(root), "val") == 12
    with pytest.raises(FileNotFoundError, match="prepare"):
        storage.split_files(str(root), "test")


def test_subsets_are_seeded_bounded_and_stable_as_photos_are_added(shards):
    root, tables = shards
    subset = storage.read_subset(str(root), "val", 5, seed=0)
    keys = subset.column("key").to_pylist()
    assert len(keys) == 5 and keys == sorted(keys) and subset.schema.equals(storage.PARQUET_SCHEMA)
    assert storage.read_subset(str(root), "val", 5, seed=0).equals(subset)  # the same every time
    assert storage.read_subset(str(root), "val", 5, seed=1).column("key").to_pylist() != keys
    everything = storage.read_subset(str(root), "val", 100, seed=0)
    assert everything.num_rows == 12  # a bound, not a quota
    # The subset is the photos whose hash is smallest: a new shard only swaps in lower hashes.
    pq.write_table(_rows("d", 6), root / "val" / "part-11.parquet")
    grown = set(storage.read_subset(str(root), "val", 5, seed=0).column("key").to_pylist())
    dropped, added = set(keys) - grown, grown - set(keys)
    assert len(grown) == 5 and all(k.startswith("d#") for k in added)
    rank = {k: data.stable_hash(f"0:{k}") for k in grown | set(keys)}
    assert all(rank[d] > rank[a] for d in dropped for a in added)
    photos = storage.load_photos(str(root), "val", 8, 3, seed=0)
    assert len(photos) == 3 and all(p.shape == (8, 8, 3) for p in photos.values())
    with pytest.raises(ValueError, match="count"):
        storage.read_subset(str(root), "val", 0, seed=0)


def test_filesystem_for(monkeypatch, tmp_path):
    fs, path = storage.filesystem_for(str(tmp_path / "x" / ".." / "y"))
    assert fs.type_name == "local" and path == str(tmp_path / "y")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    fs, path = storage.filesystem_for("s3://bucket/some/prefix/")
    assert fs.type_name == "s3" and path == "bucket/some/prefix"
    assert fs.region == "eu-west-3"
