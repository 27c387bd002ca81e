"""DFNet as an ONNX graph, and ONNX Runtime as an inference path of `dfnet.accelerate`.

`export_onnx` writes the network proper, fusion blocks and final composite included, with a
free batch size and free height and width (multiples of the preset's `size_multiple`). The graph
has two inputs and one output, all float32 NCHW, RGB, values in [0, 1]:

* ``image``  (N, 3, H, W): the photo. For a model with a classical pre-fill (the shipped one,
  ``prefill: ns``) the holes must already be filled by OpenCV, ``cv2.inpaint(photo_u8, hole_u8,
  radius, cv2.INPAINT_NS)``, with the radius in the graph's metadata (``prefill_radius``): the
  pre-fill is not an ONNX operator and stays in the caller's code (Python or C++ OpenCV alike).
  Without a pre-fill, the hole pixels of ``image`` are ignored.
* ``mask``   (N, 1, H, W): 1 = known pixel, 0 = hole, nothing in between.
* ``completed`` (N, 3, H, W): known pixels as they went in, holes filled by the network.

What a plain ``torch.onnx.export`` trace (the TorchScript exporter) of `DFNet.complete` gets
wrong: `DecoderBlock` adds its upsampled part into the output in place, through a strided view
(`add_phases`), and the tracer drops that write: the graph computes every decoder block from
its skip connection alone. Random weights hide it (a random official network saturates its
sigmoids either way), trained weights do not. The bottleneck's 1×1 special case would also be
frozen at the traced size. So the export runs each decoder block as two plain convolutions (the
skip part, and the upsampled part as one stride-2 transposed conv), which compute the same
function with no in-place write and no branch on the input's size.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dfnet.fast_decoder import transposed_kernels
from dfnet.model import DecoderBlock, DFNet

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAME",
    "OnnxRuntimeNetwork",
    "export_onnx",
    "onnx_metadata",
    "onnxruntime_available",
    "onnxruntime_network",
    "quantize_onnx_int8",
]

INPUT_NAMES = ("image", "mask")
OUTPUT_NAME = "completed"
OPSET = 18  # the torch.export-based exporter's lowest


class _PlainDecoder(nn.Module):
    """A `DecoderBlock` as two convolutions that export as they run (see the module docstring)."""

    def __init__(self, block: DecoderBlock, up_channels: int):
        super().__init__()
        weight = block.conv.weight.detach()
        out_channels = weight.shape[0]
        self.skip = nn.Conv2d(weight.shape[1] - up_channels, out_channels, 3, padding=1)
        self.skip.weight = nn.Parameter(weight[:, up_channels:].clone(), requires_grad=False)
        self.skip.bias = nn.Parameter(block.conv.bias.detach().clone(), requires_grad=False)
        self.up = nn.ConvTranspose2d(up_channels, out_channels, 4, stride=2, padding=1, bias=False)
        self.up.weight = nn.Parameter(transposed_kernels(weight[:, :up_channels]), requires_grad=False)
        self.norm = block.norm
        self.act = block.act

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.act(self.norm(self.skip(skip) + self.up(x)))


class _Completion(nn.Module):
    """(image, mask) → completed image: what the ONNX graph computes."""

    def __init__(self, model: DFNet):
        super().__init__()
        from dfnet.accelerate import fold_batchnorm  # not at the top: accelerate imports this module

        folded = fold_batchnorm(model).requires_grad_(False)
        channels = folded.config.channels
        for i, block in enumerate(folded.decoder):
            folded.decoder[i] = _PlainDecoder(block, channels[i + 1])
        self.model = folded
        self.prefilled = folded.config.opencv_prefill

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        filled = image if self.prefilled else image * mask  # a pyramid pre-fill is in forward_filled
        finest = self.model.forward_filled(filled, mask).results[0]
        return image * mask + finest * (1.0 - mask)


def onnx_metadata(model: DFNet) -> dict[str, str]:
    """What a caller needs to feed the graph, stored in the ONNX file's metadata_props."""
    config = model.config
    return {
        "dfnet_size_multiple": str(config.size_multiple),
        "dfnet_prefill": config.prefill,
        "dfnet_prefill_radius": str(config.prefill_radius),
        "dfnet_inputs": "image: N3HW float32 RGB in [0,1] (holes pre-filled by OpenCV if dfnet_prefill is ns, telea); "
        "mask: N1HW float32, 1 = known, 0 = hole",
    }


def export_onnx(model: DFNet, out: str | Path, *, example_size: int | None = None, opset: int = OPSET) -> Path:
    """Write `model` as an ONNX graph (see the module docstring for its inputs and output).

    The graph is traced once at `example_size`² (default: twice the size multiple; at the multiple
    itself the bottleneck is 1×1, and torch.export fixes a size of 1) with batch, height and width
    left free; it runs at any
    height and width that are multiples of `model.config.size_multiple`. The caller's model is
    not changed.
    """
    import onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    multiple = model.config.size_multiple
    size = example_size or 2 * multiple
    if size % multiple:
        raise ValueError(f"example_size {size} is not a multiple of {multiple}")
    network = _Completion(model).eval()
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, size, size, generator=generator)  # batch 1 would be fixed at 1
    mask = torch.ones(2, 1, size, size)
    mask[..., size // 4 : size // 2, size // 4 : size // 2] = 0.0
    # Height and width as multiples of the size multiple: the graph's input shapes say so.
    batch = torch.export.Dim("batch")
    height, width = multiple * torch.export.Dim("height_blocks"), multiple * torch.export.Dim("width_blocks")
    free = {0: batch, 2: height, 3: width}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # both inputs share the dims
        torch.onnx.export(
            network,
            (image, mask),
            str(out),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes=(free, free),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    graph = onnx.load(str(out))
    for key, value in onnx_metadata(model).items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(out))
    return out


# --------------------------------------------------------------------------- ONNX Runtime
def onnxruntime_available() -> bool:
    """Whether the ONNX Runtime paths can run: onnxruntime, onnx and onnxscript (the exporter's)
    installed (`pip install 'dfnet[onnx]'`)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


class _CalibrationReader:
    """ONNX Runtime's calibration protocol (get_next until None) over (image, mask) pairs."""

    def __init__(self, pairs: Sequence[tuple[Tensor, Tensor]]):
        self._pairs = iter(pairs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        pair = next(self._pairs, None)
        if pair is None:
            return None
        return {name: t.detach().cpu().float().contiguous().numpy() for name, t in zip(INPUT_NAMES, pair)}


def quantize_onnx_int8(
    fp32: str | Path, out: str | Path, calibration: Sequence[tuple[Tensor, Tensor]], *, reduce_range: bool
) -> Path:
    """Static int8 quantisation of an exported graph with ONNX Runtime's tools: the convolutions
    (weights per output channel, s8; activations u8, ranges from the calibration pairs, which are
    the graph's inputs: pre-filled images for a pre-fill model). Everything between them (fusion
    arithmetic, sigmoids, resizing, the composite) stays float32.

    reduce_range: 7-bit weights, for CPUs without VNNI, whose u8×s8 dot products add pairs in
    saturating 16-bit lanes (what `dfnet.accelerate.native_int8` describes for oneDNN).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fp32),
        str(out),
        _CalibrationReader(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return Path(out)


class OnnxRuntimeNetwork:
    """(image, mask) → completed image through an ONNX Runtime CPU session of an exported graph
    (torch tensors in and out; the inputs are the graph's, see the module docstring)."""

    def __init__(self, graph: bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT workers spin by default, holding a core that the pre-fill (or anything else in
        # the process) needs next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def __call__(self, image: Tensor, mask: Tensor) -> Tensor:
        feeds = {name: t.detach().cpu().float().contiguous().numpy() for name, t in zip(INPUT_NAMES, (image, mask))}
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feeds)[0]).to(image.device)


def onnxruntime_network(
    model: DFNet, *, calibration: Sequence[tuple[Tensor, Tensor]] | None = None, reduce_range: bool = False
) -> OnnxRuntimeNetwork:
    """`model` exported and loaded into ONNX Runtime; int8 (`quantize_onnx_int8`) when
    calibration pairs are given. The graphs live in a temporary folder for the build only."""
    with tempfile.TemporaryDirectory(prefix="dfnet-onnx-") as folder:
        graph = export_onnx(model, Path(folder) / "fp32.onnx")
        if calibration:
            graph = quantize_onnx_int8(graph, Path(folder) / "int8.onnx", calibration, reduce_range=reduce_range)
        return OnnxRuntimeNetwork(graph.read_bytes())
