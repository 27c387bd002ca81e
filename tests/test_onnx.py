"""dfnet.onnx: the exported graph computes what DFNet.complete computes, in ONNX Runtime."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from dfnet.accelerate import optimize_for_inference  # noqa: E402
from dfnet.cli import main as cli_main  # noqa: E402
from dfnet.data import decode_photo, resize_short_side, sample_photos  # noqa: E402
from dfnet.masks import evaluation_masks  # noqa: E402
from dfnet.model import DFNet  # noqa: E402

ONE_LEVEL = 1 / 255
# Bundled photos the shipped model never saw (it was trained on the Debian corpus); the first
# four are `default_calibration`'s, so the int8 test leaves them out.
HELDOUT = ["skimage/coffee.png", "skimage/motorcycle_left.png", "skimage/rocket.jpg", "sklearn/china.jpg"]


@pytest.fixture(scope="module")
def shipped() -> DFNet:
    return DFNet.from_pretrained("pretrained")


def heldout_pairs(height: int, width: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Centre crops of the held-out photos, each with an evaluation mask from 20 % holes up."""
    photos = sample_photos()
    bins = evaluation_masks(1, height, width, seed)
    pairs = []
    for index, key in enumerate(HELDOUT):
        photo = resize_short_side(decode_photo(photos[key].read_bytes()), max(height, width))
        top, left = (photo.shape[0] - height) // 2, (photo.shape[1] - width) // 2
        crop = np.ascontiguousarray(photo[top : top + height, left : left + width])
        mask = torch.from_numpy(bins[2 + index % (len(bins) - 2)][0]).float()[None, None]
        pairs.append((torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255, mask))
    return pairs


def run_graph(session: ort.InferenceSession, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {"image": image.numpy(), "mask": mask.numpy()})[0])


def hole_l1(out: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    hole = (1 - mask).expand_as(truth)
    return ((out - truth).abs() * hole).sum().item() / hole.sum().item()


@pytest.fixture(scope="module")
def exported(shipped: DFNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model through `dfnet export-onnx`, as a user runs it."""
    out = tmp_path_factory.mktemp("onnx") / "dfnet-small-ns.onnx"
    assert cli_main(["export-onnx", "pretrained", str(out)]) == 0
    return out


def test_exported_graph_declares_its_inputs(exported: Path, shipped: DFNet) -> None:
    graph = onnx.load(str(exported))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    # Batch free; channels fixed; height and width free but multiples of the preset's 64.
    assert inputs["image"][1] == 3 and inputs["mask"][1] == 1
    for dims in inputs.values():
        assert isinstance(dims[0], str) and all(isinstance(d, str) and d.startswith("64*") for d in dims[2:])
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["dfnet_prefill"] == "ns" and meta["dfnet_prefill_radius"] == str(shipped.config.prefill_radius)
    assert meta["dfnet_size_multiple"] == "64"


@pytest.mark.parametrize("height,width", [(64, 64), (128, 192), (256, 256)])
def test_onnxruntime_matches_pytorch_on_heldout_photos(exported: Path, shipped: DFNet, height: int, width: int) -> None:
    """Within one 8-bit level everywhere, at sizes other than the traced one (128²), the 1×1
    bottleneck of 64² included. The pre-fill runs in Python, as for any caller of the graph."""
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for image, mask in heldout_pairs(height, width):
        reference = shipped.complete(image, mask)
        out = run_graph(session, shipped.fill_holes(image, mask), mask)
        assert out.shape == reference.shape
        assert (out - reference).abs().max().item() < ONE_LEVEL
        assert torch.equal(out * mask, image * mask)  # the composite: known pixels as they went in


def test_tolerance_catches_what_a_plain_trace_exports(shipped: DFNet) -> None:
    """Guard for the test above: a plain trace drops each decoder block's upsampled part (the
    module docstring). On the trained model that moves the holes by far more than one level, so
    the parity test would catch it."""
    broken = copy.deepcopy(shipped)
    with torch.no_grad():
        for i, block in enumerate(broken.decoder):
            block.conv.weight[:, : shipped.config.channels[i + 1]] = 0.0
    image, mask = heldout_pairs(128, 192)[0]
    assert hole_l1(broken.complete(image, mask), shipped.complete(image, mask), mask) > 5 * ONE_LEVEL


def test_a_batch_runs_as_its_images_alone(exported: Path, shipped: DFNet) -> None:
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    pairs = heldout_pairs(128, 128)[:2]
    filled = [shipped.fill_holes(i, m) for i, m in pairs]
    batch = run_graph(session, torch.cat(filled), torch.cat([m for _, m in pairs]))
    for index, (fill, (_, mask)) in enumerate(zip(filled, pairs)):
        assert (batch[index : index + 1] - run_graph(session, fill, mask)).abs().max().item() < 1e-5


def test_onnxruntime_path_is_the_model(shipped: DFNet) -> None:
    runner = optimize_for_inference(shipped, path="onnxruntime")
    assert runner.path.runtime == "onnxruntime" and not runner.compiled
    for image, mask in heldout_pairs(128, 128)[:2]:
        assert (runner(image, mask) - shipped.complete(image, mask)).abs().max().item() < ONE_LEVEL


def test_onnxruntime_int8_path_is_quantised_and_keeps_quality(shipped: DFNet) -> None:
    """Calibrated on bundled photos (default_calibration), scored on others: hole ℓ1 within 1 %
    of fp32's, and really int8 (the output moves; a graph left in float would not)."""
    runner = optimize_for_inference(shipped, path="onnxruntime-int8")
    fp32, int8, moved = [], [], 0.0
    for image, mask in heldout_pairs(256, 256):
        reference, out = shipped.complete(image, mask), runner(image, mask)
        fp32.append(hole_l1(reference, image, mask))
        int8.append(hole_l1(out, image, mask))
        moved = max(moved, (out - reference).abs().max().item())
    assert moved > ONE_LEVEL
    assert abs(np.mean(int8) / np.mean(fp32) - 1) < 0.01


def test_onnxruntime_paths_are_cpu_only(shipped: DFNet) -> None:
    with pytest.raises(ValueError, match="CPU only"):
        optimize_for_inference(shipped, device="meta", path="onnxruntime")
