"""Ray Train on two nodes, data and checkpoints on S3, one node killed mid-run.

The cluster is two Ray nodes on this machine (`ray.cluster_utils.Cluster`, one CPU each, every
port picked by the OS; the `ray_two_nodes` fixture), the S3 server moto on loopback
(`s3_server`). The run is the train stage's own trainer, `pipelines.train.build_trainer`, with
`train.num_workers=2`: its workers read the prepared Parquet shards and the mask pool from the
bucket and report their checkpoints to `s3://…/runs`.

How the run finishes on the surviving node (Ray 2.60, Train V2): the trainer places its worker
group with `placement_strategy="SPREAD"`, so while both nodes are up there is one worker per
node (asserted below); each worker reserves half a CPU, so one node can also hold both.
`FailureConfig(max_failures=1)` lets the controller (on the head node, where the driver is)
restart the worker group once: with the second node gone, the fixed-size group of two is placed
on the head node and `ray.train.get_checkpoint()` hands it the last registered checkpoint. No
replacement node is started. Train V2's elastic `num_workers=(1, 2)` was not used: its resize
decisions go through an autoscaling coordinator that refreshes its view of the nodes every
20 s, so a restart soon after a node death may still count the dead node, ask for two workers
and wait out the worker-group start timeout (60 s) first; and a world of one would change the
steps per epoch.

The node is killed (its raylet and agents get SIGKILL, its workers exit with them) once the
controller has registered the first checkpoint: its `checkpoint_manager_snapshot.json` appears
in the bucket. The loop
records the step of every checkpoint it resumed from (`extra.resumed_at_steps`), so the test
knows where the restarted group went on from and asserts that its first step is the next one.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dfnet.params import load_params
from dfnet.training import run_identity
from pipelines.make_masks import make_masks
from pipelines.train import SAMPLES_FILE, STATE_FILE, load_checkpoint_state

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
EPOCHS = 3
WORKERS = 2
BATCH = 4
TRAIN_PHOTOS = WORKERS * BATCH  # one step per epoch: every step is a checkpoint and a history record
TIMEOUT_S = 300  # a failure guard only; the test takes about a minute


def _photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0 : SIZE + 16]
    base = np.stack([xx * 3.0, yy * 4.0, np.full(xx.shape, seed * 37 % 255)], -1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _tiny_params(s3: Any) -> Any:
    return load_params(
        REPO / "params.yaml",
        {
            "data": {"image_size": SIZE, "store_short_side": SIZE, "out_dir": s3.uri("prepared")},
            "masks": {"pool_size": 8, "size": SIZE, "out": s3.uri("masks/masks.npz")},
            "model": {"preset": "small"},
            "loss": {"perceptual": 0.0, "style": 0.0},  # no VGG16 on any machine: fast and the same
            "train": {
                "epochs": EPOCHS,
                "crops_per_photo": 1,
                "batch_size": BATCH,
                "bn_recalibration_batches": 1,
                "val_short_side": SIZE,
                "val_max_photos": 1,
                "num_workers": WORKERS,
                "use_gpu": False,
                "storage_path": s3.uri("runs"),
                "run_name": "multinode",
                "max_failures": 1,
            },
            "mlflow": {"tracking_uri": ""},  # no tracking: this test is about Ray and S3
        },
    )


def _objects(s3: Any, prefix: str) -> list[str]:
    listing = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def _train_workers() -> list[dict[str, Any]]:
    """Every Ray Train worker actor the cluster has had (alive or dead), from the GCS."""
    import ray._private.state

    return [a for a in ray._private.state.actors().values() if a["ActorClassName"] == "RayTrainWorker"]


@pytest.mark.slow  # in the default run (`make test`); `-m 'not slow'` skips it
def test_training_survives_losing_a_node(ray_two_nodes, s3_server, prepared_split, fit_in_background, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _tiny_params(s3_server)
    # Prepared data and mask pool in the bucket, as the prepare and masks stages leave them.
    prepared_split(params.data.out_dir, "train", [_photo(i) for i in range(TRAIN_PHOTOS)])
    prepared_split(params.data.out_dir, "val", [_photo(100)])
    report = {"splits": {"train": {"images": TRAIN_PHOTOS}, "val": {"images": 1}}}
    s3_server.client.put_object(Bucket=s3_server.bucket, Key="prepared/report.json", Body=json.dumps(report))
    make_masks(params.masks)
    name = run_identity(params)
    run_prefix = f"runs/{name}/"

    thread, outcome = fit_in_background(params)
    # A checkpoint counts once the controller has registered it (its snapshot is written then);
    # one merely uploaded by a worker is not yet what a restarted group is given.
    deadline = time.monotonic() + TIMEOUT_S
    while f"{run_prefix}checkpoint_manager_snapshot.json" not in _objects(s3_server, run_prefix):
        thread.join(timeout=0.2)  # returns at once if fit ended
        assert thread.is_alive(), f"fit ended before any checkpoint was registered: {outcome}"
        assert time.monotonic() < deadline, "no checkpoint registered in time"
    alive = [w for w in _train_workers() if w["State"] == "ALIVE"]
    worker_nodes = {w["Address"]["NodeID"] for w in alive}
    state_keys = [k for k in _objects(s3_server, run_prefix) if k.endswith(f"/{STATE_FILE}")]
    seen = torch.load(
        io.BytesIO(s3_server.client.get_object(Bucket=s3_server.bucket, Key=state_keys[0])["Body"].read()),
        weights_only=True,
    )

    ray_two_nodes.cluster.remove_node(ray_two_nodes.worker, allow_graceful=False)
    thread.join(timeout=TIMEOUT_S)
    assert not thread.is_alive(), "fit did not finish after the node was killed"

    # One worker per node until the kill.
    assert len(alive) == WORKERS
    assert worker_nodes == {ray_two_nodes.head.node_id, ray_two_nodes.worker.node_id}
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.error is None
    # The run finished on the surviving node: every worker started after the kill ran there.
    later = [w for w in _train_workers() if w["ActorID"] not in {a["ActorID"] for a in alive}]
    assert len(later) == WORKERS
    assert {w["Address"]["NodeID"] for w in later} == {ray_two_nodes.head.node_id}

    state = load_checkpoint_state(result.checkpoint)
    assert result.checkpoint.path.startswith(f"{s3_server.bucket}/{run_prefix}")
    total = EPOCHS  # one step per epoch
    assert state["epoch"] == EPOCHS and state["step"] == total
    history = state["history"]
    steps = [h["step"] for h in history if "loss_total" in h]
    assert steps == list(range(1, total + 1)), steps  # no step lost or trained twice
    assert [h["epoch"] for h in history if "val_l1" in h] == list(range(EPOCHS))
    # The restarted group went on from a checkpoint registered before the kill...
    (resumed_at,) = state["extra"]["resumed_at_steps"]
    assert 0 < seen["step"] <= resumed_at < total
    # ...whose records it carried over verbatim (timings included: restored, not retrained)...
    assert [h for h in history if h["step"] <= seen["step"]] == seen["history"]
    # ...and its first step was the one after it.
    assert min(s for s in steps if s > resumed_at) == resumed_at + 1
    assert all(np.isfinite(h["loss_total"]) for h in history if "loss_total" in h)
    # The run keeps its last two checkpoints (CheckpointConfig(num_to_keep=2)), in the bucket, each
    # with its sample grid; nothing went to a local folder named like the URI. (An upload the
    # killed group made but the controller never registered may stay beside them.)
    keys = _objects(s3_server, run_prefix)
    kept = [checkpoint.path.removeprefix(f"{s3_server.bucket}/") for checkpoint, _ in result.best_checkpoints]
    assert len(kept) == 2 and all(f"{path}/{name}" in keys for path in kept for name in (STATE_FILE, SAMPLES_FILE))
    assert not (Path.cwd() / "s3:").exists()
