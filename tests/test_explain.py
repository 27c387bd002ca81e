"""dfnet.explain: the fusion blocks' α and C, captured by hooks and mapped over the photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfnet.accelerate import optimize_for_inference
from dfnet.cli import main as cli_main
from dfnet.explain import PICTURES, FusionMaps, alpha_heatmap, capture_fusion, fusion_blocks, pictures
from dfnet.inpaint import Inpainter
from dfnet.model import build_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small").eval()  # blend fusion, 3 α channels, 4 fusion blocks


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def hole_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[box[0] : box[2], box[1] : box[3]] = 255
    return mask


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not block._forward_hooks for block in fusion_blocks(model))


def test_explained_image_is_the_plain_one_and_hooks_live_only_for_the_pass(model: torch.nn.Module) -> None:
    # Through a runner other than the plain model: the image still comes from the runner.
    runner = optimize_for_inference(model, path="eager")
    inpainter = Inpainter(model, runner=runner)
    images = [photo(90, 130), photo(64, 64, seed=1)]
    masks = [hole_mask(90, 130, (20, 30, 60, 90)), hole_mask(64, 64, (0, 0, 10, 64))]
    plain = inpainter.inpaint_batch(images, masks)
    assert no_hooks(model)
    explained = inpainter.explain_batch(images, masks, levels=(0, 3))
    assert no_hooks(model)  # removed after the pass
    for (image, maps), expected, source in zip(explained, plain, images, strict=True):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
        assert [m.level for m in maps] == [0, 3]
        for m in maps:
            assert m.alpha.shape == (*source.shape[:2], 3) and m.raw.shape == source.shape
    # Coarser blocks are coarser: the level-3 map repeats each of its values over 8×8 pixels.
    alpha3 = explained[1][1][1].alpha
    assert np.array_equal(alpha3, np.repeat(np.repeat(alpha3[::8, ::8], 8, axis=0), 8, axis=1))


def test_maps_are_the_fusion_blocks_outputs(model: torch.nn.Module) -> None:
    """On a 64×128 photo (no padding, no scaling) the finest maps are α_1 and C_1 themselves."""
    image, mask = photo(64, 128, seed=2), hole_mask(64, 128, (10, 20, 40, 70))
    ((_, (maps,)),) = Inpainter(model).explain_batch([image], [mask], levels=[0])
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    known_t = torch.from_numpy(mask == 0).float()[None, None]
    with torch.no_grad():
        out = model(image_t, known_t)
    alpha = out.alphas[0][0].permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()
    raw = out.raws[0][0].permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()
    assert np.abs(maps.alpha.astype(int) - alpha).max() <= 1
    assert np.abs(maps.raw.astype(int) - raw).max() <= 1
    assert maps.alpha.std() > 0  # a real map, not a constant


def test_large_photo_maps_only_its_windows(model: torch.nn.Module) -> None:
    """Crops around the hole: outside them the network did not run (α 0, C = the input)."""
    image = photo(700, 900, seed=3)
    mask = hole_mask(700, 900, (300, 400, 340, 460))
    ((result, (maps,)),) = Inpainter(model, work_size=256).explain_batch([image], [mask], strategy="crops")
    np.testing.assert_array_equal(np.asarray(result)[mask == 0], image[mask == 0])
    far = (slice(0, 150), slice(None))  # the window is the hole and its margin
    assert not maps.alpha[far].any()
    np.testing.assert_array_equal(maps.raw[far], image[far])
    assert maps.alpha[300:340, 400:460].any()


def test_unknown_level_is_refused(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="fusion level 4 does not exist: this model has 4"):
        Inpainter(model).explain_batch([photo(64, 64)], [hole_mask(64, 64, (0, 0, 8, 8))], levels=[4])
    with capture_fusion(model, [1]) as captured:
        model(torch.rand(1, 3, 64, 64), torch.ones(1, 1, 64, 64))
    assert [a.shape[-1] for a, _ in captured[1]] == [32]  # the block's own resolution
    assert no_hooks(model)


def test_pictures() -> None:
    alpha = np.zeros((2, 3, 3), np.uint8)
    alpha[1] = 255
    heat = alpha_heatmap(alpha)
    assert heat.shape == (2, 3, 3) and heat[0].max() < 10 and heat[1].mean() > 200  # dark = 0, bright = 1
    one_channel = FusionMaps(0, alpha[..., :1], np.zeros((2, 3, 3), np.uint8))
    drawn = pictures(one_channel)
    assert list(drawn) == list(PICTURES)
    assert drawn["alpha_rgb"].shape == (2, 3, 3)


def test_cli_explain_writes_the_pictures(tmp_path: Path, model: torch.nn.Module) -> None:
    model_dir = model.save_pretrained(tmp_path / "model")
    Image.fromarray(photo(90, 120)).save(tmp_path / "photo.png")
    Image.fromarray(hole_mask(90, 120, (30, 30, 60, 80))).save(tmp_path / "mask.png")
    args = ["inpaint", "--model", str(model_dir), "--image", str(tmp_path / "photo.png"),
            "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "out.png"), "--inference", "off"]  # fmt: skip
    assert cli_main([*args, "--explain", str(tmp_path / "explain"), "--explain-levels", "0,2"]) == 0
    names = sorted(p.name for p in (tmp_path / "explain").iterdir())
    assert names == sorted(f"photo-fusion{k}-{n}.png" for k in (0, 2) for n in PICTURES)
    assert Image.open(tmp_path / "explain" / "photo-fusion0-alpha.png").size == (120, 90)
    plain = tmp_path / "plain.png"
    assert cli_main([*args[:-4], "--out", str(plain), "--inference", "off"]) == 0
    assert np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(tmp_path / "out.png")))
    with pytest.raises(SystemExit, match="--explain-levels"):
        cli_main([*args, "--explain", str(tmp_path / "x"), "--explain-levels", "9"])
