"""DFNet architecture: shapes, parameter count, padding, the decoder and fusion blocks, model
files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dfnet.model import PRESETS, Conv2dSame, DecoderBlock, DFNet, DFNetConfig, FusionBlock, build_model
from dfnet.params import load_params

REPO = Path(__file__).resolve().parents[1]


def test_official_parameter_count() -> None:
    assert build_model("official").num_parameters() == 32_880_504


@pytest.mark.parametrize("preset", ["official", "small"])
def test_output_shapes_at_every_scale(preset: str) -> None:
    model = build_model(preset).eval()
    side = 2 * model.config.size_multiple
    image, mask = torch.rand(2, 3, side, side), torch.ones(2, 1, side, side)
    with torch.no_grad():
        out = model(image, mask)
    assert len(out.results) == len(out.alphas) == len(out.raws) == model.config.fusion_levels
    for k, (result, alpha, raw) in enumerate(zip(*out)):
        expected = (2, 3, side >> k, side >> k)
        assert result.shape == raw.shape == alpha.shape == expected


def test_decoder_widths_mirror_the_encoder() -> None:
    model = build_model("official")
    # The finest decoder block outputs the 4 input channels; the coarsest 512.
    widths = [block.conv.out_channels for block in model.decoder]
    assert widths == [4, 64, 128, 256, 512, 512, 512, 512]
    assert [block.conv.kernel_size[0] for block in model.encoder] == [7, 5, 5, 3, 3, 3, 3, 3]


def test_decoder_block_is_upsample_concat_conv_bn_leaky_relu() -> None:
    """The spec's decoder block: nearest ×2 upsample, concat the skip, 3×3 conv (padding 1),
    BatchNorm (running statistics in eval mode), LeakyReLU(0.2)."""
    torch.manual_seed(0)
    block = DecoderBlock(5, 2, 3).double().eval()
    torch.nn.init.normal_(block.norm.running_mean)
    torch.nn.init.uniform_(block.norm.running_var, 0.5, 2.0)
    torch.nn.init.normal_(block.norm.weight)
    x, skip = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, 2, 6, 8, dtype=torch.float64)
    upsampled = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    conv = F.conv2d(torch.cat([upsampled, skip], dim=1), block.conv.weight, block.conv.bias, padding=1)
    norm = block.norm
    normed = F.batch_norm(conv, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps)
    torch.testing.assert_close(block(x, skip), F.leaky_relu(normed, 0.2), rtol=0, atol=1e-12)


def test_rejects_sizes_that_are_not_a_multiple() -> None:
    model = build_model("small").eval()
    with pytest.raises(ValueError, match="multiple of 64"):
        model(torch.rand(1, 3, 96, 64), torch.ones(1, 1, 96, 64))


@pytest.mark.parametrize("kernel,stride,size", [(7, 2, 10), (5, 2, 8), (3, 2, 6), (3, 1, 5), (1, 1, 4)])
def test_same_padding_matches_tensorflow(kernel: int, stride: int, size: int) -> None:
    """TF 'SAME' on the sizes the network sees (even inputs to stride-2 convs): output =
    ceil(in / stride); an odd total padding puts the extra pixel right/bottom."""
    conv = Conv2dSame(1, 1, kernel, stride)
    x = torch.randn(1, 1, size, size)
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    before = total // 2
    reference = F.conv2d(F.pad(x, (before, total - before, before, total - before)), conv.weight, conv.bias, stride)
    out = conv(x)
    assert out.shape[-1] == -(-size // stride)
    torch.testing.assert_close(out, reference)


def test_same_padding_is_asymmetric_for_odd_totals() -> None:
    conv = Conv2dSame(1, 1, 5, 2)  # k - s = 3: one pixel left/top, two right/bottom
    assert conv.same_pad == (1, 2, 1, 2)


def test_fusion_equation_on_hand_made_tensors() -> None:
    """Î = α ⊙ C + (1 − α) ⊙ I with I the masked image resized to the feature size."""
    config = DFNetConfig()
    block = FusionBlock(4, config).eval()
    features = torch.randn(1, 4, 8, 8)
    masked = torch.rand(1, 3, 16, 16)
    result, alpha, raw = block(features, masked, torch.ones(1, 1, 16, 16))
    known = F.interpolate(masked, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(raw, torch.sigmoid(block.to_image(features)))
    torch.testing.assert_close(alpha, block.blend(known, raw))
    torch.testing.assert_close(result, alpha * raw + (1 - alpha) * known)
    assert alpha.shape[1] == 3  # per-channel alpha


def test_fusion_ablations() -> None:
    features, masked = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    hard = FusionBlock(4, DFNetConfig(fusion="hard"))
    result, _, raw = hard(features, masked, mask)
    torch.testing.assert_close(result[..., :4], masked[..., :4])  # known pixels pasted
    torch.testing.assert_close(result[..., 4:], raw[..., 4:])  # holes from the network
    plain = FusionBlock(4, DFNetConfig(fusion="none"))
    result, _, raw = plain(features, masked, mask)
    torch.testing.assert_close(result, raw)
    assert plain.blend is None and hard.blend is None


def test_complete_keeps_known_pixels() -> None:
    model = build_model("small").eval()
    image = torch.rand(1, 3, 64, 64)
    mask = torch.ones(1, 1, 64, 64)
    mask[..., 20:40, 10:30] = 0
    out = model.complete(image, mask)
    known = mask.bool().expand_as(image)
    assert torch.equal(out[known], image[known])
    assert not torch.equal(out[~known], image[~known])


def test_save_and_load_pretrained_round_trip(tmp_path: Path) -> None:
    model = build_model("small", fusion="hard").eval()
    model.save_pretrained(tmp_path / "m", provenance={"run": "unit-test"})
    loaded = DFNet.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert loaded.provenance == {"run": "unit-test"}
    image, mask = torch.rand(1, 3, 64, 64), (torch.rand(1, 1, 64, 64) > 0.3).float()
    torch.testing.assert_close(loaded.complete(image, mask), model.complete(image, mask), rtol=0, atol=0)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="kernel_sizes"):
        DFNetConfig(levels=3)
    with pytest.raises(ValueError, match="alpha_channels"):
        DFNetConfig(alpha_channels=2)
    with pytest.raises(ValueError, match="unknown DFNetConfig fields"):
        DFNetConfig.from_dict({"levels": 8, "depth": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge")
    assert set(PRESETS) >= {"official", "small"}


def test_alpha_init_starts_every_blend_near_the_given_alpha() -> None:
    torch.manual_seed(0)
    image, mask = torch.rand(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.3).float()
    base = replace(load_params(REPO / "params.yaml").model, preset="small", alpha_init=None)
    default = DFNet.from_params(base).eval()
    started = DFNet.from_params(replace(base, alpha_init=0.95)).eval()
    with torch.no_grad():
        alphas = started(image, mask).alphas
        default_alphas = default(image, mask).alphas
    assert all(0.9 < float(a.mean()) < 0.99 and float(a.min()) > 0.8 for a in alphas)
    assert all(abs(float(a.mean()) - 0.95) > 0.1 for a in default_alphas)  # the paper's init differs
    with pytest.raises(ValueError):
        DFNet.from_params(replace(base, alpha_init=1.0))
