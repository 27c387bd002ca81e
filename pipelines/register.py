"""DVC stage `register`: put the trained model in the MLflow registry.

    python -m pipelines.register [--params params.yaml]

Logs `train.out_dir` as version N of `register.model_name` and moves `register.alias` to it when
its evaluation metric (`register.metric`, the mean over every size and bin of eval.json) beats the
current champion's in that metric's direction: lower l1/BPE, higher PSNR/SSIM.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow

from dfnet.model import read_model_config
from pipelines import stage_params
from tracking.registry import register_model


def main(argv: list[str] | None = None) -> None:
    params = stage_params(__doc__, argv)
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
