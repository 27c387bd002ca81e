"""Inpainter and `dfnet` CLI: any size and mode, known pixels bit-exact, strategies, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfnet.cli import main as cli_main
from dfnet.cli import worth_compiling
from dfnet.inpaint import Inpainter, Window, hole_windows
from dfnet.model import build_model


@pytest.fixture(scope="module")
def inpainter() -> Inpainter:
    torch.manual_seed(0)
    return Inpainter(build_model("small").eval())


def photo(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def hole_mask(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """White-on-black (hole-white) mask with the given (y0, x0, y1, x1) holes."""
    mask = np.zeros((height, width), np.uint8)
    for y0, x0, y1, x1 in boxes:
        mask[y0:y1, x0:x1] = 255
    return mask


@pytest.mark.parametrize("shape", [(100, 150, 3), (70, 90), (130, 64, 4), (64, 64, 3)])
@pytest.mark.parametrize("strategy", ["auto", "pad", "resize", "crops"])
def test_known_pixels_are_bit_exact_in_every_mode(inpainter: Inpainter, shape: tuple[int, ...], strategy: str) -> None:
    image = photo(shape)
    mask = hole_mask(shape[0], shape[1], [(20, 10, 45, 40)])
    out = np.asarray(inpainter.inpaint(Image.fromarray(image), Image.fromarray(mask), strategy=strategy))
    assert out.shape == image.shape and out.dtype == np.uint8
    hole = mask > 0
    assert np.array_equal(out[~hole], image[~hole])
    colour = out[..., :3] if out.ndim == 3 else out
    assert not np.array_equal(colour[hole], (image[..., :3] if image.ndim == 3 else image)[hole])
    if out.ndim == 3 and out.shape[2] == 4:  # RGBA: the alpha channel is never touched
        assert np.array_equal(out[..., 3], image[..., 3])


def test_mask_conventions_are_opposites(inpainter: Inpainter) -> None:
    image = photo((64, 64, 3))
    hole_white = hole_mask(64, 64, [(10, 10, 30, 30)])
    a = np.asarray(inpainter.inpaint(image, hole_white, mask_convention="hole-white"))
    b = np.asarray(inpainter.inpaint(image, 255 - hole_white, mask_convention="known-white"))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="convention"):
        inpainter.inpaint(image, hole_white, mask_convention="black-is-hole")


def test_empty_mask_returns_the_input(inpainter: Inpainter) -> None:
    image = photo((50, 70, 3))
    out = np.asarray(inpainter.inpaint(image, np.zeros((50, 70), np.uint8)))
    assert np.array_equal(out, image)


def test_mask_size_mismatch_is_an_error(inpainter: Inpainter) -> None:
    with pytest.raises(ValueError, match="mask size"):
        inpainter.inpaint(photo((64, 64, 3)), np.zeros((32, 64), np.uint8))


def test_batch_equals_one_by_one(inpainter: Inpainter) -> None:
    images = [photo((64, 64, 3), seed) for seed in range(3)] + [photo((80, 120, 3), 9)]
    masks = [hole_mask(64, 64, [(5 * s, 5, 30, 40)]) for s in range(3)] + [hole_mask(80, 120, [(10, 10, 50, 60)])]
    batched = inpainter.inpaint_batch(images, masks)
    for image, mask, out in zip(images, masks, batched):
        assert np.array_equal(np.asarray(out), np.asarray(inpainter.inpaint(image, mask)))


def test_large_photo_with_small_holes_uses_crops(inpainter: Inpainter) -> None:
    """A 4000×3000 photo with two scratches: only windows around the holes are computed."""
    image = photo((3000, 4000, 3))
    mask = hole_mask(3000, 4000, [(1000, 2000, 1040, 2060), (200, 300, 215, 380)])
    windows = hole_windows(mask > 0)
    assert len(windows) == 2
    assert sum(w.height * w.width for w in windows) < 0.01 * 3000 * 4000
    out = np.asarray(inpainter.inpaint(image, mask))
    hole = mask > 0
    assert np.array_equal(out[~hole], image[~hole])
    assert not np.array_equal(out[hole], image[hole])


def test_overlapping_hole_windows_are_merged() -> None:
    hole = np.zeros((200, 200), bool)
    hole[50:60, 50:60] = True
    hole[50:60, 75:85] = True  # close enough that the context margins overlap
    hole[180:190, 180:190] = True
    windows = hole_windows(hole, min_margin=10)
    assert len(windows) == 2
    for a in windows:
        for b in windows:
            assert a is b or not a.overlaps(b)
    assert Window(0, 0, 10, 10).union(Window(5, 5, 20, 20)) == Window(0, 0, 20, 20)


def test_imported_models_quantize_like_the_release() -> None:
    model = build_model("small").eval()
    model.provenance = {"output_quantization": "floor"}
    assert Inpainter(model).quantization == "floor"
    model.provenance = {}
    assert Inpainter(model).quantization == "round"


# ------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "small"
    build_model("small").save_pretrained(path)
    return path


def test_cli_single_file(model_dir: Path, tmp_path: Path) -> None:
    image = photo((90, 120, 3))
    mask = hole_mask(90, 120, [(30, 30, 60, 80)])
    Image.fromarray(image).save(tmp_path / "photo.jpg", quality=95)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code = cli_main(
        ["inpaint", "--model", str(model_dir), "--image", str(tmp_path / "photo.jpg"),
         "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out.png"), "--inference", "off"]
    )  # fmt: skip
    assert code == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    decoded = np.asarray(Image.open(tmp_path / "photo.jpg"))
    assert out.shape == decoded.shape
    assert np.array_equal(out[mask == 0], decoded[mask == 0])


def test_cli_folder_counts_failures_and_keeps_going(model_dir: Path, tmp_path: Path) -> None:
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir()
    masks.mkdir()
    for i in range(3):
        Image.fromarray(photo((64, 96, 3), i)).save(images / f"p{i}.png")
        Image.fromarray(hole_mask(64, 96, [(10, 10, 30, 30)])).save(masks / f"p{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    Image.fromarray(hole_mask(64, 96, [(1, 1, 5, 5)])).save(masks / "broken.png")
    args = ["inpaint", "--model", str(model_dir), "--image", str(images), "--mask", str(masks), "--out", str(out)]
    code = cli_main([*args, "--inference", "off"])
    assert code == 1  # one failure reported through the exit code
    assert sorted(p.name for p in out.iterdir()) == ["p0.png", "p1.png", "p2.png"]


def test_cli_import_official_reports_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"en_0.encode.0.conv.1.weight": torch.zeros(64, 4, 7, 7)}, tmp_path / "bad.pth")
    code = cli_main(["import-official", str(tmp_path / "bad.pth"), str(tmp_path / "out")])
    assert code == 2
    assert "missing key" in capsys.readouterr().err


def test_compiling_is_worth_it_only_when_enough_images_remain() -> None:
    assert not worth_compiling(images_left=0, seconds_per_image=10.0)
    assert not worth_compiling(images_left=20, seconds_per_image=0.05)  # a folder of 512² photos
    assert worth_compiling(images_left=5000, seconds_per_image=0.05)  # a long run pays it back
    assert worth_compiling(images_left=50, seconds_per_image=5.0)  # so do fewer, slower images


@pytest.mark.parametrize("compile_seconds, compiled", [(30.0, False), (0.0, True)])
def test_cli_compiles_a_size_only_when_the_run_pays_it_back(
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    compiled_graphs: list[torch.fx.GraphModule],
    compile_seconds: float,
    compiled: bool,
) -> None:
    """A short folder runs eagerly throughout; when compiling pays (here: when it is free) the size
    compiles at its second image."""
    import dfnet.cli

    monkeypatch.setattr(dfnet.cli, "COMPILE_SECONDS", compile_seconds)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(3):
        Image.fromarray(photo((64, 96, 3), i)).save(images / f"p{i}.png")
        Image.fromarray(hole_mask(64, 96, [(10, 10, 30, 30)])).save(masks / f"p{i}.png")
    args = ["inpaint", "--model", str(model_dir), "--image", str(images), "--mask", str(masks)]
    assert cli_main([*args, "--out", str(tmp_path / "out"), "--inference", "compile"]) == 0
    assert len(compiled_graphs) == (1 if compiled else 0)  # one size, compiled once at most
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p0.png", "p1.png", "p2.png"]
