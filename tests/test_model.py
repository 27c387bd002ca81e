"""DFNet architecture: shapes, parameter count, padding, the fusion equation, model files and
the importer for the authors' released checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dfnet.model import (
    PRESETS,
    CheckpointMismatchError,
    Conv2dSame,
    DFNet,
    DFNetConfig,
    FusionBlock,
    build_model,
    import_official_checkpoint,
    load_official_state_dict,
    official_to_dfnet_key,
)

KEY_TABLE = Path(__file__).resolve().parents[1] / "docs" / "official-checkpoint-keys.tsv"


def official_key_table() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in KEY_TABLE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("() ").split(",") if s.strip())))
    return rows


def random_official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the release's exact names and shapes, filled with random values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_key_table():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


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


# ------------------------------------------------------------------ official checkpoints
def test_every_official_key_maps_to_a_tensor_of_the_same_shape() -> None:
    ours = build_model("official").state_dict()
    table = official_key_table()
    assert len(table) == len(ours)
    for key, shape in table:
        mapped = official_to_dfnet_key(key)
        assert mapped in ours, key
        assert tuple(ours[mapped].shape) == shape, key


def test_import_round_trip_gives_the_release_output_on_rgb(tmp_path: Path) -> None:
    """The release ran on BGR pixels; after import our RGB API must give the same completion."""
    state = random_official_state_dict()
    checkpoint = tmp_path / "model_places2.pth"
    torch.save(state, checkpoint)
    imported = import_official_checkpoint(checkpoint, tmp_path / "imported")
    reloaded = DFNet.from_pretrained(tmp_path / "imported")
    assert reloaded.provenance["output_quantization"] == "floor"

    as_released = DFNet()  # same weights, channels untouched: what the release computed on BGR
    load_official_state_dict(as_released, state, channel_order="rgb")
    as_released.eval()

    rgb = torch.rand(1, 3, 256, 256)
    mask = torch.ones(1, 1, 256, 256)
    mask[..., 60:140, 100:200] = 0
    with torch.no_grad():
        ours = reloaded(rgb, mask)
        release = as_released(rgb.flip(1), mask)  # BGR in
    for a, b in zip(ours.results, release.results):
        torch.testing.assert_close(a, b.flip(1), atol=1e-5, rtol=0)
    for a, b in zip(ours.alphas, release.alphas):
        torch.testing.assert_close(a, b.flip(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(imported.state_dict()["encoder.3.conv.weight"], state["en_3.encode.0.conv.1.weight"])


def test_import_reports_wrong_shape_and_missing_key() -> None:
    state = random_official_state_dict()
    state["de_2.decode.0.conv.weight"] = torch.zeros(128, 380, 3, 3)
    del state["fuse_4.blend.blend.4.running_var"]
    state["fuse_9.map2img.0.conv.weight"] = torch.zeros(3, 4, 1, 1)
    with pytest.raises(CheckpointMismatchError) as error:
        load_official_state_dict(DFNet(), state)
    message = str(error.value)
    assert "shape mismatch for 'de_2.decode.0.conv.weight'" in message
    assert "(128, 380, 3, 3)" in message and "(128, 384, 3, 3)" in message
    assert "missing key 'fusion.4.blend.layers.4.running_var'" in message
    assert "unexpected key 'fuse_9.map2img.0.conv.weight'" in message


def test_import_refuses_pickled_objects(tmp_path: Path) -> None:
    """weights_only=True: a checkpoint carrying arbitrary Python objects is refused."""
    path = tmp_path / "evil.pth"
    torch.save({"en_0.encode.0.conv.1.weight": torch.zeros(1), "payload": Path("/")}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        import_official_checkpoint(path, tmp_path / "out")


def test_alpha_init_starts_every_blend_near_the_given_alpha() -> None:
    from dfnet.params import ModelParams

    torch.manual_seed(0)
    image, mask = torch.rand(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.3).float()
    default = ModelParams(preset="small").build().eval()
    started = ModelParams(preset="small", alpha_init=0.95).build().eval()
    with torch.no_grad():
        alphas = started(image, mask).alphas
        default_alphas = default(image, mask).alphas
    assert all(0.9 < float(a.mean()) < 0.99 and float(a.min()) > 0.8 for a in alphas)
    assert all(abs(float(a.mean()) - 0.95) > 0.1 for a in default_alphas)  # the paper's init differs
    with pytest.raises(ValueError):
        ModelParams(preset="small", alpha_init=1.0).build()
