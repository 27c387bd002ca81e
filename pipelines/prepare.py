"""DVC stage ``prepare``: raw photos -> whole photos at a storage size in Parquet shards, split by photo.

    python -m pipelines.prepare --params params.yaml

Ray Data reads the source named by ``data.source`` in params.yaml:

- a local folder (read recursively, image extensions only; by default the corpus stage's
  photos) or ``s3://bucket/prefix`` (endpoint from ``AWS_ENDPOINT_URL``), split by a hash of the
  photo's path relative to the source root (:func:`dfnet.data.split_of`), so adding photos never
  moves existing ones between splits;
- ``sample``: the photos bundled with scikit-image / scikit-learn (works offline), split by
  quotas so val and test are never empty (:func:`dfnet.data.quota_splits`).

Every readable photo becomes one row: EXIF-oriented RGB scaled to ``store_short_side`` on the
short side (smaller photos are kept as they are), stored as JPEG. Training draws fresh crops
from them every epoch; validation and evaluation score them whole. Unreadable files are skipped
and listed in the report; they never fail the stage. Output:
``{out_dir}/{train,val,test}/part-NNNNN.parquet`` (``shard_rows`` photos each, schema
:data:`dfnet.data.PARQUET_SCHEMA`, rows in key order so reruns write identical tables) and
``{out_dir}/report.json``. ``out_dir`` may be an ``s3://`` URI.

On a multi-node cluster a local folder must be reachable from every node (shared filesystem);
S3 or the sample source need nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dfnet.data import (
    IMAGE_EXTENSIONS,
    PARQUET_SCHEMA,
    SPLITS,
    encode_jpeg,
    filesystem_for,
    quota_splits,
    resize_short_side,
    sample_photos,
    split_of,
    try_decode_image,
)
from dfnet.params import DataParams
from pipelines import stage_params

log = logging.getLogger("pipelines.prepare")


def ensure_ray() -> None:
    """Connect to Ray if this process is not connected yet (a local instance, or the cluster
    named by ``RAY_ADDRESS`` / started with ``ray start``), with usage stats off by default."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init()


@dataclass(frozen=True)
class _PhotoSpec:
    """Everything a Ray task needs to turn one file into a row (pickled into the tasks)."""

    store_short_side: int
    val_fraction: float
    test_fraction: float
    root: str | None  # keys are paths relative to this (folder / S3 sources)
    keys: dict[str, str] | None  # path -> key (sample source)
    splits: dict[str, str] | None  # key -> split (sample source quotas)

    def key_of(self, path: str) -> str:
        if self.keys is not None:
            return self.keys[path]
        root = (self.root or "").rstrip("/")
        if path == root:  # the source named a single file
            return os.path.basename(path)
        if root and path.startswith(root + "/"):
            return path[len(root) + 1 :]
        return path

    def split_of(self, key: str) -> str:
        if self.splits is not None:
            return self.splits[key]
        return split_of(key, self.val_fraction, self.test_fraction)


def _photo_row(spec: _PhotoSpec, row: dict[str, Any]) -> dict[str, Any]:
    """Ray ``map`` body: one file -> its row, or an error row if unreadable.

    Failed files travel through the dataset beside the good rows, marked by a non-empty
    ``error``, so the driver can report them without a second pass over the files.
    """
    key = spec.key_of(str(row["path"]))
    image, reason = try_decode_image(row["bytes"])
    if image is None:
        return {"key": key, "source": key, "split": "", "image": b"", "height": 0, "width": 0,
                "error": reason or "unreadable"}  # fmt: skip
    photo = resize_short_side(image, spec.store_short_side, upscale=False)
    return {"key": key, "source": key, "split": spec.split_of(key), "image": encode_jpeg(photo),
            "height": photo.shape[0], "width": photo.shape[1], "error": ""}  # fmt: skip


class _ShardWriter:
    """Buffers one split's rows and writes ``part-NNNNN.parquet`` files of ``shard_rows`` rows."""

    def __init__(self, fs: pafs.FileSystem, directory: str, shard_rows: int) -> None:
        self.fs = fs
        self.directory = directory
        self.shard_rows = shard_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.shards = 0
        self.rows = 0
        self.sources: set[str] = set()
        self.digest = hashlib.sha256()  # of every key and image: the data version of a run

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.sources.update(table.column("source").to_pylist())
        for key, image in zip(table.column("key").to_pylist(), table.column("image").to_pylist()):
            self.digest.update(key.encode() + image)
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.shard_rows:
            merged = pa.concat_tables(self.pending)
            self._write(merged.slice(0, self.shard_rows))
            rest = merged.slice(self.shard_rows)
            self.pending, self.pending_rows = [rest], rest.num_rows

    def close(self) -> None:
        # Every split gets at least one (possibly empty) shard so readers find all three.
        if self.pending_rows or self.shards == 0:
            merged = (
                pa.concat_tables(self.pending) if self.pending else PARQUET_SCHEMA.empty_table()
            )
            self._write(merged)
        self.pending, self.pending_rows = [], 0

    def _write(self, table: pa.Table) -> None:
        path = f"{self.directory}/part-{self.shards:05d}.parquet"
        # PNG bytes do not compress further; skipping compression keeps reads cheap.
        pq.write_table(table.cast(PARQUET_SCHEMA), path, filesystem=self.fs, compression="none")
        self.shards += 1
        self.rows += table.num_rows
        log.info("wrote %s (%d rows)", path, table.num_rows)


def _make_dir(fs: pafs.FileSystem, path: str) -> None:
    # Object stores have no directories (creating one would leave marker objects behind).
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)


def _is_hidden(relative: str) -> bool:
    # Same rule as Ray's own listing: names starting with "." or "_" are metadata, not data.
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def list_image_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """Image files under ``root`` (a file or a folder, searched recursively), sorted by key.

    Only :data:`dfnet.data.IMAGE_EXTENSIONS` are listed, case-insensitively; hidden names are
    left out. Listing on the driver gives a fixed file order, which keeps the output
    deterministic without a distributed sort.
    """
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.source {root!r} does not exist")
    if info.type == pafs.FileType.File:
        return [root]
    suffixes = tuple("." + ext for ext in IMAGE_EXTENSIONS)
    found = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        relative = entry.path[len(root) :].lstrip("/")
        is_file = entry.type == pafs.FileType.File
        if is_file and not _is_hidden(relative) and relative.lower().endswith(suffixes):
            found.append(entry.path)
    if not found:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
    return sorted(found, key=lambda path: path[len(root) :])


def _source_plan(params: DataParams) -> tuple[list[str], pafs.FileSystem, _PhotoSpec]:
    """The files to read (in output order), their filesystem, and how to turn them into rows."""
    common = {
        "store_short_side": params.store_short_side,
        "val_fraction": params.val_fraction,
        "test_fraction": params.test_fraction,
    }
    if params.source == "sample":
        photos = sample_photos()  # sorted by key
        paths = [os.path.abspath(p) for p in photos.values()]
        spec = _PhotoSpec(
            root=None,
            keys=dict(zip(paths, photos, strict=True)),
            splits=quota_splits(photos, params.val_fraction, params.test_fraction),
            **common,
        )
        return paths, pafs.LocalFileSystem(), spec
    fs, root = filesystem_for(params.source)
    spec = _PhotoSpec(root=root, keys=None, splits=None, **common)
    return list_image_files(fs, root), fs, spec


def _build_dataset(paths: list[str], fs: pafs.FileSystem, spec: _PhotoSpec) -> Any:
    """Ray Data: read the files, decode and scale them, keeping the input order of the files."""
    import ray

    # With preserve_order the blocks come out in the order of `paths` however the tasks are
    # scheduled, so reruns and clusters of any size write identical shards. A dataset takes a
    # copy of the current DataContext when it is created; the global one is restored after.
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        dataset = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
        dataset = dataset.map(functools.partial(_photo_row, spec))
    finally:
        context.execution_options.preserve_order = saved
    return dataset


def prepare(params: DataParams) -> dict[str, Any]:
    """Run the stage for ``params`` (the ``data`` section); returns the report it writes."""
    if params.store_short_side < params.image_size or params.shard_rows < 1:
        raise ValueError("need data.store_short_side >= data.image_size and data.shard_rows >= 1")
    started = time.perf_counter()
    ensure_ray()

    paths, read_fs, spec = _source_plan(params)
    log.info(
        "reading %d file(s) from %s (stored at short side %d)", len(paths), params.source, params.store_short_side
    )
    dataset = _build_dataset(paths, read_fs, spec)

    out_fs, out_root = filesystem_for(params.out_dir)
    writers = {}
    for split in SPLITS:
        directory = f"{out_root}/{split}"
        # Stale shards of an earlier, larger run would otherwise be read as part of this one.
        out_fs.delete_dir_contents(directory, missing_dir_ok=True)
        _make_dir(out_fs, directory)
        writers[split] = _ShardWriter(out_fs, directory, params.shard_rows)

    skipped: list[dict[str, str]] = []
    batch_size = max(params.shard_rows, 256)
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        errors = np.asarray(batch.column("error").to_pylist(), dtype=object)
        failed = errors != ""
        for index in np.flatnonzero(failed):
            skipped.append({"file": batch.column("source")[index].as_py(), "reason": errors[index]})
            log.warning("skipped %s: %s", skipped[-1]["file"], skipped[-1]["reason"])
        good = batch.filter(pa.array(~failed)).drop_columns(["error"])
        split_column = np.asarray(good.column("split").to_pylist(), dtype=object)
        for split, writer in writers.items():
            writer.add(good.filter(pa.array(split_column == split)))
    for writer in writers.values():
        writer.close()

    skipped.sort(key=lambda item: item["file"])
    splits = {
        split: {"images": w.rows, "shards": w.shards, "sha256": w.digest.hexdigest()}
        for split, w in writers.items()
    }
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if writers[a].sources & writers[b].sources:  # guards the split-by-photo promise
            raise RuntimeError(f"a source photo landed in both {a} and {b}")
    report = {
        "source": params.source,
        "out_dir": params.out_dir,
        "store_short_side": params.store_short_side,
        "val_fraction": params.val_fraction,
        "test_fraction": params.test_fraction,
        "files_read": sum(s["images"] for s in splits.values()) + len(skipped),
        "splits": splits,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "elapsed_seconds": round(time.perf_counter() - started, 3),
    }
    _make_dir(out_fs, out_root)
    with out_fs.open_output_stream(f"{out_root}/report.json") as stream:
        stream.write((json.dumps(report, indent=2) + "\n").encode("utf-8"))
    log.info(
        "done in %.1f s: %s; %d file(s) skipped",
        report["elapsed_seconds"],
        ", ".join(f"{k} {v['images']} photos" for k, v in splits.items()),
        len(skipped),
    )
    return report


def main(argv: list[str] | None = None) -> None:
    prepare(stage_params(__doc__, argv).data)


if __name__ == "__main__":
    main()
