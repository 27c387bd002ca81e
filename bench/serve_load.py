"""Load test of the Serve endpoint: dynamic batching on vs off, against the raw Inpainter.

    python bench/serve_load.py [--preset small] [--size 128] [--requests 200] [--clients 16]
                               [--max-batch-size 8] [--batch-wait-s 0.02] [--threads N]
                               [--modes batched unbatched] [--rounds 3] [--model DIR]
                               [--json out.json]
    python bench/serve_load.py --url http://127.0.0.1:8000 ...   # an endpoint already running

Everything is measured in one run on the same images (random photos with a random rectangular
hole), in --rounds rounds that alternate: the raw `Inpainter` in this process (one image per
call; --max-batch-size images per call, in forward passes sized as the server sizes them and
in one pass), then each mode's Serve application (started here on a local Ray, all modes
deployed side by side), driven by --clients concurrent HTTP clients until --requests answers
have come back. Printed: throughput, p50/p95/p99 latency, the batch sizes the server formed
(from its /stats), served throughput as a share of the best raw run, and the CPU time per
request spent by the replica, Serve's proxy and the load generator (the clients share the
machine with the server: on a small machine they cost it CPU time).
No assertions: this is a measurement.
"""

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import socket
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dfnet.inpaint import Inpainter
from dfnet.model import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="drive this running endpoint instead of starting one")
    parser.add_argument("--model", help="model directory (default: a random-init --preset)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--size", type=int, default=128, help="square image side")
    parser.add_argument("--images", type=int, default=16, help="distinct images cycled through")
    parser.add_argument("--requests", type=int, default=200, help="answered requests per mode")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-s", type=float, default=0.02)
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="torch threads, raw and in the replica (default: CPUs - 1, one left for HTTP)",
    )
    parser.add_argument("--modes", nargs="+", default=["batched", "unbatched"])
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- workload
def make_workload(count: int, size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Smooth random photos (noise blurred by downscaling) and masks with one rectangular hole
    covering 10-25% of the image."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        photo = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))
        hole = np.zeros((size, size), dtype=np.uint8)
        h, w = (int(size * f) for f in rng.uniform(0.3, 0.5, 2))
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        hole[y : y + h, x : x + w] = 255
        items.append((photo, hole))
    return items


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = np.sort(np.asarray(latencies)) * 1000
    return {f"p{p}": float(np.percentile(ordered, p)) for p in (50, 95, 99)}


# --------------------------------------------------------------------------- raw model
def bench_raw(inpainter: Inpainter, workload: list, requests: int, batch: int) -> dict[str, Any]:
    """Images/s of the Inpainter alone, on arrays (no HTTP, no PNG): one image per call; `batch`
    images per call in forward passes sized as the server sizes them on CPU (at most
    CPU_FORWARD_PIXELS pixels); and `batch` images per call in a single forward pass."""
    from serve.app import CPU_FORWARD_PIXELS, forward_area

    images = [workload[i % len(workload)][0] for i in range(requests)]
    masks = [workload[i % len(workload)][1] for i in range(requests)]
    area = forward_area(inpainter, images[0].shape[:2], "auto")
    server_pass = max(1, min(batch, CPU_FORWARD_PIXELS // area))
    runs = (
        ("raw, 1 per call", 1, 1),
        (f"raw, {batch} per call, passes of {server_pass}", batch, server_pass),
        (f"raw, {batch} per call, one pass", batch, batch),
    )
    results = {}
    for name, step, per_pass in runs:
        inpainter.max_batch = per_pass
        inpainter.inpaint_batch(images[:step], masks[:step])  # warm-up (allocator, oneDNN plans)
        start = time.perf_counter()
        for i in range(0, requests, step):
            inpainter.inpaint_batch(images[i : i + step], masks[i : i + step])
        elapsed = time.perf_counter() - start
        results[name] = {"throughput": requests / elapsed, "seconds": elapsed, "batch": step}
    return results


def _cpu_seconds(patterns: dict[str, str]) -> dict[str, float]:
    """CPU time (user + system) so far of this process ("client") and of every process whose
    command line contains a pattern (Ray names its workers "ray::ServeReplica:APP:...")."""
    import psutil

    totals = {"client": sum(psutil.Process().cpu_times()[:2])}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        for label, pattern in patterns.items():
            if pattern in cmdline:
                with contextlib.suppress(psutil.Error):  # it may have exited meanwhile
                    totals[label] = totals.get(label, 0.0) + sum(proc.cpu_times()[:2])
    return totals


# --------------------------------------------------------------------------- served
async def drive(
    url: str, bodies: list[tuple[bytes, bytes]], requests: int, clients: int
) -> dict[str, Any]:
    """`clients` concurrent loops posting until `requests` answers; latency per request."""
    import httpx

    latencies: list[float] = []
    batch_sizes: Counter[int] = Counter()
    statuses: Counter[int] = Counter()
    issued = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests:
            image, mask = bodies[issued % len(bodies)]
            issued += 1
            files = {"image": ("i.png", image, "image/png"), "mask": ("m.png", mask, "image/png")}
            start = time.perf_counter()
            response = await http.post(url + "/inpaint", files=files)
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] += 1
            batch_sizes[int(response.headers.get("x-batch-size", 0))] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "throughput": len(latencies) / elapsed,
        "seconds": elapsed,
        "latencies": latencies,
        "statuses": dict(statuses),
        "client_batch_sizes": dict(sorted(batch_sizes.items())),
    }


def bench_served(
    url: str, bodies: list, args: argparse.Namespace, processes: dict[str, str] | None = None
) -> dict[str, Any]:
    import httpx

    # Warm-up outside the timing: connections, the first batches, lazy initialisation.
    asyncio.run(drive(url, bodies, 2 * args.max_batch_size, args.clients))
    before = httpx.get(url + "/stats", timeout=30).json()["batch_sizes"]
    cpu_before = _cpu_seconds(processes or {})
    result = asyncio.run(drive(url, bodies, args.requests, args.clients))
    cpu_after = _cpu_seconds(processes or {})
    after = httpx.get(url + "/stats", timeout=30).json()["batch_sizes"]
    # Where the CPU went, per answered request: the replica (model + HTTP handling), Serve's
    # proxy, and the load generator itself (which on a small machine competes with both).
    result["cpu_ms_per_request"] = {
        k: 1000 * (cpu_after[k] - cpu_before.get(k, 0.0)) / args.requests for k in cpu_after
    }
    # Server-side view: batches formed during the timed run only.
    formed = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    result["server_batch_sizes"] = dict(sorted(formed.items()))
    return result


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median throughput over rounds; latencies pooled; batch counts summed."""
    summary: dict[str, Any] = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        entry: dict[str, Any] = {
            "throughput": float(np.median([r["throughput"] for r in runs])),
            "throughput_per_round": [round(r["throughput"], 2) for r in runs],
        }
        if "latencies" in runs[0]:
            entry.update(percentiles([x for r in runs for x in r["latencies"]]))
            formed: Counter[int] = Counter()
            statuses: Counter[int] = Counter()
            for r in runs:
                formed.update(r["server_batch_sizes"])
                statuses.update(r["statuses"])
            batches = sum(formed.values())
            entry["server_batch_sizes"] = dict(sorted(formed.items()))
            entry["mean_batch_size"] = sum(k * v for k, v in formed.items()) / max(1, batches)
            entry["statuses"] = dict(statuses)
            entry["cpu_ms_per_request"] = {
                k: float(np.median([r["cpu_ms_per_request"].get(k, 0.0) for r in runs]))
                for k in runs[0]["cpu_ms_per_request"]
            }
        else:
            entry["batch"] = runs[0]["batch"]
        summary[name] = entry
    return summary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(args.threads)
    workload = make_workload(args.images, args.size)
    bodies = [(png(photo), png(hole)) for photo, hole in workload]
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dfnet-bench-") as tmp:
        model_dir = args.model
        if model_dir is None:
            torch.manual_seed(0)
            model_dir = str(build_model(args.preset).save_pretrained(Path(tmp) / "model"))
        inpainter = Inpainter.from_pretrained(model_dir, "cpu", max_batch=args.max_batch_size)
        targets: dict[str, str] = {}
        if args.url:
            targets["target"] = args.url.rstrip("/")
        else:
            import ray
            from ray import serve

            from serve.app import app_builder

            ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for mode in args.modes:  # all deployed at once; an idle replica costs no CPU
                settings = {
                    "source": model_dir,
                    "batching": mode == "batched",
                    "max_batch_size": args.max_batch_size,
                    "batch_wait_timeout_s": args.batch_wait_s,
                    "max_ongoing_requests": max(args.clients, args.max_batch_size) * 2,
                    "torch_threads": args.threads,
                    "num_cpus": 0,  # resources are not the point; threads are set explicitly
                }
                serve.run(app_builder(settings), name=mode, route_prefix=f"/{mode}")
                targets[mode] = f"http://127.0.0.1:{port}/{mode}"
        try:
            # Rounds alternate raw and served runs, so that drift in the machine's load
            # (shared machines) hits every kind of run alike.
            for _ in range(args.rounds):
                measured = bench_raw(inpainter, workload, args.requests, args.max_batch_size)
                for mode, url in targets.items():
                    processes = {"replica": f"ServeReplica:{mode}:", "proxy": "ray::ProxyActor"}
                    measured[f"served, {mode}"] = bench_served(
                        url, bodies, args, None if args.url else processes
                    )
                rounds.append(measured)
        finally:
            if not args.url:
                serve.shutdown()
                ray.shutdown()
    report["summary"] = summarise(rounds)
    for measured in rounds:
        for entry in measured.values():
            entry.pop("latencies", None)
    report["rounds"] = rounds
    return report


def print_table(report: dict[str, Any]) -> None:
    config, summary = report["config"], report["summary"]
    best_raw = max(v["throughput"] for k, v in summary.items() if k.startswith("raw"))
    print(
        f"\n{config['preset']} preset, {config['size']}² images, {config['requests']} requests "
        f"× {config['rounds']} rounds, {config['clients']} clients, max_batch_size "
        f"{config['max_batch_size']}, batch wait {config['batch_wait_s']} s, {config['threads']} "
        f"torch thread(s), {report['machine']['cpus']} CPUs (throughput: median of rounds)\n"
    )
    print(
        "| run | img/s | vs best raw | p50 ms | p95 ms | p99 ms | batch sizes formed "
        "| CPU ms/request |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for name, r in summary.items():
        share = f"{100 * r['throughput'] / best_raw:.0f}%"
        if "p50" not in r:
            print(f"| {name} | {r['throughput']:.1f} | {share} | | | | | |")
            continue
        sizes = ", ".join(f"{k}×{v}" for k, v in r["server_batch_sizes"].items())
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_ms_per_request"].items())
        print(
            f"| {name} | {r['throughput']:.1f} | {share} | {r['p50']:.0f} | {r['p95']:.0f} "
            f"| {r['p99']:.0f} | {sizes} (mean {r['mean_batch_size']:.2f}) | {cpu} |"
        )
    errors = {
        n: r["statuses"] for n, r in summary.items() if set(r.get("statuses", {200: 0})) != {200}
    }
    if errors:
        print(f"\nnon-200 answers: {errors}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
