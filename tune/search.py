"""Ray Tune search over DFNet's loss weights and (p, q); every trial is a Ray Train run.

    python tune/search.py [--smoke] [--num-samples N] [--max-concurrent K] [--time-budget-s S]
                          [--name NAME] [--root DIR] [--params params.yaml] [--storage PATH|s3://...]
                          [--set section.key=value ...]

As a Ray job (the working dir is uploaded, so `--root` points the job at the DVC stages' data,
the runs folder and the MLflow database of the checkout it was submitted from), run from the
project's virtualenv (the job's `python` is the one on the PATH `ray start` saw):

    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
    ray start --head --port=6379 --dashboard-host=127.0.0.1 --include-dashboard=true
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv", ".git", "data", "runs", "mlruns", "*.db"]}' \\
        -- python tune/search.py --smoke --root "$PWD"
    ray stop

Token authentication (Ray >= 2.59): `ray start` turns it on when a token exists (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, which any earlier `ray.init()` creates), and the `ray
job` CLI only sends the token when RAY_AUTH_MODE=token is set in its environment; the job and its
workers inherit both variables from `ray start`. On a trusted loopback-only machine,
RAY_AUTH_MODE=disabled for every command turns it off instead. The MLflow database is
`<root>/mlflow.db` (or MLFLOW_TRACKING_URI, e.g. passed in the runtime env's `env_vars`), so the
job and the user's shell see the same runs.

Design (kept thin: the model, losses, data, training loop and registry come from `dfnet/` and
`pipelines/`):

* Train inside Tune, the Ray Train V2 pattern: each Tune trial runs `run_trial`, a small driver
  that builds the project's `TorchTrainer` (`pipelines.train.build_trainer`) for its
  hyperparameters and calls `fit()`. A Train `UserCallback` (`ReportToTune`, built on
  `ray.tune.integration.ray_train.TuneReportCallback`) forwards every epoch's validation metrics
  from the Train controller to Tune, so ASHA can stop bad trials after any epoch.
* The search space is declared in `tune/search_space.yaml` (log-uniform ranges around the
  paper's weights, a categorical over the valid (p, q) pairs of the model preset); Optuna's TPE
  proposes the points, the first one being params.yaml's own values (the baseline).
* Metric: `val_score` = val ℓ1 + val BPE (see `val_score`).
* MLflow: one parent run per search, one child run per trial (the training loop's own run,
  tagged `mlflow.parentRunId`; it holds the parameters and the metric curves, and gets the
  trial's best checkpoint as the artifact `best_checkpoint`). At the end the best trial's model
  is evaluated on the fixed test pairs like the DVC `evaluate` stage and registered as
  `register.model_name` (`dfnet`); the alias (`champion`) moves only if its `register.metric`
  (mean test BPE, the DVC `register` stage's metric) beats the current champion's. A summary
  table (CSV) and a plot of the score against each hyperparameter go to the parent run.
* Resumable: rerunning the same command (same `--name` and storage) restores the experiment with
  `Tuner.restore`: finished trials are kept as they are, unfinished ones continue (their Train run
  resumes from its last checkpoint, their MLflow run continues).
* Storage: Tune's experiment and the trials' Train runs live under `<storage>/<name>/`
  (`train.storage_path` by default: a local folder or `s3://bucket/prefix`, as for training).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python tune/search.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import yaml  # noqa: E402

log = logging.getLogger("dfnet.tune")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPACE = Path(__file__).resolve().parent / "search_space.yaml"
METRIC = "val_score"
MODE = "min"
TIME_ATTR = "epochs_done"  # ASHA's clock: epochs completed, continuous across Train restarts
PQ_KEY = "loss.pq"
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes reserved per trial driver (it holds no model)
BEST_FILE = "best.json"
TRIAL_RUN_PREFIX = "trial-"
# MLflow tags of the parent run (no dots: they would need backticks in search filters).
TAG_SEARCH = "tune_search"
TAG_EXPERIMENT = "tune_experiment_path"
TAG_REGISTERED = "tune_registered_version"


# --------------------------------------------------------------------------- metric


def val_score(metrics: Mapping[str, Any]) -> float:
    """The search's metric (lower is better): validation ℓ1 + validation BPE, both in percent.

    Why this and not ℓ1 alone: the search moves loss *weights*, so training losses of different
    trials are not comparable; the validation metrics are. ℓ1 over the completed image rewards
    overall fidelity, but a blurry, structure-only model already scores well on it; BPE (error in
    a thin band inside the hole boundary) measures the seams that DFNet's fusion blocks exist to
    remove. Both are mean absolute errors in percent of the [0, 1] range on the same fixed
    validation pairs, so their sum needs no weighting to be meaningful. ℓ1 is averaged over the
    whole image (known pixels included) and BPE over the band only, so BPE usually dominates the
    sum: intended, the seams are what the fusion weights and (p, q) change most, while ℓ1 keeps
    the rest of the hole honest. A missing/NaN value scores +inf so such a trial never wins.
    """
    value = float(metrics["val_l1"]) + float(metrics["val_bpe"])
    return value if math.isfinite(value) else math.inf


# --------------------------------------------------------------------------- search space


def pq_pairs(fusion_levels: int) -> list[str]:
    """Every valid (p, q) as "p,q": 1 <= q <= p <= fusion_levels (texture within structure)."""
    if fusion_levels < 1:
        raise ValueError(f"fusion_levels must be >= 1, got {fusion_levels}")
    return [f"{p},{q}" for p in range(1, fusion_levels + 1) for q in range(1, p + 1)]


def parse_pq(value: str) -> tuple[int, int]:
    p, q = (int(v) for v in str(value).split(","))
    return p, q


def load_spec(path: str | Path = DEFAULT_SPACE, smoke: bool = False) -> dict[str, Any]:
    """search_space.yaml as a dict; with `smoke`, its `smoke` section merged over the others."""
    spec = yaml.safe_load(Path(path).read_text()) or {}
    smoke_section = spec.pop("smoke", {}) or {}
    spec.setdefault("params", {})
    for section in ("space", "search", "asha", "params"):
        spec.setdefault(section, {})
    if smoke:
        for section, values in smoke_section.items():
            if section == "params":
                for name, fields in values.items():
                    spec["params"].setdefault(name, {}).update(fields)
            else:
                spec.setdefault(section, {}).update(values)
    return spec


def _fusion_levels(preset: str) -> int:
    from dfnet.model import PRESETS

    return PRESETS[preset].fusion_levels


def inert_texture_weights(params: Any) -> bool:
    """True when λ_p and λ_s multiply nothing: no ImageNet VGG16 weights, texture_fallback off."""
    if params.loss.texture_fallback != "off":
        return False
    from dfnet.losses import load_vgg16_features

    vgg, _ = load_vgg16_features(params.loss.vgg_weights, "off")
    return vgg is None


def build_space(
    space_spec: Mapping[str, Mapping[str, Any]], params: Any, drop_keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Tune's param_space from the YAML entries (keys `section.field`; `loss.pq` special)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, entry in space_spec.items():
        if key in drop_keys:
            continue
        if len(entry) != 1:
            raise ValueError(f"search space entry {key}: expected one kind, got {dict(entry)}")
        ((kind, args),) = entry.items()
        if key == PQ_KEY:
            if kind != "pq_pairs":
                raise ValueError(f"{PQ_KEY} must be {{pq_pairs: fusion_levels}}, got {kind}")
            levels = _fusion_levels(params.model.preset) if args == "fusion_levels" else int(args)
            space[key] = tune.choice(pq_pairs(levels))
            continue
        section, _, field = key.partition(".")
        if not hasattr(getattr(params, section, None), field):
            raise ValueError(f"search space key {key!r} is not a params.yaml field")
        if kind == "loguniform":
            low, high = (float(a) for a in args)
            if not 0 < low < high:
                raise ValueError(f"{key}: loguniform needs 0 < low < high, got {args}")
            space[key] = tune.loguniform(low, high)
        elif kind == "uniform":
            space[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "choice":
            space[key] = tune.choice(list(args))
        else:
            raise ValueError(
                f"{key}: unknown kind {kind!r} (loguniform, uniform, choice, pq_pairs)"
            )
    return space


def baseline_point(space: Mapping[str, Any], params: Any) -> dict[str, Any] | None:
    """params.yaml's own values as a point of `space`, or None if one lies outside it."""
    point: dict[str, Any] = {}
    for key, domain in space.items():
        if key == PQ_KEY:
            value: Any = f"{params.loss.p},{params.loss.q}"
            if value not in domain.categories:
                return None
        else:
            section, _, field = key.partition(".")
            value = getattr(getattr(params, section), field)
            categories = getattr(domain, "categories", None)
            if categories is not None:
                if value not in categories:
                    return None
            elif not domain.lower <= value <= domain.upper:
                return None
        point[key] = value
    return point


def apply_hyperparameters(base: Mapping[str, Any], config: Mapping[str, Any]) -> Any:
    """Typed Params: `base` (a Params.to_dict()) with a trial's sampled values put in."""
    from dfnet.params import parse_params

    raw = copy.deepcopy(dict(base))
    for key, value in config.items():
        if key == PQ_KEY:
            raw["loss"]["p"], raw["loss"]["q"] = parse_pq(value)
        else:
            section, _, field = key.partition(".")
            raw[section][field] = value
    return parse_params(raw)


# --------------------------------------------------------------------------- paths


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _rooted(path: str, root: Path) -> str:
    return path if "://" in path or Path(path).is_absolute() else str(root / path)


def root_params(params: Any, root: Path) -> Any:
    """Resolve params.yaml's relative paths against `root`, not the current directory.

    Tune trials run in their own trial directories and a Ray job in a copy of the working dir,
    so every path a trial reads or writes must be absolute. The MLflow SQLite database gets the
    same treatment (unless MLFLOW_TRACKING_URI is set, which wins everywhere).
    """
    params.data.out_dir = _rooted(params.data.out_dir, root)
    params.masks.out = _rooted(params.masks.out, root)
    params.train.storage_path = _rooted(params.train.storage_path, root)
    params.train.out_dir = _rooted(params.train.out_dir, root)
    prefix = "sqlite:///"
    uri = params.mlflow.tracking_uri
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        params.mlflow.tracking_uri = prefix + str(root / uri[len(prefix) :])
    return params


# --------------------------------------------------------------------------- best checkpoint


def read_best(best_uri: str) -> dict[str, Any] | None:
    """The record of a trial's best checkpoint copy (written last, so a copy it names is whole)."""
    from dfnet.data import filesystem_for

    fs, root = filesystem_for(best_uri)
    try:
        with fs.open_input_stream(_join(root, BEST_FILE)) as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError):
        return None


def save_best(checkpoint: Any, best_uri: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Copy `checkpoint` to `<best_uri>/epoch_NNNN`, point best.json at it, drop older copies.

    Train keeps only the latest checkpoints (`num_to_keep`), which need not include the best
    one, so the trial keeps its own copy of the best. No directory renames: S3 has none.
    """
    from dfnet.data import filesystem_for

    fs, root = filesystem_for(best_uri)
    name = f"epoch_{int(metrics['epoch']):04d}"
    target = _join(root, name)
    fs.create_dir(target, recursive=True)
    pafs.copy_files(
        checkpoint.path,
        target,
        source_filesystem=checkpoint.filesystem,
        destination_filesystem=fs,
    )
    record = {
        "checkpoint": name,
        "epoch": int(metrics["epoch"]),
        "step": int(metrics["step"]),
        METRIC: float(metrics[METRIC]),
        "val_l1": float(metrics["val_l1"]),
        "val_bpe": float(metrics["val_bpe"]),
    }
    with fs.open_output_stream(_join(root, BEST_FILE)) as f:
        f.write(json.dumps(record).encode())
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type == pafs.FileType.Directory and info.base_name != name:
            fs.delete_dir(info.path)
    return record


# The callback subclasses Ray's TuneReportCallback, whose constructor needs a Tune session: it
# is created inside the trial and pickled to the Train controller, where `after_report` runs.
def _report_callback_class() -> type:
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        """Forward rank 0's epoch metrics (+ val_score, epochs_done) to Tune; keep the best copy."""

        def __init__(self, best_uri: str) -> None:
            super().__init__()
            self.best_uri = best_uri
            # A restarted trial continues its Train run: remember the best it already has.
            self.best = read_best(best_uri)

        def after_report(
            self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
        ) -> None:
            first = dict(metrics[0])
            first[METRIC] = val_score(first)
            first[TIME_ATTR] = int(first["epoch"]) + 1
            if checkpoint is not None and (self.best is None or first[METRIC] < self.best[METRIC]):
                self.best = save_best(checkpoint, self.best_uri, first)
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ReportToTune


# --------------------------------------------------------------------------- the trial


@dataclass
class SearchContext:
    """What every trial needs besides its hyperparameters (all absolute paths / URIs)."""

    name: str
    parent_run_id: str
    tracking_uri: str
    train_storage: str  # the trials' Train runs: <storage>/<name>/train/trial-<id>
    best_root: str  # the trials' best checkpoints: <storage>/<name>/best/<trial id>
    threads_per_worker: int


def run_trial(config: dict[str, Any], base: dict[str, Any], context: SearchContext) -> None:
    """One Tune trial: the project's TorchTrainer for `config`, metrics forwarded per epoch."""
    from ray import tune

    from pipelines.train import build_trainer

    trial_id = tune.get_context().get_trial_id()
    params = apply_hyperparameters(base, config)
    params.train.storage_path = context.train_storage
    trainer = build_trainer(
        params,
        extra_config={
            # Named after the trial (not the params hash): a restored trial finds its Train run.
            "name": TRIAL_RUN_PREFIX + trial_id,
            "parent_run_id": context.parent_run_id,
            "tracking_uri": context.tracking_uri,
            "threads_per_worker": context.threads_per_worker,
        },
    )
    callback = _report_callback_class()(_join(context.best_root, trial_id))
    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), callback]
    trainer.fit()


# --------------------------------------------------------------------------- MLflow


def parent_run(
    client: Any, experiment_id: str, name: str, experiment_path: str, info: dict, fresh: bool
) -> str:
    """The search's parent run: the existing one for this experiment path (resume), else new."""
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.{TAG_SEARCH} = '{name}' and tags.{TAG_EXPERIMENT} = '{experiment_path}'"
        ),
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found and fresh:  # keep the old run, but never resume into it
        client.set_tag(found[0].info.run_id, TAG_EXPERIMENT, f"{experiment_path} (replaced)")
        found = []
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(
        experiment_id, run_name=name, tags={TAG_SEARCH: name, TAG_EXPERIMENT: experiment_path}
    )
    client.log_batch(run.info.run_id, params=_mlflow_params(info))
    return run.info.run_id


def _mlflow_params(info: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in info.items()]


def child_runs(client: Any, experiment_id: str, parent_id: str) -> dict[str, list[Any]]:
    """{trial run name: [runs, newest first]} of the parent's children."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        max_results=5000,
        order_by=["attributes.start_time DESC"],
    )
    grouped: dict[str, list[Any]] = {}
    for run in runs:
        grouped.setdefault(run.data.tags.get("mlflow.runName", ""), []).append(run)
    return grouped


# --------------------------------------------------------------------------- summary


@dataclass
class TrialSummary:
    trial_id: str
    status: str  # completed | stopped (ASHA or time budget) | error | not started
    epochs: int
    config: dict[str, Any]
    best: dict[str, Any] | None  # best.json
    last_score: float
    curve: list[tuple[int, float]]  # (step, val_score) per reported epoch
    run_id: str = ""


def summarize(results: Any, epochs: int, best_root: str) -> list[TrialSummary]:
    """One row per trial of a ResultGrid, best first."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        curve: list[tuple[int, float]] = []
        if frame is not None and METRIC in frame:
            frame = frame.dropna(subset=[METRIC])
            curve = [(int(s), float(v)) for s, v in zip(frame["step"], frame[METRIC])]
        done = int((result.metrics or {}).get(TIME_ATTR, 0) or 0)
        status = "error" if result.error else ("completed" if done >= epochs else "stopped")
        if not curve and not result.error:
            status = "not started"
        rows.append(
            TrialSummary(
                trial_id=trial_id,
                status=status,
                epochs=done,
                config=dict(result.config or {}),
                best=read_best(_join(best_root, trial_id)),
                last_score=curve[-1][1] if curve else math.inf,
                curve=curve,
            )
        )
    return sorted(rows, key=lambda r: r.best[METRIC] if r.best else math.inf)


def write_summary(
    rows: list[TrialSummary],
    space_keys: list[str],
    out_dir: Path,
    space: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """tune_summary.csv (one row per trial) and tune_summary.png (score vs each hyperparameter,
    over the hyperparameter's whole search range when `space`, Tune's param_space, is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "tune_summary.csv"
    header = ["trial_id", "status", "epochs", *space_keys, "best_epoch", METRIC, "val_l1"]
    header += ["val_bpe", f"last_{METRIC}", "mlflow_run_id"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            best = r.best or {}
            writer.writerow(
                [r.trial_id, r.status, r.epochs, *(r.config.get(k, "") for k in space_keys)]
                + [best.get(k, "") for k in ("epoch", METRIC, "val_l1", "val_bpe")]
                + [r.last_score, r.run_id]
            )

    png_path = out_dir / "tune_summary.png"
    scored = [r for r in rows if r.best]
    fig, axes = plt.subplots(
        1, max(1, len(space_keys)), figsize=(3.2 * max(1, len(space_keys)), 3.2)
    )
    axes = np.atleast_1d(axes)
    colors = {"completed": "tab:blue", "stopped": "tab:orange", "error": "tab:red"}
    for ax, key in zip(axes, space_keys):
        values = [r.config.get(key) for r in scored]
        scores = [r.best[METRIC] for r in scored]  # type: ignore[index]
        if key == PQ_KEY or any(isinstance(v, str) for v in values):
            labels = sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=45)
        else:
            xs = [float(v) for v in values]
            domain = (space or {}).get(key)
            if domain is None or "Log" in type(getattr(domain, "sampler", None)).__name__:
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())  # crowded on narrow ranges
            if hasattr(domain, "lower"):
                ax.set_xlim(domain.lower, domain.upper)
        ax.scatter(xs, scores, c=[colors.get(r.status, "gray") for r in scored])
        if scored:
            ax.scatter(xs[:1], scores[:1], s=160, facecolors="none", edgecolors="black")
        ax.set(xlabel=key, title=key)
    axes[0].set_ylabel(f"best {METRIC} (val ℓ1 + BPE, %)")
    statuses = sorted({r.status for r in scored})
    handles = [
        Line2D([], [], marker="o", ls="", color=colors.get(status, "gray"), label=status)
        for status in statuses
    ]
    handles.append(Line2D([], [], marker="o", ls="", mfc="none", mec="black", ms=12, label="best"))
    if scored:
        axes[-1].legend(handles=handles, fontsize="small")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path


def format_table(rows: list[TrialSummary], space_keys: list[str]) -> str:
    """A Markdown table of the trials (what the search prints at the end)."""
    head = ["trial", "status", "epochs", *space_keys, METRIC, "val_l1", "val_bpe"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        best = r.best or {}
        cells = [r.trial_id, r.status, str(r.epochs)]
        cells += [_fmt(r.config.get(k)) for k in space_keys]
        cells += [_fmt(best.get(METRIC)), _fmt(best.get("val_l1")), _fmt(best.get("val_bpe"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


# --------------------------------------------------------------------------- end of search


def _local_copy(uri: str, tmp: Path) -> Path:
    """A local directory with the contents of `uri` (itself when it is local)."""
    if "://" not in uri:
        return Path(uri)
    from dfnet.data import filesystem_for

    fs, path = filesystem_for(uri)
    target = tmp / Path(path).name
    target.mkdir(parents=True, exist_ok=True)  # the local filesystem does not create parents
    pafs.copy_files(
        path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )
    return target


def finalize_children(
    client: Any, experiment_id: str, parent_id: str, rows: list[TrialSummary], best_root: str
) -> None:
    """Tag each trial's child run, add its val_score curve and best checkpoint, close it.

    Trials stopped by ASHA are killed mid-run, so their training loop never ends its MLflow run;
    a run orphaned by an interruption before the trial's first checkpoint is superseded by the
    newer run of the same trial.
    """
    from mlflow.entities import Metric

    grouped = child_runs(client, experiment_id, parent_id)
    status_of = {"completed": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
    for row in rows:
        runs = grouped.get(TRIAL_RUN_PREFIX + row.trial_id, [])
        if not runs:
            continue
        live, *orphans = runs
        row.run_id = live.info.run_id
        for orphan in orphans:
            if orphan.info.status == "RUNNING":
                client.set_tag(orphan.info.run_id, "tune_superseded_by", row.run_id)
                client.set_terminated(orphan.info.run_id, status="KILLED")
        client.set_tag(row.run_id, "tune_trial_id", row.trial_id)
        client.set_tag(row.run_id, "tune_status", row.status)
        if row.curve and METRIC not in live.data.metrics:
            now = int(time.time() * 1000)
            client.log_batch(row.run_id, metrics=[Metric(METRIC, v, now, s) for s, v in row.curve])
        if row.best and live.data.tags.get("tune_best_checkpoint") != row.best["checkpoint"]:
            with tempfile.TemporaryDirectory() as tmp:
                source = _local_copy(
                    _join(best_root, row.trial_id, row.best["checkpoint"]), Path(tmp)
                )
                client.log_artifacts(row.run_id, str(source), artifact_path="best_checkpoint")
            client.log_metric(row.run_id, f"best_{METRIC}", row.best[METRIC])
            client.set_tag(row.run_id, "tune_best_checkpoint", row.best["checkpoint"])
        if live.info.status == "RUNNING" and row.status in status_of:
            client.set_terminated(row.run_id, status=status_of[row.status])


def register_best(
    client: Any, row: TrialSummary, base: dict[str, Any], context: SearchContext
) -> dict[str, Any]:
    """Export the best trial's best checkpoint, score it on the whole test photos, register it.

    The registry compares versions on `register.metric` (its mean over the sizes and hole-ratio
    bins of the fixed whole-photo test pairs, as the DVC `evaluate`/`register` stages do), never on
    `val_score`: a tuned model then competes with a pipeline-trained champion on the same footing.
    """
    import ray.train

    from dfnet.evaluation import dfnet_method
    from dfnet.model import DFNet
    from dfnet.training import export_model
    from pipelines.evaluate import evaluate_heldout, overall_mean
    from pipelines.train import load_checkpoint_state
    from tracking.registry import register_model

    assert row.best is not None
    params = apply_hyperparameters(base, row.config)
    uri = _join(context.best_root, row.trial_id, row.best["checkpoint"])
    with tempfile.TemporaryDirectory() as tmp:
        state = load_checkpoint_state(ray.train.Checkpoint.from_directory(str(_local_copy(uri, Path(tmp)))))
        extra = {"tune_search": context.name, "tune_trial": row.trial_id, METRIC: row.best[METRIC]}
        model_dir = export_model(params, state, Path(tmp) / "model", extra=extra)
        model = DFNet.from_pretrained(model_dir)
        test = overall_mean(evaluate_heldout(params, {"dfnet": dfnet_method(model)}).results["dfnet"])
        metric = params.register.metric
        registration = register_model(
            model_dir,
            params.register.model_name,
            params.register.alias,
            metric,
            test[metric],
            run_id=row.run_id or None,
        )
    for key, value in {"tune_search": context.name, "tune_trial_id": row.trial_id}.items():
        client.set_model_version_tag(registration.name, registration.version, key, value)
    client.set_model_version_tag(
        registration.name, registration.version, METRIC, str(row.best[METRIC])
    )
    return {"test": test, **registration.__dict__}


# --------------------------------------------------------------------------- main


def _start_local_ray() -> None:
    """Start a local Ray whose workers can import the project and find this cluster's API.

    Workers inherit this process's environment. PYTHONPATH: the trial function lives in
    `tune.search`. RAY_API_SERVER_ADDRESS: Ray Train's placement-group cleaner (which frees the
    Train workers' CPUs when Tune stops a trial early) looks the cluster up through it, and
    without it guesses, which fails when another Ray runs on the same machine.
    """
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # "local": a new instance, never a `ray start` cluster that happens to run on this machine.
    ray.init(
        address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port
    )


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set expects section.key=value, got {item!r}")
        overrides.setdefault(section, {})[field] = yaml.safe_load(value)
    return overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a few-minute CPU search (2 tiny trials)"
    )
    parser.add_argument("--num-samples", type=int, help="trials (default: search_space.yaml)")
    parser.add_argument("--max-concurrent", type=int, help="trials at a time")
    parser.add_argument("--time-budget-s", type=float, help="wall-clock budget of the search")
    parser.add_argument(
        "--name", help="experiment name (default dfnet-search[-smoke]); reuse it to resume"
    )
    parser.add_argument(
        "--root",
        default=".",
        help="project root that params.yaml's relative paths (data, runs, mlflow.db) are resolved"
        " against; a Ray job must pass the submitting checkout's absolute path",
    )
    parser.add_argument("--params", default=None, help="params.yaml (default: <root>/params.yaml)")
    parser.add_argument("--space", default=str(DEFAULT_SPACE), help="the search space YAML")
    parser.add_argument(
        "--storage", help="where Tune/Train results go (default train.storage_path)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a params.yaml value for every trial (repeatable)",
    )
    parser.add_argument(
        "--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)"
    )
    parser.add_argument("--no-register", action="store_true", help="skip the registry step")
    parser.add_argument(
        "--fresh", action="store_true", help="discard an earlier search of this name, start over"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    start = time.perf_counter()

    import mlflow
    import ray
    from mlflow import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from dfnet.data import filesystem_for
    from dfnet.params import load_params

    root = Path(args.root).resolve()
    spec = load_spec(args.space, smoke=args.smoke)
    overrides = copy.deepcopy(spec["params"])
    for section, values in _parse_set(args.set).items():
        overrides.setdefault(section, {}).update(values)
    params = root_params(load_params(args.params or root / "params.yaml", overrides), root)
    for needed in (Path(params.data.out_dir) / "train", Path(params.masks.out)):
        if "://" not in str(needed) and not needed.exists():
            raise SystemExit(f"{needed} not found: run `dvc repro masks` first, or pass --root")
    search = spec["search"]
    num_samples = args.num_samples or int(search.get("num_samples", 8))
    max_concurrent = args.max_concurrent or int(search.get("max_concurrent", 1))
    time_budget = args.time_budget_s or search.get("time_budget_s")
    name = args.name or ("dfnet-search-smoke" if args.smoke else "dfnet-search")
    storage = _rooted(args.storage, root) if args.storage else params.train.storage_path
    experiment_uri = _join(storage, name)

    dropped: tuple[str, ...] = ()
    if search.get("drop_inert_texture_weights", True) and inert_texture_weights(params):
        dropped = ("loss.perceptual", "loss.style")
        log.warning(
            "no VGG16 weights and texture_fallback=off: not searching %s", ", ".join(dropped)
        )
    space = build_space(spec["space"], params, drop_keys=dropped)
    space_keys = list(space)
    baseline = baseline_point(space, params) if search.get("baseline_first", True) else None

    if not ray.is_initialized():
        if args.address is None and "RAY_ADDRESS" not in os.environ:
            _start_local_ray()
        else:
            ray.init(address=args.address)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if max_concurrent * params.train.num_workers >= cpus:
        log.warning(
            "%d concurrent trial(s) x %d worker(s) take all %d CPUs: none left for Ray Data reads",
            max_concurrent,
            params.train.num_workers,
            cpus,
        )

    tracking_uri = params.mlflow.resolved_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    from tracking.registry import ensure_experiment

    experiment_id = ensure_experiment(tracking_uri, params.mlflow.experiment)
    info = {
        "metric": f"{METRIC} ({MODE}) = val_l1 + val_bpe",
        "space": json.dumps({k: str(v) for k, v in space.items()}),
        "dropped": ",".join(dropped) or "-",
        "num_samples": num_samples,
        "max_concurrent": max_concurrent,
        "time_budget_s": time_budget,
        "asha": json.dumps(spec["asha"]),
        "search_alg": f"optuna TPE seed={search.get('seed', 0)}",
        "smoke": args.smoke,
        "experiment_path": experiment_uri,
        **{f"base.{s}.{k}": v for s, values in overrides.items() for k, v in values.items()},
    }
    fs, fs_path = filesystem_for(storage) if "://" in storage else (None, storage)
    experiment_path = _join(fs_path, name)
    if args.fresh:
        _delete_dir(fs or pafs.LocalFileSystem(), experiment_path)
    parent_id = parent_run(client, experiment_id, name, experiment_uri, info, args.fresh)
    log.info(
        "search %s: %s, MLflow %s (parent run %s)", name, experiment_uri, tracking_uri, parent_id
    )

    context = SearchContext(
        name=name,
        parent_run_id=parent_id,
        tracking_uri=tracking_uri,
        train_storage=_join(experiment_uri, "train"),
        best_root=_join(experiment_uri, "best"),
        threads_per_worker=max(1, cpus // max(1, max_concurrent * params.train.num_workers)),
    )
    base = params.to_dict()
    # The trial driver only waits on its Train run: it reserves no CPU (even a fraction would
    # keep a whole-CPU Ray Data read task from ever being scheduled on a small machine), only
    # memory for its own footprint. Concurrency is bounded by max_concurrent_trials instead.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, context=context),
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
        log.info("restoring %s: finished trials are kept, unfinished ones continue", experiment_uri)
        tuner = tune.Tuner.restore(
            experiment_path,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=OptunaSearch(
                    points_to_evaluate=[baseline] if baseline else None,
                    seed=int(search.get("seed", 0)),
                ),
                scheduler=ASHAScheduler(
                    time_attr=TIME_ATTR,
                    max_t=params.train.epochs,
                    grace_period=int(spec["asha"].get("grace_period", 1)),
                    reduction_factor=float(spec["asha"].get("reduction_factor", 2)),
                    # A trial that reached the last epoch ends by itself, so its Train run
                    # shuts down cleanly instead of being killed at its final report.
                    stop_last_trials=False,
                ),
                num_samples=num_samples,
                max_concurrent_trials=max_concurrent,
                time_budget_s=time_budget,
            ),
            run_config=tune.RunConfig(name=name, storage_path=fs_path, storage_filesystem=fs),
        )
    results = tuner.fit()

    rows = summarize(results, params.train.epochs, context.best_root)
    finalize_children(client, experiment_id, parent_id, rows, context.best_root)
    table = format_table(rows, space_keys)
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_summary(rows, space_keys, Path(tmp), space):
            client.log_artifact(parent_id, str(path))
            if "://" not in storage:  # also beside the experiment, for a look without MLflow
                Path(experiment_uri, path.name).write_bytes(path.read_bytes())
    client.set_tag(parent_id, "tune_trials", str(len(rows)))

    outcome: dict[str, Any] = {}
    best = next((r for r in rows if r.best), None)
    if best is not None:
        client.set_tag(parent_id, "tune_best_trial", best.trial_id)
        client.log_metric(parent_id, f"best_{METRIC}", best.best[METRIC])  # type: ignore[index]
        already = client.get_run(parent_id).data.tags.get(TAG_REGISTERED)
        if args.no_register:
            log.info("--no-register: the best model is not registered")
        elif already:
            log.info("this search already registered version %s", already)
        else:
            outcome = register_best(client, best, base, context)
            if best.status == "stopped":  # registering reopened (and so finished) the trial's run
                client.set_terminated(best.run_id, status="KILLED")
            client.set_tag(parent_id, TAG_REGISTERED, outcome["version"])
            client.log_metric(parent_id, f"best_test_{outcome['metric']}", outcome["value"])
    client.set_terminated(parent_id, status="FINISHED")

    print(
        f"\nsearch {name}: {len(rows)} trials in {time.perf_counter() - start:.0f} s "
        f"(metric {METRIC} = val_l1 + val_bpe, lower is better)\n{table}"
    )
    if outcome and best is not None:
        verdict = "now holds" if outcome["promoted"] else "did not take"
        print(
            f"\nbest trial {best.trial_id}: registered {outcome['name']} v{outcome['version']} "
            f"(test {outcome['metric']}={outcome['value']:.4f}); "
            f"it {verdict} @{params.register.alias} (previous {outcome['previous_champion']})"
        )
    return 0 if best is not None else 1


if __name__ == "__main__":
    # Import the module under its package name, so Ray pickles the trial function by reference.
    from tune.search import main as _main

    sys.exit(_main())
