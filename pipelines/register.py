"""DVC stage `register`: put the trained model in the MLflow registry.

    python -m pipelines.register [--params params.yaml]

Logs `train.out_dir` as version N of `register.model_name` and moves `register.alias` to it when
its mean evaluation metric (`register.metric`, lower is better) beats the current champion's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import mlflow

from dfnet.model import read_model_config
from dfnet.params import load_params
from pipelines.registry import register_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    evaluation = json.loads((Path(params.evaluate.out_dir) / "eval.json").read_text())
    value = evaluation["dfnet"]["mean"][params.register.metric]

    mlflow.set_tracking_uri(params.mlflow.resolved_tracking_uri())
    mlflow.set_experiment(params.mlflow.experiment)
    training_run = read_model_config(params.train.out_dir)["provenance"].get("mlflow_run_id") or None
    registration = register_model(
        params.train.out_dir,
        params.register.model_name,
        params.register.alias,
        params.register.metric,
        value,
        run_id=training_run,
    )
    out = Path(params.evaluate.out_dir) / "register.json"
    out.write_text(json.dumps(dataclasses.asdict(registration), indent=2) + "\n")
    print(json.dumps(dataclasses.asdict(registration), indent=2))


if __name__ == "__main__":
    main()
