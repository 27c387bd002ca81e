"""DVC stage `train`: DFNet on Ray Train.

    python -m pipelines.train [--params params.yaml]

A `TorchTrainer` runs `train_loop_per_worker` on `train.num_workers` workers (gloo on CPU, NCCL
on GPU). Every epoch each worker reports metrics and rank 0 a checkpoint (model, optimizer,
scheduler, step, history) to the run's storage (`train.storage_path`, local or s3://). The Ray
run is named after the training-relevant parameters, so rerunning after a crash continues the
last checkpoint, while changing a parameter starts a new run. The finished model is written as a
model directory to `train.out_dir`; curves and sample grids go to `metrics/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

from dfnet.data import MaskSampler, decode_png_batch
from dfnet.losses import DFNetLoss
from dfnet.masks import load_masks
from dfnet.metrics import bpe, default_band_width, l1_percent
from dfnet.params import Params, parse_params
from dfnet.training import make_optimizer, sample_grid, to_batch, train_step
from pipelines import stage_params

log = logging.getLogger("dfnet.train")
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
LOG_EVERY = 10  # steps between progress lines / MLflow step metrics


def run_name(params: Params) -> str:
    """`<run_name>-<hash of what determines the training>`: same params → same (resumable) run."""
    relevant = {k: params.to_dict()[k] for k in ("data", "masks", "model", "loss", "train")}
    # Not part of the identity: how and where it runs, and how long (raising `epochs` extends
    # the same run from its last checkpoint; the schedule depends on the epoch, not the total).
    for volatile in ("epochs", "resume", "max_failures", "num_workers", "use_gpu", "storage_path", "out_dir"):
        relevant["train"].pop(volatile)
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]
    return f"{params.train.run_name}-{digest}"


def _validation_batches(
    config: dict[str, Any], device: torch.device, limit: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed validation pairs: the first `limit` val crops, each with an evaluation mask (bins cycled)."""
    shard = ray.train.get_dataset_shard("val")
    blobs: list[bytes] = []
    for batch in shard.iter_batches(batch_size=limit, batch_format="numpy"):
        blobs.extend(batch["image"])
        if len(blobs) >= limit:
            break
    images = decode_png_batch(blobs[:limit])
    eval_masks = config["eval_masks"]
    masks = np.stack([eval_masks[i % len(eval_masks)] for i in range(len(images))])[:, None].astype(
        np.float32
    )
    return to_batch(images, masks, device)


def _evaluate(
    model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor
) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        completed = model.complete(images, masks)
    band = default_band_width(*images.shape[-2:])
    return {
        "val_l1": float(l1_percent(completed, images).mean()),
        "val_bpe": float(bpe(completed, images, masks, band_width=band).nanmean()),
    }


def _start_mlflow(
    config: dict[str, Any], params: Params, resume_run_id: str | None, loss_provenance: str
) -> Any:
    import mlflow

    mlflow.set_tracking_uri(config["tracking_uri"])
    mlflow.set_experiment(params.mlflow.experiment)
    if resume_run_id:
        return mlflow.start_run(run_id=resume_run_id)
    tags = {"mlflow.parentRunId": config["parent_run_id"]} if config.get("parent_run_id") else None
    run = mlflow.start_run(run_name=config["name"], tags=tags)
    flat = {
        f"{section}.{k}": v
        for section, values in params.to_dict().items()
        for k, v in values.items()
    }
    mlflow.log_params({**flat, "loss.vgg_provenance": loss_provenance, "ray_run": config["name"]})
    return run


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs. `config` carries the params and small arrays (masks)."""
    params = parse_params(config["params"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, config.get("threads_per_worker", 1)))
    torch.manual_seed(params.train.seed + rank)
    device = ray.train.torch.get_device()
    use_amp = params.train.amp and device.type == "cuda"

    model = params.model.build().to(device)
    loss_fn = DFNetLoss(params.loss).to(device)
    optimizer, scheduler = make_optimizer(model, params.train)
    scaler = (
        torch.amp.GradScaler("cuda") if use_amp and not torch.cuda.is_bf16_supported() else None
    )
    step, history, mlflow_run_id = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
            history = json.loads((Path(directory) / HISTORY_FILE).read_text())
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, mlflow_run_id = int(state["step"]), state.get("mlflow_run_id") or None
        print(f"[rank {rank}] resumed from checkpoint at step {step}", flush=True)
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1
    bare = model.module if hasattr(model, "module") else model

    mlflow = None
    if rank == 0 and config.get("tracking_uri"):
        import mlflow

        mlflow_run_id = _start_mlflow(config, params, mlflow_run_id, loss_fn.provenance).info.run_id

    sampler = MaskSampler(config["mask_pool"], seed=params.train.seed * 1000 + rank * 100 + step)
    val_images, val_masks = _validation_batches(config, device)
    shard = ray.train.get_dataset_shard("train")
    total_steps = params.train.epochs * params.train.steps_per_epoch
    batch_size = params.train.batch_size

    while step < total_steps:
        epoch = step // params.train.steps_per_epoch
        epoch_end = (epoch + 1) * params.train.steps_per_epoch
        tick, seen = time.perf_counter(), 0
        while step < epoch_end:
            for batch in shard.iter_batches(
                batch_size=batch_size, batch_format="numpy", drop_last=True
            ):
                images, masks = to_batch(
                    decode_png_batch(batch["image"]), sampler.sample(batch_size), device
                )
                result = train_step(
                    model, loss_fn, optimizer, images, masks, scaler=scaler, amp=use_amp
                )
                step += 1
                seen += batch_size * world
                if step % LOG_EVERY == 0 or step == epoch_end:
                    rate = seen / (time.perf_counter() - tick)
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "lr": scheduler.get_last_lr()[0],
                        "images_per_s": rate,
                    }
                    record.update({f"loss_{k}": v for k, v in result.losses.items()})
                    history.append(record)
                    if rank == 0:
                        print(
                            f"step {step}/{total_steps} epoch {epoch} loss {result.losses['total']:.4f} "
                            f"({rate:.1f} img/s)",
                            flush=True,
                        )
                        if mlflow:
                            mlflow.log_metrics(
                                {k: v for k, v in record.items() if k != "step"}, step=step
                            )
                if step >= epoch_end:
                    break
        scheduler.step()
        metrics = {
            "step": step,
            "epoch": epoch,
            "loss": history[-1]["loss_total"],
            **_evaluate(bare, val_images, val_masks),
        }
        history.append(
            {
                "step": step,
                "epoch": epoch,
                **{k: v for k, v in metrics.items() if k.startswith("val_")},
            }
        )
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                state = {
                    "model": bare.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "mlflow_run_id": mlflow_run_id or "",
                }
                torch.save(state, Path(directory) / STATE_FILE)
                (Path(directory) / HISTORY_FILE).write_text(json.dumps(history))
                grid = sample_grid(bare, val_images, val_masks, rows=params.evaluate.grid_rows)
                grid.save(Path(directory) / "samples.png")
                if mlflow:
                    mlflow.log_metrics(
                        {k: v for k, v in metrics.items() if k.startswith("val_")}, step=step
                    )
                    mlflow.log_image(grid, f"samples/epoch_{epoch:03d}.png")
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=saved)
    if mlflow:
        mlflow.end_run()


def build_trainer(
    params: Params, extra_config: dict[str, Any] | None = None
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer for `params` (also used by tune/search.py, one trial per trainer)."""
    train = params.train
    data_root = params.data.out_dir
    # Per-step progress lines come from the train loop; Ray Data's bars would bury them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_ds = ray.data.read_parquet(f"{data_root}/train", columns=["image"]).randomize_block_order(
        seed=train.seed
    )
    val_ds = ray.data.read_parquet(f"{data_root}/val", columns=["image"])
    masks = load_masks(params.masks.out)
    eval_masks = np.concatenate([masks[f"eval_bin{i}"] for i in range(5)])
    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    config = {
        "params": params.to_dict(),
        "mask_pool": masks["pool"],
        "eval_masks": eval_masks,
        "name": run_name(params),
        "tracking_uri": params.mlflow.resolved_tracking_uri(),
        # Each worker reserves one logical CPU (the rest stay free for Ray Data's read tasks)
        # but computes with its share of the machine's cores.
        "threads_per_worker": max(1, cpus // train.num_workers),
        **(extra_config or {}),
    }
    if config["tracking_uri"]:
        from pipelines.registry import ensure_experiment

        ensure_experiment(config["tracking_uri"], params.mlflow.experiment)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            # CPU workers never reserve every CPU: Ray Data's read tasks need one too, and
            # without it the run waits forever (e.g. 2 workers on a 2-CPU machine).
            resources_per_worker=None
            if train.use_gpu
            else {"CPU": min(1.0, max(cpus - 1, 0) / train.num_workers)},
        ),
        run_config=RunConfig(
            name=config["name"],
            storage_path=_absolute_storage(train.storage_path),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _absolute_storage(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def load_checkpoint_state(
    checkpoint: ray.train.Checkpoint,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
        history = json.loads((Path(directory) / HISTORY_FILE).read_text())
    return state, history


def export_model(
    params: Params, state: dict[str, Any], out_dir: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write the trained weights as a model directory with its provenance."""
    model = params.model.build()
    model.load_state_dict(state["model"])
    provenance = {
        "source": "trained",
        "preset": params.model.preset,
        "image_size": params.data.image_size,
        "steps": int(state["step"]),
        "mlflow_run_id": state.get("mlflow_run_id", ""),
        "channel_order": "rgb",
        "output_quantization": "round",
        **(extra or {}),
    }
    return model.save_pretrained(out_dir, provenance=provenance)


def write_training_report(
    history: list[dict[str, Any]], out_dir: Path, elapsed_s: float
) -> dict[str, Any]:
    """metrics/train.json (for `dvc metrics`), train_history.csv (for `dvc plots`) and a PNG curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [h for h in history if "loss_total" in h]
    vals = [h for h in history if "val_l1" in h]
    with open(out_dir / "train_history.csv", "w") as f:
        f.write("step,loss_total,loss_structure,loss_texture,images_per_s\n")
        for h in steps:
            texture = h["loss_perceptual"] + h["loss_style"] + h["loss_tv"]
            f.write(
                f"{h['step']},{h['loss_total']:.6f},{h['loss_structure']:.6f},{texture:.6f},{h['images_per_s']:.2f}\n"
            )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot([h["step"] for h in steps], [h["loss_total"] for h in steps], label="total")
    ax1.plot([h["step"] for h in steps], [h["loss_structure"] for h in steps], label="structure")
    ax1.set(xlabel="step", ylabel="training loss", yscale="log", title="Training loss")
    ax1.legend()
    ax2.plot([h["step"] for h in vals], [h["val_l1"] for h in vals], "o-", label="val ℓ1 (%)")
    ax2.plot([h["step"] for h in vals], [h["val_bpe"] for h in vals], "s-", label="val BPE (%)")
    ax2.set(xlabel="step", title="Validation")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "train_curve.png", dpi=110)
    plt.close(fig)
    summary = {
        "steps": steps[-1]["step"] if steps else 0,
        "first_loss": steps[0]["loss_total"] if steps else None,
        "final_loss": steps[-1]["loss_total"] if steps else None,
        "final_val_l1": vals[-1]["val_l1"] if vals else None,
        "final_val_bpe": vals[-1]["val_bpe"] if vals else None,
        "median_images_per_s": float(np.median([h["images_per_s"] for h in steps]))
        if steps
        else None,
        "elapsed_s": round(elapsed_s, 1),
    }
    (out_dir / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    params = stage_params(__doc__, argv)
    if not ray.is_initialized():
        ray.init()
    name = run_name(params)
    if not params.train.resume:
        _remove_run(params.train.storage_path, name)
    log.info("training run %s (storage %s)", name, params.train.storage_path)
    start = time.perf_counter()
    result = build_trainer(params).fit()
    state, history = load_checkpoint_state(result.checkpoint)
    export_model(params, state, params.train.out_dir, extra={"ray_run": name})
    with result.checkpoint.as_directory() as directory:
        Path(params.evaluate.out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(
            Path(directory, "samples.png"), Path(params.evaluate.out_dir) / "train_samples.png"
        )
    summary = write_training_report(
        history, Path(params.evaluate.out_dir), time.perf_counter() - start
    )
    log.info("done: %s", json.dumps(summary))


def _remove_run(storage_path: str, name: str) -> None:
    from dfnet.data import filesystem_for

    fs, root = filesystem_for(_absolute_storage(storage_path))
    target = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(target).type.name != "NotFound":
        fs.delete_dir(target)


if __name__ == "__main__":
    main()
