"""The train stage through real Ray Train: checkpoints, export, resume, fault tolerance, MLflow.

Everything runs on tiny configurations (the `small` preset at 64², batch 4, a few steps, the
library's one loop `dfnet.training.train` inside the workers) on the session's 2-CPU local Ray.
Each `fit()` costs Ray Train's start-up (~10-25 s on a busy 2-core machine), so the runs are
shared through module fixtures where a test only reads them; the worker-kill test starts its own
run and is marked slow. Training with its data and checkpoints on S3 is tests/test_multinode.py's
(preparing from and to S3 is tests/test_prepare.py's).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from dfnet.losses import DFNetLoss
from dfnet.model import DFNet, read_model_config
from dfnet.params import Params, load_params, parse_params
from dfnet.storage import count_rows
from dfnet.training import export_model, run_identity
from pipelines.make_masks import make_masks
from pipelines.prepare import prepare
from pipelines.train import SAMPLES_FILE, STATE_FILE, build_trainer, load_checkpoint_state, resumed_epoch

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


def tiny_params(root: Path, **sections: dict[str, Any]) -> Params:
    """The repository's params.yaml with everything shrunk to test size, outputs under `root`.

    Speed-relevant keys are pinned here (not taken from params.yaml) so an edit of the defaults
    cannot make these tests slow; `sections` override further.
    """
    overrides: dict[str, dict[str, Any]] = {
        "data": {"source": "sample", "image_size": SIZE, "store_short_side": SIZE, "out_dir": str(root / "prepared")},
        "masks": {"pool_size": 20, "out": str(root / "masks.npz")},
        "model": {"preset": "small", "fusion": "blend"},
        "loss": {"p": 4, "q": 2, "texture_fallback": "off"},
        "train": {
            "epochs": 2,
            "crops_per_photo": 1,
            "batch_size": 4,
            "bn_recalibration_batches": 1,
            "val_short_side": SIZE,
            "val_max_photos": 1,
            "num_workers": 1,
            "use_gpu": False,
            "storage_path": str(root / "runs"),
            "out_dir": str(root / "model"),
            "max_failures": 0,
        },
        "evaluate": {"grid_rows": 2, "out_dir": str(root / "metrics")},
    }
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return load_params(REPO / "params.yaml", overrides)


def load_params_with(params: Params, **sections: dict[str, Any]) -> Params:
    """A copy of `params` with some fields changed."""
    raw = params.to_dict()
    for section, values in sections.items():
        raw[section].update(values)
    return parse_params(raw)


def split_history(history: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(training-step records, end-of-epoch validation records)."""
    return [h for h in history if "loss_total" in h], [h for h in history if "val_l1" in h]


def steps_per_epoch(params: Params) -> int:
    """What the loop makes of the prepared photos: one pass over crops_per_photo crops each."""
    photos = count_rows(params.data.out_dir, "train")
    return photos * params.train.crops_per_photo // (params.train.batch_size * params.train.num_workers)


def check_history(history: list[dict[str, Any]], params: Params) -> None:
    """Step records strictly increase up to the total; one validation record per epoch end."""
    spe = steps_per_epoch(params)
    total = params.train.epochs * spe
    steps, vals = split_history(history)
    step_values = [h["step"] for h in steps]
    assert step_values == sorted(set(step_values)), f"steps go back or repeat: {step_values}"
    assert step_values[-1] == total
    assert [h["step"] for h in vals] == list(range(spe, total + 1, spe))
    assert all(np.isfinite(h["loss_total"]) and h["images_per_s"] > 0 for h in steps)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if (p / STATE_FILE).is_file())


def mlflow_run(params: Params) -> Any:
    """The one MLflow run logged for the Ray run of `params`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"params.ray_run = '{run_identity(params)}'")
    assert len(runs) == 1, f"expected one MLflow run for {run_identity(params)}, got {len(runs)}"
    return runs[0]


def metric_history(run_id: str, key: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A SQLite MLflow store for the module (workers get it through the train config)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def data_root(ray_local: Any, mlflow_store: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny prepared data (the bundled sample photos at 64 px) and a small mask pool."""
    root = tmp_path_factory.mktemp("train-data")
    params = tiny_params(root)
    report = prepare(params.data)
    assert all(report["splits"][s]["images"] > 0 for s in ("train", "val", "test"))
    make_masks(params.masks)
    return root


@pytest.fixture(scope="module")
def first_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Any]:
    """One finished 2-epoch run; the tests below only read it (or resume it)."""
    params = tiny_params(data_root, train={"storage_path": str(tmp_path_factory.mktemp("runs"))})
    result = build_trainer(params).fit()
    return params, result


def test_fit_checkpoints_and_exports_a_loadable_model(first_run, tmp_path):
    params, result = first_run
    total = params.train.epochs * steps_per_epoch(params)
    assert result.error is None
    state = load_checkpoint_state(result.checkpoint)
    assert state["step"] == total
    check_history(state["history"], params)
    # The checkpoint lives in the run's storage folder, named after what determines the weights.
    run_dir = Path(params.train.storage_path) / run_identity(params)
    assert [p.name for p in checkpoint_dirs(run_dir)][-1] in result.checkpoint.path
    with result.checkpoint.as_directory() as directory:
        assert Image.open(Path(directory) / SAMPLES_FILE).size[0] == 3 * SIZE

    out = export_model(params, state, tmp_path / "model")
    model = DFNet.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key].cpu()), key
    provenance = read_model_config(out)["provenance"]
    assert provenance["steps"] == total and provenance["epochs"] == params.train.epochs
    assert provenance["image_size"] == SIZE and provenance["preset"] == params.model.preset
    # The exported weights are the trained ones, not a fresh initialisation.
    fresh = DFNet.from_params(params.model).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in model.state_dict().items())


def test_training_is_logged_to_mlflow(first_run):
    params, result = first_run
    state = load_checkpoint_state(result.checkpoint)
    run = mlflow_run(params)
    assert run.info.run_id == state["extra"]["mlflow_run_id"]
    assert {"loss_total", "val_l1", "val_bpe", "data_wait"} <= set(run.data.metrics)
    assert 0 <= run.data.metrics["data_wait"] < 1  # the share of time the worker waited for Ray Data
    assert run.data.params["loss.vgg_provenance"] == DFNetLoss(params.loss).provenance
    assert run.data.params["train.batch_size"] == str(params.train.batch_size)
    spe = steps_per_epoch(params)
    val_steps = [m.step for m in metric_history(run.info.run_id, "val_l1")]
    assert val_steps == list(range(spe, params.train.epochs * spe + 1, spe))
    # Sample grids are artifacts stored beside the SQLite store, not in a Ray temp folder.
    store_dir = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent
    artifacts = Path(urlparse(run.info.artifact_uri).path)
    assert artifacts.is_relative_to(store_dir), run.info.artifact_uri
    assert len(list(artifacts.glob("samples/*.png"))) == params.train.epochs


def test_rerun_with_same_params_resumes_instead_of_retraining(first_run):
    params, first = first_run
    state = load_checkpoint_state(first.checkpoint)
    run_dir = Path(params.train.storage_path) / run_identity(params)
    before = checkpoint_dirs(run_dir)

    again = build_trainer(params).fit()
    resumed = load_checkpoint_state(again.checkpoint)
    assert resumed["step"] == state["step"]
    # Identical records, timings included: read back from storage, not recomputed.
    assert resumed["history"] == state["history"]
    assert checkpoint_dirs(run_dir) == before  # no step was trained, so nothing was reported
    for key, value in state["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    # The resumed worker continued the same MLflow run rather than opening a second one.
    assert mlflow_run(params).info.run_id == state["extra"]["mlflow_run_id"]


def test_more_epochs_extend_the_run_from_its_checkpoint(first_run):
    params, first = first_run
    state = load_checkpoint_state(first.checkpoint)
    longer = load_params_with(params, train={"epochs": params.train.epochs + 1})
    assert run_identity(longer) == run_identity(params)
    # The driver finds where the run stands, so the extension's data is seeded from its epoch.
    assert resumed_epoch(params.train.storage_path, run_identity(params)) == params.train.epochs
    assert resumed_epoch(params.train.storage_path, "no-such-run") == 0
    extended = load_checkpoint_state(build_trainer(longer).fit().checkpoint)
    assert extended["step"] == state["step"] + steps_per_epoch(params)
    history = state["history"]
    assert extended["history"][: len(history)] == history  # the first epochs were not retrained
    assert min(h["step"] for h in extended["history"][len(history) :]) > state["step"]


def test_run_identity_tracks_what_determines_training(data_root):
    base = tiny_params(data_root)
    name = run_identity(base)
    assert name.startswith(base.train.run_name + "-")
    # Where and how the run executes does not make it a different run...
    for key, value in {
        "num_workers": 2,
        "max_failures": 5,
        "resume": False,
        "storage_path": "s3://bucket/x",
        "out_dir": "elsewhere",
        "use_gpu": True,
        "epochs": 3,  # more epochs extend the same run
    }.items():
        assert run_identity(tiny_params(data_root, train={key: value})) == name, key
    # ...while what is trained, on what, and how, does.
    for section, values in [
        ("train", {"lr": 1e-3}),
        ("train", {"batch_size": 8}),
        ("train", {"seed": 1}),
        ("train", {"crops_per_photo": 3}),
        ("loss", {"style": 120.0}),
        ("model", {"fusion": "hard"}),
        ("masks", {"pool_size": 21}),
        ("data", {"store_short_side": 128}),
    ]:
        assert run_identity(tiny_params(data_root, **{section: values})) != name, values


def _train_workers() -> list[psutil.Process]:
    """This session's Ray Train worker processes (descendants of the test process only)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(data_root, tmp_path, fit_in_background):
    params = tiny_params(
        data_root,
        train={
            "epochs": 4,
            "max_failures": 1,
            "storage_path": str(tmp_path / "runs"),
            "run_name": "killed",
        },
    )
    total = params.train.epochs * steps_per_epoch(params)
    run_dir = tmp_path / "runs" / run_identity(params)
    thread, outcome = fit_in_background(params)
    # Kill only once the controller has registered a checkpoint (its snapshot file appears):
    # a checkpoint merely uploaded by a worker is not yet one a restarted worker group gets.
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint_manager_snapshot.json").exists():
        assert thread.is_alive(), f"fit ended before any checkpoint: {outcome}"
        assert time.monotonic() < deadline, "no checkpoint registered in time"
        time.sleep(0.05)
    workers = _train_workers()
    assert len(workers) == params.train.num_workers
    first = checkpoint_dirs(run_dir)[0]
    seen_history = torch.load(first / STATE_FILE, weights_only=True)["history"]
    seen_step = split_history(seen_history)[0][-1]["step"]
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    killed_at_ms = time.time() * 1000
    thread.join(timeout=300)
    assert not thread.is_alive(), "fit did not finish after the worker was killed"

    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.error is None
    state = load_checkpoint_state(result.checkpoint)
    history = state["history"]
    assert 0 < seen_step < total
    assert state["step"] == total
    check_history(history, params)
    # What was trained before the checkpoint is carried over verbatim (timings included), so
    # those steps were restored, not recomputed.
    assert [h for h in history if h["step"] <= seen_step] == seen_history
    # The replacement worker trained only the steps after the checkpoint: every step it logged
    # (to the same MLflow run) lies beyond the checkpoint, and it logged the final one.
    run = mlflow_run(params)
    after_kill = [m.step for m in metric_history(run.info.run_id, "loss_total")
                  if m.timestamp > killed_at_ms]  # fmt: skip
    assert after_kill, "nothing was trained after the kill"
    assert min(after_kill) > seen_step and max(after_kill) == total
    assert total - seen_step < total
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
