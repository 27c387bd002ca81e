"""DVC stage entry points: `python -m pipelines.<stage> [--params params.yaml]`."""

from __future__ import annotations

import argparse
import logging
import os

from dfnet.params import Params, load_params


def stage_params(description: str, argv: list[str] | None = None) -> Params:
    """The command line every stage shares: `--params`, logging set up, params.yaml parsed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="path to params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_params(args.params)


# Ray's settings for the pipeline's driver and every worker of its jobs. Ray Data lists Parquet
# shards with a pool of footer-reading actors, a process each, 32 by default: the more shards,
# the more of them start, so a stage's memory grew with the data set. Our footers are tiny.
RAY_JOB_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}


def ensure_ray() -> None:
    """Connect to Ray unless connected: the cluster named by ``RAY_ADDRESS`` or started with
    ``ray start``, else a local instance; usage stats off unless the user turned them on."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.update(RAY_JOB_ENV)  # read where Ray Data plans a read, and where it lists
        ray.init(runtime_env={"env_vars": RAY_JOB_ENV})
