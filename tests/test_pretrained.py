"""The model shipped with the package, and the pre-fill it is built on."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from dfnet.accelerate import INFERENCE_PATHS, choose_path
from dfnet.cli import main as cli_main
from dfnet.inpaint import Inpainter
from dfnet.model import DFNet, DFNetConfig, build_model, classical_prefill, pyramid_prefill
from dfnet.params import load_params
from dfnet.pretrained import pretrained_dir
from dfnet.training import load_initial_weights

ROOT = Path(__file__).resolve().parents[1]


def _stroke_hole(height: int, width: int) -> np.ndarray:
    """A wide zig-zag brush stroke (1 = hole) across the middle of the frame."""
    hole = np.zeros((height, width), np.uint8)
    points = np.array([[10, height // 3], [width // 3, 2 * height // 3], [2 * width // 3, height // 4],
                       [width - 10, 2 * height // 3]], np.int32)  # fmt: skip
    cv2.polylines(hole, [points], isClosed=False, color=1, thickness=max(8, height // 8))
    return hole


@pytest.mark.parametrize("method", ["ns", "telea"])
def test_an_untrained_prefill_model_returns_exactly_the_classical_fill(method: str) -> None:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (128, 192, 3), dtype=np.uint8), (9, 9), 3)
    hole = _stroke_hole(128, 192)
    torch.manual_seed(0)
    inpainter = Inpainter(build_model("small", prefill=method))
    completed = np.asarray(inpainter.inpaint(image, hole * 255, mask_convention="hole-white"))
    flag = cv2.INPAINT_NS if method == "ns" else cv2.INPAINT_TELEA
    radius = inpainter.model.config.prefill_radius
    np.testing.assert_array_equal(completed, cv2.inpaint(image, hole, radius, flag))


def test_classical_prefill_keeps_known_pixels_and_fills_holes() -> None:
    image = torch.rand(2, 3, 32, 48)
    mask = torch.ones(2, 1, 32, 48)
    mask[:, :, 8:20, 10:30] = 0
    filled = classical_prefill(image, mask, "ns", radius=2)
    assert torch.equal(filled * mask, image * mask)
    hole = filled[:, :, 8:20, 10:30]
    # Around the mean of the uniform noise it is filled from (not zeros), and smoother than it.
    assert abs(hole.mean().item() - 0.5) < 0.05 and hole.std().item() < 0.5 * image.std().item()


def test_pyramid_prefill_keeps_known_pixels_and_continues_smooth_content() -> None:
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 96), indexing="ij")
    ramp = torch.stack([cols, rows, 0.5 * (rows + cols)])[None].repeat(2, 1, 1, 1)
    mask = torch.ones(2, 1, 64, 96)
    mask[0, :, 10:40, 20:70] = 0
    mask[1, :, 30:60, 5:35] = 0
    filled = pyramid_prefill(ramp, mask)
    assert torch.equal(filled * mask, ramp * mask)
    hole = mask < 0.5
    # Near the ramp it was never shown (zeros in the hole would be ~0.5 off), and inside its range.
    assert (filled - ramp).abs()[hole.expand_as(ramp)].mean() < 0.06
    assert filled.min() >= 0 and filled.max() <= 1
    flat = torch.full_like(ramp, 0.3)
    assert torch.allclose(pyramid_prefill(flat, mask), flat, atol=1e-6)


def test_an_untrained_pyramid_model_returns_exactly_its_prefill() -> None:
    model = build_model("small", prefill="pyramid").eval()
    image = torch.rand(2, 3, 128, 192)
    mask = torch.from_numpy(1 - _stroke_hole(128, 192)).float()[None, None].repeat(2, 1, 1, 1)
    expected = pyramid_prefill(image * mask, mask)
    torch.testing.assert_close(model.complete(image, mask), expected, atol=2e-4, rtol=0)


def test_a_batch_prefill_is_each_image_filled_on_its_own() -> None:
    """The batch is spread over threads; every image still gets its own fill, in order."""
    rng = np.random.default_rng(1)
    images = [cv2.GaussianBlur(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), (9, 9), 3) for _ in range(5)]
    holes = [np.roll(_stroke_hole(64, 96), 7 * i, axis=1) for i in range(5)]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    mask = 1 - torch.from_numpy(np.stack(holes)).float()[:, None]
    assert torch.get_num_threads() > 1 or pytest.skip("one CPU thread: nothing runs in parallel")
    radius = DFNetConfig().prefill_radius
    filled = classical_prefill(batch, mask, "ns", radius)
    for i in range(5):
        alone = cv2.inpaint(images[i], holes[i], radius, cv2.INPAINT_NS)
        alone = torch.from_numpy(alone).permute(2, 0, 1).float() / 255
        assert torch.equal(filled[i] * (1 - mask[i]), alone * (1 - mask[i])), i


# ------------------------------------------------------------------------------ the shipped model
@pytest.fixture(scope="module")
def shipped() -> Inpainter:
    return Inpainter.from_pretrained("pretrained")


def test_the_shipped_model_is_a_complete_model_directory() -> None:
    directory = pretrained_dir()
    weights = directory / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 50 * 2**20
    meta = json.loads((directory / "config.json").read_text())
    assert meta["model"]["prefill"] == "ns" and meta["provenance"]["source"] == "trained"
    card = (directory / "README.md").read_text()
    for section in ("## Data", "## Recipe", "## Held-out results", "## Limits", "python -m dfnet.training"):
        assert section in card, section
    for picture in (p for p in card.split("](")[1:]):
        assert (directory / picture.split(")")[0]).is_file()


def test_the_default_pipeline_fine_tunes_the_shipped_model() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.train.init_from == "pretrained"
    model = DFNet.from_params(params.model)
    load_initial_weights(model, params.train.init_from)  # same architecture, or it raises
    shipped_state = DFNet.from_pretrained("pretrained").state_dict()
    assert all(torch.equal(v, shipped_state[k]) for k, v in model.state_dict().items())


def test_initial_weights_may_come_from_a_model_with_another_prefill(tmp_path: Path) -> None:
    """The pre-fill has no weights: recipes/pyramid.yaml fine-tunes a Navier–Stokes model onto it."""
    source = build_model("small", prefill="ns")
    source.save_pretrained(tmp_path / "ns")
    model = build_model("small", prefill="pyramid")
    load_initial_weights(model, str(tmp_path / "ns"))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_initial_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    build_model("small", fusion_levels=1).save_pretrained(tmp_path / "one-block")
    with pytest.raises(ValueError, match="fusion_levels"):
        load_initial_weights(build_model("small"), str(tmp_path / "one-block"))


@pytest.mark.parametrize("colour", [(200, 40, 40), (30, 120, 220), (128, 128, 128)])
def test_a_flat_colour_photo_comes_back_that_colour(shipped: Inpainter, colour: tuple[int, int, int]) -> None:
    image = np.empty((256, 384, 3), np.uint8)
    image[:] = colour
    hole = _stroke_hole(256, 384).astype(bool)
    completed = np.asarray(shipped.inpaint(image, hole.astype(np.uint8) * 255))
    error = np.abs(completed[hole].astype(int) - np.array(colour))
    # No visible tint: a zero-filled network that has not learned to carry colours is off by tens.
    assert error.mean() <= 1.0 and error.max() <= 8, (error.mean(), error.max())


def test_a_hole_across_a_seam_takes_each_sides_colour(shipped: Inpainter) -> None:
    left, right = np.array([220, 200, 60]), np.array([40, 70, 160])
    image = np.empty((256, 384, 3), np.uint8)
    image[:, :192], image[:, 192:] = left, right
    hole = np.zeros((256, 384), bool)
    hole[96:160, 64:320] = True  # a wide hole across the seam at x = 192
    completed = np.asarray(shipped.inpaint(image, hole.astype(np.uint8) * 255)).astype(int)
    for side, own, other in ((completed[96:160, 64:160], left, right), (completed[96:160, 224:320], right, left)):
        # 32 px and more from the seam every pixel is nearer its own side's colour than the other's,
        # and on average close to it (Navier–Stokes, the pre-fill, smears a few px more than that:
        # 9.0 levels on the right side at the pre-fill's radius 2, 5.7 at radius 3).
        assert (np.abs(side - own).sum(-1) < np.abs(side - other).sum(-1)).all()
        assert np.abs(side - own).mean() <= 10, np.abs(side - own).mean()


def test_cli_inpaints_with_the_shipped_model_on_the_fast_path_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = np.empty((96, 128, 3), np.uint8)
    image[:] = (90, 160, 70)
    hole = np.zeros((96, 128), np.uint8)
    hole[30:60, 40:100] = 255
    Image.fromarray(image).save(tmp_path / "photo.png")
    Image.fromarray(hole).save(tmp_path / "mask.png")
    args = ["inpaint", "--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png")]
    assert cli_main([*args, "--out", str(tmp_path / "out.png")]) == 0
    path = choose_path("cpu")[0].name
    assert f"inference path: {path}" in capsys.readouterr().err  # the machine's path, compiled
    assert cli_main([*args, "--out", str(tmp_path / "plain.png"), "--inference", "off"]) == 0
    out = np.asarray(Image.open(tmp_path / "out.png")).astype(int)
    plain = np.asarray(Image.open(tmp_path / "plain.png")).astype(int)
    assert np.abs(out[30:60, 40:100] - image[30:60, 40:100]).max() <= 8  # the photo's colour, filled
    # The fast path completes like the plain model: float paths within rounding, int8 (torch's or
    # ONNX Runtime's) within its quantisation error, which moved flat colour here by up to 5 levels.
    assert np.abs(out - plain).max() <= (8 if INFERENCE_PATHS[path].int8 else 3)
    assert np.abs(out - plain).mean() <= 1
