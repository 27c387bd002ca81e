"""Shared pytest fixtures: one local Ray for the session, a real S3 server on loopback, and
torch.compile with a recording backend.

The S3 server is moto in server mode (a real HTTP S3 endpoint), so code under test uses its
ordinary clients (pyarrow, boto3) instead of patched ones.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Two test processes share the cores, each with torch's default threads, and start Ray, DVC and
# compilers beside them: OpenMP threads that spin while they wait for work take the cores from
# the others, and the training tests crawl. Passive threads sleep instead. OpenMP reads this
# when torch loads, so it is set before anything imports torch (and inherited by subprocesses).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Telemetry off for everything the tests start (Ray, DVC, MLflow), before any of them import.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402

from pipelines import RAY_JOB_ENV  # noqa: E402

# `make test` runs the files in two processes (pytest-xdist, whole files per process). The files
# of the end-to-end tests go first, longest first (from `--durations` of a full run), so the two
# processes finish together instead of one starting the longest file last.
LONGEST_FILES_FIRST = (
    "test_tune.py",
    "test_train.py",
    "test_pipeline.py",
    "test_serve.py",
    "test_browser.py",
    "test_multinode.py",
    "test_prepare.py",
    "test_accelerate.py",
    "test_training.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"
S3_REGION = "us-east-1"


def _s3_env(endpoint_url: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
    }


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port for the whole session; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_local(moto_endpoint: str) -> Iterator[Any]:
    """A local 2-CPU Ray for the session.

    Workers get the S3 test endpoint and credentials through the job's runtime_env: a worker's
    environment is fixed when Ray starts, so a test that sets them later in the driver alone
    would leave the workers pointing at real AWS.
    """
    import ray

    _start_local_ray(moto_endpoint)
    yield ray
    ray.shutdown()


def _start_local_ray(moto_endpoint: str) -> None:
    import ray

    from serve.ray_env import read_ray_env

    # Started the way `make serve` starts Serve's Ray, so the Serve tests run what users run.
    os.environ.update(read_ray_env())
    os.environ.update(RAY_JOB_ENV)  # as pipelines.ensure_ray sets it
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": _s3_env(moto_endpoint) | RAY_JOB_ENV | {"RAY_USAGE_STATS_ENABLED": "0"}},
    )


@dataclass
class TwoNodeCluster:
    """A Ray cluster of two nodes on this machine, the driver connected to it."""

    cluster: Any  # ray.cluster_utils.Cluster
    head: Any  # the head node (driver, Train controller, one training worker)
    worker: Any  # the second node (the other training worker)


@pytest.fixture
def ray_two_nodes(moto_endpoint: str) -> Iterator[TwoNodeCluster]:
    """Two Ray nodes (one CPU each, ports chosen by the OS) with the driver connected to them.

    Both run on this machine and reach each other at its own address (Ray advertises that even
    for a node told 127.0.0.1), so nothing leaves the machine.

    Ray allows one connection per process, so the session's local Ray (`ray_local`), if some
    test started it, is shut down first and started again afterwards. The cluster's address
    file goes to a private RAY_TMPDIR, so no other process's bare `ray.init()` finds this
    cluster, and its workers get the S3 test endpoint like `ray_local`'s.
    """
    import shutil
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    had_local_ray = ray.is_initialized()
    if had_local_ray:
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="ray2n-")  # short: Unix socket paths live under it
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    # Port 0: the OS picks (Ray's default for the head's dashboard agent is the fixed 52365).
    # No log monitor: nothing is forwarded to the driver (log_to_driver=False).
    node_args = {
        "num_cpus": 1,
        "include_dashboard": False,
        "include_log_monitor": False,
        "dashboard_agent_listen_port": 0,
    }
    cluster = Cluster()
    try:
        cluster.add_node(**node_args)  # the head
        worker = cluster.add_node(wait=False, **node_args)
        cluster.wait_for_nodes()
        ray.init(
            address=cluster.address,
            log_to_driver=False,
            runtime_env={"env_vars": _s3_env(moto_endpoint) | RAY_JOB_ENV | {"RAY_USAGE_STATS_ENABLED": "0"}},
        )
        yield TwoNodeCluster(cluster=cluster, head=cluster.head_node, worker=worker)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        shutil.rmtree(temp_dir, ignore_errors=True)
        if had_local_ray:
            _start_local_ray(moto_endpoint)


@dataclass
class S3Server:
    """What a test needs to talk to the loopback S3 server."""

    endpoint_url: str
    bucket: str  # a fresh, empty bucket for this test
    client: Any  # a boto3 S3 client

    def uri(self, key: str = "") -> str:
        """``s3://{bucket}/{key}``."""
        return f"s3://{self.bucket}/{key.lstrip('/')}"


@pytest.fixture
def s3_server(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's S3 server, AWS_* variables pointing at it for this test, a new bucket."""
    import boto3

    for name, value in _s3_env(moto_endpoint).items():
        monkeypatch.setenv(name, value)
    # Keep a developer's real AWS profile or session out of the tests.
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        region_name=S3_REGION,
    )
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3Server(endpoint_url=moto_endpoint, bucket=bucket, client=client)


def write_prepared_split(root: Any, split: str, photos: list[Any], shard_rows: int = 0) -> None:
    """A prepared split as the prepare stage writes it: one Parquet row per (HxWx3 uint8) photo,
    in shards of `shard_rows` photos (0: one shard).

    `root` is a local folder or a URI such as ``s3://bucket/prepared``.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from dfnet.images import encode_png
    from dfnet.storage import PARQUET_SCHEMA, filesystem_for

    fs, base = filesystem_for(str(root))
    directory = f"{base}/{split}"
    if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders
        fs.create_dir(directory, recursive=True)
    rows = [
        {"key": f"{split}/{i:04d}.png", "source": f"{split}/{i:04d}.png", "split": split,
         "image": encode_png(photo), "height": photo.shape[0], "width": photo.shape[1]}
        for i, photo in enumerate(photos)
    ]  # fmt: skip
    step = shard_rows or max(1, len(rows))
    for part, start in enumerate(range(0, max(1, len(rows)), step)):
        table = pa.Table.from_pylist(rows[start : start + step], schema=PARQUET_SCHEMA)
        pq.write_table(table, f"{directory}/part-{part:06d}.parquet", filesystem=fs)


def split_table(root: Any, split: str) -> Any:
    """A whole prepared split as one Arrow table in key order: for checking small test data
    (the library itself never reads a whole split)."""
    import pyarrow.dataset as pads

    from dfnet.storage import PARQUET_SCHEMA, split_files

    fs, files = split_files(str(root), split)
    return pads.dataset(files, schema=PARQUET_SCHEMA, format="parquet", filesystem=fs).to_table().sort_by("key")


@pytest.fixture
def prepared_split() -> Any:
    """`write_prepared_split(root, split, photos)`, for tests that need prepared data without Ray."""
    return write_prepared_split


def _fit_in_background(params: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """`build_trainer(params).fit()` on a daemon thread, so a test can act on the running job
    (kill a worker or a node); the result or the error lands in the returned dict."""
    from pipelines.train import build_trainer

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = build_trainer(params).fit()
        except BaseException as error:  # surfaced by the caller's assertions
            outcome["error"] = error

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    return thread, outcome


@pytest.fixture
def fit_in_background() -> Any:
    """The function `_fit_in_background`: start a Train run and keep control of the test."""
    return _fit_in_background


def _free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that the OS just handed out, for servers that cannot bind port 0
    and report it themselves (Ray Serve's proxy)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_loopback_port() -> Any:
    """The function `_free_loopback_port`."""
    return _free_loopback_port


@pytest.fixture
def compiled_graphs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The graphs torch.compile hands to its backend, in order. Dynamo traces for real; the graphs
    then run as they are instead of through inductor (which takes tens of seconds per graph)."""
    import torch

    graphs: list[Any] = []

    def recording_backend(graph: Any, example_inputs: list[Any]) -> Any:
        graphs.append(graph)
        return graph.forward

    compile_with = torch.compile
    monkeypatch.setattr(torch, "compile", lambda network, **_: compile_with(network, backend=recording_backend))
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()
