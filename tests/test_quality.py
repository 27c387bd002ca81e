"""bench/quality.py: the quality report end to end on a tiny budget, and its statistics.

The end-to-end test writes its own tiny prepared data (a few small synthetic photos per split and
a 64² mask pool) in tmp, never the repository's data/, and needs no Ray: training runs through
`dfnet.training.train` in this process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dfnet.evaluation import METRICS, bin_label
from dfnet.masks import HOLE_BINS, mask_pool, save_masks

ROOT = Path(__file__).resolve().parents[1]
LABELS = [bin_label(b) for b in range(len(HOLE_BINS))]
SIZES = [64, 128]


def _load_quality():
    # bench/ is a folder of scripts, not a package: load the file as a module.
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    sys.path.insert(0, str(ROOT / "bench"))  # the script imports bench/_common.py
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


quality = _load_quality()
TRAINED = [v.name for v in quality.VARIANTS]
METHODS = TRAINED + list(quality.BASELINES)


def _photos(count: int, seed: int) -> list[np.ndarray]:
    """Smooth colour waves of a few aspect ratios: photo-like enough for every method to run."""
    rng = np.random.default_rng(seed)
    photos = []
    for i in range(count):
        height, width = (80, 112) if i % 2 else (96, 96)
        y, x = np.mgrid[0:height, 0:width] / 16.0
        phase = rng.uniform(0, 6)
        waves = [np.sin(x + phase), np.cos(y - phase), np.sin(x + y + 2 * phase)]
        photos.append((127 + 100 * np.stack(waves, axis=2)).astype(np.uint8))
    return photos


def _report_tables(markdown: str) -> dict[str, tuple[list[str], dict[str, dict[str, list[str]]]]]:
    """{size: (method columns, {metric title: {bin label: cells}})} of the report's results tables."""
    section = markdown.split("## Results", 1)[1].split("\n## ", 1)[0]
    tables = {}
    for block in section.split("### ")[1:]:
        size = block.split(" px short side", 1)[0]
        lines = [line for line in block.splitlines() if line.startswith("|")]
        header = [c.strip().strip("`") for c in lines[0].strip("|").split("|")][1:]
        rows: dict[str, dict[str, list[str]]] = {}
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0].startswith("**"):
                current = rows.setdefault(cells[0].strip("*"), {})
            else:
                current[cells[0]] = cells[1:]
        tables[size] = (header, rows)
    return tables


def test_report_covers_every_method_bin_and_size_with_the_runs_numbers(tmp_path: Path, prepared_split) -> None:
    data = tmp_path / "prepared"
    for split, count in {"train": 8, "val": 2, "test": 2}.items():
        prepared_split(data, split, _photos(count, seed=len(split)))
    (data / "report.json").write_text(json.dumps({"source": "synthetic test photos"}))  # run identity hashes it
    save_masks(tmp_path / "masks.npz", {"pool": mask_pool(30, 64, 64, seed=0)})
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())  # params.yaml's model and loss
    raw["data"].update(out_dir=str(data), image_size=64)
    raw["masks"].update(out=str(tmp_path / "masks.npz"), size=64)
    raw["train"].update(batch_size=4, bn_recalibration_batches=1, val_short_side=64)
    raw["evaluate"].update(sizes=SIZES, max_photos=2, grid_rows=2)  # both test photos
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "docs" / "results.md"
    argv = ["--params", str(tmp_path / "params.yaml"), "--epochs", "1", "--crops-per-photo", "1",
            "--seeds", "2", "--device", "cpu", "--threads", "1", "--out", str(out)]  # fmt: skip

    summary = quality.main(argv)

    stored = json.loads((tmp_path / "docs" / "results" / "quality.json").read_text())
    assert stored["results"] == summary["results"] and stored["seeds"] == [0, 1]
    text = out.read_text()
    tables = _report_tables(text)
    assert sorted(tables, key=int) == [str(s) for s in SIZES]
    for size, (header, rows) in tables.items():
        assert header == METHODS
        assert list(rows) == [quality.TITLES[m] for m in METRICS]
        for metric, title in zip(METRICS, rows):
            assert list(rows[title]) == LABELS, (size, metric)
            for label, cells in rows[title].items():
                for name, shown in zip(METHODS, cells, strict=True):
                    entry = stored["results"][name][size][label][metric]
                    # The table is the JSON's numbers, and the JSON holds one value per seed.
                    assert shown.replace("**", "") == quality.cell(entry, metric), (size, metric, label, name)
                    assert len(entry["values"]) == (2 if name in TRAINED else 1)
                    assert entry["mean"] == pytest.approx(np.mean(entry["values"]))
                    assert all(math.isfinite(v) for v in entry["values"])
    # Two seeds really trained two different models of each variant.
    for name in TRAINED:
        cells = [e for bins in stored["results"][name].values() for scores in bins.values() for e in scores.values()]
        assert any(e["values"][0] != e["values"][1] for e in cells), name

    methods = stored["methods"]
    assert (methods["dfnet"]["fusion"], methods["dfnet"]["pq"]) == ("blend", [raw["loss"]["p"], raw["loss"]["q"]])
    assert methods["dfnet"]["fusion_blocks"] > 1 and methods["dfnet-1blk"]["fusion_blocks"] == 1
    assert methods["dfnet-1blk"]["pq"] == [1, 1]
    assert (methods["hard"]["fusion"], methods["unet"]["fusion"]) == ("hard", "none")
    assert all(methods[n]["steps"] == 2 for n in TRAINED)  # 8 photos × 1 crop / batch 4
    assert f"`python bench/quality.py {' '.join(argv)}`" in text and "wall time" in text
    assert quality.cpu_name() in text and "synthetic test photos" in text
    for claim, winner, loser in quality.CLAIMS:
        assert f"| {claim} | `{winner}` vs `{loser}` |" in text
    figures = re.findall(r"\]\((results/[^)]+\.png)\)", text)
    assert {Path(f).name for f in figures} == {"grid.png", "alphas.png"}
    for figure in figures:
        with Image.open(out.parent / figure) as image:
            assert image.format == "PNG" and image.width > 200


def test_variants_change_one_thing_each() -> None:
    base = quality.load_params(ROOT / "params.yaml")
    built = {v.name: v.params(base, seed=7) for v in quality.VARIANTS}
    assert all(p.train.seed == 7 for p in built.values())
    # Every variant is the paper's network trained from scratch: zero-filled holes, no start weights.
    assert all(p.model.prefill == "none" and p.train.init_from is None for p in built.values())
    assert built["dfnet"].model == replace(base.model, prefill="none") and built["dfnet"].loss == base.loss
    one = built["dfnet-1blk"]
    assert (one.model.fusion, one.model.fusion_levels, one.loss.p, one.loss.q) == ("blend", 1, 1, 1)
    for name, fusion in (("hard", "hard"), ("unet", "none")):
        assert built[name].model.fusion == fusion and built[name].loss == base.loss
        assert built[name].model.fusion_levels == base.model.fusion_levels


def _entry(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": None, "values": values}


def test_aggregate_takes_mean_and_sample_std_over_seeds() -> None:
    runs = [{"64": {"0-10%": dict.fromkeys(METRICS, 1.0)}}, {"64": {"0-10%": dict.fromkeys(METRICS, 3.0)}}]
    out = quality.aggregate(runs)["64"]["0-10%"]["l1"]
    assert out["mean"] == pytest.approx(2.0) and out["std"] == pytest.approx(math.sqrt(2.0))
    assert quality.aggregate(runs[:1])["64"]["0-10%"]["l1"]["std"] is None


def test_compare_and_verdict_follow_metric_direction_and_seeds() -> None:
    def table(l1: list[float], psnr: list[float]) -> dict:
        return {"64": {label: {"l1": _entry(l1), "psnr": _entry(psnr)} for label in LABELS}}

    # a beats c in every bin and seed; b beats c on l1 by the mean only; c is deterministic.
    results = {"a": table([1.0, 1.0], [30.0, 30.0]), "b": table([0.5, 2.5], [20.0, 20.0]), "c": table([2.0], [25.0])}
    assert quality.compare(results, "a", "c", "l1") == (5, 5, 5)
    assert quality.verdict(5, 5, 5, seeds=2) == "holds"
    assert quality.compare(results, "b", "c", "l1") == (5, 0, 5)
    assert quality.verdict(5, 0, 5, seeds=2).startswith("holds on average")
    assert quality.compare(results, "a", "c", "psnr")[0] == 5  # higher PSNR is better
    assert quality.compare(results, "b", "c", "psnr")[0] == 0
    assert quality.verdict(0, 0, 5, seeds=2) == "does not hold"
    assert quality.verdict(3, 1, 5, seeds=2) == "mostly holds"
