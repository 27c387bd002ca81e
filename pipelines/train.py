"""DVC stage `train`: DFNet on Ray Train.

    python -m pipelines.train [--params params.yaml]

A `TorchTrainer` runs the library's one training loop (`dfnet.training.train`) on its workers;
Ray Data reads the shards lazily, crops and masks them in CPU tasks on any node, and each worker
draws its share through a seeded shuffle buffer. Rank 0 checkpoints every epoch. The run is
named after what determines the weights (parameters, code and data versions), so a rerun after
a crash continues the last checkpoint while any change starts a new run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch
from ray.data import ExecutionResources, FileShuffleConfig
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from dfnet.data import stable_hash
from dfnet.params import Params, parse_params
from dfnet.reports import write_training_report
from dfnet.storage import filesystem_for
from dfnet.train_data import Batch, TrainingCrops, as_batch, shuffle_buffer_items
from dfnet.training import BatchSource, State, checkpoint_state, export_model, run_identity, train
from pipelines import ensure_ray, stage_params

log = logging.getLogger("dfnet.train")
WORKER_MEMORY = 512 * 2**20  # what a CPU worker reserves instead of CPUs (bytes)
STATE_FILE = "train_state.pt"
SAMPLES_FILE = "samples.png"
PROGRESS_FILE = "progress.json"  # the checkpoint's epoch and step, read without loading its state


def _start_mlflow(config: dict[str, Any], params: Params, run_id: str | None) -> Any:
    # Not ray.air.integrations.mlflow.setup_mlflow: it always starts a new MLflow run, and a run
    # resumed from its checkpoint must go on logging into the run it started.
    import mlflow

    mlflow.set_tracking_uri(config["tracking_uri"])
    mlflow.set_experiment(params.mlflow.experiment)
    if run_id:
        return mlflow.start_run(run_id=run_id)
    tags = {"mlflow.parentRunId": config["parent_run_id"]} if config.get("parent_run_id") else None
    run = mlflow.start_run(run_name=config["name"], tags=tags)
    flat = {f"{section}.{k}": v for section, values in params.to_dict().items() for k, v in values.items()}
    mlflow.log_params({**flat, "ray_run": config["name"]})
    return run


def _crop_batch(batch: dict[str, Any], crops: TrainingCrops, seed: int) -> dict[str, Any]:
    # Ray Data counts the dataset's executions (one per epoch or recalibration pass, and its
    # file shuffle reseeds with it): the same count makes every pass draw new crops and masks.
    passes = ray.data.DataContext.get_current()._execution_idx
    return crops.batch(batch["key"], batch["image"], (seed, passes))


def crop_dataset(params: Params, first_epoch: int = 0) -> ray.data.Dataset:
    """The training crops as a lazy Ray Data pipeline: shards in a seeded order per pass,
    `crops_per_photo` crops and masks of each photo in CPU tasks that may run on any node.

    Ray Data counts passes from 0 in every new driver, so a run resumed at `first_epoch` seeds
    from it: its epochs draw new data instead of replaying the first epochs' photos and crops.
    """
    t, data = params.train, params.data
    fs, root = filesystem_for(data.out_dir)
    seed = stable_hash(f"{t.seed}:{first_epoch}") % 2**32
    crops = TrainingCrops(_absolute(params.masks.out), data.image_size, t.crops_per_photo, t.max_zoom_out)
    photos = ray.data.read_parquet(
        f"{root}/train", filesystem=fs, shuffle=FileShuffleConfig(seed=seed)
    ).select_columns(["key", "image"])
    # A few photos per task keep output blocks small: each photo becomes many crops.
    return photos.map_batches(_crop_batch, fn_args=(crops, seed), batch_size=4, batch_format="numpy")


def data_config(params: Params) -> ray.train.DataConfig:
    """Ray Data's object-store budget for crops in flight: without it the pipeline reads ahead
    until the object store is full, so its memory (and work thrown away at an epoch's end)
    would grow with the data set."""
    options = ray.train.DataConfig.default_ingest_options()
    options.resource_limits = ExecutionResources.for_limits(object_store_memory=params.train.data_inflight_mb * 2**20)
    return ray.train.DataConfig(execution_options=options)


def resumed_epoch(storage_path: str, name: str) -> int:
    """The epoch run `name` goes on from: its latest checkpoint's, 0 for a new run."""
    fs, root = filesystem_for(_absolute(storage_path))
    run = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(run).type == pafs.FileType.NotFound:
        return 0
    entries = fs.get_file_info(pafs.FileSelector(run))
    checkpoints = sorted(
        i.path for i in entries if i.base_name.startswith("checkpoint_") and i.type != pafs.FileType.File
    )  # folders (object stores list them as "directories"), not Ray's checkpoint_manager_snapshot.json
    for checkpoint in reversed(checkpoints):  # the newest with its progress written
        with contextlib.suppress(FileNotFoundError), fs.open_input_stream(f"{checkpoint}/{PROGRESS_FILE}") as stream:
            return int(json.loads(stream.read())["epoch"])
    return 0


def shard_batches(params: Params, rank: int) -> BatchSource:
    """A worker's batch source: its shard of the dataset `crop_dataset` built, one pass per call,
    through a shuffle buffer seeded by (seed, rank, epoch, pass)."""
    t = params.train
    shard = ray.train.get_dataset_shard("train")
    buffer = shuffle_buffer_items(t.shuffle_buffer_mb, params.data.image_size)

    def batches(epoch: int, pass_index: int) -> Iterator[Batch]:
        seed = int.from_bytes(hashlib.sha256(f"{t.seed}:{rank}:{epoch}:{pass_index}".encode()).digest()[:4], "big")
        columns = shard.iter_torch_batches(
            batch_size=t.batch_size, drop_last=True, local_shuffle_buffer_size=buffer, local_shuffle_seed=seed,
            prefetch_batches=4,  # crops made while the step runs: the worker waits as little as possible
        )
        return (as_batch(c) for c in columns)

    return batches


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the library's loop, reporting to Ray (and MLflow)."""
    params = parse_params(config["params"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(max(1, config.get("threads_per_worker", 1)))
    resume = None
    if checkpoint := ray.train.get_checkpoint():
        resume = load_checkpoint_state(checkpoint)
    mlflow, extra = None, {}
    if rank == 0 and config.get("tracking_uri"):
        import mlflow

        previous = (resume or {}).get("extra", {}).get("mlflow_run_id")
        extra["mlflow_run_id"] = _start_mlflow(config, params, previous).info.run_id

    def on_log(record: dict[str, float]) -> None:
        if mlflow:
            mlflow.log_metrics({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def on_epoch(metrics: dict[str, float], state: State) -> None:
        state["extra"].update(extra)
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                torch.save(checkpoint_state(state), Path(directory) / STATE_FILE)
                progress = {"epoch": state["epoch"], "step": state["step"]}
                (Path(directory) / PROGRESS_FILE).write_text(json.dumps(progress))
                state["samples"].save(Path(directory) / SAMPLES_FILE)
                if mlflow:
                    mlflow.log_param("loss.vgg_provenance", state["extra"]["vgg_provenance"])
                    val = {k: v for k, v in metrics.items() if k.startswith("val_")}
                    mlflow.log_metrics(val, step=int(metrics["step"]))
                    mlflow.log_image(state["samples"], f"samples/epoch_{int(metrics['epoch']):03d}.png")
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=saved)

    train(
        params,
        ray.train.torch.get_device(),
        batches=shard_batches(params, rank),
        resume=resume,
        on_epoch=on_epoch,
        on_log=on_log,
        rank=rank,
        world=context.get_world_size(),
        wrap_model=ray.train.torch.prepare_model,  # DDP when world > 1
    )
    if mlflow:
        mlflow.end_run()


def build_trainer(params: Params, extra_config: dict[str, Any] | None = None) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer for `params` (also used by tune/search.py, one trial per trainer)."""
    t = params.train
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    # Workers run in a folder of Ray's: relative local paths must point into this checkout.
    worker_params = params.to_dict()
    worker_params["data"]["out_dir"] = _absolute(params.data.out_dir)
    worker_params["masks"]["out"] = _absolute(params.masks.out)
    config = {
        "params": worker_params,
        "name": run_identity(params),
        "tracking_uri": params.mlflow.resolved_tracking_uri(),
        # Each worker reserves at most one logical CPU but computes with its share of the cores.
        "threads_per_worker": max(1, cpus // t.num_workers),
        **(extra_config or {}),
    }
    if config["tracking_uri"]:
        from tracking.registry import ensure_experiment

        ensure_experiment(config["tracking_uri"], params.mlflow.experiment)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        datasets={"train": crop_dataset(params, resumed_epoch(t.storage_path, config["name"]))},
        dataset_config=data_config(params),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            # CPU workers hold no logical CPU: they share the cores with the decode tasks anyway, and
            # a held CPU could leave a node none for a data task (both workers on one node).
            resources_per_worker=None if t.use_gpu else {"memory": WORKER_MEMORY},
            # One worker per node while there are nodes enough; after a node dies, the restarted
            # group fits on the nodes left (tests/test_multinode.py).
            placement_strategy="SPREAD",
        ),
        run_config=RunConfig(
            name=config["name"],
            storage_path=_absolute(t.storage_path),
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def load_checkpoint_state(checkpoint: ray.train.Checkpoint) -> State:
    # A copy of its own for every caller: as_directory() shares one download among the workers
    # of a node, and a restarted group on one node once read a state file still being written.
    with tempfile.TemporaryDirectory() as directory:
        checkpoint.to_directory(directory)
        return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def main(argv: list[str] | None = None) -> None:
    params = stage_params(__doc__, argv)
    ensure_ray()
    name = run_identity(params)
    if not params.train.resume:
        _remove_run(params.train.storage_path, name)
    log.info("training run %s (storage %s)", name, params.train.storage_path)
    start = time.perf_counter()
    result = build_trainer(params).fit()
    state = load_checkpoint_state(result.checkpoint)
    export_model(params, state, params.train.out_dir, extra={"ray_run": name})
    out_dir = Path(params.evaluate.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as directory:
        (out_dir / "train_samples.png").write_bytes(Path(directory, SAMPLES_FILE).read_bytes())
    summary = write_training_report(state["history"], out_dir, time.perf_counter() - start)
    log.info("done: %s", json.dumps(summary))


def _remove_run(storage_path: str, name: str) -> None:
    fs, root = filesystem_for(_absolute(storage_path))
    target = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(target).type.name != "NotFound":
        fs.delete_dir(target)


if __name__ == "__main__":
    main()
