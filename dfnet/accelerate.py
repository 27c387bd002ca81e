"""Fast DFNet inference: one call, `optimize_for_inference(model)`, picks the path for the machine.

A *path* is how the network runs (`INFERENCE_PATHS`): every path folds each BatchNorm into the
conv before it, uses channels_last and runs the decoder blocks without building their upsampled
tensor (`dfnet.fast_decoder`: sub-pixel phases, or transposed convs on the fp32 and native-bf16
compiled paths); then

* ``eager``         fp32, no compiler (what runs where nothing else can)
* ``compile``       torch.compile (inductor, weights frozen as constants), fp32
* ``compile-bf16``  the same under bf16 autocast: fast only where bf16 is native
                    (AVX512-BF16 / AMX CPUs, recent GPUs); emulated elsewhere, and slower than fp32
* ``int8``          post-training static quantisation (PT2E, the x86 inductor quantiser), calibrated
                    on photos the caller passes or, by default, on bundled sample photos
* ``int8-bf16``     the same int8 convolutions with everything between them (fusion and blend
                    blocks, upsampling, activations) in bf16, for CPUs where bf16 is native
* ``onnxruntime``   the network exported to ONNX (`dfnet.onnx`) and run by ONNX Runtime, fp32
* ``onnxruntime-int8``  the same graph with its convolutions statically quantised to int8 by
                    ONNX Runtime's tools, calibrated like ``int8`` (needs ``dfnet[onnx]``)

``path="auto"`` (the default) picks one for the machine (`choose_path`) and logs why. OpenCV's
pre-fills (ns, telea) run eagerly before the network; the pyramid pre-fill is part of
`DFNet.forward_filled`, which is what each path compiles, quantises or exports. The caller's model
is never touched: the runner works on a deep copy. `bench/inference.py` measures every path.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import fuse_conv_bn_eval

from dfnet.fast_decoder import use_fast_decoders
from dfnet.model import DecoderBlock, DFNet, EncoderBlock
from dfnet.onnx import onnxruntime_available, onnxruntime_network

__all__ = [
    "INFERENCE_PATHS",
    "InferencePath",
    "InferenceRunner",
    "choose_path",
    "default_calibration",
    "fold_batchnorm",
    "int8_available",
    "native_bfloat16",
    "native_int8",
    "optimize_for_inference",
    "persistent_compile_cache",
]

logger = logging.getLogger(__name__)

Network = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class InferencePath:
    """One way to run the network: compiled or not, the autocast dtype, int8, memory layout."""

    name: str
    compile: bool = False
    dtype: torch.dtype | None = None  # autocast dtype; None = float32
    int8: bool = False  # PT2E static quantisation, calibrated on photos
    channels_last: bool = True
    fold_bn: bool = True
    runtime: str = "torch"  # or "onnxruntime": the network exported to ONNX (dfnet.onnx)


INFERENCE_PATHS: dict[str, InferencePath] = {
    p.name: p
    for p in (
        InferencePath("eager"),
        InferencePath("compile", compile=True),
        InferencePath("compile-bf16", compile=True, dtype=torch.bfloat16),
        InferencePath("int8", compile=True, int8=True),
        InferencePath("int8-bf16", compile=True, dtype=torch.bfloat16, int8=True),
        InferencePath("onnxruntime", channels_last=False, runtime="onnxruntime"),
        InferencePath("onnxruntime-int8", int8=True, channels_last=False, runtime="onnxruntime"),
    )
}


# --------------------------------------------------------------------------- BatchNorm folding
@torch.no_grad()
def _fold_in_place(model: nn.Module) -> int:
    """Fold every (conv, BatchNorm) pair this model's structure guarantees; return how many.

    Only pairs whose forward order is known are folded: `conv` → `norm` in Encoder/DecoderBlock,
    and consecutive (Conv2d, BatchNorm2d) entries of an nn.Sequential (BlendBlock.layers). The
    model must be in eval mode: folding uses the running statistics.
    """
    folded = 0
    for module in model.modules():
        if isinstance(module, (EncoderBlock, DecoderBlock)):
            if isinstance(module.norm, nn.BatchNorm2d) and isinstance(module.conv, nn.Conv2d):
                module.conv = fuse_conv_bn_eval(module.conv, module.norm)
                module.norm = nn.Identity()
                folded += 1
        elif isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                conv, norm = module[i], module[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(conv, norm)
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


# --------------------------------------------------------------------------- choosing a path
_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def native_bfloat16(device: torch.device) -> bool:
    """Whether bf16 kernels run natively here: on the CPU, oneDNN finds AVX512-BF16 or AMX *and*
    ATen runs its AVX-512 kernels (ATEN_CPU_CAPABILITY=avx2, with ONEDNN_MAX_CPU_ISA=AVX2, makes
    such a CPU behave like an AVX2-only one, and then bf16 is emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    onednn = torch.backends.mkldnn.is_available() and check is not None and bool(check())
    # oneDNN also calls bf16 "supported" on AVX-512 CPUs without AVX512-BF16 (it emulates it
    # there), so the instructions themselves are asked for.
    instructions = any(getattr(torch.cpu, name, lambda: False)() for name in _BF16_CHECKS)
    return onednn and instructions and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def native_int8() -> bool:
    """Whether oneDNN's int8 convolutions get VNNI dot products on this CPU (AVX512-VNNI, AMX).

    Without VNNI (AVX2-only CPUs, or this one capped to AVX2 like `native_bfloat16` describes)
    pairs of u8×s8 products are summed in saturating 16-bit lanes, so activations have to be
    quantised to 7 bits (`reduce_range`) or large ones clip and move the completion visibly.
    """
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
    return bool(vnni) and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def int8_available(device: torch.device) -> bool:
    """Whether the int8 path can run: an x86 CPU with oneDNN, and torchao installed."""
    import importlib.util
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    return (
        device.type == "cpu"
        and x86
        and torch.backends.mkldnn.is_available()
        and (importlib.util.find_spec("torchao") is not None)
    )


def choose_path(device: str | torch.device = "cpu") -> tuple[InferencePath, str]:
    """The fastest validated path for `device` on this machine, and the reason for it.

    The order follows bench/inference.py: compiled bf16 where bf16 is native (GPUs, AVX512-BF16,
    AMX); ONNX Runtime int8 on VNNI CPUs without it; torch int8 with torchao; compiled fp32; eager
    without a C++ compiler. The int8 paths' longer start-up keeps them out where bf16 is native.
    """
    device = torch.device(device)
    where = "the GPU" if device.type == "cuda" else f"this CPU ({torch.backends.cpu.get_cpu_capability()})"
    if device.type == "cpu" and not native_bfloat16(device) and native_int8() and onnxruntime_available():
        # Needs no C++ compiler, so it comes before that check. bench/inference.py: the fastest
        # path within quality on an AVX-512 VNNI CPU without bf16 (docs/performance.md).
        return INFERENCE_PATHS["onnxruntime-int8"], f"{where} has VNNI but no native bf16: ONNX Runtime int8"
    if device.type == "cpu" and shutil.which(os.environ.get("CXX", "c++")) is None:
        return INFERENCE_PATHS["eager"], "no C++ compiler on the PATH for inductor"
    if native_bfloat16(device):
        return INFERENCE_PATHS["compile-bf16"], f"{where} has native bf16"
    no_bf16 = f"{where} has no native bf16 (emulated bf16 is slower than fp32)"
    if int8_available(device):
        return INFERENCE_PATHS["int8"], f"{no_bf16}; int8 is the fastest validated path left"
    return INFERENCE_PATHS["compile"], f"{no_bf16}; int8 needs torchao (pip install 'dfnet[int8]')"


def persistent_compile_cache() -> Path:
    """Keep inductor's compiled kernels in a folder that survives restarts (unless the user set
    TORCHINDUCTOR_CACHE_DIR): the next process with the same model and shapes skips most of the
    compile time. Returns the folder in use."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    ours = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dfnet" / "inductor"
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its own default (under /tmp) into the environment once it has looked it
    # up, so that value means "not set by the user" too.
    if current is None or Path(current).resolve() == Path(default_cache_dir()).resolve():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(ours)
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------- the runner
class _Finest(nn.Module):
    """The network proper, returning only the finest result (the coarser ones are then dead code
    to a compiler)."""

    def __init__(self, model: DFNet):
        super().__init__()
        self.model = model

    def forward(self, input_image: Tensor, mask: Tensor) -> Tensor:
        return self.model.forward_filled(input_image, mask).results[0]


class _Autocast(nn.Module):
    """`network` run under autocast to `dtype`, returning float32. It wraps the network from
    outside so that the int8 path quantises an fp32 graph (torch.export would keep an autocast
    region inside as an opaque wrapper) and bf16 then covers what runs between the int8 convs."""

    def __init__(self, network: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.network = network
        self.dtype = dtype

    def forward(self, input_image: Tensor, mask: Tensor) -> Tensor:
        with torch.autocast(input_image.device.type, dtype=self.dtype):
            return self.network(input_image, mask).float()


def _network(model: DFNet, path: InferencePath, calibration: Sequence[tuple[Tensor, Tensor]] = ()) -> nn.Module:
    """What the path runs on the filled image and mask: the finest result, quantised when the
    path is int8 (on the calibration inputs), under autocast when it has a dtype."""
    network: nn.Module = _Finest(model)
    if path.int8:
        network = _quantize_int8(network, calibration)
    return network if path.dtype is None else _Autocast(network, path.dtype)


class InferenceRunner:
    """Callable returned by :func:`optimize_for_inference`: ``runner(image, mask) -> completed``,
    what ``DFNet.complete`` returns (float32, the known pixels exactly as they went in).

    `path` is the path in use and `reason` why it was chosen; `compiled` becomes False if
    compilation failed and the runner fell back to eager mode.

    On a compiled path every image size (height, width) gets a graph of its own, compiled on the
    `compile_after`-th call at that size (slow on a CPU); until then, and for every
    size when `compile_after` is None, the size runs eagerly (the same path without the compiler
    and without int8). `warmup` compiles its size at once. Sizes with a graph always use it.
    """

    def __init__(
        self,
        model: DFNet,
        network: Network,
        *,
        device: torch.device,
        path: InferencePath,
        reason: str,
        compile_after: int | None = 1,
    ):
        self.model = model
        self.device = device
        self.path = path
        self.reason = reason
        self.compiled = path.compile
        self.compile_after = compile_after
        self.calls_per_size: Counter[tuple[int, int]] = Counter()
        self.graph_sizes: set[tuple[int, int]] = set()  # sizes with a compiled graph
        self._eager: Network = _network(model, replace(path, int8=False))
        self._network = network

    def __repr__(self) -> str:
        return f"InferenceRunner(path={self.path.name!r}, device={self.device}, compiled={self.compiled})"

    def __call__(self, image: Tensor, mask: Tensor) -> Tensor:
        """image: N3HW in [0, 1]; mask: N1HW, 1 = known. Returns the completed N3HW float32 image
        on the runner's device (standard contiguous layout)."""
        return self._complete(image, mask, compile_now=False)

    # inference_mode, not no_grad: callers such as Inpainter run it in inference mode, and a
    # compiled graph traced under the other mode would be recompiled on their first call.
    @torch.inference_mode()
    def _complete(self, image: Tensor, mask: Tensor, *, compile_now: bool) -> Tensor:
        image, mask = _placed(image, self.device, self.path), _placed(mask, self.device, self.path)
        filled = _placed(self.model.fill_holes(image, mask), self.device, self.path)
        size = (filled.shape[-2], filled.shape[-1])
        self.calls_per_size[size] += 1
        due = self.compile_after is not None and self.calls_per_size[size] >= self.compile_after
        if self.compiled and (compile_now or due or size in self.graph_sizes):
            try:
                for tensor in (filled, mask):  # one static graph per image size, see _static_sizes
                    _static_sizes(tensor)
                with _compiling():
                    finest = self._network(filled, mask)
                self.graph_sizes.add(size)
            except Exception as error:  # a failing compiler must not take inference down
                # An eager run tells a bad input (it fails again, and that error propagates)
                # from a compile problem (eager works: warn once and stay eager from now on).
                # Every new input shape compiles afresh, so this can happen on any call.
                finest = self._eager(filled, mask)
                logger.warning(
                    "torch.compile failed (%s: %s); falling back to eager mode",
                    type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "",
                )
                self.compiled = False
        elif self.path.compile:  # a size not compiled (yet), or compiling failed
            finest = self._eager(filled, mask)
        else:
            finest = self._network(filled, mask)
        return (image * mask + finest * (1.0 - mask)).contiguous()

    def warmup(self, shape: Sequence[int], repeats: int = 1) -> float:
        """Run on a synthetic batch so compilation (and oneDNN/cuDNN set-up) happens now.

        shape: (height, width), (batch, height, width) or (batch, channels, height, width).
        Returns the seconds the first call took (the compile time on a compiled path).
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3, 4):
            raise ValueError(f"warmup shape must have 2, 3 or 4 entries, got {shape}")
        batch, height, width = (1, *shape) if len(shape) == 2 else (shape[0], shape[-2], shape[-1])
        generator = torch.Generator().manual_seed(0)
        image = torch.rand(batch, 3, height, width, generator=generator)
        mask = torch.ones(batch, 1, height, width)
        mask[..., height // 4 : height // 2, width // 4 : width // 2] = 0.0  # a hole, like real use
        start = time.perf_counter()
        for index in range(max(repeats, 1)):
            self._complete(image, mask, compile_now=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if index == 0:
                first = time.perf_counter() - start
        return first


def _placed(x: Tensor, device: torch.device, path: InferencePath) -> Tensor:
    """`x` as float32 on `device`, in the path's memory format."""
    x = x.to(device, torch.float32, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if path.channels_last else x


def _static_sizes(x: Tensor) -> None:
    """Keep height and width static when torch.compile sees a new image size.

    By default dynamo recompiles a graph whose input size changed with that size symbolic, and
    on the CPU such a graph runs many times slower than a static one (inductor cannot prepack the
    convolutions for oneDNN without their sizes). So every size gets a static graph of its own:
    a compile per new size (up to dynamo's recompile limit, then new sizes run eagerly), while
    the batch size may still turn dynamic, which costs nothing measurable.
    """
    torch._dynamo.mark_static(x, 2)
    torch._dynamo.mark_static(x, 3)


def _compiling() -> contextlib.AbstractContextManager[object]:
    """Inductor's settings for a compiled call, patched for its duration only: `freezing` (weights
    become constants that inductor prepacks for oneDNN; it must be set while dynamo traces, so a
    `torch.compile` option is not enough, and such graphs cannot be cached: every process lowers
    them afresh) and `cpp_wrapper` (the graph runs as one C++ function that releases the GIL)."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True, cpp_wrapper=True)


def default_calibration(size: int = 256, count: int = 4, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Calibration inputs for the int8 path when the caller brings none: `count` of the photos
    bundled with installed packages (`dfnet.data.sample_photos`, the embedded default data set),
    scaled and centre-cropped to size², each with a fixed evaluation mask from a different
    hole-size bin. The int8 path only needs activation ranges typical of photos with holes."""
    from dfnet.data import decode_photo, resize_short_side, sample_photos
    from dfnet.masks import HOLE_BINS, evaluation_masks

    bins = evaluation_masks(1, size, size, seed)
    pairs = []
    for index, path in enumerate(sorted(sample_photos().values())[:count]):
        photo = resize_short_side(decode_photo(path.read_bytes()), size)
        top, left = (photo.shape[0] - size) // 2, (photo.shape[1] - size) // 2
        crop = torch.from_numpy(np.ascontiguousarray(photo[top : top + size, left : left + size]))
        mask = torch.from_numpy(bins[index % len(HOLE_BINS)][0]).float()
        pairs.append((crop.permute(2, 0, 1)[None].float() / 255, mask[None, None]))
    return pairs


def _quantize_int8(network: nn.Module, calibration: Sequence[tuple[Tensor, Tensor]]) -> nn.Module:
    """PT2E static int8 quantisation of `network` (filled image, mask → finest result) with the x86
    inductor quantiser: export, insert observers, run the calibration inputs, convert.

    The export is strict (traced by dynamo): the quantiser finds convolutions by their source
    (nn.Conv2d or F.conv2d), and only a strict trace records that for `Conv2dSame`, a subclass. A
    non-strict export hands it the class name "Conv2dSame", which it does not recognise, and then
    not one convolution is quantised (the graph runs in fp32 with no error).
    """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as error:
        raise RuntimeError("the int8 path needs torchao: pip install 'dfnet[int8]'") from error
    # Batch, height and width stay free, so one quantised graph serves every input size.
    free = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    example = tuple(t.expand(2, *t.shape[1:]) for t in calibration[0])  # batch 1 would be fixed at 1
    exported = torch.export.export(network, example, dynamic_shapes=(free, free), strict=True).module()
    config = get_default_x86_inductor_quantization_config(reduce_range=not native_int8())
    quantizer = X86InductorQuantizer().set_global(config)
    observed = prepare_pt2e(exported, quantizer)
    for inputs in calibration:
        observed(*inputs)
    return convert_pt2e(observed)


def optimize_for_inference(
    model: DFNet,
    *,
    device: str | torch.device = "cpu",
    path: str | InferencePath = "auto",
    calibration: Sequence[tuple[Tensor, Tensor]] = (),
    compile_after: int | None = 1,
) -> InferenceRunner:
    """A fast inference callable for `model` on `device`, leaving `model` itself untouched.

    path: "auto" (chosen by `choose_path` for this machine), a name in `INFERENCE_PATHS`, or an
        `InferencePath`. Compiled paths compile on the first call for each input shape (slow on
        a CPU: call `warmup`); if compiling fails (no C++ compiler, ...), the runner logs a
        warning and runs eagerly.
    calibration: (image, mask) pairs like the ones the runner will see, for the int8 path; by
        default a few bundled photos with holes (`default_calibration`).
    compile_after: on a compiled path, the call at an image size that compiles it: 1 = the
        first, 2 = once the size comes again (a lone image does not wait for a compile it cannot
        pay back), None = only sizes passed to `InferenceRunner.warmup`; until then a size runs
        eagerly. Can be changed later on the runner.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available")
    if path == "auto":
        chosen, reason = choose_path(device)
    elif isinstance(path, InferencePath):
        chosen, reason = path, "requested"
    elif path in INFERENCE_PATHS:
        chosen, reason = INFERENCE_PATHS[path], "requested"
    else:
        raise ValueError(f"unknown inference path {path!r}; choose auto or one of {', '.join(INFERENCE_PATHS)}")
    if (chosen.int8 or chosen.runtime != "torch") and device.type != "cpu":
        raise ValueError(f"the {chosen.name} path runs on the CPU only")
    emulated_bf16 = chosen.dtype == torch.bfloat16 and not native_bfloat16(device)
    if emulated_bf16:
        logger.warning("no native bfloat16 on %s: the %s path will be slow", device, chosen.name)
    prepared = copy.deepcopy(model).eval()  # .to() and folding mutate; the caller keeps theirs
    if chosen.fold_bn:
        _fold_in_place(prepared)
    prepared.requires_grad_(False).to(device)
    # Transposed convs are what inductor fuses best. Not for int8: the quantiser leaves them in
    # float, and that graph ran slower. Nor for emulated bf16, where oneDNN's transposed conv is
    # pathologically slow. Eagerly the phases win.
    use_fast_decoders(prepared, transposed=chosen.compile and not chosen.int8 and not emulated_bf16)
    if chosen.channels_last:
        prepared.to(memory_format=torch.channels_last)
    inputs = []
    if chosen.int8:
        for image, mask in calibration or default_calibration():
            image, mask = _placed(image, device, chosen), _placed(mask, device, chosen)
            inputs.append((_placed(prepared.fill_holes(image, mask), device, chosen), mask))
    if chosen.runtime == "onnxruntime":
        network = onnxruntime_network(prepared, calibration=inputs, reduce_range=not native_int8())
    else:
        network = _network(prepared, chosen, inputs)
    if chosen.compile:
        persistent_compile_cache()
        network = torch.compile(network)
    logger.info("inference path %s on %s: %s", chosen.name, device, reason)
    return InferenceRunner(prepared, network, device=device, path=chosen, reason=reason, compile_after=compile_after)
