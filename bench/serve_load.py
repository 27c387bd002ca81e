"""Served throughput against the raw `Inpainter`, in one run, at the shipped and official presets.

    python bench/serve_load.py [--presets shipped official] [--sizes 256 512] [--requests 128]
                               [--clients 16] [--rounds 2] [--threads N] [--inference auto]
                               [--max-batch-size 8] [--batch-wait-s 0.02] [--ray-env serve/ray.env]
                               [--json out.json]
                               [--doc docs/performance.md | --doc '']
    python bench/serve_load.py --compare CHECKOUT [CHECKOUT ...] [--repeats 2] [the options above]

For each preset the raw `Inpainter` is loaded in this process by the very function a replica's
model process uses (`serve.app.load_inpainter`, same inference path, same warm-up shapes) and timed
on arrays (no HTTP, no PNG): one image per call, and --max-batch-size images per call in forward
passes sized as the server sizes them. The same model is then served by a Serve application on a
local Ray and driven by --clients concurrent HTTP clients (PNG in, PNG out) until --requests
answers have come back; its throughput counts the steady state only, between the first and the last
--clients answers (before and after, fewer requests are in flight than the clients keep up). Each
preset is deployed once and measured at every --sizes side. Rounds alternate raw and served runs so
that drift in a shared machine's load hits both alike; throughputs are medians over rounds,
latencies pooled. Over the served rounds every process's CPU time is read too, so the table shows
where each request's CPU goes (model, replica, proxy, clients, the rest of Ray) and how busy the
machine was: on a small machine that shares its cores with the load generator, the serving stack's
CPU limits served throughput, not the model. `shipped` is the model in dfnet/pretrained (small + NS
pre-fill); `official` has random weights (speed only). The results go to stdout and between the
serve_load markers of --doc. No assertions.

--compare runs the bench of each named checkout (a git worktree of another design of serve/, say)
in turn, each on a Ray of its own, --repeats times (A B A B), and tabulates served / raw per run
and cell and the medians: two designs measured in one run, their drift in a shared machine's load
alternated.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import torch
from _common import cpu_name, write_doc  # bench/'s shared helpers
from PIL import Image

from dfnet.images import encode_png
from dfnet.inpaint import Inpainter
from dfnet.model import build_model
from dfnet.pretrained import pretrained_dir
from serve.ray_env import RAY_ENV_FILE, read_ray_env
from serve.schemas import configured_settings

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["shipped", "official"], choices=["shipped", "official"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sides")
    parser.add_argument("--requests", type=int, default=128, help="answered requests per run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--rounds", type=int, default=2)
    # One CPU is left to Serve's proxy and the load generator, which share the machine.
    threads = max(1, (os.cpu_count() or 2) - 1)
    parser.add_argument("--threads", type=int, default=threads, help="torch threads, raw and replica")
    parser.add_argument("--inference", default="auto", help="dfnet.accelerate path (or off), raw and served")
    parser.add_argument("--max-batch-size", type=int, default=configured_settings().max_batch_size)
    parser.add_argument("--batch-wait-s", type=float, default=configured_settings().batch_wait_timeout_s)
    parser.add_argument(
        "--ray-env",
        default=str(RAY_ENV_FILE.relative_to(ROOT)),
        help="Ray settings for the local Ray, as `make serve` uses them ('' = Ray's defaults)",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"), help="'' = do not write")
    parser.add_argument("--compare", nargs="+", metavar="CHECKOUT", help="run each checkout's bench in turn")
    parser.add_argument("--repeats", type=int, default=2, help="with --compare: runs of each checkout")
    return parser.parse_args(argv)


def workload(count: int, size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Smooth random photos (noise scaled up) with one rectangular hole of 9-25 % of the image."""
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


def bench_raw(inpainter: Inpainter, items: list, requests: int, batch: int, server_pass: int) -> dict[str, float]:
    """Images/s of the Inpainter alone: one image per call, and `batch` per call in the server's passes."""
    results = {}
    for name, step, per_pass in (("1 per call", 1, 1), (f"{batch} per call", batch, server_pass)):
        inpainter.max_batch = per_pass
        start = time.perf_counter()
        for i in range(0, requests, step):
            chunk = [items[j % len(items)] for j in range(i, i + step)]
            inpainter.inpaint_batch([c[0] for c in chunk], [c[1] for c in chunk])
        results[name] = requests / (time.perf_counter() - start)
    return results


async def drive(url: str, bodies: list[tuple[bytes, bytes]], requests: int, clients: int) -> dict[str, Any]:
    """`clients` concurrent loops posting until `requests` answers; latency of each."""
    latencies: list[float] = []
    finished: list[float] = []
    batch_sizes: Counter[int] = Counter()
    statuses: Counter[int] = Counter()
    issued = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests:
            image, mask = bodies[issued % len(bodies)]
            issued += 1
            start = time.perf_counter()
            response = await http.post(url + "/inpaint", files={"image": image, "mask": mask})
            finished.append(time.perf_counter())
            latencies.append(finished[-1] - start)
            statuses[response.status_code] += 1
            batch_sizes[int(response.headers.get("x-batch-size", 0))] += 1

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    # Steady state only: while the first `clients` answers are on their way, and once the
    # last requests have gone out, fewer than `clients` requests are in flight.
    edge = min(clients, (len(finished) - 2) // 2)
    throughput = (len(finished) - 1 - 2 * edge) / (finished[-1 - edge] - finished[edge])
    return {"throughput": throughput, "latencies": latencies, "batch_sizes": batch_sizes, "statuses": statuses}


ROLES = ("model", "replica", "proxy", "clients", "other")


def cpu_seconds_by_role() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process on the machine, with its part in serving: the
    replicas' model processes, the replicas, Serve's proxy, this process (the clients), and
    everything else (Ray's raylet, GCS and controller, and whatever else runs here)."""
    seconds = {}
    for process in psutil.process_iter(["pid", "ppid", "cmdline", "cpu_times"]):
        cmdline, times = " ".join(process.info["cmdline"] or []), process.info["cpu_times"]
        if times is None:
            continue
        if process.info["pid"] == os.getpid():
            role = "clients"
        elif "ServeReplica" in cmdline:
            role = "replica"
        elif "ProxyActor" in cmdline:
            role = "proxy"
        elif "spawn_main" in cmdline and _is_replica(process.info["ppid"]):
            role = "model"
        else:
            role = "other"
        seconds[process.info["pid"]] = (role, times.user + times.system)
    return seconds


def _is_replica(pid: int) -> bool:
    try:
        return "ServeReplica" in " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def cpu_per_request(before: dict, after: dict, requests: int) -> dict[str, float]:
    """Milliseconds of CPU per answered request, by role, between two `cpu_seconds_by_role`."""
    spent = dict.fromkeys(ROLES, 0.0)
    for pid, (role, seconds) in after.items():
        spent[role] += seconds - before.get(pid, (role, 0.0))[1]
    return {role: 1000 * value / requests for role, value in spent.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_preset(preset: str, model_dir: str, args: argparse.Namespace, base_url: str) -> list[dict[str, Any]]:
    """One deployment of the preset, measured at each of --sizes."""
    from ray import serve

    from serve.app import InpaintDeployment, load_inpainter

    settings = configured_settings(
        source=model_dir,
        inference=args.inference,
        warmup_sizes=args.sizes,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_s,
    )
    deployment = InpaintDeployment.options(
        ray_actor_options={"num_cpus": args.threads}, max_ongoing_requests=2 * max(args.clients, args.max_batch_size)
    )
    serve.run(deployment.bind(settings), name=preset, route_prefix=f"/{preset}")  # warms up in the replica
    url = f"{base_url}/{preset}"
    info = httpx.get(url + "/model", timeout=60).json()
    inpainter, _ = load_inpainter(settings)
    results = [bench_size(size, inpainter, info, url, args) for size in args.sizes]
    serve.delete(preset)
    return results


def bench_size(
    size: int, inpainter: Inpainter, info: dict[str, Any], url: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Raw and served rounds, alternating, at size² images."""
    from serve.app import images_per_pass

    items = workload(16, size)
    bodies = [(encode_png(photo), encode_png(hole)) for photo, hole in items]
    server_pass = images_per_pass(inpainter, (size,) * 2, "auto", info["forward_pixels"], args.max_batch_size)
    batching = (args.max_batch_size, server_pass)
    bench_raw(inpainter, items, 2 * args.max_batch_size, *batching)  # warm-up
    asyncio.run(drive(url, bodies, 2 * args.max_batch_size, args.clients))  # warm-up: connections, batches
    raw_runs, served_runs = [], []
    for _ in range(args.rounds):
        raw_runs.append(bench_raw(inpainter, items, args.requests, *batching))
        cpu_before, busy_before = cpu_seconds_by_role(), psutil.cpu_times()
        served_runs.append(asyncio.run(drive(url, bodies, args.requests, args.clients)))
        busy_after = psutil.cpu_times()
        served_runs[-1]["cpu_ms"] = cpu_per_request(cpu_before, cpu_seconds_by_role(), args.requests)
        idle = (busy_after.idle - busy_before.idle) / (sum(busy_after) - sum(busy_before))
        served_runs[-1]["machine_busy"] = 1 - idle
    raw = {name: float(np.median([r[name] for r in raw_runs])) for name in raw_runs[0]}
    latencies = np.asarray([x for r in served_runs for x in r["latencies"]]) * 1000
    sizes = sum((r["batch_sizes"] for r in served_runs), Counter())
    served = float(np.median([r["throughput"] for r in served_runs]))
    return {
        "preset": info["preset"],
        "size": size,
        "inference": info["inference"],
        "torch_threads": info["torch_threads"],
        "raw": raw,
        "served": served,
        "ratio": served / max(raw.values()),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "mean_batch": sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values())),
        "statuses": dict(sum((r["statuses"] for r in served_runs), Counter())),
        "cpu_ms_per_request": {role: float(np.median([r["cpu_ms"][role] for r in served_runs])) for role in ROLES},
        "machine_busy": float(np.median([r["machine_busy"] for r in served_runs])),
    }


def markdown(report: dict[str, Any]) -> str:
    c = report["config"]
    ray_env = ", ".join(f"`{k}={v}`" for k, v in report["ray_env"].items()) or "none (Ray's defaults)"
    lines = [
        "## Serve throughput (`bench/serve_load.py`)",
        "",
        f"{report['cpu']} ({report['cpus']} CPUs, {report['capability']}), torch {torch.__version__}; "
        f"square images with one rectangular hole, {c['requests']} requests × {c['rounds']} rounds per size, "
        f"{c['clients']} concurrent clients on the same machine, max_batch_size {c['max_batch_size']}, "
        f"batch wait {c['batch_wait_s']} s, inference `{c['inference']}`; Ray's settings: {ray_env}. "
        "Raw = the `Inpainter` in one process "
        "on arrays (best of 1 and max_batch_size images per call); served = HTTP + PNG through Serve, "
        "counted in the steady state (the first and last --clients answers, when fewer requests are in "
        "flight, are left out). Throughput: median of rounds; latency: all served requests pooled; "
        "overhead = 1/served − 1/raw, "
        "the time per request that serving adds (HTTP, PNG, proxy, queueing). CPU ms per request, "
        "measured over the served rounds from every process's CPU time: the replica's model process, "
        "the replica itself (HTTP, PNG decoding and encoding, Serve's batching), Serve's proxy, the "
        "load generator (this machine's clients) and everything else (Ray's own processes); CPUs busy: "
        "the share of the machine's CPU time in use meanwhile.",
        "",
        "| preset | size | path | threads | raw img/s | served img/s | served / raw | overhead ms | p50 ms "
        "| p99 ms | mean batch | CPU ms/request: model · replica · proxy · clients · other | CPUs busy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["results"]:
        raw = max(r["raw"].values())
        cpu = " · ".join(f"{r['cpu_ms_per_request'][role]:.1f}" for role in ROLES)
        lines.append(
            f"| {r['preset']} | {r['size']}² | {r['inference']} | {r['torch_threads']} | {raw:.1f} "
            f"| {r['served']:.1f} | {100 * r['ratio']:.0f} % | {1000 / r['served'] - 1000 / raw:.0f} "
            f"| {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
            f"| {r['mean_batch']:.2f} | {cpu} | {100 * r['machine_busy']:.0f} % |"
        )
    return "\n".join(lines) + "\n"


PASSED_ON = ("presets", "sizes", "requests", "clients", "rounds", "threads", "inference", "ray_env")


def compare(args: argparse.Namespace) -> list[tuple[str, int, str, int, float, float]]:
    """Each checkout's own bench, in turn, --repeats times: (checkout, run, preset, size, raw,
    served) per run and cell."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="dfnet-compare-") as tmp:
        for repeat, checkout in ((r, Path(c).resolve()) for r in range(args.repeats) for c in args.compare):
            out = Path(tmp) / f"{checkout.name}-{repeat}.json"
            command = [sys.executable, str(checkout / "bench" / "serve_load.py"), "--json", str(out), "--doc", ""]
            for name in PASSED_ON:
                value = getattr(args, name)
                command += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
            print(f"run {repeat + 1} of {checkout}", flush=True)
            subprocess.run(command, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, check=True)
            for r in json.loads(out.read_text())["results"]:
                rows.append((checkout.name, repeat + 1, r["preset"], r["size"], max(r["raw"].values()), r["served"]))
    return rows


def compare_markdown(rows: list[tuple[str, int, str, int, float, float]]) -> str:
    lines = [
        "| design | run | preset | size | raw img/s | served img/s | served / raw |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {d} | {n} | {p} | {s}² | {raw:.1f} | {served:.1f} | {100 * served / raw:.0f} % |"
        for d, n, p, s, raw, served in rows
    ]
    lines += ["", "| design | preset | size | median served / raw | runs |", "|---|---|---:|---:|---|"]
    for design, preset, size in dict.fromkeys((d, p, s) for d, _, p, s, _, _ in rows):
        ratios = [served / raw for d, _, p, s, raw, served in rows if (d, p, s) == (design, preset, size)]
        each = " · ".join(f"{100 * x:.0f}" for x in ratios)
        lines.append(f"| {design} | {preset} | {size}² | {100 * float(np.median(ratios)):.0f} % | {each} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import ray
    from ray import serve

    args = parse_args(argv)
    if args.compare:
        rows = compare(args)
        print("\n" + compare_markdown(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        return
    torch.set_num_threads(args.threads)
    ray_env = read_ray_env(ROOT / args.ray_env) if args.ray_env else {}
    os.environ.update(ray_env)  # every process of the Ray started below inherits them
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    report: dict[str, Any] = {"cpu": cpu_name(), "cpus": os.cpu_count(), "config": vars(args), "results": []}
    report["ray_env"] = ray_env
    report["capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        with tempfile.TemporaryDirectory(prefix="dfnet-bench-") as tmp:
            for preset in args.presets:
                model_dir = str(pretrained_dir())
                if preset == "official":
                    torch.manual_seed(0)
                    model_dir = str(build_model("official").save_pretrained(Path(tmp) / "official"))
                for result in bench_preset(preset, model_dir, args, f"http://127.0.0.1:{port}"):
                    report["results"].append(result)
                    print(json.dumps(result), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    section = markdown(report)
    print("\n" + section)
    if args.doc:
        write_doc(Path(args.doc), "serve_load", section.rstrip("\n"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
