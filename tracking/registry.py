"""DFNet models in the MLflow Model Registry.

A registered version is an MLflow pyfunc whose artifact is the model directory, so it loads
either through `mlflow.pyfunc.load_model` or as a directory (`download_registered_model`). Each
version carries its evaluation metric as a tag; the alias moves only to a better one
(`dfnet.evaluation.better`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dfnet.evaluation import better

log = logging.getLogger("dfnet.registry")
ARTIFACT_KEY = "model_dir"
METRIC_TAG_PREFIX = "metric."


class DFNetPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc input: {"image": N×H×W×3 uint8, "mask": N×H×W uint8 (white = hole)} → N×H×W×3 uint8."""

    def load_context(self, context: Any) -> None:
        from dfnet.inpaint import Inpainter

        self.inpainter = Inpainter.from_pretrained(context.artifacts[ARTIFACT_KEY])

    # model_input is left unannotated: MLflow turns predict's type hints into a schema it enforces.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        images, masks = model_input["image"], model_input["mask"]
        out = self.inpainter.inpaint_batch(list(images), list(masks), mask_convention="hole-white")
        return np.stack([np.asarray(o) for o in out])


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """The experiment's id, creating it with a SQLite store's artifacts beside the database file.

    Created by a Ray worker instead, its artifact root would be relative to the worker's working
    directory, a temporary Ray session folder.
    """
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent trial
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_tagged_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> mlflow.ActiveRun:
    """Resume the run of `experiment` that carries `tags`, or start one with them: a resumed job
    (e.g. a restored Tune search) logs into its earlier run, as the parent of its child runs."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.set_experiment(experiment_id=ensure_experiment(tracking_uri, experiment)).experiment_id
    query = " and ".join(f"tags.{key} = '{value}'" for key, value in tags.items())
    found = mlflow.search_runs([experiment_id], query, max_results=1, output_format="list")
    if found:
        return mlflow.start_run(run_id=found[0].info.run_id)
    return mlflow.start_run(run_name=run_name, tags=tags)


def end_child_runs(parent_run_id: str, status: str = "KILLED") -> None:
    """Mark the parent's child runs that are still RUNNING as `status`: their process was killed
    (a Tune trial stopped early), so they never ended themselves."""
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    running = f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], running, max_results=10000):
        client.set_terminated(run.info.run_id, status=status)


@dataclass
class Registration:
    name: str
    version: str
    promoted: bool
    metric: str
    value: float
    previous_champion: float | None


def register_model(
    model_dir: str | Path,
    name: str,
    alias: str,
    metric: str,
    value: float,
    run_id: str | None = None,
) -> Registration:
    """Log `model_dir` as a pyfunc, register it as a new version of `name`, and point `alias`
    at it when `value` beats the current holder of the alias (or there is none) on `metric`,
    compared in that metric's direction.

    Logs into `run_id` if given, else into the active run, else a new run.
    """
    client = MlflowClient()
    context = mlflow.start_run(run_id=run_id) if run_id or not mlflow.active_run() else contextlib.nullcontext()
    with context:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=DFNetPyfunc(),
            artifacts={ARTIFACT_KEY: str(model_dir)},
            # Named, not inferred: MLflow's inference loads the model in a slow subprocess.
            pip_requirements=["dfnet", f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
        mlflow.log_metric(f"registered_{metric}", value)
    version = mlflow.register_model(info.model_uri, name).version
    client.set_model_version_tag(name, version, METRIC_TAG_PREFIX + metric, str(value))

    previous = champion_metric(name, alias, metric)
    promoted = previous is None or better(metric, value, previous)
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    log.info(
        "registered %s version %s (%s=%.4f); %s %s",
        name,
        version,
        metric,
        value,
        "now" if promoted else "not",
        f"@{alias} (previous {previous})",
    )
    return Registration(name, str(version), promoted, metric, value, previous)


def champion_metric(name: str, alias: str, metric: str) -> float | None:
    """The metric tag of the version that holds `alias`, or None if there is none."""
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    value = version.tags.get(METRIC_TAG_PREFIX + metric)
    return float(value) if value is not None and not math.isnan(float(value)) else None


def download_registered_model(uri: str, tracking_uri: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A local model directory for `models:/name@alias` or `models:/name/version`, and what it is."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    name, _, ref = uri.removeprefix("models:/").partition("@")
    if ref:
        version = client.get_model_version_by_alias(name, ref)
        info = {"name": name, "alias": ref}
    else:
        name, _, number = uri.removeprefix("models:/").partition("/")
        version = client.get_model_version(name, number)
        info = {"name": name}
    info.update({"version": version.version, "run_id": version.run_id, "tags": dict(version.tags)})
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}"))
    model_dir = local / "artifacts" / ARTIFACT_KEY
    if not (model_dir / "config.json").is_file():
        # pyfunc keeps an artifact under its own basename; find it rather than guess.
        candidates = [p.parent for p in local.rglob("config.json") if (p.parent / "model.safetensors").is_file()]
        if not candidates:
            raise FileNotFoundError(f"{uri} holds no DFNet model directory (looked in {local})")
        model_dir = candidates[0]
    return model_dir, info


def has_registered_model(uri: str, tracking_uri: str | None = None) -> bool:
    """Whether `models:/name@alias` (or `models:/name/version`) resolves in the registry at
    `tracking_uri`, else $MLFLOW_TRACKING_URI, else ./mlflow.db when that file exists: never
    creates a database, and any failure (no such model, no registry, unreachable) means no."""
    if not tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        if not Path("mlflow.db").is_file():
            return False
        tracking_uri = f"sqlite:///{Path('mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, _, alias = uri.removeprefix("models:/").partition("@")
    try:
        if alias:
            client.get_model_version_by_alias(name, alias)
        else:
            client.get_model_version(*name.split("/", 1))
        return True
    except Exception as exc:
        log.info("registry %s has no %s: %s", tracking_uri, uri, exc)
        return False
