"""DVC stage ``prepare``: raw photos -> whole photos at a storage size in Parquet shards, split by photo.

    python -m pipelines.prepare --params params.yaml

Ray Data reads ``data.source``: a local folder (recursively; image extensions only, hidden
names skipped, by default the corpus stage's photos), ``s3://bucket/prefix`` (endpoint from
``AWS_ENDPOINT_URL``) or ``sample`` (the photos bundled with scikit-image / scikit-learn). Each
file becomes one row (:class:`dfnet.data.PhotoSource`): EXIF-oriented RGB scaled to
``store_short_side`` on the short side (never up), stored as JPEG, in the split given by a hash
of its key (quotas for the sample photos), so adding photos never moves others between splits.
Unreadable files are skipped and listed in the report; they never fail the stage.

Output: ``{out_dir}/{train,val,test}/part-N.parquet`` (at most ``shard_rows`` photos each,
schema :data:`dfnet.data.PARQUET_SCHEMA`, rows in key order so reruns write identical tables)
and ``{out_dir}/report.json``. ``out_dir`` may be an ``s3://`` URI. On a multi-node cluster a
local folder source must be reachable from every node (shared filesystem).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from dfnet.data import PARQUET_SCHEMA, SPLITS, PhotoSource, filesystem_for
from dfnet.images import IMAGE_EXTENSIONS
from dfnet.params import DataParams
from pipelines import ensure_ray, stage_params

log = logging.getLogger("pipelines.prepare")


def read_photos(params: DataParams) -> ray.data.Dataset:
    """Ray Data: every file of ``data.source`` as a row of :data:`PARQUET_SCHEMA` plus ``error``."""
    if params.source == "sample":
        paths, source = PhotoSource.sample(params.store_short_side, params.val_fraction, params.test_fraction)
        fs: pafs.FileSystem = pafs.LocalFileSystem()
    else:
        fs, root = filesystem_for(params.source)
        paths = [root]
        source = PhotoSource(params.store_short_side, params.val_fraction, params.test_fraction, root=root)
    files = ray.data.read_binary_files(
        paths, filesystem=fs, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS)
    )
    photos = files.map(lambda row: source.row(row["path"], row["bytes"]))
    # Reading gives about a block per file; sorting sorts as many partitions as there are blocks,
    # so tiny blocks are combined into shard-sized ones first (360 photos: 6 blocks, not 360).
    return photos.repartition(target_num_rows_per_block=params.shard_rows)


def _shards(photos: ray.data.Dataset, digest: Any, counts: dict[str, int]) -> Iterator[pa.RecordBatch]:
    """The rows of `photos` in key order as Arrow batches, hashed into `digest` and counted."""
    for batch in photos.iter_batches(batch_format="pyarrow", batch_size=256):
        table = batch.select(PARQUET_SCHEMA.names).cast(PARQUET_SCHEMA)
        for key, image in zip(table.column("key").to_pylist(), table.column("image").to_pylist()):
            digest.update(key.encode() + image)
        counts["rows"] += table.num_rows
        yield from table.to_batches()


def write_split(photos: ray.data.Dataset, fs: pafs.FileSystem, directory: str, shard_rows: int) -> dict[str, Any]:
    """One split's rows as ``part-N.parquet`` shards of at most `shard_rows` rows; returns its
    report entry (images, shards and a sha256 of every key and image: the data version)."""
    fs.delete_dir_contents(directory, missing_dir_ok=True)  # stale shards of a larger earlier run
    digest, counts, written = hashlib.sha256(), {"rows": 0}, []
    parquet = pads.ParquetFileFormat()
    pads.write_dataset(
        _shards(photos.sort("key"), digest, counts),
        directory,
        schema=PARQUET_SCHEMA,
        format=parquet,
        # JPEG bytes do not compress further; skipping compression keeps reads cheap.
        file_options=parquet.make_write_options(compression="none"),
        filesystem=fs,
        basename_template="part-{i}.parquet",
        max_rows_per_file=shard_rows,
        max_rows_per_group=shard_rows,
        preserve_order=True,
        existing_data_behavior="overwrite_or_ignore",
        file_visitor=lambda file: written.append(file.path),
    )
    if not written:  # write_dataset writes no file for no rows; readers expect every split
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(directory)
        pq.write_table(PARQUET_SCHEMA.empty_table(), f"{directory}/part-0.parquet", filesystem=fs)
        written.append(f"{directory}/part-0.parquet")
    log.info("wrote %d photos in %d shard(s) to %s", counts["rows"], len(written), directory)
    return {"images": counts["rows"], "shards": len(written), "sha256": digest.hexdigest()}


def prepare(params: DataParams) -> dict[str, Any]:
    """Run the stage for ``params`` (the ``data`` section); returns the report it writes."""
    if params.store_short_side < params.image_size or params.shard_rows < 1:
        raise ValueError("need data.store_short_side >= data.image_size and data.shard_rows >= 1")
    started = time.perf_counter()
    ensure_ray()
    log.info("reading %s (stored at short side %d)", params.source, params.store_short_side)
    photos = read_photos(params).materialize()  # decoded once, read by every split below
    failed = photos.filter(expr=col("error") != "")
    skipped = sorted(({"file": r["source"], "reason": r["error"]} for r in failed.take_all()), key=lambda s: s["file"])
    for item in skipped:
        log.warning("skipped %s: %s", item["file"], item["reason"])

    fs, root = filesystem_for(params.out_dir)
    splits = {
        split: write_split(
            photos.filter(expr=(col("error") == "") & (col("split") == split)),
            fs, f"{root}/{split}", params.shard_rows,
        )  # fmt: skip
        for split in SPLITS
    }
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
    with fs.open_output_stream(f"{root}/report.json") as stream:
        stream.write((json.dumps(report, indent=2) + "\n").encode("utf-8"))
    log.info("done in %.1f s: %s; %d file(s) skipped", report["elapsed_seconds"],
             ", ".join(f"{k} {v['images']} photos" for k, v in splits.items()), len(skipped))  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> None:
    params = stage_params(__doc__, argv)
    prepare(params.data)


if __name__ == "__main__":
    main()
