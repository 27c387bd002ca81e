"""tune/search.py: the search space, the best-checkpoint bookkeeping, the summary, and — end to
end — the smoke search submitted as a Ray job to a `ray start --head` cluster on loopback with
token authentication, interrupted after its first finished trial and resumed by resubmitting the
same command.
"""

from __future__ import annotations

import csv
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dfnet.params import load_params
from tune import search

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The paper's loss weights (spec §Losses): the search ranges must surround them.
PAPER_WEIGHTS = {"loss.l1": 6.0, "loss.perceptual": 0.1, "loss.style": 240.0, "loss.tv": 0.1}
# What `ray job submit --working-dir` must not upload (the job reads data via --root instead).
UPLOAD_EXCLUDES = [
    ".venv", ".git", "data", "runs", "mlruns", "models", "metrics", "test-artifacts",
    "*.db", "__pycache__", ".pytest_cache", ".ruff_cache", ".dvc/cache",
]  # fmt: skip


def _params():
    return load_params(REPO / "params.yaml")


# --------------------------------------------------------------------------- search space


@pytest.mark.parametrize("levels", [1, 4, 6])
def test_pq_pairs_are_exactly_the_valid_pairs(levels: int) -> None:
    pairs = [search.parse_pq(v) for v in search.pq_pairs(levels)]
    expected = {(p, q) for p in range(1, levels + 1) for q in range(1, p + 1)}
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == expected


def test_pq_choices_follow_the_model_preset() -> None:
    spec = search.load_spec()
    params = _params()
    params.model.preset = "small"  # 4 fusion levels
    small = set(search.build_space(spec["space"], params)[search.PQ_KEY].categories)
    params.model.preset = "official"  # 6 fusion levels, the paper's (6, 3) among them
    official = set(search.build_space(spec["space"], params)[search.PQ_KEY].categories)
    assert "4,4" in small and "5,1" not in small and "4,5" not in small
    assert {"6,3", "6,6", "1,1"} <= official and "7,1" not in official
    assert small < official


def test_loss_weights_are_log_uniform_around_the_paper_values() -> None:
    space = search.build_space(search.load_spec()["space"], _params())
    for key, paper in PAPER_WEIGHTS.items():
        domain = space[key]
        assert "LogUniform" in type(domain.sampler).__name__, key
        assert domain.lower < paper < domain.upper, key
        # "around": the paper's value is inside the range by at least a factor of 2 both ways
        assert domain.lower <= paper / 2 and domain.upper >= paper * 2, key


def test_smoke_section_overrides_the_full_search() -> None:
    full, smoke = search.load_spec(), search.load_spec(smoke=True)
    assert smoke["space"] == full["space"]
    assert smoke["search"]["num_samples"] < full["search"]["num_samples"]
    assert smoke["search"]["max_concurrent"] == 1
    params = load_params(REPO / "params.yaml", smoke["params"])
    assert params.train.epochs * params.train.crops_per_photo <= 10
    assert params.train.epochs >= 2  # ASHA needs a rung before the last epoch


def test_build_space_rejects_bad_entries() -> None:
    params = _params()
    with pytest.raises(ValueError, match="not a params.yaml field"):
        search.build_space({"loss.nope": {"loguniform": [1.0, 2.0]}}, params)
    with pytest.raises(ValueError, match="0 < low < high"):
        search.build_space({"loss.l1": {"loguniform": [0.0, 2.0]}}, params)
    with pytest.raises(ValueError, match="unknown kind"):
        search.build_space({"loss.l1": {"normal": [0.0, 2.0]}}, params)
    dropped = search.build_space(
        search.load_spec()["space"], params, drop_keys=("loss.perceptual", "loss.style")
    )
    assert "loss.perceptual" not in dropped and "loss.l1" in dropped


def test_apply_hyperparameters_sets_weights_and_pq_without_touching_the_base() -> None:
    base = _params().to_dict()
    before = json.dumps(base, sort_keys=True)
    params = search.apply_hyperparameters(base, {"loss.l1": 3.5, search.PQ_KEY: "3,1"})
    assert params.loss.l1 == 3.5
    assert (params.loss.p, params.loss.q) == (3, 1)
    assert params.loss.tv == base["loss"]["tv"]
    assert json.dumps(base, sort_keys=True) == before
    with pytest.raises(ValueError):
        search.apply_hyperparameters(base, {"loss.typo": 1.0})


def test_baseline_point_is_params_yaml_when_inside_the_space() -> None:
    params = _params()
    space = search.build_space(search.load_spec()["space"], params)
    point = search.baseline_point(space, params)
    assert point is not None
    assert point["loss.l1"] == params.loss.l1
    assert point[search.PQ_KEY] == f"{params.loss.p},{params.loss.q}"
    params.loss.l1 = 1000.0  # outside the range: no baseline point
    assert search.baseline_point(space, params) is None


def test_val_score_adds_l1_and_bpe_and_never_rewards_nan() -> None:
    assert search.val_score({"val_l1": 2.0, "val_bpe": 3.5}) == pytest.approx(5.5)
    assert search.val_score({"val_l1": 2.0, "val_bpe": float("nan")}) == math.inf


def test_root_params_makes_relative_paths_absolute() -> None:
    params = _params()
    params.train.storage_path = "s3://bucket/runs"
    params.masks.out = "/abs/masks.npz"
    rooted = search.root_params(params, Path("/proj"))
    assert rooted.data.out_dir == "/proj/data/prepared"
    assert rooted.masks.out == "/abs/masks.npz"
    assert rooted.train.storage_path == "s3://bucket/runs"
    assert rooted.mlflow.tracking_uri == "sqlite:////proj/mlflow.db"


# --------------------------------------------------------------------------- best checkpoint


def _checkpoint(directory: Path, payload: bytes):
    import ray.train

    directory.mkdir(parents=True)
    (directory / "train_state.pt").write_bytes(payload)
    (directory / "history.json").write_text("[]")
    return ray.train.Checkpoint.from_directory(str(directory))


def _metrics(epoch: int, l1: float, bpe: float) -> dict:
    metrics = {"epoch": epoch, "step": 5 * (epoch + 1), "val_l1": l1, "val_bpe": bpe}
    return {**metrics, search.METRIC: search.val_score(metrics)}


def test_save_best_keeps_a_single_whole_copy(tmp_path: Path) -> None:
    uri = str(tmp_path / "best" / "trial")
    assert search.read_best(uri) is None
    search.save_best(_checkpoint(tmp_path / "c0", b"epoch0"), uri, _metrics(0, 5.0, 20.0))
    search.save_best(_checkpoint(tmp_path / "c2", b"epoch2"), uri, _metrics(2, 4.0, 18.0))
    record = search.read_best(uri)
    assert record is not None
    assert record["checkpoint"] == "epoch_0002" and record["epoch"] == 2
    assert record[search.METRIC] == pytest.approx(22.0)
    assert sorted(p.name for p in Path(uri).iterdir()) == ["best.json", "epoch_0002"]
    assert (Path(uri) / "epoch_0002" / "train_state.pt").read_bytes() == b"epoch2"


def test_save_best_on_s3(tmp_path: Path, s3_server) -> None:
    uri = s3_server.uri("search/best/trial")
    search.save_best(_checkpoint(tmp_path / "c0", b"epoch0"), uri, _metrics(0, 5.0, 20.0))
    search.save_best(_checkpoint(tmp_path / "c1", b"epoch1"), uri, _metrics(1, 4.5, 19.0))
    listing = s3_server.client.list_objects_v2(Bucket=s3_server.bucket, Prefix="search/best/")
    keys = sorted(o["Key"] for o in listing.get("Contents", []))
    assert "search/best/trial/best.json" in keys
    assert any(k.startswith("search/best/trial/epoch_0001/") for k in keys)
    assert not any("epoch_0000" in k for k in keys)
    assert search.read_best(uri)["checkpoint"] == "epoch_0001"  # type: ignore[index]
    copy = search._local_copy(f"{uri}/epoch_0001", tmp_path / "dl")
    assert (copy / "train_state.pt").read_bytes() == b"epoch1"


# --------------------------------------------------------------------------- summary


def test_summary_csv_and_plot(tmp_path: Path) -> None:
    keys = ["loss.l1", search.PQ_KEY]

    def row(trial: str, status: str, l1: float, pq: str, score: float | None):
        best = None
        if score is not None:
            best = {"checkpoint": "epoch_0001", "epoch": 1, search.METRIC: score}
            best.update({"val_l1": score / 4, "val_bpe": score * 3 / 4})
        config = {"loss.l1": l1, search.PQ_KEY: pq}
        return search.TrialSummary(trial, status, 2, config, best, score or math.inf, [])

    rows = [row("b", "completed", 3.0, "4,2", 20.0), row("a", "stopped", 9.0, "2,1", 25.0)]
    rows.append(row("c", "error", 1.0, "1,1", None))
    csv_path, png_path = search.write_summary(rows, keys, tmp_path)
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == ["b", "a", "c"]
    assert table[0][search.PQ_KEY] == "4,2" and float(table[1]["loss.l1"]) == 9.0
    assert float(table[0][search.METRIC]) == 20.0 and table[2][search.METRIC] == ""
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = search.format_table(rows, keys)
    assert len(text.splitlines()) == 2 + len(rows) and "| b | completed |" in text


# --------------------------------------------------------------------------- the Ray job


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class RayHead:
    url: str  # the dashboard / job API
    env: dict[str, str]  # what the `ray` CLI needs (token, PATH)
    token: str

    def jobs(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {self.token}"})


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """`ray start --head` on loopback, with token authentication, stopped after the module.

    Token auth is Ray's default since 2.59 once a token exists; here it is explicit:
    RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN for the cluster and every CLI call (never the
    user's ~/.ray/auth_token). `ray stop` would stop every Ray on the machine, so the cluster runs
    under `ray start --block` and is stopped by signalling that process alone.
    """
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are limited
    gcs, dash, *more = _free_ports(9)
    token = secrets.token_hex(32)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is ours
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    names = ["node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc",
             "runtime-env-agent", "metrics-export", "ray-client-server"]  # fmt: skip
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
           *(f"--{name}-port={port}" for name, port in zip(names, more))]  # fmt: skip
    log = open(Path(temp_dir) / "ray_start.log", "w")  # noqa: SIM115 (open while Ray runs)
    head = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        import httpx

        deadline = time.time() + 180
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited: {(Path(temp_dir) / 'ray_start.log').read_text()}")
            try:
                auth = {"Authorization": f"Bearer {token}"}
                if httpx.get(f"{url}/api/version", headers=auth, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail("the Ray dashboard did not come up in 180 s")
            time.sleep(2)
        yield RayHead(url=url, env=env, token=token)
    finally:
        _stop_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop this cluster only: SIGTERM to `ray start --block` (it kills what it started), then
    any straggler whose command line names this cluster's temp dir, by pid."""
    import psutil

    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            head.kill()
    time.sleep(2)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _trials(experiment: Path) -> dict[str, str]:
    """{trial id: status} from Tune's newest experiment state file ({} while none is readable)."""
    # Named after the session's start time; a restored search writes a new one (and re-syncs the
    # old one, so modification times do not tell them apart).
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}  # being written
    trials = [json.loads(state) for state, _ in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def _trial_footprint(experiment: Path, trial_id: str) -> dict:
    """Everything a rerun of the trial would change: Tune results, Train checkpoints, best copy."""
    (trial_dir,) = [p for p in experiment.iterdir() if p.is_dir() and f"_{trial_id}_" in p.name]
    train_dir = experiment / "train" / f"{search.TRIAL_RUN_PREFIX}{trial_id}"
    return {
        "results": (trial_dir / "result.json").read_text(),
        "checkpoints": sorted(p.name for p in train_dir.glob("checkpoint_*")),
        "best": (experiment / "best" / trial_id / search.BEST_FILE).read_text(),
    }


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory: pytest.TempPathFactory, ray_local) -> Path:
    """A project root with its own params.yaml and tiny prepared data + masks (the repository's
    data/ may be rebuilt by a concurrent `dvc repro`)."""
    import yaml

    from dfnet.params import DataParams, MaskParams
    from pipelines.make_masks import make_masks
    from pipelines.prepare import prepare

    root = tmp_path_factory.mktemp("project")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(source="sample", store_short_side=128, out_dir=str(root / "data" / "prepared"))
    raw["masks"].update(pool_size=50, out=str(root / "data" / "masks.npz"))
    params = load_params(REPO / "params.yaml", {k: raw[k] for k in ("data", "masks")})
    prepare(DataParams(**vars(params.data)))
    make_masks(MaskParams(**vars(params.masks)))
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


@pytest.mark.slow
def test_smoke_search_as_a_ray_job_resumes_and_registers(
    tiny_project: Path, ray_head: RayHead, tmp_path: Path
) -> None:
    """`ray job submit ... -- python tune/search.py --smoke`; stop it after one trial finished;
    submit it again: the finished trial is not rerun, the search completes, MLflow has a parent
    run with one child per trial and the registry `dfnet@champion`. (~3-5 min on 2 busy cores.)"""
    import httpx
    from mlflow import MlflowClient

    name = "job-smoke"
    storage, db = tmp_path / "runs", tmp_path / "mlflow.db"
    experiment = storage / name
    runtime_env = {
        "excludes": UPLOAD_EXCLUDES,
        # The tracking database is an absolute path the job and this test (the user) share.
        "env_vars": {
            "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray Train's placement-group cleaner finds the cluster through this; without it, it
            # guesses, and fails while other Rays run on this machine (e.g. other tests').
            "RAY_API_SERVER_ADDRESS": ray_head.url,
        },
    }
    # The job runs in an uploaded copy of the repository: --root points it at the project's
    # params.yaml and data (here a tiny one), like `--root "$PWD"` in the README.
    entrypoint = ["--", "python", "tune/search.py", "--smoke", "--name", name,
                  "--root", str(tiny_project), "--storage", str(storage)]  # fmt: skip

    def submit(*options: str) -> list[str]:
        return [str(BIN / "ray"), "job", "submit", "--address", ray_head.url,
                "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
                *options, *entrypoint]  # fmt: skip

    # Token authentication is on: the job API refuses a request without the token.
    assert httpx.get(f"{ray_head.url}/api/jobs/", timeout=10).status_code in (401, 403)

    jobs = ray_head.jobs()
    subprocess.run(submit("--no-wait", "--submission-id", "tune-a"), env=ray_head.env,
                   check=True, timeout=180, capture_output=True)  # fmt: skip
    deadline = time.time() + 480
    while not any(s == "TERMINATED" for s in _trials(experiment).values()):
        status = jobs.get_job_status("tune-a").value
        if status in ("FAILED", "SUCCEEDED", "STOPPED") or time.time() > deadline:
            logs = jobs.get_job_logs("tune-a")[-6000:]
            pytest.fail(f"job tune-a {status} before a trial finished:\n{logs}")
        time.sleep(1)
    (finished,) = [t for t, s in _trials(experiment).items() if s == "TERMINATED"]
    before = _trial_footprint(experiment, finished)

    subprocess.run([str(BIN / "ray"), "job", "stop", "--address", ray_head.url, "tune-a"],
                   env=ray_head.env, check=True, timeout=120, capture_output=True)  # fmt: skip
    assert jobs.get_job_status("tune-a").value == "STOPPED"
    interrupted = _trials(experiment)
    assert len(interrupted) == 2 and list(interrupted.values()).count("TERMINATED") == 1, (
        interrupted
    )
    assert not (experiment / "tune_summary.csv").exists()  # the search did not get to its end

    done = subprocess.run(submit("--submission-id", "tune-b"), env=ray_head.env, timeout=600,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "restoring" in done.stdout
    final = _trials(experiment)
    assert set(final) == set(interrupted) and set(final.values()) == {"TERMINATED"}
    assert _trial_footprint(experiment, finished) == before  # not rerun, not touched

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment_id = client.get_experiment_by_name("dfnet").experiment_id
    parents = client.search_runs([experiment_id], f"tags.{search.TAG_SEARCH} = '{name}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    assert {"tune_summary.csv", "tune_summary.png"} <= {
        a.path for a in client.list_artifacts(parent)
    }
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    live = [c for c in children if "tune_superseded_by" not in c.data.tags]
    assert sorted(c.info.run_name for c in live) == sorted(f"trial-{t}" for t in final)
    assert [c.info.run_name for c in children].count(f"trial-{finished}") == 1
    for child in live:
        assert child.info.status in ("FINISHED", "KILLED")
        assert "val_score" in child.data.metrics and "val_l1" in child.data.metrics
        files = {a.path for a in client.list_artifacts(child.info.run_id, "best_checkpoint")}
        assert "best_checkpoint/train_state.pt" in files

    champion = client.get_model_version_by_alias("dfnet", "champion")
    assert champion.tags["tune_search"] == name
    assert champion.run_id in {c.info.run_id for c in live}
    assert float(champion.tags["metric.bpe"]) > 0
    summary = client.download_artifacts(parent, "tune_summary.csv", str(tmp_path))
    with open(summary) as f:
        assert sorted(r["trial_id"] for r in csv.DictReader(f)) == sorted(final)
