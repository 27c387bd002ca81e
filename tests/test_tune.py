"""tune/search.py: the search space, the project root, the MLflow parent/child helpers and, end to
end, the mission's command as typed — `ray job submit --working-dir . -- python tune/search.py` —
against a `ray start --head` cluster, in a copy of the project with its own install and data.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from dfnet.params import load_params
from tune import search

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The paper's loss weights (spec §Losses): the search ranges must surround them.
PAPER_WEIGHTS = {"loss.l1": 6.0, "loss.perceptual": 0.1, "loss.style": 240.0, "loss.tv": 0.1}


def _params():
    return load_params(REPO / "params.yaml")


# --------------------------------------------------------------------------- search space


@pytest.mark.parametrize("levels", [1, 4, 6])
def test_pq_pairs_are_exactly_the_valid_pairs(levels: int) -> None:
    pairs = [tuple(int(v) for v in pair.split(",")) for pair in search.pq_pairs(levels)]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == {(p, q) for p in range(1, levels + 1) for q in range(1, p + 1)}


def test_pq_choices_follow_the_model() -> None:
    spec, params = search.load_spec()["space"], _params()
    params.model.preset = "small"  # 4 fusion levels
    small = set(search.build_space(spec, params)[search.PQ].categories)
    params.model.preset = "official"  # 6 fusion levels, the paper's (6, 3) among them
    official = set(search.build_space(spec, params)[search.PQ].categories)
    params.model.fusion_levels = 1  # the single-fusion-block ablation
    single = set(search.build_space(spec, params)[search.PQ].categories)
    assert "4,4" in small and "5,1" not in small and "4,5" not in small
    assert {"6,3", "6,6", "1,1"} <= official and "7,1" not in official
    assert small < official and single == {"1,1"}


def test_loss_weights_are_log_uniform_around_the_paper_values() -> None:
    space = search.build_space(search.load_spec()["space"], _params())
    for key, paper in PAPER_WEIGHTS.items():
        domain = space[key]
        assert "LogUniform" in type(domain.sampler).__name__, key
        # "around": inside the range by at least a factor of 2 both ways
        assert domain.lower <= paper / 2 and domain.upper >= paper * 2, key
        assert space[key].is_valid(search.value_of(_params(), key))  # params.yaml is a valid start


def test_search_settings_live_in_the_yaml_and_smoke_overrides_them() -> None:
    full, smoke = search.load_spec(), search.load_spec(smoke=True)
    for key in ("num_samples", "max_concurrent", "time_budget_s", "seed", "baseline_first"):
        assert key in full["search"], key  # read without fallbacks in code
    assert smoke["space"] == full["space"]
    assert smoke["search"]["num_samples"] < full["search"]["num_samples"]
    assert smoke["search"]["max_concurrent"] == 1
    params = load_params(REPO / "params.yaml", smoke["params"])
    assert params.train.epochs * params.train.crops_per_photo <= 10
    assert params.train.epochs >= 2  # ASHA needs a rung before the last epoch


def test_build_space_rejects_bad_entries() -> None:
    params = _params()
    with pytest.raises(AttributeError):
        search.build_space({"loss.nope": {"loguniform": [1.0, 2.0]}}, params)
    with pytest.raises(ValueError):
        search.build_space({"loss.l1": {"loguniform": [0.0, 2.0]}}, params)
    with pytest.raises(ValueError, match="unknown kind"):
        search.build_space({"loss.l1": {"normal": [0.0, 2.0]}}, params)
    dropped = search.build_space(search.load_spec()["space"], params, drop=("loss.perceptual", "loss.style"))
    assert "loss.perceptual" not in dropped and "loss.l1" in dropped


def test_with_hyperparameters_sets_weights_and_pq_without_touching_the_base() -> None:
    base = _params().to_dict()
    params = search.with_hyperparameters(base, {"loss.l1": 3.5, search.PQ: "3,1"})
    assert (params.loss.l1, params.loss.p, params.loss.q) == (3.5, 3, 1)
    assert params.loss.tv == base["loss"]["tv"] and base["loss"]["l1"] == _params().loss.l1
    with pytest.raises(ValueError):
        search.with_hyperparameters(base, {"loss.typo": 1.0})


def test_results_figure_plots_the_metric_against_each_hyperparameter() -> None:
    import io

    import pandas as pd

    frame = pd.DataFrame({"val_bpe": [6.0, 7.0], "config/loss.l1": [3.0, 9.0], "config/loss.pq": ["4,1", "4,2"]})
    fig = search.results_figure(frame, "val_bpe", log_keys=["loss.l1"])
    fig.savefig(io.BytesIO())  # draws the ticks
    l1, pq = fig.axes
    assert (l1.get_xlabel(), l1.get_xscale(), pq.get_xscale()) == ("loss.l1", "log", "linear")
    assert [t.get_text() for t in pq.get_xticklabels()] == ["4,1", "4,2"]


# --------------------------------------------------------------------------- project root


def test_project_root_is_the_cwd_with_the_data_else_the_editable_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)  # like a Ray job's uploaded copy: params.yaml but no data/
    assert search.project_root() == REPO  # the checkout `make setup` installed editable
    (tmp_path / _params().data.out_dir).mkdir(parents=True)
    assert search.project_root() == tmp_path


def test_absolute_paths_pin_relative_paths_to_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params()
    params.masks.out, params.train.storage_path = "/abs/masks.npz", "s3://bucket/runs"
    pinned = search.absolute_paths(params)
    assert pinned.data.out_dir == str(tmp_path / "data" / "prepared")
    assert (pinned.masks.out, pinned.train.storage_path) == ("/abs/masks.npz", "s3://bucket/runs")
    assert pinned.train.init_from == "pretrained"  # a name, not a path
    assert pinned.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


# --------------------------------------------------------------------------- MLflow helpers


def test_tagged_run_resumes_and_running_children_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from tracking import registry

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # MLflow's process-wide tracking URI and experiment, restored after the test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    tags = {"tune_search": "s", "tune_experiment": "/runs/s"}
    with registry.start_tagged_run(uri, "exp", "s", tags) as first:
        finished = mlflow.start_run(run_name="done", nested=True)
        mlflow.end_run()
        killed = mlflow.start_run(run_name="killed", nested=True).info.run_id
        mlflow.end_run(status="RUNNING")  # what a trial killed mid-run leaves behind
        registry.end_child_runs(first.info.run_id)
    with registry.start_tagged_run(uri, "exp", "s", tags) as again:
        assert again.info.run_id == first.info.run_id
    with registry.start_tagged_run(uri, "exp", "other", {**tags, "tune_search": "other"}) as other:
        assert other.info.run_id != first.info.run_id
    client = mlflow.MlflowClient(uri)
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"


# --------------------------------------------------------------------------- the Ray job


@pytest.fixture(scope="module")
def project(ray_local: Any) -> Iterator[Path]:
    """A copy of the project as a user has it after `make setup` and `dvc repro` (tiny): the
    working tree's files, its own virtualenv with the project installed editable from the copy,
    and small prepared data and masks at params.yaml's relative paths."""
    from dfnet.params import DataParams, MaskParams
    from pipelines.make_masks import make_masks
    from pipelines.prepare import prepare

    # Not under pytest's basetemp: a concurrent pytest on the machine may prune it mid-test.
    with tempfile.TemporaryDirectory(prefix="dfnet-project-", ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                               check=True, capture_output=True, text=True).stdout.split("\0")  # fmt: skip
        for name in filter(None, files):
            if (REPO / name).is_file():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, root / name)
        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["data"].update(source="sample", store_short_side=128)
        raw["masks"].update(pool_size=50)
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        params = load_params(root / "params.yaml")
        prepare(DataParams(**{**vars(params.data), "out_dir": str(root / params.data.out_dir)}))
        make_masks(MaskParams(**{**vars(params.masks), "out": str(root / params.masks.out)}))
        # Its own virtualenv, sharing this one's packages, with the copy installed editable: what
        # `make setup` gives a fresh clone (and what tune/search.py finds its project root by).
        venv = root / ".venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        (site,) = venv.glob("lib/python*/site-packages")
        shared = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "ray").is_dir())
        (site / "shared.pth").write_text(f"import site; site.addsitedir({shared!r})\n")
        subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "-e", str(root)], check=True, cwd=root)  # fmt: skip
        yield root


@pytest.fixture(scope="module")
def ray_head(project: Path) -> Iterator[dict[str, str]]:
    """`ray start --head` on loopback from the project's virtualenv, with token authentication;
    yields the environment a user's shell has (RAY_ADDRESS points the CLIs at this cluster).

    Every port is chosen by the OS (0); the cluster's temp dir keeps its address file away from
    other Rays on the machine. `ray stop` would stop every Ray here, so the cluster runs under
    `ray start --block` and is stopped by signalling that process group alone.
    """
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are limited
    env = {
        **os.environ,
        "PATH": f"{project / '.venv' / 'bin'}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",  # what the README asks for
        "RAY_AUTH_TOKEN": secrets.token_hex(32),  # never the user's ~/.ray/auth_token
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV"):
        env.pop(name, None)
    log = open(Path(temp_dir) / "ray_start.log", "w")  # noqa: SIM115 (open while Ray runs)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port=0", "--dashboard-port=0",
         "--dashboard-agent-listen-port=0", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=project,
    )  # fmt: skip
    address_file = Path(temp_dir) / "ray_current_cluster"
    try:
        # Written once the cluster is up; generous, as a busy 2-core machine may take minutes.
        deadline = time.monotonic() + 600
        while not address_file.is_file() or not address_file.read_text().strip():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up: {(Path(temp_dir) / 'ray_start.log').read_text()}")
            time.sleep(1)
        yield {**env, "RAY_ADDRESS": address_file.read_text().strip()}
    finally:
        _stop_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop this cluster only, at once (a graceful `ray stop` takes half a minute and the cluster
    is thrown away): SIGKILL to the process group of `ray start --block`, then any straggler
    that left the group, found by this cluster's temp dir on its command line."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture(scope="module")
def search_job(project: Path, ray_head: dict[str, str]) -> subprocess.CompletedProcess:
    """The bare `ray job submit --working-dir . -- python tune/search.py --smoke`, from the project
    root, run once for the tests below."""
    return subprocess.run(["ray", "job", "submit", "--working-dir", ".", "--", "python", "tune/search.py", "--smoke"],
                          cwd=project, env=ray_head, capture_output=True, text=True, timeout=900)  # fmt: skip


@pytest.mark.slow
def test_the_mission_command_registers_the_champion_in_the_projects_mlflow(
    project: Path, ray_head: dict[str, str], search_job: subprocess.CompletedProcess
) -> None:
    """The job runs in an uploaded copy, yet reads the project's data and writes its trials, the
    parent run's results and the registered dfnet@champion to the project's runs/ and mlflow.db.
    Then `python tune/search.py --smoke` again: the finished search is restored, not rerun."""
    from mlflow import MlflowClient

    job = search_job
    assert job.returncode == 0, (job.stdout + job.stderr)[-8000:]
    assert "succeeded" in job.stdout + job.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dfnet").experiment_id
    (parent,) = client.search_runs([experiment], "tags.tune_search = 'dfnet-search-smoke'")
    assert parent.info.status == "FINISHED"
    assert {"tune_results.csv", "tune_results.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.info.status in ("FINISHED", "KILLED") for c in children)
    assert all("val_bpe" in c.data.metrics for c in children)
    champion = client.get_model_version_by_alias("dfnet", "champion")
    assert champion.run_id in {c.info.run_id for c in children}
    assert champion.tags["tune_search"] == "dfnet-search-smoke" and float(champion.tags["metric.bpe"]) > 0
    assert parent.data.tags[search.REGISTERED_TAG] == str(champion.version)
    experiment_dir = project / "runs" / "dfnet-search-smoke"
    assert len(list(experiment_dir.glob("trial-*/checkpoint_*"))) >= 2  # the trials' Train runs

    again = subprocess.run([str(project / ".venv" / "bin" / "python"), "tune/search.py", "--smoke"],
                           cwd=project, env=ray_head, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, (again.stdout + again.stderr)[-8000:]
    assert "restoring" in again.stderr and f"already registered version {champion.version}" in again.stdout
    assert len(client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 2
    assert len(client.search_model_versions("name = 'dfnet'")) == 1


@pytest.mark.slow
def test_serve_deploy_serves_the_champion(
    project: Path, ray_head: dict[str, str], search_job: subprocess.CompletedProcess, free_loopback_port: Any
) -> None:
    """`serve deploy serve/config.yaml` from the project root to the same cluster, the config as
    shipped but for its HTTP port (one the OS picked) and one warm-up size instead of two (each
    compiles for most of a minute here): the replica finds the project's MLflow, serves the
    champion the search registered on the default inference path, compiled during its warm-up,
    and completes a photo."""
    import httpx
    from mlflow import MlflowClient
    from PIL import Image

    from dfnet.accelerate import choose_path

    assert search_job.returncode == 0, "the search job failed: see the test above"
    champion = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").get_model_version_by_alias(
        "dfnet", "champion"
    )
    config_file = project / "serve" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    port = free_loopback_port()
    config["http_options"]["port"] = port
    (application,) = config["applications"]
    application["args"]["warmup_sizes"] = [128]  # the photo below is padded to 128²
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    # `serve` talks to the dashboard: a default `ray start --head` has it at localhost:8265, this
    # one on a port the OS picked, which the cluster itself reports.
    dashboard = subprocess.run([str(project / ".venv" / "bin" / "python"), "-c",
                                "import ray; print(ray.init(log_to_driver=False).dashboard_url)"],
                               env=ray_head, capture_output=True, text=True, check=True).stdout.split()[-1]  # fmt: skip
    env = {**ray_head, "RAY_DASHBOARD_ADDRESS": f"http://{dashboard}"}
    deploy = subprocess.run(["serve", "deploy", "serve/config.yaml"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-4000:]

    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # the warm-up compiles; a busy 2-core machine is slow at it
    while True:
        try:
            info = httpx.get(f"{base}/model", timeout=10)
            if info.status_code == 200:
                break
        except httpx.TransportError:
            pass
        status = subprocess.run(["serve", "status"], cwd=project, env=env, capture_output=True, text=True)
        assert "DEPLOY_FAILED" not in status.stdout, status.stdout
        assert time.monotonic() < deadline, f"not serving after 15 minutes:\n{status.stdout}"
        time.sleep(5)
    served = info.json()
    assert served["source"] == "models:/dfnet@champion" and served["version"] == int(champion.version)
    assert served["inference"] == choose_path("cpu")[0].name

    rng = np.random.default_rng(0)
    photo, mask = io.BytesIO(), io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(photo, format="PNG")
    hole = np.zeros((90, 120), np.uint8)
    hole[30:60, 40:80] = 255  # white = fill, the default convention
    Image.fromarray(hole).save(mask, format="PNG")
    response = httpx.post(f"{base}/inpaint", files={"image": photo.getvalue(), "mask": mask.getvalue()}, timeout=120)
    assert response.status_code == 200, response.text
    completed = np.asarray(Image.open(io.BytesIO(response.content)))
    assert completed.shape == (90, 120, 3)
