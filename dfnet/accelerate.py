"""Faster DFNet inference on CPU and GPU: BatchNorm folding, channels_last, autocast, torch.compile.

The one entry point is :func:`optimize_for_inference`. It never touches the caller's model: it
works on a deep copy, which it puts in eval mode, optionally folds every BatchNorm into the
convolution before it, moves to the device and memory format, and wraps in an
:class:`InferenceRunner` whose call returns exactly what ``DFNet.complete`` returns (the finest
result with the known pixels pasted back, float32).

What each switch buys is measured by ``bench/inference.py``. On a 2-core x86 CPU (official preset,
512², batch 1) the design notes report: channels_last ≈ 1.14×, compile (inductor freezing) +
channels_last ≈ 1.75× and bit-identical, and the same under bf16 autocast ≈ 3.1× within 0.5/255.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dfnet.model import DecoderBlock, DFNet, EncoderBlock

__all__ = ["InferenceRunner", "fold_batchnorm", "optimize_for_inference"]

logger = logging.getLogger(__name__)

_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- BatchNorm folding
@torch.no_grad()
def _fold_conv_bn(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Rewrite `conv` in place so that conv'(x) == norm(conv(x)) with norm in eval mode.

    Eval-mode BN is a per-output-channel affine map y = (x − μ) · γ/√(σ² + ε) + β, so it can be
    absorbed into the conv's weight (scaled per output channel) and bias. The arithmetic is done
    in float64 so the folded weights are as close as float32 can hold to the exact product.
    """
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics")
    if norm.num_features != conv.out_channels:
        raise ValueError(
            f"BatchNorm has {norm.num_features} features, conv has {conv.out_channels} outputs"
        )
    weight = conv.weight
    mean = norm.running_mean.double()
    var = norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + norm.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    new_weight = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    new_bias = (bias - mean) * scale + beta
    conv.weight = nn.Parameter(new_weight.to(weight.dtype), requires_grad=weight.requires_grad)
    # Assigning a Parameter also (re-)registers `bias` when the conv was built with bias=False.
    conv.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)


def _fold_in_place(model: nn.Module) -> int:
    """Fold every (conv, BatchNorm) pair this model's structure guarantees; return how many.

    Only pairs whose forward order is known are folded: `conv` → `norm` in Encoder/DecoderBlock,
    and consecutive (Conv2d, BatchNorm2d) entries of an nn.Sequential (BlendBlock.layers).
    """
    folded = 0
    for module in model.modules():
        if isinstance(module, (EncoderBlock, DecoderBlock)):
            if isinstance(module.norm, nn.BatchNorm2d) and isinstance(module.conv, nn.Conv2d):
                _fold_conv_bn(module.conv, module.norm)
                module.norm = nn.Identity()
                folded += 1
        elif isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, norm = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    _fold_conv_bn(conv, norm)
                    module[i + 1] = nn.Identity()
                    folded += 1
    return folded


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode with each BatchNorm2d folded into the conv before it.

    The copy computes what ``model.eval()`` computes (up to float rounding) with fewer ops; the
    caller's model, including its train/eval flag, is left as it was. BatchNorms that follow no
    convolution (none in DFNet) are kept, with a warning.
    """
    folded_model = copy.deepcopy(model).eval()
    _fold_in_place(folded_model)
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded_model.modules())
    if left:
        logger.warning("%d BatchNorm layer(s) could not be folded and are kept", left)
    return folded_model


# --------------------------------------------------------------------------- the runner
def _complete(
    model: DFNet, image: Tensor, mask: Tensor, device_type: str, dtype: torch.dtype | None
) -> Tensor:
    """The function that runs (and, with compile=True, is compiled): DFNet.complete in float32.

    Only the finest result leaves the function, so a compiled graph drops the coarser fusion
    outputs as dead code.
    """
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        finest = model(image, mask).results[0]
    # Paste back in float32: the known pixels must come out exactly as they went in.
    return image * mask + finest.float() * (1.0 - mask)


class InferenceRunner:
    """Callable returned by :func:`optimize_for_inference`: ``runner(image, mask) -> completed``.

    Attributes describe what is actually in use: `compiled` becomes False if compilation failed
    and the runner fell back to eager mode.
    """

    def __init__(
        self,
        model: DFNet,
        *,
        device: torch.device,
        channels_last: bool,
        dtype: torch.dtype | None,
        compile: bool,
        folded_batchnorms: int,
    ) -> None:
        self.model = model
        self.device = device
        self.channels_last = channels_last
        self.dtype = dtype
        self.compiled = compile
        self.folded_batchnorms = folded_batchnorms
        self._compiled_fn: Callable[[Tensor, Tensor], Tensor] | None = None
        if compile:
            try:
                # dynamic=False: one specialised graph per input shape (a server sees few).
                self._compiled_fn = torch.compile(self._eager, dynamic=False)
            except Exception as error:  # e.g. a Python version this torch cannot compile for
                logger.warning("torch.compile unavailable (%s); running eagerly", error)
                self.compiled = False

    def __repr__(self) -> str:
        return (
            f"InferenceRunner(device={self.device}, channels_last={self.channels_last}, "
            f"dtype={self.dtype}, compiled={self.compiled}, "
            f"folded_batchnorms={self.folded_batchnorms})"
        )

    def _eager(self, image: Tensor, mask: Tensor) -> Tensor:
        return _complete(self.model, image, mask, self.device.type, self.dtype)

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.to(self.device, torch.float32, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def __call__(self, image: Tensor, mask: Tensor) -> Tensor:
        """image: N3HW in [0, 1]; mask: N1HW, 1 = known. Returns the completed N3HW float32 image
        on the runner's device (standard contiguous layout)."""
        image, mask = self._prepare(image), self._prepare(mask)
        if self.compiled and self._compiled_fn is not None:
            try:
                with _freezing():
                    out = self._compiled_fn(image, mask)
            except Exception as error:  # a failing compiler must not take inference down
                # An eager run tells a bad input (it fails again, and that error propagates)
                # from a compile problem (eager works: warn once and stay eager from now on).
                # Every new input shape compiles afresh, so this can happen on any call.
                out = self._eager(image, mask)
                logger.warning(
                    "torch.compile failed (%s: %s); falling back to eager mode",
                    type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "",
                )
                self.compiled = False
                self._compiled_fn = None
        else:
            out = self._eager(image, mask)
        return out.contiguous()

    def warmup(self, shape: Sequence[int], repeats: int = 1) -> float:
        """Run on a synthetic batch so compilation (and oneDNN/cuDNN set-up) happens now.

        shape: (height, width), (batch, height, width) or (batch, channels, height, width).
        Returns the seconds the first call took (the compile time when compile=True).
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) == 2:
            batch, height, width = 1, *shape
        elif len(shape) == 3:
            batch, height, width = shape
        elif len(shape) == 4:
            batch, _, height, width = shape
        else:
            raise ValueError(f"warmup shape must have 2, 3 or 4 entries, got {shape}")
        generator = torch.Generator().manual_seed(0)
        image = torch.rand(batch, 3, height, width, generator=generator)
        mask = torch.ones(batch, 1, height, width)
        mask[..., height // 4 : height // 2, width // 4 : width // 2] = 0.0  # a hole, like real use
        start = time.perf_counter()
        self(image, mask)
        self._synchronize()
        first = time.perf_counter() - start
        for _ in range(max(repeats - 1, 0)):
            self(image, mask)
        self._synchronize()
        return first

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _freezing() -> contextlib.AbstractContextManager[object]:
    """Inductor's `freezing` switched on for the duration of a compiled call.

    Freezing lets inductor treat the weights as constants: it folds BN itself, prepacks conv
    weights for oneDNN and constant-folds whatever depends on weights only. It has to be on in
    the global config while dynamo *traces* (dynamo reads it to decide whether parameters are
    graph inputs), so `torch.compile(options={"freezing": True})` alone is not enough; a
    scoped patch keeps the rest of the process unaffected.
    """
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # an unusual build without inductor: compile as is
        return contextlib.nullcontext()
    if not hasattr(inductor_config, "freezing"):
        return contextlib.nullcontext()
    return inductor_config.patch(freezing=True)


def _check_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    if dtype is None or dtype == torch.float32:
        return None
    if dtype not in _AUTOCAST_DTYPES:
        raise ValueError(f"dtype must be None, float32, bfloat16 or float16, got {dtype}")
    if device.type == "cpu":
        # Without native support the CPU emulates the low-precision kernels: correct, but slow.
        native = {
            torch.bfloat16: getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None),
            torch.float16: getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None),
        }[dtype]
        supported = torch.backends.mkldnn.is_available() and native is not None and bool(native())
        if not supported:
            logger.warning("no native %s support in oneDNN here; autocast may be slower", dtype)
    return dtype


def optimize_for_inference(
    model: DFNet,
    *,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
    fold_bn: bool = True,
    dtype: torch.dtype | None = None,
    compile: bool = False,
) -> InferenceRunner:
    """Prepare a fast inference callable for `model`, leaving `model` itself untouched.

    device: where the copy runs ("cpu", "cuda", "cuda:1", ...); inputs are moved there.
    channels_last: NHWC memory format for weights and inputs (oneDNN and cuDNN prefer it).
    fold_bn: fold each eval-mode BatchNorm into the conv before it.
    dtype: None / torch.float32 = full precision; torch.bfloat16 or torch.float16 = autocast
        (the output is float32 either way).
    compile: torch.compile with inductor (weights frozen as constants). Compilation happens
        on the first call for each input shape (tens of seconds on a CPU; call `warmup`). If it
        fails, e.g. no C++ compiler, the runner logs a warning and runs eagerly.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available")
    dtype = _check_dtype(dtype, device)
    prepared = copy.deepcopy(model).eval()  # .to() and folding mutate; the caller keeps theirs
    folded = _fold_in_place(prepared) if fold_bn else 0
    prepared.requires_grad_(False)
    prepared.to(device)
    if channels_last:
        prepared.to(memory_format=torch.channels_last)
    return InferenceRunner(
        prepared,
        device=device,
        channels_last=channels_last,
        dtype=dtype,
        compile=compile,
        folded_batchnorms=folded,
    )
