"""Ray Tune search over DFNet's loss weights and (p, q); every trial is the project's Ray Train run.

    python tune/search.py [--smoke] [--name NAME]
    ray job submit --working-dir . -- python tune/search.py [--smoke]    # on a `ray start` cluster

The space, trial counts and ASHA come from tune/search_space.yaml (`--smoke` merges its `smoke`
section), what each trial trains from params.yaml. Optuna's TPE proposes points, starting from
params.yaml's own, and ASHA stops poor trials on `val_<register.metric>`. The best trial's best
checkpoint is scored on the evaluate stage's test pairs and registered; the alias moves only if
it beats the champion. Rerunning the same command resumes; a new `--name` starts over.

A Ray job runs in an uploaded copy without the .gitignored data, runs and MLflow store, so the
project root is the current directory when it holds `data.out_dir`, else the editable install's
checkout: the project whose virtualenv `ray start` ran from.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import pandas as pd
import ray
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from ray import tune
from ray.train import Checkpoint, CheckpointConfig
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from dfnet.evaluation import LOWER_IS_BETTER, dfnet_method, evaluate_heldout, overall_mean
from dfnet.losses import load_vgg16_features
from dfnet.model import PRESETS, DFNet
from dfnet.params import Params, load_params, parse_params
from dfnet.storage import filesystem_for
from dfnet.training import export_model
from pipelines import ensure_ray
from pipelines.train import build_trainer, load_checkpoint_state
from tracking import registry

log = logging.getLogger("dfnet.tune")
SPACE_FILE = Path(__file__).with_name("search_space.yaml")
# (p, q) is one categorical of "p,q" strings: Tune samples keys independently, q <= p is joint.
PQ = "loss.pq"
REGISTERED_TAG = "tune_registered_version"  # on the parent run: a resumed search registers once


def project_root() -> Path:
    """Where params.yaml's relative paths point: see the module docstring."""
    cwd = Path.cwd()
    out_dir = load_params(cwd / "params.yaml").data.out_dir
    if "://" in out_dir or (cwd / out_dir).exists():
        return cwd
    # The installed distribution's record (a source tree on sys.path may hold a bare dfnet.egg-info).
    for dist in metadata.distributions(name="dfnet"):
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct_url.get("dir_info", {}).get("editable"):
            return Path(unquote(urlparse(direct_url["url"]).path))
    return cwd


def load_spec(smoke: bool = False) -> dict[str, Any]:
    """search_space.yaml; with `smoke`, its `smoke` section merged over the other sections."""
    spec = yaml.safe_load(SPACE_FILE.read_text())
    smoke_spec = spec.pop("smoke")
    for section, values in smoke_spec.items() if smoke else ():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


def pq_pairs(fusion_levels: int) -> list[str]:
    """Every valid (p, q) as "p,q": 1 <= q <= p <= fusion_levels (texture within structure)."""
    return [f"{p},{q}" for p in range(1, fusion_levels + 1) for q in range(1, p + 1)]


def value_of(params: Params, key: str) -> Any:
    """The value of search key `key` (`section.field`, or `loss.pq`) in `params`."""
    if key == PQ:
        return f"{params.loss.p},{params.loss.q}"
    section, _, field = key.partition(".")
    return getattr(getattr(params, section), field)


def build_space(space_spec: dict[str, dict[str, Any]], params: Params, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """Tune's param_space from search_space.yaml's `space` (keys `section.field` of params.yaml)."""
    kinds = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": lambda *c: tune.choice(list(c))}
    space: dict[str, Any] = {}
    for key, entry in space_spec.items():
        ((kind, args),) = entry.items()
        if key in drop:
            continue
        if key == PQ:
            space[key] = tune.choice(pq_pairs(params.model.fusion_levels or PRESETS[params.model.preset].fusion_levels))
            continue
        value_of(params, key)  # AttributeError for a key that is not a params.yaml field
        if kind not in kinds:
            raise ValueError(f"{key}: unknown kind {kind!r}; one of {sorted(kinds)} (or loss.pq: pq_pairs)")
        space[key] = kinds[kind](*args)
    return space


def with_hyperparameters(base: dict[str, Any], config: dict[str, Any]) -> Params:
    """Typed Params: `base` (a Params.to_dict()) with a trial's sampled values put in."""
    raw = copy.deepcopy(base)
    for key, value in config.items():
        section, _, field = key.partition(".")
        if key == PQ:
            raw["loss"]["p"], raw["loss"]["q"] = (int(v) for v in value.split(","))
        else:
            raw[section][field] = value
    return parse_params(raw)


def absolute_paths(params: Params) -> Params:
    """Pin params.yaml's relative paths to the current directory: trials run in Tune's folders."""

    def pin(path: str) -> str:
        return path if "://" in path else str(Path(path).resolve())

    params.data.out_dir, params.masks.out = pin(params.data.out_dir), pin(params.masks.out)
    params.train.storage_path = pin(params.train.storage_path)
    if params.train.init_from and Path(params.train.init_from).exists():
        params.train.init_from = pin(params.train.init_from)
    params.mlflow.tracking_uri = params.mlflow.resolved_tracking_uri()
    return params


def run_trial(
    config: dict[str, Any], base: dict[str, Any], extra_config: dict[str, Any], metric: str, mode: str
) -> None:
    """One trial: the project's Train run with the sampled values, its epochs reported to Tune."""
    trial_id = tune.get_context().get_trial_id()
    # Named after the trial, so a restored trial continues its own Train run.
    trainer = build_trainer(with_hyperparameters(base, config), {**extra_config, "name": f"trial-{trial_id}"})
    trainer.run_config.callbacks = [TuneReportCallback()]
    trainer.run_config.checkpoint_config = CheckpointConfig(
        num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode
    )
    trainer.fit()


def results_figure(frame: pd.DataFrame, metric: str, log_keys: list[str]) -> Figure:
    """Each trial's best `metric` against each hyperparameter."""
    keys = [c.removeprefix("config/") for c in frame.columns if c.startswith("config/")]
    fig = Figure(figsize=(3.2 * len(keys), 3.2), layout="tight")
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False, sharey=True)[0], keys):
        ax.scatter(frame[f"config/{key}"], frame[metric])  # "p,q" strings: a categorical axis
        ax.set_xlabel(key)
        if key in log_keys:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # crowded on ranges under a decade
    fig.axes[0].set_ylabel(f"best {metric}")
    return fig


def register_best(params: Params, checkpoint: Checkpoint, tags: dict[str, str]) -> registry.Registration:
    """Score the checkpoint on the fixed test pairs like the `evaluate` stage, then register it in
    its trial's MLflow run: the registry compares it with the champion on the same footing."""
    state = load_checkpoint_state(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_model(params, state, Path(tmp) / "model", extra=tags)
        methods = {"dfnet": dfnet_method(DFNet.from_pretrained(model_dir))}
        test = overall_mean(evaluate_heldout(params, methods).results["dfnet"])
        r, run_id = params.register, state["extra"].get("mlflow_run_id")
        registration = registry.register_model(model_dir, r.model_name, r.alias, r.metric, test[r.metric], run_id)
    for key, value in tags.items():
        mlflow.MlflowClient().set_model_version_tag(registration.name, registration.version, key, value)
    return registration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few-minute CPU search (search_space.yaml's smoke)")
    parser.add_argument("--name", help="experiment name (default dfnet-search[-smoke]); reuse it to resume")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = project_root()
    os.chdir(root)  # params.yaml's relative paths (data/, runs/, mlflow.db) are the project's
    spec = load_spec(args.smoke)
    search, asha = spec["search"], spec["asha"]
    params = absolute_paths(load_params("params.yaml", spec.get("params")))
    for needed in (params.data.out_dir, params.masks.out):
        if "://" not in needed and not Path(needed).exists():
            raise SystemExit(f"{needed} not found: run `dvc repro` in {root} first")
    metric = f"val_{params.register.metric}"
    mode = "min" if params.register.metric in LOWER_IS_BETTER else "max"
    name = args.name or ("dfnet-search-smoke" if args.smoke else "dfnet-search")
    fs, storage = filesystem_for(params.train.storage_path)
    base = params.to_dict()
    base["train"]["storage_path"] = f"{params.train.storage_path}/{name}"  # Train runs beside Tune's trials

    # Without VGG16 weights (texture_fallback off) λ_p and λ_s multiply nothing: not searched.
    inert = params.loss.texture_fallback == "off" and load_vgg16_features(params.loss.vgg_weights, "off")[0] is None
    drop = ("loss.perceptual", "loss.style") if inert and search["drop_inert_texture_weights"] else ()
    space = build_space(spec["space"], params, drop)
    baseline = {key: value_of(params, key) for key in space}
    first = [baseline] if search["baseline_first"] and all(space[k].is_valid(v) for k, v in baseline.items()) else []

    ensure_ray()
    threads = int(ray.cluster_resources()["CPU"]) // (search["max_concurrent"] * params.train.num_workers)
    tags = {"tune_search": name, "tune_experiment": base["train"]["storage_path"]}
    with registry.start_tagged_run(params.mlflow.tracking_uri, params.mlflow.experiment, name, tags) as parent:
        if not parent.data.params:
            mlflow.log_params({"metric": f"{metric} ({mode})", "dropped": ",".join(drop) or "-", **search, **asha})
        extra = {"parent_run_id": parent.info.run_id, "threads_per_worker": max(1, threads)}
        # The trial only waits on its Train run: it reserves no CPU (its workers do), only memory.
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=base, extra_config=extra, metric=metric, mode=mode),
            {"cpu": 0, "memory": 256 * 1024**2},
        )
        if tune.Tuner.can_restore(f"{storage}/{name}", storage_filesystem=fs):
            log.info("restoring %s/%s: finished trials are kept, unfinished ones continue", storage, name)
            tuner = tune.Tuner.restore(f"{storage}/{name}", trainable, resume_errored=True, storage_filesystem=fs)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode=mode,
                    search_alg=OptunaSearch(points_to_evaluate=first, seed=search["seed"]),
                    # A trial at its last epoch ends by itself, so its Train run shuts down cleanly.
                    scheduler=ASHAScheduler(max_t=params.train.epochs, stop_last_trials=False, **asha),
                    num_samples=search["num_samples"],
                    max_concurrent_trials=search["max_concurrent"],
                    time_budget_s=search["time_budget_s"],
                ),
                run_config=tune.RunConfig(name=name, storage_path=storage, storage_filesystem=fs),
            )
        results = tuner.fit()
        registry.end_child_runs(parent.info.run_id)  # trials ASHA stopped were killed mid-run
        frame = results.get_dataframe(filter_metric=metric, filter_mode=mode).sort_values(metric)
        mlflow.log_text(frame.to_csv(index=False), "tune_results.csv")
        log_keys = [key for key, entry in spec["space"].items() if "loguniform" in entry]
        mlflow.log_figure(results_figure(frame, metric, log_keys), "tune_results.png")
        print(frame[["trial_id", "training_iteration", metric, *frame.filter(like="config/")]].to_string(index=False))
        best = results.get_best_result(metric, mode, scope="all")
        epochs = best.metrics_dataframe.dropna(subset=[metric])
        row = epochs.loc[epochs[metric].idxmin() if mode == "min" else epochs[metric].idxmax()]
        mlflow.log_metric(f"best_{metric}", row[metric])
        registered = parent.data.tags.get(REGISTERED_TAG)
    if registered:
        print(f"this search already registered version {registered}")
        return 0
    params = with_hyperparameters(base, best.config)
    checkpoint = Checkpoint(row["checkpoint_path"], filesystem=fs)
    registration = register_best(params, checkpoint, {"tune_search": name, "tune_trial": str(row["trial_id"])})
    mlflow.MlflowClient().set_tag(parent.info.run_id, REGISTERED_TAG, registration.version)
    verdict = "now holds" if registration.promoted else "did not take"
    print(
        f"best trial {row['trial_id']}: {registration.name} v{registration.version} (test {registration.metric} "
        f"{registration.value:.4f}) {verdict} @{params.register.alias} (previous {registration.previous_champion})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
