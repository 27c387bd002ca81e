"""Where prepared photos live: filesystems (local or ``s3://``) and the Parquet shards of a split.

Every reader here streams: shards are read one row group at a time, and a subset of a split is
chosen from its key column alone, so memory never grows with the number of photos in a split.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dfnet.data import decode_photo, resize_short_side, stable_hash

__all__ = [
    "PARQUET_SCHEMA",
    "SPLITS",
    "count_rows",
    "filesystem_for",
    "iter_rows",
    "load_photos",
    "read_subset",
    "split_files",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")

#: One row per photo. ``key`` = ``source`` = the photo's key (its path relative to the source
#: root); ``image`` = JPEG bytes of the photo scaled to the stored short side.
PARQUET_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
    ]
)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or a URI such as ``s3://``.

    S3 credentials found in the environment are passed explicitly so the filesystem carries them
    when pickled to Ray workers whose environment lacks them; otherwise the SDK's chain applies.
    """
    uri = str(uri)
    if uri.startswith("s3://"):
        env = os.environ
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        access_key = env.get("AWS_ACCESS_KEY_ID")
        secret_key = env.get("AWS_SECRET_ACCESS_KEY")
        creds: dict[str, str] = {}
        if access_key and secret_key:
            creds = {"access_key": access_key, "secret_key": secret_key}
            if env.get("AWS_SESSION_TOKEN"):
                creds["session_token"] = env["AWS_SESSION_TOKEN"]
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region, **creds)
        return fs, uri[len("s3://") :].rstrip("/")
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def split_files(root: str, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the sorted Parquet shard paths of ``{root}/{split}``.

    A shard holds ``data.shard_rows`` photos, so this list stays short even for large splits.
    """
    fs, path = filesystem_for(root)
    directory = f"{path}/{split}"
    if fs.get_file_info(directory).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no Parquet shards in {directory}; run the prepare stage first")
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=False))
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def iter_rows(
    fs: pafs.FileSystem, files: Sequence[str], columns: Sequence[str] = ("key", "image")
) -> Iterator[pa.RecordBatch]:
    """The rows of ``files``, in file order, one row group at a time."""
    for path in files:
        with fs.open_input_file(path) as stream:
            shard = pq.ParquetFile(stream)
            for group in range(shard.num_row_groups):
                yield from shard.read_row_group(group, columns=list(columns)).to_batches()


def count_rows(root: str, split: str) -> int:
    """Photos in a split, from the shards' footers (no photo is read)."""
    fs, files = split_files(root, split)
    total = 0
    for path in files:
        with fs.open_input_file(path) as stream:
            total += pq.ParquetFile(stream).metadata.num_rows
    return total


def read_subset(root: str, split: str, count: int, seed: int) -> pa.Table:
    """A fixed, seeded subset of ``count`` photos of a split, in key order.

    The photos whose ``hash(seed, key)`` is smallest: the choice ignores shard layout, and adding
    photos only swaps in those that hash lower. Only the key column is scanned.
    """

    if count < 1:
        raise ValueError(f"a subset needs count >= 1, got {count}")
    fs, files = split_files(root, split)
    smallest: list[tuple[int, str]] = []  # a max-heap of the `count` smallest (negated hash, key)
    for batch in iter_rows(fs, files, columns=("key",)):
        for key in batch.column(0).to_pylist():
            item = (-stable_hash(f"{seed}:{key}"), key)
            if len(smallest) < count:
                heapq.heappush(smallest, item)
            elif item > smallest[0]:
                heapq.heapreplace(smallest, item)
    keys = pa.array(sorted(key for _, key in smallest), pa.string())
    if not len(keys):
        return PARQUET_SCHEMA.empty_table()
    dataset = pads.dataset(files, schema=PARQUET_SCHEMA, format="parquet", filesystem=fs)
    return dataset.to_table(filter=pc.field("key").isin(keys)).sort_by("key")


def load_photos(root: str, split: str, short_side: int, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``{key: photo}`` of :func:`read_subset`'s photos, decoded and scaled to ``short_side``."""
    table = read_subset(root, split, count, seed)
    keys, blobs = table.column("key").to_pylist(), table.column("image").to_pylist()
    return {key: resize_short_side(decode_photo(blob), short_side) for key, blob in zip(keys, blobs)}
