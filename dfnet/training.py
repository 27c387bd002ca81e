"""The training step and schedule, shared by Ray Train workers, the Tune trials and the plain
single-process loop of the benchmarks (so they all train exactly the same way)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dfnet.losses import DFNetLoss
from dfnet.model import DFNet
from dfnet.params import TrainParams


def make_optimizer(
    model: nn.Module, train: TrainParams
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    """Adam with the paper's schedule: the learning rate ×gamma every `lr_decay_epochs` epochs."""
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.lr_decay_epochs, gamma=train.lr_decay_gamma)
    return optimizer, scheduler


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on GPU only (bf16 where supported, else fp16); a no-op on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@dataclass
class StepResult:
    losses: dict[str, float]
    output: Any  # DFNetOutput of the step, for sample grids


def train_step(
    model: nn.Module,
    loss_fn: DFNetLoss,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    masks: Tensor,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
) -> StepResult:
    """One optimisation step on a batch (images N3HW in [0,1], masks N1HW with 1 = known)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(images.device, amp):
        output = model(images, masks)
    # The loss runs in fp32: Gram matrices and the style weight (240) overflow fp16.
    results = [r.float() for r in output.results]
    losses = loss_fn(results, images, masks)
    if scaler is not None:
        scaler.scale(losses["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        losses["total"].backward()
        optimizer.step()
    return StepResult({k: float(v.detach()) for k, v in losses.items()}, output)


def to_batch(images: np.ndarray, masks: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """NHW3 uint8 images and N1HW float masks → tensors on `device`."""
    image_t = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return image_t.to(device, non_blocking=True), torch.from_numpy(masks).to(device, non_blocking=True)


def sample_grid(model: DFNet, images: Tensor, masks: Tensor, rows: int = 6) -> Image.Image:
    """A picture of what the model does: input with hole (grey) | completion | ground truth."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        images, masks = images[:rows].float(), masks[:rows].float()
        completed = model.complete(images, masks)
    model.train(was_training)
    holes = images * masks + 0.5 * (1 - masks)
    columns = [holes, completed, images]
    grid = torch.cat([torch.cat(list(col), dim=1) for col in columns], dim=2)  # 3 × (rows·H) × (3·W)
    return Image.fromarray(grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
