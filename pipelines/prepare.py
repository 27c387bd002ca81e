"""DVC stage ``prepare``: raw photos -> whole photos at a storage size in Parquet shards, split by photo.

    python -m pipelines.prepare --params params.yaml

``data.source`` is a local folder, ``s3://bucket/prefix`` or ``sample``. Each file becomes one
row (:class:`dfnet.data.PhotoSource`) in the split a hash of its key gives, so adding photos
never moves others between splits; unreadable files are skipped and reported, never fatal.

It streams: the source is walked one folder at a time and each chunk of files becomes shards
that Ray Data tasks write on any node, so the driver holds one chunk of paths. Shards are
numbered in walk order, so a rerun over the same files writes the same shards. Output:
``{out_dir}/{split}/part-NNNNNN.parquet`` and ``{out_dir}/report.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from dfnet.data import PhotoSource
from dfnet.images import IMAGE_EXTENSIONS
from dfnet.params import DataParams
from dfnet.storage import PARQUET_SCHEMA, SPLITS, filesystem_for
from pipelines import ensure_ray, stage_params

log = logging.getLogger("pipelines.prepare")

#: Source files listed before their shards are handed to Ray Data (the driver's only list).
LISTING_CHUNK = 20_000
#: Skipped files named in the report; more are counted only.
MAX_LISTED_SKIPS = 1_000


def walk(fs: pafs.FileSystem, root: str) -> Iterator[str]:
    """The image files under ``root`` (or ``root`` itself if it is a file), one folder listed at
    a time, in name order; hidden names are skipped."""
    if fs.get_file_info(root).type == pafs.FileType.File:
        yield root
        return
    infos = sorted(fs.get_file_info(pafs.FileSelector(root, recursive=False)), key=lambda i: i.path)
    for info in infos:
        if info.base_name.startswith("."):
            continue
        if info.type == pafs.FileType.Directory:
            yield from walk(fs, info.path)
        elif info.type == pafs.FileType.File and posixpath.splitext(info.path)[1].lower()[1:] in IMAGE_EXTENSIONS:
            yield info.path


def source_files(params: DataParams) -> tuple[pafs.FileSystem, Iterator[str], PhotoSource]:
    """The filesystem, a lazy walk of ``data.source``'s files and how they are named and split."""
    if params.source == "sample":
        paths, source = PhotoSource.sample(params.store_short_side, params.val_fraction, params.test_fraction)
        return pafs.LocalFileSystem(), iter(sorted(paths)), source
    fs, root = filesystem_for(params.source)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.source {params.source!r} does not exist")
    source = PhotoSource(params.store_short_side, params.val_fraction, params.test_fraction, root=root)
    return fs, walk(fs, root), source


def write_shard(
    task: dict[str, Any], in_fs: pafs.FileSystem, out_fs: pafs.FileSystem, source: PhotoSource
) -> dict[str, Any]:
    """Read, scale and encode one shard's files and write them (in key order) to ``task["path"]``.

    Returns the shard's summary: split, photos written, the sum of their digests (an
    order-free data version) and the files skipped, as JSON.
    """
    rows, skipped, digest = [], [], 0
    for path in task["files"]:
        try:
            with in_fs.open_input_stream(path) as stream:
                row = source.row(path, stream.read())
        except OSError as exc:  # vanished or unreadable on the filesystem: skipped like a bad image
            row = {"key": source.key_of(path), "error": f"cannot read: {exc}"}
        if row["error"]:
            skipped.append({"file": row["key"], "reason": row["error"]})
            continue
        rows.append(row)
        digest += int.from_bytes(hashlib.sha256(row["key"].encode() + row["image"]).digest(), "big")
    rows.sort(key=lambda r: r["key"])
    if rows:
        table = pa.Table.from_pylist([{k: r[k] for k in PARQUET_SCHEMA.names} for r in rows], schema=PARQUET_SCHEMA)
        # JPEG bytes do not compress further; skipping compression keeps reads cheap.
        pq.write_table(table, task["path"], filesystem=out_fs, compression="none", row_group_size=len(rows))
    return {"split": task["split"], "images": len(rows), "digest": f"{digest % 2**256:064x}",
            "skipped": json.dumps(skipped)}  # fmt: skip


def _shard_tasks(chunk: list[str], source: PhotoSource, root: str, shard_rows: int, next_part: dict[str, int]):
    """One chunk of source files as shard tasks: files grouped by split, in key order, numbered."""
    by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
    for path in chunk:
        by_split[source.split_of(source.key_of(path))].append(path)
    for split, paths in by_split.items():
        paths.sort(key=source.key_of)
        for start in range(0, len(paths), shard_rows):
            yield {"split": split, "files": paths[start : start + shard_rows],
                   "path": f"{root}/{split}/part-{next_part[split]:06d}.parquet"}  # fmt: skip
            next_part[split] += 1


def _chunks(files: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for path in files:
        chunk.append(path)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def prepare(params: DataParams, listing_chunk: int = LISTING_CHUNK) -> dict[str, Any]:
    """Run the stage for ``params`` (the ``data`` section); returns the report it writes."""
    if params.store_short_side < params.image_size or params.shard_rows < 1:
        raise ValueError("need data.store_short_side >= data.image_size and data.shard_rows >= 1")
    started = time.perf_counter()
    ensure_ray()
    in_fs, files, source = source_files(params)
    out_fs, root = filesystem_for(params.out_dir)
    for split in SPLITS:  # stale shards of an earlier, larger run would otherwise be read
        out_fs.delete_dir_contents(f"{root}/{split}", missing_dir_ok=True)
        if isinstance(out_fs, pafs.LocalFileSystem):
            out_fs.create_dir(f"{root}/{split}")
    log.info("reading %s (stored at short side %d)", params.source, params.store_short_side)

    splits = {split: {"images": 0, "shards": 0, "digest": 0} for split in SPLITS}
    skipped: list[dict[str, str]] = []
    num_skipped, next_part = 0, dict.fromkeys(SPLITS, 0)
    for chunk in _chunks(files, listing_chunk):
        tasks = list(_shard_tasks(chunk, source, root, params.shard_rows, next_part))
        shards = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map(
            write_shard, fn_args=(in_fs, out_fs, source)
        )
        for shard in shards.iter_rows():
            entry = splits[shard["split"]]
            entry["images"] += shard["images"]
            entry["shards"] += shard["images"] > 0
            entry["digest"] += int(shard["digest"], 16)
            for item in json.loads(shard["skipped"]):
                num_skipped += 1
                if len(skipped) < MAX_LISTED_SKIPS:
                    skipped.append(item)
                log.warning("skipped %s: %s", item["file"], item["reason"])
        done = sum(s["images"] for s in splits.values()) + num_skipped
        log.info("%d files read (%.0f photos/s)", done, done / (time.perf_counter() - started))
    for split, entry in splits.items():
        if not entry["shards"]:  # readers expect every split: an empty one gets an empty shard
            pq.write_table(PARQUET_SCHEMA.empty_table(), f"{root}/{split}/part-000000.parquet", filesystem=out_fs)
            entry["shards"] = 1

    report = {
        "source": params.source,
        "out_dir": params.out_dir,
        "store_short_side": params.store_short_side,
        "val_fraction": params.val_fraction,
        "test_fraction": params.test_fraction,
        "files_read": sum(s["images"] for s in splits.values()) + num_skipped,
        # sha256: a digest of every (key, image) pair, whatever their order (the data version).
        "splits": {k: {"images": v["images"], "shards": v["shards"], "sha256": f"{v['digest'] % 2**256:064x}"}
                   for k, v in splits.items()},  # fmt: skip
        "num_skipped": num_skipped,
        "skipped": sorted(skipped, key=lambda s: s["file"]),
        "elapsed_seconds": round(time.perf_counter() - started, 3),
    }
    with out_fs.open_output_stream(f"{root}/report.json") as stream:
        stream.write((json.dumps(report, indent=2) + "\n").encode("utf-8"))
    log.info("done in %.1f s: %s; %d file(s) skipped", report["elapsed_seconds"],
             ", ".join(f"{k} {v['images']} photos" for k, v in splits.items()), num_skipped)  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> None:
    params = stage_params(__doc__, argv)
    prepare(params.data)


if __name__ == "__main__":
    main()
