"""The one training loop: plain PyTorch on one CPU or GPU, or inside a Ray Train worker.

    python -m dfnet.training [--params params.yaml] [--run-dir runs/plain] [--device cuda]

:func:`train` owns everything a training run is: the model, the loss, the shuffled stream of
photo crops (:mod:`dfnet.train_data`), Adam with the paper's step schedule, mixed precision,
the resumable state, BatchNorm recalibration and the per-epoch validation on whole held-out
photos. Callers only decide where things go: the Ray Train worker (`pipelines/train.py`) passes
its rank, DDP wrapper and a callback that reports checkpoints to Ray; the command line above
saves the state to a local folder and resumes from it; the benchmarks call it directly.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dfnet.data import filesystem_for, read_split
from dfnet.evaluation import validation_scores
from dfnet.losses import DFNetLoss
from dfnet.masks import load_masks
from dfnet.model import DFNet
from dfnet.params import Params, TrainParams, load_params
from dfnet.train_data import set_epoch, training_loader

log = logging.getLogger("dfnet.training")

# How and where a run executes, and how long: not part of its identity (more epochs extend it).
_NOT_IDENTITY = (
    "epochs", "resume", "max_failures", "num_workers", "use_gpu", "storage_path", "out_dir", "loader_workers",
)  # fmt: skip
#: A training run's resumable state: model, optimizer, scheduler, step, epoch, history, extra.
State = dict[str, Any]
#: Called at the end of every epoch on every rank with (metrics, state); rank 0's state is the
#: checkpoint. Ray Train's worker reports both to Ray; the command line saves the state.
EpochCallback = Callable[[dict[str, float], State], None]


def make_optimizer(
    model: nn.Module, train: TrainParams
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """Adam with the paper's schedule: the learning rate ×gamma every `lr_decay_epochs` epochs."""
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.lr_decay_epochs, gamma=train.lr_decay_gamma)
    return optimizer, scheduler


def load_initial_weights(model: DFNet, source: str) -> None:
    """Copy the weights of model directory `source` ("pretrained": the shipped model) into
    `model`, whose architecture must be the same (the configs are compared field by field)."""
    start = DFNet.from_pretrained(source)
    if start.config != model.config:
        differences = [
            f"{name}: {getattr(start.config, name)!r} in {source}, {getattr(model.config, name)!r} here"
            for name in start.config.to_dict()
            if getattr(start.config, name) != getattr(model.config, name)
        ]
        raise ValueError(f"train.init_from={source!r} is another architecture: " + "; ".join(differences))
    model.load_state_dict(start.state_dict())


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on GPU only (bf16 where supported, else fp16); a no-op on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _step(
    model: nn.Module,
    loss_fn: DFNetLoss,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    masks: Tensor,
    scaler: torch.amp.GradScaler | None,
    amp: bool,
) -> dict[str, float]:
    """One optimisation step on a batch (images N3HW in [0,1], masks N1HW with 1 = known)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(images.device, amp):
        output = model(images, masks)
    # The loss runs in fp32: Gram matrices and the style weight (240) overflow fp16.
    losses = loss_fn([r.float() for r in output.results], images, masks)
    if scaler is not None:
        scaler.scale(losses["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        losses["total"].backward()
        optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader, batches: int, device: torch.device) -> None:
    """Re-estimate BatchNorm running statistics as a plain average over shuffled batches.

    Training updates them with momentum, so they lean towards the last few batches; inference
    normalises with them, so they should describe the data as a whole.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches < 1:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    for index, (images, masks, _) in enumerate(loader):
        if index >= batches:
            break
        model(images.to(device), masks.to(device))
    model.train(was_training)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def code_version() -> str:
    """A hash of the library's source: a run trained by other code is another run."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def data_version(params: Params) -> str:
    """A hash of the prepared data's report and the mask file: other data is another run."""
    digest = hashlib.sha256()
    for uri in (f"{params.data.out_dir.rstrip('/')}/report.json", params.masks.out):
        fs, path = filesystem_for(uri)
        with fs.open_input_stream(path) as stream:
            digest.update(stream.read())
    return digest.hexdigest()[:12]


def run_identity(params: Params) -> str:
    """`<run_name>-<hash>` of what determines the weights: parameters, code and data versions.

    Same inputs → the same (resumable) run; any change → a new run, never stale weights.
    Not part of it: how and where it runs, and how long (raising `epochs` extends the run).
    """
    relevant = {k: params.to_dict()[k] for k in ("data", "masks", "model", "loss", "train")}
    for key in _NOT_IDENTITY:
        relevant["train"].pop(key)
    relevant["versions"] = {"code": code_version(), "data": data_version(params)}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]
    return f"{params.train.run_name}-{digest}"


def sample_grid(model: DFNet, images: Tensor, masks: Tensor, rows: int = 6) -> Image.Image:
    """A picture of what the model does: input with hole (grey) | completion | ground truth."""
    was_training = model.training
    model.eval()
    images, masks = images[:rows].float(), masks[:rows].float()
    completed = model.complete(images, masks)
    model.train(was_training)
    holes = images * masks + 0.5 * (1 - masks)
    columns = [holes, completed, images]
    grid = torch.cat([torch.cat(list(col), dim=1) for col in columns], dim=2)  # 3 × (rows·H) × (3·W)
    return Image.fromarray(grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())


def train(
    params: Params,
    device: torch.device | str = "cpu",
    *,
    resume: State | None = None,
    on_epoch: EpochCallback | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    rank: int = 0,
    world: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
    log_every: int = 10,
) -> State:
    """Train `params` to `params.train.epochs` epochs and return the final state.

    An epoch is one pass over `crops_per_photo` fresh crops of every training photo, shuffled
    across photos; the state of the epoch's end (BatchNorm recalibrated, so it is what
    inference will see) goes to `on_epoch` with the validation metrics of rank 0.
    """
    device = torch.device(device)
    t = params.train
    torch.manual_seed(t.seed + rank)
    amp = t.amp and device.type == "cuda"
    model = params.model.build().to(device)
    loss_fn = DFNetLoss(params.loss).to(device)
    optimizer, scheduler = make_optimizer(model, t)
    scaler = torch.amp.GradScaler("cuda") if amp and not torch.cuda.is_bf16_supported() else None
    state: State = {"step": 0, "epoch": 0, "history": [], "extra": {}}
    if t.init_from and not resume:
        load_initial_weights(model, t.init_from)
        log.info("[rank %d] starting from the weights of %s", rank, t.init_from)
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        state.update(step=int(resume["step"]), epoch=int(resume["epoch"]), history=list(resume["history"]))
        state["extra"] = dict(resume.get("extra", {}))
        # Provenance of a run that survived failures: the step of every checkpoint it went on from.
        state["extra"]["resumed_at_steps"] = [*state["extra"].get("resumed_at_steps", []), state["step"]]
        log.info("[rank %d] resumed at epoch %d, step %d", rank, state["epoch"], state["step"])
    state["extra"]["vgg_provenance"] = loss_fn.provenance  # which texture loss really ran
    bare = model
    model = wrap_model(model)

    fs, masks_path = filesystem_for(params.masks.out)
    with fs.open_input_file(masks_path) as stream:
        pool = load_masks(stream)["pool"]
    loader = training_loader(
        params.data.out_dir, pool, params.data.image_size, t.batch_size,
        crops_per_photo=t.crops_per_photo, seed=t.seed, rank=rank, world=world,
        workers=t.loader_workers, max_zoom_out=t.max_zoom_out,
    )  # fmt: skip
    # Rank 0 validates (the other ranks report no metrics), when there are validation photos.
    val_photos = read_split(params.data.out_dir, "val").num_rows if rank == 0 else 0
    steps_per_epoch = len(loader)
    log.info(
        "[rank %d] %d training photos × %d crops → %d steps per epoch of %d, %d validation photos",
        rank, len(loader.dataset.photos), t.crops_per_photo, steps_per_epoch, t.batch_size, val_photos,
    )  # fmt: skip

    while state["epoch"] < t.epochs:
        epoch = state["epoch"]
        set_epoch(loader, epoch)
        tick, seen, losses = time.perf_counter(), 0, {}
        for index, (images, masks, _) in enumerate(loader, start=1):
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            losses = _step(model, loss_fn, optimizer, images, masks, scaler, amp)
            state["step"] += 1
            seen += len(images) * world
            if index % log_every == 0 or index == steps_per_epoch:
                record = {
                    "step": state["step"],
                    "epoch": epoch,
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": seen / (time.perf_counter() - tick),
                    **{f"loss_{k}": v for k, v in losses.items()},
                }
                state["history"].append(record)
                if rank == 0:
                    log.info(
                        "epoch %d step %d/%d loss %.4f (%.1f img/s)", epoch, index, steps_per_epoch,
                        losses["total"], record["images_per_s"],
                    )  # fmt: skip
                    if on_log:
                        on_log(record)
        scheduler.step()
        recalibrate_batchnorm(bare, loader, t.bn_recalibration_batches, device)
        state["epoch"] = epoch + 1
        metrics: dict[str, float] = {"step": state["step"], "epoch": epoch, "loss": losses.get("total", float("nan"))}
        if val_photos:
            validation = {f"val_{k}": v for k, v in validation_scores(bare, params).items()}
            metrics.update(validation)
            state["history"].append({"step": state["step"], "epoch": epoch, **validation})
            log.info("epoch %d validation: %s", epoch, " ".join(f"{k}={v:.3f}" for k, v in validation.items()))
        state.update(model=bare.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
        state["samples"] = sample_grid(bare, images, masks, rows=params.evaluate.grid_rows) if rank == 0 else None
        if on_epoch:
            on_epoch(metrics, state)
    return state


def export_model(params: Params, state: State, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the trained weights as a model directory with their provenance."""
    model = params.model.build()
    model.load_state_dict(state["model"])
    provenance = {
        "source": "trained",
        "preset": params.model.preset,
        "image_size": params.data.image_size,
        "steps": int(state["step"]),
        "epochs": int(state["epoch"]),
        "code_version": code_version(),
        "channel_order": "rgb",
        "output_quantization": "round",
        **state.get("extra", {}),
        **(extra or {}),
    }
    return model.save_pretrained(out_dir, provenance=provenance)


def checkpoint_state(state: State) -> State:
    """The part of `state` that goes into a checkpoint file (tensors and plain data only)."""
    return {k: v for k, v in state.items() if k != "samples"}


def main(argv: list[str] | None = None) -> None:
    """Train without Ray: one process, one device, checkpoints in `--run-dir/<run identity>`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--run-dir", default="runs/plain", help="checkpoints go to <run-dir>/<run identity>/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", default=None, help="model directory (default: train.out_dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    run_dir = Path(args.run_dir) / run_identity(params)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "state.pt"
    resume = None
    if params.train.resume and checkpoint.exists():
        resume = torch.load(checkpoint, map_location=args.device, weights_only=True)

    def save(metrics: dict[str, float], state: State) -> None:
        torch.save(checkpoint_state(state), run_dir / "state.tmp")
        (run_dir / "state.tmp").replace(checkpoint)  # never a half-written checkpoint
        state["samples"].save(run_dir / "samples.png")

    state = train(params, args.device, resume=resume, on_epoch=save)
    out = export_model(params, state, args.out_dir or params.train.out_dir, extra={"run": run_dir.name})
    log.info("model written to %s", out)


if __name__ == "__main__":
    main()
