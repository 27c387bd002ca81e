"""Tests of dfnet.losses: VGG16 layout/loading/fallbacks, Gram, TV and the DFNet loss."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dfnet.losses import (
    VGG16_ENV_VAR,
    VGG16_FILENAME,
    DFNetLoss,
    VGG16Features,
    gram_matrix,
    load_vgg16_features,
    total_variation,
)
from dfnet.params import LossParams, load_params

REPO = Path(__file__).resolve().parents[1]


def _loss(**changes: object) -> LossParams:
    """params.yaml's loss section with `changes`."""
    return load_params(REPO / "params.yaml", {"loss": changes}).loss


# torchvision's VGG16 features[0:17]: conv indices and (out, in) channels, written from the
# architecture (conv3-64 ×2, pool, conv3-128 ×2, pool, conv3-256 ×3, pool).
_EXPECTED_CONVS = {
    0: (64, 3),
    2: (64, 64),
    5: (128, 64),
    7: (128, 128),
    10: (256, 128),
    12: (256, 256),
    14: (256, 256),
}


def _expected_layout() -> dict[str, tuple[int, ...]]:
    layout: dict[str, tuple[int, ...]] = {}
    for idx, (out_ch, in_ch) in _EXPECTED_CONVS.items():
        layout[f"features.{idx}.weight"] = (out_ch, in_ch, 3, 3)
        layout[f"features.{idx}.bias"] = (out_ch,)
    return layout


@pytest.fixture(autouse=True)
def _no_real_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Isolate every test from any VGG16 weights on this machine (env var, hub cache)."""
    monkeypatch.delenv(VGG16_ENV_VAR, raising=False)
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


def _fake_checkpoint(path: Path, seed: int = 123) -> dict[str, torch.Tensor]:
    """A state dict in torchvision's full-VGG16 key layout, plus keys that must be ignored."""
    gen = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(shape, generator=gen) for key, shape in _expected_layout().items()}
    full = dict(state)
    full["features.17.weight"] = torch.randn(512, 256, 3, 3, generator=gen)
    full["classifier.0.weight"] = torch.randn(8, 4, generator=gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(full, path)
    return state


# ----------------------------------------------------------------------------- VGG16 features


def test_vgg_state_dict_matches_torchvision_layout() -> None:
    module = VGG16Features()
    got = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    assert got == _expected_layout()
    assert all(not p.requires_grad for p in module.parameters())


def test_vgg_pool_shapes() -> None:
    module = VGG16Features()
    pool1, pool2, pool3 = module(torch.rand(2, 3, 64, 64))
    assert pool1.shape == (2, 64, 32, 32)
    assert pool2.shape == (2, 128, 16, 16)
    assert pool3.shape == (2, 256, 8, 8)


def test_vgg_stays_in_eval_mode() -> None:
    module = VGG16Features()
    module.train()
    assert not module.training
    loss = DFNetLoss(_loss(p=1, q=1, texture_fallback="random"))
    loss.train()
    assert loss.vgg is not None and not loss.vgg.training


def test_load_explicit_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights" / VGG16_FILENAME
    state = _fake_checkpoint(path)
    module, provenance = load_vgg16_features(str(path), "error")
    assert provenance == f"imagenet:{path}"
    assert module is not None
    loaded = module.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_load_from_env_var_and_hub_cache(
    tmp_path: Path, _no_real_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_file = _no_real_weights / "hub" / "checkpoints" / VGG16_FILENAME
    hub_state = _fake_checkpoint(hub_file, seed=1)
    module, provenance = load_vgg16_features(None, "error")
    assert provenance == f"imagenet:{hub_file}"
    assert module is not None
    assert torch.equal(module.state_dict()["features.0.weight"], hub_state["features.0.weight"])

    # The environment variable takes precedence over the hub cache.
    env_file = tmp_path / "elsewhere.pth"
    env_state = _fake_checkpoint(env_file, seed=2)
    monkeypatch.setenv(VGG16_ENV_VAR, str(env_file))
    module, provenance = load_vgg16_features(None, "error")
    assert provenance == f"imagenet:{env_file}"
    assert module is not None
    assert torch.equal(module.state_dict()["features.0.weight"], env_state["features.0.weight"])


def test_load_rejects_file_without_vgg_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    torch.save({"classifier.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="VGG16"):
        load_vgg16_features(str(path), "random")


def test_fallback_random_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dfnet.losses"):
        module, provenance = load_vgg16_features(None, "random")
    assert isinstance(module, VGG16Features)
    assert provenance.startswith("random-init")
    assert VGG16_ENV_VAR in provenance
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings, "falling back to random VGG16 weights must not be silent"
    message = warnings[0].getMessage()
    assert "RANDOMLY INITIALISED" in message and VGG16_ENV_VAR in message


def test_fallback_random_is_seeded() -> None:
    a, _ = load_vgg16_features(None, "random")
    b, _ = load_vgg16_features(None, "random")
    assert a is not None and b is not None
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])


def test_fallback_error_raises() -> None:
    with pytest.raises(FileNotFoundError, match="VGG16"):
        load_vgg16_features(None, "error")
    with pytest.raises(FileNotFoundError):
        DFNetLoss(_loss(texture_fallback="error"))


def test_fallback_off_disables_vgg_terms(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dfnet.losses"):
        loss = DFNetLoss(_loss(p=2, q=2, texture_fallback="off"))
    assert loss.provenance == "off"
    assert not loss.texture_enabled
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    gen = torch.Generator().manual_seed(0)
    results = [torch.rand(1, 3, 32, 32, generator=gen), torch.rand(1, 3, 16, 16, generator=gen)]
    out = loss(results, torch.rand(1, 3, 32, 32, generator=gen), torch.ones(1, 1, 32, 32))
    assert out["perceptual"].item() == 0.0
    assert out["style"].item() == 0.0
    assert out["tv"].item() > 0.0


def test_unknown_fallback_rejected() -> None:
    with pytest.raises(ValueError):
        load_vgg16_features(None, "download")


# ----------------------------------------------------------------------------- Gram and TV


def test_gram_matrix_by_hand() -> None:
    # One sample, C=2, H=1, W=2: F = [[1, 2], [3, 4]] → F Fᵀ = [[5, 11], [11, 25]], / (2·1·2).
    features = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    expected = torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4.0
    assert torch.allclose(gram_matrix(features), expected)
    # Batched: the second sample is independent of the first.
    batch = torch.cat([features, 2 * features])
    got = gram_matrix(batch)
    assert got.shape == (2, 2, 2)
    assert torch.allclose(got[1], 4 * expected[0])


def test_tv_constant_image_is_zero() -> None:
    image = torch.full((2, 3, 8, 8), 0.7)
    assert total_variation(image, torch.ones(2, 1, 8, 8)).item() == pytest.approx(0.0, abs=1e-7)


def test_tv_step_image_by_hand() -> None:
    # Columns 0–1 are 0, columns 2–3 are 1. Response x[i-1,j] + x[i,j-1] - 2x[i,j]: vertical
    # neighbours are equal (replicate padding at the top), so it is x[i,j-1] - x[i,j], which is
    # -1 on column 2 only: 4 of 16 pixels per channel → mean |·| = 1/4.
    image = torch.zeros(1, 3, 4, 4)
    image[..., 2:] = 1.0
    assert total_variation(image, torch.ones(1, 1, 4, 4)).item() == pytest.approx(0.25)
    # Mask 0 on the step column removes all of it.
    mask = torch.ones(1, 1, 4, 4)
    mask[..., 2] = 0.0
    assert total_variation(image, mask).item() == pytest.approx(0.0)


def test_tv_kernel_orientation() -> None:
    # An impulse at (1, 1) reaches (2, 1) through the kernel's top-centre tap (x[i-1, j]) with
    # value 1; the flipped kernel would not. Weight only (2, 1): 3 channels × 1 / 48 elements.
    image = torch.zeros(1, 3, 4, 4)
    image[..., 1, 1] = 1.0
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2, 1] = 1.0
    assert total_variation(image, mask).item() == pytest.approx(3 / 48)
    # And the centre tap is -2.
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1, 1] = 1.0
    assert total_variation(image, mask).item() == pytest.approx(2 * 3 / 48)


def test_tv_zero_mask_and_resized_mask() -> None:
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert total_variation(image, torch.zeros(1, 1, 16, 16)).item() == 0.0
    # A full-resolution all-ones mask resizes to all ones: same as the unmasked value.
    full = total_variation(image, torch.ones(1, 1, 16, 16))
    assert full.item() == pytest.approx(total_variation(image, torch.ones(1, 1, 8, 8)).item())
    assert full.item() > 0.0


# ----------------------------------------------------------------------------- DFNetLoss


def _pyramid(image: torch.Tensor, n: int) -> list[torch.Tensor]:
    h, w = image.shape[-2:]
    out = [image]
    for k in range(1, n):
        size = (h >> k, w >> k)
        out.append(F.interpolate(image, size=size, mode="bilinear", align_corners=False))
    return out


def _inputs(seed: int = 0, size: int = 64, n: int = 3) -> tuple[list[torch.Tensor], ...]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 3, size, size, generator=gen)
    results = [torch.rand(2, 3, size >> k, size >> k, generator=gen) for k in range(n)]
    mask = (torch.rand(2, 1, size, size, generator=gen) > 0.3).float()
    return results, target, mask


def test_identical_results_give_zero_structure_and_texture() -> None:
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(2, 3, 64, 64, generator=gen)
    mask = torch.ones(2, 1, 64, 64)
    loss = DFNetLoss(_loss(p=3, q=2, texture_fallback="random"))
    assert loss.texture_enabled
    out = loss(_pyramid(target, 3), target, mask)
    assert out["structure"].item() == 0.0
    assert out["perceptual"].item() == 0.0
    assert out["style"].item() == 0.0
    # TV of a random image is not zero, and total is the sum of the parts.
    assert out["tv"].item() > 0.0
    assert out["total"].item() == pytest.approx(out["tv"].item())


def test_terms_are_nonzero_and_sum_to_total() -> None:
    results, target, mask = _inputs()
    out = DFNetLoss(_loss(p=3, q=2, texture_fallback="random"))(results, target, mask)
    for key in ("structure", "perceptual", "style", "tv"):
        assert out[key].item() > 0.0, key
    parts = sum(out[k] for k in ("structure", "perceptual", "style", "tv"))
    assert out["total"].item() == pytest.approx(parts.item(), rel=1e-5)


def test_structure_matches_hand_formula() -> None:
    results, target, mask = _inputs(n=3)
    out = DFNetLoss(_loss(l1=6.0, p=2, q=0))(results, target, mask)
    half = F.interpolate(target, size=(32, 32), mode="bilinear", align_corners=False)
    l1_0 = (results[0] - target).abs().mean()
    l1_1 = (results[1] - half).abs().mean()
    assert out["structure"].item() == pytest.approx((6.0 * (l1_0 + l1_1) / 2).item(), rel=1e-5)


@pytest.mark.parametrize(
    "term,field",
    [
        ("structure", "l1"),
        ("perceptual", "perceptual"),
        ("style", "style"),
        ("tv", "tv"),
    ],
)
def test_weights_scale_terms_linearly(term: str, field: str) -> None:
    results, target, mask = _inputs()
    base = _loss(p=3, q=2)
    doubled = replace(base, **{field: 2 * getattr(base, field)})
    a = DFNetLoss(base)(results, target, mask)
    b = DFNetLoss(doubled)(results, target, mask)
    assert b[term].item() == pytest.approx(2 * a[term].item(), rel=1e-5)
    for other in {"structure", "perceptual", "style", "tv"} - {term}:
        assert b[other].item() == pytest.approx(a[other].item(), rel=1e-6)


def test_p_zero_drops_structure_and_q_zero_drops_texture() -> None:
    results, target, mask = _inputs()
    out = DFNetLoss(_loss(p=0, q=2, texture_fallback="random"))(results, target, mask)
    assert out["structure"].item() == 0.0
    assert out["perceptual"].item() > 0.0
    out = DFNetLoss(_loss(p=2, q=0))(results, target, mask)
    assert out["structure"].item() > 0.0
    for key in ("perceptual", "style", "tv"):
        assert out[key].item() == 0.0


def test_gradient_flows_only_to_used_scales() -> None:
    results, target, mask = _inputs(n=4)
    results = [r.requires_grad_() for r in results]
    out = DFNetLoss(_loss(p=2, q=1))(results, target, mask)
    out["total"].backward()
    for k in (0, 1):
        assert results[k].grad is not None and results[k].grad.abs().sum() > 0
    for k in (2, 3):
        assert results[k].grad is None
    assert not out["structure"].requires_grad


def test_texture_gradient_reaches_result_through_vgg() -> None:
    results, target, mask = _inputs(n=1)
    results[0].requires_grad_()
    out = DFNetLoss(_loss(l1=0.0, tv=0.0, style=0.0, p=1, q=1, texture_fallback="random"))(results, target, mask)
    out["total"].backward()
    assert results[0].grad is not None and results[0].grad.abs().sum() > 0


def test_tiny_scales_skip_vgg_without_crashing() -> None:
    # Scales 32, 16, 8 and 4 px: the last two are below the VGG minimum side and are skipped.
    results, target, mask = _inputs(size=32, n=4)
    out = DFNetLoss(_loss(p=4, q=4))(results, target, mask)
    assert torch.isfinite(out["total"])
    # Perceptual/style are averaged over the scales the VGG saw (32 and 16 only).
    two = DFNetLoss(_loss(p=4, q=2))(results, target, mask)
    assert out["perceptual"].item() == pytest.approx(two["perceptual"].item(), rel=1e-5)
    assert out["style"].item() == pytest.approx(two["style"].item(), rel=1e-5)


def test_invalid_p_q_raise() -> None:
    results, target, mask = _inputs(n=3)
    with pytest.raises(ValueError, match="p=4"):
        DFNetLoss(_loss(p=4, q=2))(results, target, mask)
    with pytest.raises(ValueError, match="q=5"):
        DFNetLoss(_loss(p=2, q=5))(results, target, mask)
    with pytest.raises(ValueError):
        DFNetLoss(_loss(p=-1, q=0))
    with pytest.raises(ValueError):
        DFNetLoss(_loss(p=0, q=0))


def test_shape_mismatch_raises() -> None:
    results, target, mask = _inputs(n=2)
    loss = DFNetLoss(_loss(p=2, q=1))
    with pytest.raises(ValueError, match="target"):
        loss(results, target[..., :32, :32], mask)
    with pytest.raises(ValueError, match="mask"):
        loss(results, target, mask.expand(-1, 3, -1, -1))


def test_zero_texture_weights_skip_vgg(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dfnet.losses"):
        loss = DFNetLoss(_loss(perceptual=0.0, style=0.0, texture_fallback="error"))
    assert loss.vgg is None and not loss.texture_enabled
    assert not caplog.records
