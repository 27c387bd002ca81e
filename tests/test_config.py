"""One source of configuration: params.yaml and the dataclass defaults of dfnet/params.py agree."""

from __future__ import annotations

from pathlib import Path

import yaml

from dfnet.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]


def test_dataclass_defaults_are_the_values_of_params_yaml():
    """A section or key left out of a params file (a recipe, a test's overrides) takes exactly
    what params.yaml says: the two cannot drift apart."""
    on_disk = yaml.safe_load((REPO / "params.yaml").read_text())
    assert Params().to_dict() == on_disk
    assert load_params(REPO / "params.yaml") == Params()
