"""The one training loop: plain PyTorch on one CPU or GPU, or inside a Ray Train worker.

    python -m dfnet.training [--params params.yaml] [--recipe recipes/R.yaml] [--run-dir runs/plain] [--device cuda]

:func:`train` owns everything a training run is: the model, the loss, the batches of photo
crops (the plain stream of :mod:`dfnet.train_data`, or a Ray Data shard the caller passes), Adam
with the paper's step schedule, mixed precision, the resumable state, BatchNorm recalibration and
the per-epoch validation on held-out photos. Callers only decide where things go: the Ray Train
worker (`pipelines/train.py`) passes its rank, DDP wrapper, dataset shard and a callback that
reports checkpoints to Ray; the command line above saves the state to a local folder and resumes
from it; the benchmarks call it directly.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from dfnet.evaluation import validation_scores
from dfnet.losses import DFNetLoss
from dfnet.model import DFNet
from dfnet.params import Params, TrainParams, load_params
from dfnet.storage import filesystem_for
from dfnet.train_data import Batch, CropStream, TrainingCrops, crop_batches, shuffle_buffer_items

log = logging.getLogger("dfnet.training")

# How and where a run executes, and how long: not part of its identity (more epochs extend it).
_NOT_IDENTITY = (
    "epochs", "resume", "max_failures", "num_workers", "use_gpu", "storage_path", "out_dir", "loader_workers",
    "data_inflight_mb",
)  # fmt: skip
#: A training run's resumable state: model, optimizer, scheduler, step, epoch, history, extra.
State = dict[str, Any]
#: ``(epoch, pass) -> the batches of one pass over the training photos``: the plain stream
#: (:func:`plain_batches`) or a Ray Train worker's dataset shard.
BatchSource = Callable[[int, int], Iterable[Batch]]
#: The pass whose batches re-estimate BatchNorm statistics after an epoch (not a training pass).
_RECALIBRATION_PASS = 2**31 - 1
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
    `model`, whose architecture must be the same (the configs are compared field by field). The
    pre-fill may differ: it has no weights, and a model can be fine-tuned onto another one."""
    start = DFNet.from_pretrained(source)
    differences = [
        f"{name}: {getattr(start.config, name)!r} in {source}, {getattr(model.config, name)!r} here"
        for name in start.config.to_dict()
        if name not in ("prefill", "prefill_radius") and getattr(start.config, name) != getattr(model.config, name)
    ]
    if differences:
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
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch], count: int, device: torch.device) -> None:
    """Re-estimate BatchNorm running statistics as a plain average over `count` shuffled batches.

    Training updates them with momentum, so they lean towards the last few batches; inference
    normalises with them, so they should describe the data as a whole.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or count < 1:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    for images, masks, _ in itertools.islice(batches, count):
        model(images.to(device), masks.to(device))
    model.train(was_training)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def plain_batches(params: Params) -> BatchSource:
    """The training split as a stream without Ray: :class:`CropStream` in DataLoader workers."""
    t = params.train
    crops = TrainingCrops(params.masks.out, params.data.image_size, t.crops_per_photo, t.max_zoom_out)
    buffer = shuffle_buffer_items(t.shuffle_buffer_mb, params.data.image_size)
    return crop_batches(CropStream(params.data.out_dir, crops, buffer, t.seed), t.batch_size, t.loader_workers)


def epoch_batches(source: BatchSource, epoch: int, steps: int | None) -> Iterator[Batch]:
    """Epoch `epoch`'s batches: one pass when `steps` is None, else exactly `steps` batches,
    going on into further passes (each drawn afresh) when a pass is shorter."""
    taken, pass_index = 0, 0
    while steps is None or taken < steps:
        before = taken
        for batch in source(epoch, pass_index):
            yield batch
            taken += 1
            if taken == steps:
                return
        if taken == before:
            raise ValueError("the training split gives no full batch: is it empty, or train.batch_size too large?")
        if steps is None:
            return
        pass_index += 1


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


def sample_grid(model: DFNet, images: Tensor, masks: Tensor, rows: int) -> Image.Image:
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


class _Interval:
    """Images per second and the share of time spent waiting for batches, between records."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.waited = time.perf_counter(), 0, 0.0

    def timed(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        iterator = iter(batches)
        while True:
            ready = time.perf_counter()
            batch = next(iterator, None)
            self.waited += time.perf_counter() - ready
            if batch is None:
                return
            yield batch

    def rates(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        rates = {"images_per_s": self.images / elapsed, "data_wait": self.waited / elapsed}
        self.reset()
        return rates


def train(
    params: Params,
    device: torch.device | str = "cpu",
    *,
    batches: BatchSource | None = None,
    resume: State | None = None,
    on_epoch: EpochCallback | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    rank: int = 0,
    world: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
    log_every: int = 10,
) -> State:
    """Train `params` to `params.train.epochs` epochs and return the final state.

    `batches` is where the crops come from (default: the plain stream over the prepared shards).
    An epoch is `train.steps_per_epoch` steps, or one pass when that is null; its end state
    (BatchNorm recalibrated, as inference will see it) goes to `on_epoch` with rank 0's
    validation metrics. Each log record carries `data_wait`: the share of the interval's time
    spent waiting for batches.
    """
    device = torch.device(device)
    t = params.train
    torch.manual_seed(t.seed + rank)
    amp = t.amp and device.type == "cuda"
    model = DFNet.from_params(params.model).to(device)
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
    source = batches or plain_batches(params)
    of_steps = f"/{t.steps_per_epoch}" if t.steps_per_epoch else ""

    def report(epoch: int, index: int, losses: dict[str, float], meter: _Interval) -> None:
        record = {"step": state["step"], "epoch": epoch, "lr": scheduler.get_last_lr()[0], **meter.rates(),
                  **{f"loss_{k}": v for k, v in losses.items()}}  # fmt: skip
        state["history"].append(record)
        if rank == 0:
            log.info(
                "epoch %d step %d%s loss %.4f (%.1f img/s, %.0f%% of the time waiting for data)", epoch, index,
                of_steps, losses["total"], record["images_per_s"], 100 * record["data_wait"],
            )  # fmt: skip
            if on_log:
                on_log(record)

    while state["epoch"] < t.epochs:
        epoch = state["epoch"]
        losses: dict[str, float] = {}
        images = masks = torch.empty(0)
        meter, index = _Interval(), 0
        for index, batch in enumerate(meter.timed(epoch_batches(source, epoch, t.steps_per_epoch)), start=1):
            images, masks = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            losses = _step(model, loss_fn, optimizer, images, masks, scaler, amp)
            state["step"] += 1
            meter.images += len(images) * world
            if index % log_every == 0:
                report(epoch, index, losses, meter)
        if index % log_every:
            report(epoch, index, losses, meter)  # the epoch's last steps
        scheduler.step()
        recalibrate_batchnorm(bare, source(epoch, _RECALIBRATION_PASS), t.bn_recalibration_batches, device)
        state["epoch"] = epoch + 1
        metrics: dict[str, float] = {"step": state["step"], "epoch": epoch, "loss": losses.get("total", float("nan"))}
        validation = {f"val_{k}": v for k, v in validation_scores(bare, params).items()} if rank == 0 else {}
        if validation:
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
    model = DFNet.from_params(params.model)
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
    parser.add_argument("--recipe", help="an overlay on --params (only the keys it changes): recipes/*.yaml")
    parser.add_argument("--run-dir", default="runs/plain", help="checkpoints go to <run-dir>/<run identity>/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", default=None, help="model directory (default: train.out_dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params, recipe=args.recipe)
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
