"""Scale: the pipeline's stages at N and 10·N photos, and the training data path's throughput.

    python bench/scale.py [--photos N] [--factor F] [--doc docs/performance.md] [--no-s3]

On seeded synthetic photos, runs the prepare stage (from a folder, and from a loopback S3 server
at F·N) and a short train stage at N and F·N photos, each as users run it, in its own process
with its own Ray, recording wall time and peak memory of the whole process tree. Then the data
path alone: crops per second on one core, the plain stream's memory beside its shuffle buffer,
and the data-wait share on the embedded default when it is prepared. The goals are printed
beside the figures; `--doc` writes them into docs/performance.md under "Scale".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from _common import cpu_name, write_doc  # bench/'s shared helpers

ROOT = Path(__file__).resolve().parents[1]
GOAL_RSS_RATIO, GOAL_CROPS_PER_CORE, GOAL_DATA_WAIT = 1.25, 100.0, 0.10


def synthetic_photo(seed: int, side: int = 512) -> bytes:
    """A photo-like JPEG: smooth gradients, blobs, and grain that JPEG cannot compress away."""
    from dfnet.data import encode_jpeg

    rng = np.random.default_rng(seed)
    height, width = side, int(side * rng.uniform(1.0, 1.5))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    for channel in range(3):  # a smooth gradient per channel
        fx, fy, phase = *rng.uniform(0.5, 4, 2) * np.pi / side, rng.uniform(0, 2 * np.pi)
        image[..., channel] = 128 + 80 * np.sin(xx * fx + yy * fy + phase)
    for _ in range(12):  # blobs: edges and flat regions
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, side / 4)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        image[inside] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)  # grain: the texture JPEG pays for
    return encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90)


def write_photos(folder: Path, start: int, count: int) -> int:
    """Photos ``start .. start+count`` into ``folder/<hundreds>/``; returns their total bytes."""
    total = 0
    for seed in range(start, start + count):
        path = folder / f"{seed // 1000:03d}" / f"photo-{seed:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = synthetic_photo(seed)
        path.write_bytes(blob)
        total += len(blob)
    return total


def make_corpus(folder: Path, count: int, processes: int) -> float:
    """``count`` photos in ``folder`` (kept between runs); returns their mean size in KB."""
    existing = len(list(folder.rglob("*.jpg"))) if folder.is_dir() else 0
    if existing < count:
        step = -(-(count - existing) // processes)
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(write_photos, [folder] * processes, range(existing, count, step),
                          [min(step, count - s) for s in range(existing, count, step)]))  # fmt: skip
    sizes = [p.stat().st_size for p in sorted(folder.rglob("*.jpg"))[:count]]
    return float(np.mean(sizes)) / 1024


class PeakRSS:
    """Samples a process and its descendants: peak RSS of the tree (sum) and of its largest
    process, and the tree's peak PSS. RSS counts the pages of Ray's shared object store in every
    process that touched them; PSS shares them out, so its sum is what the tree holds."""

    def __init__(self, pid: int) -> None:
        self.root, self.tree, self.largest, self.largest_name = psutil.Process(pid), 0, 0, ""
        self.tree_pss = 0
        self.at_peak: dict[str, list[int]] = {}  # process name → [count, RSS] when the tree peaked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = total_pss = 0
            by_name: dict[str, list[int]] = {}
            for process in processes:
                try:
                    memory, name = process.memory_full_info(), process.name()
                except psutil.Error:
                    continue
                total += memory.rss
                total_pss += memory.pss
                count_rss = by_name.setdefault(name, [0, 0])
                count_rss[0] += 1
                count_rss[1] += memory.rss
                if memory.rss > self.largest:
                    self.largest, self.largest_name = memory.rss, name
            if total > self.tree:
                self.tree, self.at_peak = total, by_name
            self.tree_pss = max(self.tree_pss, total_pss)
            self._stop.wait(0.1)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(stage: str, params_file: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """``python -m pipelines.<stage> --params params_file`` as its own process: wall time, peaks."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", f"pipelines.{stage}", "--params", str(params_file)],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        with PeakRSS(process.pid) as peak:
            code = process.wait()
    if code:
        raise RuntimeError(f"{stage} failed (exit {code}); see {log}")
    return {"seconds": time.perf_counter() - start, "tree_mb": peak.tree / 2**20, "tree_pss_mb": peak.tree_pss / 2**20,
            "largest_mb": peak.largest / 2**20, "largest": peak.largest_name,
            "at_peak": {name: f"{n} × {rss / n / 2**20:.0f} MB" for name, (n, rss) in
                        sorted(peak.at_peak.items(), key=lambda item: -item[1][1])}}  # fmt: skip


def stage_params(work: Path, source: str, tag: str) -> Path:
    """params.yaml with the scratch data and a short, fixed-length training run."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(source=source, out_dir=str(work / f"prepared-{tag}"), image_size=128, shard_rows=64)
    raw["masks"].update(out=str(work / "masks.npz"), pool_size=200)
    raw["train"].update(init_from=None, epochs=1, steps_per_epoch=30, batch_size=8, val_max_photos=8,
                        bn_recalibration_batches=2, storage_path=str(work / f"runs-{tag}"),
                        out_dir=str(work / f"model-{tag}"), resume=False)  # fmt: skip
    raw["evaluate"].update(out_dir=str(work / f"metrics-{tag}"))
    raw["mlflow"].update(tracking_uri=f"sqlite:///{work}/mlflow.db")
    path = work / f"params-{tag}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def crops_per_core(prepared: str, masks: str, sizes: tuple[int, ...], photos: int = 120) -> dict[str, float]:
    """Crops per second of `TrainingCrops` on one thread, per crop size and crops per photo (1: a
    decode per crop, the worst case; params.yaml's: the decode shared), from the stored photos."""
    import cv2
    import torch

    from dfnet.params import load_params
    from dfnet.storage import iter_rows, split_files
    from dfnet.train_data import TrainingCrops

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    fs, files = split_files(prepared, "train")
    keys, blobs = [], []
    for rows in iter_rows(fs, files):
        keys += rows.column(0).to_pylist()
        blobs += rows.column(1).to_pylist()
        if len(keys) >= photos:
            break
    configured = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["crops_per_photo"]
    rates = {}
    for size in sizes:
        for per_photo in sorted({1, configured}):
            crops = TrainingCrops(masks, size, per_photo, load_params(ROOT / "params.yaml").train.max_zoom_out)
            crops.batch(keys[:2], blobs[:2], (0, 0))  # loads the mask pool
            start = time.perf_counter()
            out = crops.batch(keys[:photos], blobs[:photos], (0, 1))
            rates[f"{size}² crops, {per_photo} per photo"] = len(out["photo"]) / (time.perf_counter() - start)
    return rates


def stream_probe(prepared: str, masks: str, batches: int, buffer_mb: float) -> dict[str, float]:
    """RSS growth of the plain loop's stream (one process, no DataLoader workers) over `batches`."""
    from dfnet.params import load_params
    from dfnet.train_data import CropStream, TrainingCrops, crop_batches, shuffle_buffer_items

    train = load_params(ROOT / "params.yaml").train
    me = psutil.Process()
    before, peak = me.memory_info().rss, 0
    crops = TrainingCrops(masks, 128, 4, train.max_zoom_out)
    stream = CropStream(prepared, crops, shuffle_buffer_items(buffer_mb, 128), train.seed)
    source = crop_batches(stream, 16, 0)
    for index, _ in enumerate(source(0, 0)):
        peak = max(peak, me.memory_info().rss)
        if index + 1 == batches:
            break
    return {"growth_mb": (peak - before) / 2**20, "buffer_mb": buffer_mb}


def s3_upload(folder: Path, count: int, endpoint: str, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                          region_name="us-east-1")  # fmt: skip
    client.create_bucket(Bucket=bucket)
    paths = sorted(folder.rglob("*.jpg"))[:count]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.put_object(Bucket=bucket, Key=f"photos/{p.relative_to(folder)}",
                                                  Body=p.read_bytes()), paths))  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def embedded_data_wait(work: Path, env: dict[str, str]) -> dict[str, Any] | None:
    """The data-wait share of the train stage on the embedded default's prepared data."""
    prepared, masks = ROOT / "data" / "prepared", ROOT / "data" / "masks.npz"
    if not (prepared / "train").is_dir() or not masks.is_file():
        return None
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["out_dir"], raw["masks"]["out"] = str(prepared), str(masks)
    # The stage as `dvc repro` runs it (params.yaml's epochs, one pass each), pass start-ups included.
    raw["train"].update(storage_path=str(work / "runs-embedded"), out_dir=str(work / "model-embedded"), resume=False)
    raw["evaluate"].update(out_dir=str(work / "metrics-embedded"))
    raw["mlflow"].update(tracking_uri=f"sqlite:///{work}/mlflow.db")
    path = work / "params-embedded.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = run_stage("train", path, env, work / "train-embedded.log")
    summary = json.loads((work / "metrics-embedded" / "train.json").read_text())
    return {**run, "data_wait": summary["mean_data_wait"], "images_per_s": summary["median_images_per_s"]}


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    n, big = args.photos, args.photos * args.factor
    lines = [
        f"### {cpu_name()} · {os.cpu_count()} CPUs · N = {n:,}, {args.factor}·N = {big:,} photos "
        f"(synthetic, mean {results['photo_kb']:.0f} KB at 512 px)",
        "",
        "| stage | photos | wall s | photos/s | peak RSS, largest process (MB) | peak RSS, process tree (MB) "
        "| peak PSS, process tree (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results["stages"].items():
        for count, row in rows.items():
            lines.append(f"| {name} | {count:,} | {row['seconds']:.0f} | {row['photos_per_s']:.0f} "
                         f"| {row['largest_mb']:.0f} ({row['largest']}) | {row['tree_mb']:.0f} "
                         f"| {row['tree_pss_mb']:.0f} |")  # fmt: skip
    lines += ["", f"Goal: at {args.factor}·N, peak RSS ≤ {GOAL_RSS_RATIO}× that at N (largest process and tree)."]
    for name, rows in results["stages"].items():
        if n in rows and big in rows:
            ratio = rows[big]["tree_mb"] / rows[n]["tree_mb"]
            largest = rows[big]["largest_mb"] / rows[n]["largest_mb"]
            verdict = "met" if max(ratio, largest) <= GOAL_RSS_RATIO else "NOT met"
            pss = rows[big]["tree_pss_mb"] / rows[n]["tree_pss_mb"]
            lines.append(f"- {name}: tree {ratio:.2f}× (PSS {pss:.2f}×), largest process {largest:.2f}× ({verdict})")
    lines += ["", "Data path (one core, `TrainingCrops` from 512 px photos):", ""]
    for what, rate in results["crops_per_core"].items():
        goal = f" (goal ≥ {GOAL_CROPS_PER_CORE:.0f} at 256²: {'met' if rate >= GOAL_CROPS_PER_CORE else 'NOT met'})"
        lines.append(f"- {what}: {rate:.0f} crops/s per core" + (goal if what.startswith("256") else ""))
    for count, probe in results["stream"].items():
        lines.append(f"- plain stream over {count:,} photos: RSS +{probe['growth_mb']:.0f} MB "
                     f"(shuffle buffer {probe['buffer_mb']:.0f} MB)")  # fmt: skip
    wait = results.get("embedded")
    if wait:
        verdict = "met" if wait["data_wait"] <= GOAL_DATA_WAIT else "NOT met"
        lines.append(f"- embedded default, Ray Data into Ray Train: {100 * wait['data_wait']:.1f} % of step time "
                     f"waiting for data, {wait['images_per_s']:.1f} img/s "
                     f"(goal ≤ {100 * GOAL_DATA_WAIT:.0f} %: {verdict})")  # fmt: skip
    else:
        lines.append("- embedded default: not measured (no data/prepared: run `make repro` first)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2000, help="N")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dfnet-scale")
    parser.add_argument("--no-s3", action="store_true", help="skip prepare from the loopback S3 server")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--doc", type=Path, default=None, help="write the table into this file")
    parser.add_argument("--stream-probe", nargs=2, metavar=("PREPARED", "MASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.stream_probe:
        print(json.dumps(stream_probe(*args.stream_probe, batches=150, buffer_mb=32.0)))
        return {}
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    big = args.photos * args.factor
    results: dict[str, Any] = {"stages": {"prepare (folder)": {}, "train (30 steps)": {}}}
    print(f"writing {big:,} synthetic photos to {work / 'photos'} (kept for later runs)", flush=True)
    results["photo_kb"] = make_corpus(work / "photos", big, max(1, os.cpu_count() or 1))

    for count in (args.photos, big):
        folder = work / f"photos-{count}"  # a folder of exactly `count` photos, linked, not copied
        if not folder.is_dir():
            for path in sorted((work / "photos").rglob("*.jpg"))[:count]:
                link = folder / path.relative_to(work / "photos")
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, link)
        params = stage_params(work, str(folder), str(count))
        run = run_stage("prepare", params, env, work / f"prepare-{count}.log")
        results["stages"]["prepare (folder)"][count] = {**run, "photos_per_s": count / run["seconds"]}
        print(f"prepare {count:,}: {json.dumps(run)}", flush=True)
        if not (work / "masks.npz").is_file():
            run_stage("make_masks", params, env, work / "masks.log")
        if not args.no_train:
            run = run_stage("train", params, env, work / f"train-{count}.log")
            results["stages"]["train (30 steps)"][count] = {**run, "photos_per_s": 30 * 8 / run["seconds"]}
            print(f"train {count:,}: {json.dumps(run)}", flush=True)

    if not args.no_s3:
        port = free_port()
        server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            endpoint = f"http://127.0.0.1:{port}"
            time.sleep(2)
            s3_upload(work / "photos", big, endpoint, "scale")
            s3_env = {**env, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench",
                      "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}  # fmt: skip
            params = stage_params(work, "s3://scale/photos", "s3")
            run = run_stage("prepare", params, s3_env, work / "prepare-s3.log")
            results["stages"]["prepare (s3://, loopback)"] = {big: {**run, "photos_per_s": big / run["seconds"]}}
            print(f"prepare s3 {big:,}: {json.dumps(run)}", flush=True)
        finally:
            server.terminate()

    masks = str(work / "masks.npz")
    results["crops_per_core"] = crops_per_core(str(work / f"prepared-{args.photos}"), masks, (256, 512))
    results["stream"] = {}
    for count in (args.photos, big):  # each in a process of its own: one probe's heap must not hide the other's
        probe = [sys.executable, __file__, "--stream-probe", str(work / f"prepared-{count}"), masks]
        results["stream"][count] = json.loads(subprocess.run(probe, check=True, capture_output=True, text=True,
                                                             env=env).stdout.splitlines()[-1])  # fmt: skip
    results["embedded"] = None if args.no_train else embedded_data_wait(work, env)
    text = report(results, args)
    print(text)
    if args.doc:
        write_doc(args.doc, "scale", "## Scale (`bench/scale.py`)\n\n" + text)
    return results


if __name__ == "__main__":
    main()
