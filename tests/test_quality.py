"""bench/quality.py: the quality report's training + evaluation on a tiny budget, and its maths.

The end-to-end test prepares its own tiny data set (2 crops per sample photo, 20 pool masks,
2 evaluation masks per bin) in tmp, never the repository's data/.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from dfnet.masks import HOLE_BINS
from dfnet.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def _load_quality():
    # bench/ is a folder of scripts, not a package: load the file as a module.
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


quality = _load_quality()
LABELS = [quality.bin_label(b) for b in range(len(HOLE_BINS))]
NUMBER = re.compile(r"^(\*\*)?-?\d+\.\d+(\*\*)?( ± \d+\.\d+)?$")


def _table_rows(markdown: str) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """(method names, {metric title: {bin label: cells}}) of the report's results table."""
    section = markdown.split("## Results per hole-ratio bin", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip().strip("`") for c in lines[0].strip("|").split("|")][1:]
    blocks: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("**"):
            current = cells[0].strip("*")
            blocks[current] = {}
        else:
            blocks[current][cells[0]] = cells[1:]
    return header, blocks


def test_quality_report_lists_every_method_in_every_bin(ray_local, tmp_path):
    from pipelines.make_masks import make_masks
    from pipelines.prepare import prepare

    # params.yaml's model, loss and training settings; tiny data of this test's own.
    params = load_params(
        ROOT / "params.yaml",
        {
            "data": {"crops_per_image": 2, "shard_rows": 64, "out_dir": str(tmp_path / "data")},
            "masks": {"pool_size": 20, "eval_per_bin": 2, "out": str(tmp_path / "masks.npz")},
            "evaluate": {"pairs_per_bin": 2},
        },
    )
    prepare(params.data)
    make_masks(params.masks, params.data.image_size)
    out = tmp_path / "docs" / "results.md"
    # One thread: on a CPU shared with other tests, two threads wait on each other at every op.
    budget = quality.Budget(steps=3, batch=4, seeds=2)
    summary = quality.run_quality(
        params, budget, out, command="python bench/quality.py -x", threads=1
    )

    methods = [v.name for v in quality.VARIANTS] + list(quality.BASELINES)
    text = out.read_text()
    header, blocks = _table_rows(text)
    assert header == methods
    assert set(blocks) == {quality.METRIC_TITLES[m] for m in quality.METRICS}  # no FID here
    for metric, rows in blocks.items():
        assert list(rows) == LABELS, metric
        for label, cells in rows.items():
            assert len(cells) == len(methods), (metric, label)
            assert all(NUMBER.match(c) for c in cells), (metric, label, cells)
            # Two seeds: every trained method carries a spread, the deterministic ones do not.
            assert all("±" in c for c in cells[: len(quality.VARIANTS)])
            assert not any("±" in c for c in cells[len(quality.VARIANTS) :])

    assert "`python bench/quality.py -x`" in text and "Wall time:" in text
    figures = re.findall(r"\]\((results/[^)]+\.png)\)", text)
    assert {Path(f).name for f in figures} >= {"metrics.png", "grid.png", "alphas.png"}
    for figure in figures:
        with Image.open(out.parent / figure) as image:
            assert image.format == "PNG" and image.width > 100

    stored = json.loads((out.parent / "results" / "quality.json").read_text())
    assert stored["results"] == summary["results"]
    assert stored["budget"]["steps"] == 3 and stored["seeds"] == [0, 1]
    trained = {v.name for v in quality.VARIANTS}
    for name in methods:
        for label in LABELS:
            for metric in quality.METRICS:
                entry = stored["results"][name][label][metric]
                assert math.isfinite(entry["mean"])
                assert len(entry["values"]) == (2 if name in trained else 1)
    # The single-scale variants really have one fusion block; DFNet has the preset's.
    assert stored["methods"]["dfnet"]["pq"] == [params.loss.p, params.loss.q]
    for name in ("dfnet-1blk", "hard", "unet"):
        assert stored["methods"][name]["pq"] == [1, 1]
        assert stored["methods"][name]["parameters"] < stored["methods"]["dfnet"]["parameters"]


def test_build_variant_fusion_and_levels():
    params = load_params(ROOT / "params.yaml")
    built = {v.name: quality.build_variant(params, v) for v in quality.VARIANTS}
    assert built["dfnet"].config.fusion == "blend" and len(built["dfnet"].fusion) > 1
    assert built["dfnet-1blk"].config.fusion == "blend" and len(built["dfnet-1blk"].fusion) == 1
    assert built["hard"].config.fusion == "hard" and built["hard"].fusion[0].blend is None
    assert built["unet"].config.fusion == "none" and built["unet"].fusion[0].blend is None


def test_aggregate_mean_sample_std_and_missing_values():
    runs = [{"0-10%": {"l1": 1.0, "fid": None}}, {"0-10%": {"l1": 3.0, "fid": 5.0}}]
    out = quality.aggregate(runs)["0-10%"]
    assert out["l1"]["mean"] == pytest.approx(2.0)
    assert out["l1"]["std"] == pytest.approx(math.sqrt(2.0))  # sample std of {1, 3}
    assert out["fid"]["mean"] is None  # missing in one seed -> not averaged
    single = quality.aggregate([{"0-10%": {"l1": 4.0}}])["0-10%"]["l1"]
    assert single["mean"] == 4.0 and single["std"] is None


def _entry(values):
    return {"mean": sum(values) / len(values), "std": None, "values": values}


def test_compare_and_verdict_follow_metric_direction_and_seeds():
    labels = LABELS
    table = {
        # a beats c in every bin and seed on l1 (lower); b beats c by the mean only.
        "a": {lb: {"l1": _entry([1.0, 1.0]), "psnr": _entry([30.0, 30.0])} for lb in labels},
        "b": {lb: {"l1": _entry([0.5, 2.5]), "psnr": _entry([20.0, 20.0])} for lb in labels},
        "c": {lb: {"l1": _entry([2.0]), "psnr": _entry([25.0])} for lb in labels},
    }
    assert quality.compare(table, "a", "c", "l1") == (5, 5, 5)
    assert quality.verdict(5, 5, 5, seeds=2) == "holds"
    by_mean, every, bins = quality.compare(table, "b", "c", "l1")
    assert (by_mean, every) == (5, 0)
    assert quality.verdict(by_mean, every, bins, seeds=2).startswith("holds on average")
    # Higher PSNR is better: a wins, b loses.
    assert quality.compare(table, "a", "c", "psnr")[0] == 5
    assert quality.compare(table, "b", "c", "psnr")[0] == 0
    assert quality.verdict(0, 0, 5, seeds=2) == "does not hold"
    assert quality.verdict(3, 1, 5, seeds=2) == "mostly holds"
