"""The DVC pipeline end to end: `dvc repro` in a throw-away copy of the repository, tiny params.

The copy holds what `dvc.yaml` needs (dvc.yaml, params.yaml, pipelines/, dfnet/, tracking/) in a fresh git
+ DVC repository; every stage runs as DVC runs it, a `python -m pipelines.<stage>` subprocess
with the virtualenv first on PATH. One full repro (Ray starts in the prepare and train stages)
takes one to three minutes on 2 cores, so the file is marked slow. The tests run in file order:
the last ones edit params.yaml of the shared copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import yaml
from conftest import split_table

from dfnet.evaluation import METRICS, bin_label
from dfnet.images import decode_image
from dfnet.inpaint import Inpainter
from dfnet.masks import HOLE_BINS, evaluation_masks
from dfnet.storage import count_rows

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STAGES = ("corpus", "prepare", "masks", "train", "evaluate", "register")
METHODS = ("dfnet", "shipped", "untrained", "telea", "ns")  # shipped: the model fine-tuning started from
TINY = {
    "corpus": {"source": "sample"},  # the bundled photos: the Debian download is not for tests
    "data": {"image_size": 64, "store_short_side": 128},
    "masks": {"pool_size": 50},
    "model": {"preset": "small"},
    "loss": {"p": 4, "q": 2, "texture_fallback": "off"},
    "train": {"epochs": 2, "crops_per_photo": 2, "batch_size": 4, "num_workers": 1,
              "bn_recalibration_batches": 2, "val_short_side": 64, "val_max_photos": 2},
    "evaluate": {"sizes": [64, 128], "max_photos": 2, "grid_rows": 2},
}  # fmt: skip


class Repo:
    """A scratch copy of the project that DVC runs in."""

    def __init__(self, root: Path, tracking_uri: str) -> None:
        self.root = root
        self.tracking_uri = tracking_uri
        venv_bin = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "RAY_USAGE_STATS_ENABLED": "0",
            "DVC_NO_ANALYTICS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_TRACKING_URI": tracking_uri,
            # Each stage starts its own Ray, never a cluster a developer left running (`ray
            # start` would otherwise be picked up through /tmp/ray/ray_current_cluster).
            "RAY_ADDRESS": "local",
        }

    def run(self, *args: str, timeout: float = 600) -> str:
        """Run a command in the copy; fails the test with its output when it fails."""
        done = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{output[-6000:]}"
        return output

    def repro(self) -> tuple[list[str], list[str], str]:
        """`dvc repro`: (stages run, stages skipped as unchanged, the output)."""
        output = self.run("dvc", "repro")
        ran = re.findall(r"Running stage '([^']+)'", output)
        skipped = re.findall(r"Stage '([^']+)' didn't change, skipping", output)
        return ran, skipped, output

    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def write_params(self, params: dict[str, Any]) -> None:
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    root = tmp_path_factory.mktemp("dvc-repo")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for package in ("pipelines", "dfnet", "tracking"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    scratch = Repo(root, f"sqlite:///{root / 'mlflow.db'}")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    scratch.write_params(params)
    scratch.run("git", "init", "-q")
    scratch.run("dvc", "init", "-q")
    return scratch


@pytest.fixture(scope="module")
def first_repro(repo: Repo) -> tuple[list[str], list[str], str]:
    return repo.repro()


def test_repro_runs_every_stage_and_writes_eval_metrics(repo, first_repro):
    ran, _, output = first_repro
    assert ran == list(STAGES), output[-3000:]
    evaluation = json.loads((repo.root / "metrics/eval.json").read_text())
    labels = [bin_label(b) for b in range(len(HOLE_BINS))]
    for method in METHODS:
        for size in TINY["evaluate"]["sizes"]:
            for label in labels:  # whole held-out photos at both sizes, every bin
                scores = evaluation[method][str(size)][label]
                assert all(np.isfinite(scores[m]) for m in METRICS), (method, size, label, scores)
        assert set(evaluation[method]["mean"]) == set(METRICS)
    train = json.loads((repo.root / "metrics/train.json").read_text())
    photos = count_rows(str(repo.root / "data/prepared"), "train")
    t = TINY["train"]
    assert train["steps"] == t["epochs"] * (photos * t["crops_per_photo"] // t["batch_size"])
    corpus = json.loads((repo.root / "data/corpus/report.json").read_text())
    assert corpus["total_photos"] == photos + sum(
        count_rows(str(repo.root / "data/prepared"), s) for s in ("val", "test")
    )
    assert (repo.root / "docs/corpus-manifest.tsv").read_text().count("\n") == corpus["total_photos"] + 1
    assert (repo.root / "models/dfnet/model.safetensors").is_file()
    assert (repo.root / "dvc.lock").is_file()


def _find(tree: Any, key: str) -> Any:
    """The value stored under `key` anywhere in a nested JSON document (None if absent)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def _numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested JSON document, keyed by their dotted path."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("."): float(tree)}
    return {}


def test_dvc_metrics_show_reports_the_evaluation(repo, first_repro):
    shown = json.loads(repo.run("dvc", "metrics", "show", "--json"))
    entry = _find(shown, "metrics/eval.json")
    assert entry is not None, shown
    reported = _numbers(entry.get("data", entry))
    written = _numbers(json.loads((repo.root / "metrics/eval.json").read_text()))
    assert written and reported == written  # DVC leaves out non-numbers (FID is None here)
    table = repo.run("dvc", "metrics", "show")
    assert "metrics/eval.json" in table and "metrics/train.json" in table


def test_dvc_plots_show_renders_the_curves(repo, first_repro):
    plots = json.loads(repo.run("dvc", "plots", "show", "--json"))
    assert not plots.get("errors"), plots.get("errors")
    rendered = json.dumps(plots["data"])
    for column in ("loss_total", "loss_structure", "dfnet_bpe", "telea_bpe", "hole_ratio"):
        assert f'"{column}"' in rendered, column


def test_second_repro_changes_nothing(repo, first_repro):
    lock = (repo.root / "dvc.lock").read_text()
    ran, skipped, output = repo.repro()
    assert ran == [], output
    assert set(skipped) == set(STAGES) or "Data and pipelines are up to date" in output, output
    assert (repo.root / "dvc.lock").read_text() == lock


def test_evaluation_param_change_reruns_only_evaluate_and_register(repo, first_repro):
    before = json.loads((repo.root / "metrics/register.json").read_text())
    model_bytes = (repo.root / "models/dfnet/model.safetensors").read_bytes()
    params = repo.params()
    params["evaluate"]["max_photos"] = TINY["evaluate"]["max_photos"] - 1
    repo.write_params(params)

    ran, skipped, output = repo.repro()
    assert ran == ["evaluate", "register"], output[-3000:]
    assert {"corpus", "prepare", "masks", "train"} <= set(skipped), output[-3000:]
    after = json.loads((repo.root / "metrics/register.json").read_text())
    assert int(after["version"]) == int(before["version"]) + 1
    assert (repo.root / "models/dfnet/model.safetensors").read_bytes() == model_bytes


def test_champion_from_registry_matches_the_trained_model(repo, first_repro):
    import mlflow
    from mlflow import MlflowClient

    registration = json.loads((repo.root / "metrics/register.json").read_text())
    name, alias = registration["name"], repo.params()["register"]["alias"]
    test = split_table(repo.root / "data/prepared", "test")
    images = decode_image(test.column("image")[0].as_py())[None]  # one whole held-out photo
    known = evaluation_masks(1, *images.shape[1:3], seed=0)[3]
    holes = ((1 - known) * 255).astype(np.uint8)

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(repo.tracking_uri)
    try:
        champion = MlflowClient().get_model_version_by_alias(name, alias)
        assert int(champion.version) >= 1
        model = mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
        served = model.predict({"image": images, "mask": holes})
    finally:
        mlflow.set_tracking_uri(previous)
    inpainter = Inpainter.from_pretrained(repo.root / "models/dfnet")
    local = inpainter.inpaint_batch(list(images), list(holes), mask_convention="hole-white")
    expected = np.stack([np.asarray(image) for image in local])
    assert served.shape == images.shape and served.dtype == np.uint8
    np.testing.assert_array_equal(served, expected)
    # The holes were filled (not the input echoed back): the model really ran.
    assert not np.array_equal(served, images)
    assert np.array_equal(served[holes == 0], images[holes == 0])


def test_mlflow_artifacts_are_kept_beside_the_tracking_store(repo, first_repro):
    """The registered model and training images must outlive the run: not in Ray's temp dirs."""
    from mlflow import MlflowClient

    client = MlflowClient(repo.tracking_uri)
    registration = json.loads((repo.root / "metrics/register.json").read_text())
    version = client.get_model_version(registration["name"], registration["version"])
    run = client.get_run(version.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    for uri in (experiment.artifact_location, run.info.artifact_uri):
        assert Path(urlparse(uri).path).is_relative_to(repo.root), uri
    root = Path(urlparse(experiment.artifact_location).path)
    assert any(root.rglob("model.safetensors")), list(root.rglob("*"))
    assert any(root.rglob("samples/*.png"))  # the training run's sample grids
