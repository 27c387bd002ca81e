"""dfnet.sources.load_model: a model directory, an s3:// prefix (moto on loopback), an official .pth."""

from pathlib import Path

import pytest
import torch

from dfnet.model import DFNet, build_model
from dfnet.official import CheckpointMismatchError
from dfnet.pretrained import pretrained_dir
from dfnet.sources import load_model, preset_name


def _same_weights(a: DFNet, b: DFNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_directory_and_s3(tmp_path: Path, s3_server) -> None:
    torch.manual_seed(0)
    model_dir = build_model("small").save_pretrained(tmp_path / "model")
    local, kind = load_model(model_dir)
    assert kind == "directory" and preset_name(local) == "small"
    for name in ("config.json", "model.safetensors"):
        s3_server.client.upload_file(str(model_dir / name), s3_server.bucket, f"models/dfnet/{name}")
    remote, kind = load_model(s3_server.uri("models/dfnet"))
    assert kind == "s3" and _same_weights(local, remote)
    with pytest.raises(FileNotFoundError, match="not a DFNet model directory"):
        load_model(s3_server.uri("nothing/here"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")


def test_pretrained_name() -> None:
    model, kind = load_model("pretrained")
    assert kind == "directory" and preset_name(model) == "small + ns pre-fill"
    assert _same_weights(model, DFNet.from_pretrained(pretrained_dir()))


def test_official_checkpoint(tmp_path: Path, s3_server) -> None:
    """A .pth in the release's layout is converted on load (keys from docs/'s key table)."""
    from test_official import random_official_state_dict

    torch.save(random_official_state_dict(), tmp_path / "model_places2.pth")
    model, kind = load_model(tmp_path / "model_places2.pth")
    assert kind == "official-checkpoint" and preset_name(model) == "official"
    assert model.provenance["output_quantization"] == "floor"  # the release's x.mul(255).byte()
    # From S3 it is downloaded first, then read the same way (a small wrong file keeps it fast).
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    s3_server.client.upload_file(str(tmp_path / "other.pth"), s3_server.bucket, "release/other.pth")
    with pytest.raises(CheckpointMismatchError):
        load_model(s3_server.uri("release/other.pth"))
