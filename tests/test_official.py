"""dfnet.official: the importer for the authors' released checkpoints (names, shapes, colours)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfnet.model import DFNet, build_model
from dfnet.official import (
    CheckpointMismatchError,
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
