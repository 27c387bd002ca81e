"""bench/gpu.py: without a GPU it says so and measures nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_skips_clearly_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}  # no GPU, even on a GPU machine
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 77, result.stderr  # "skipped", not success and not a crash
    assert result.stdout.startswith("skipped: no CUDA device")
    assert json.loads(out.read_text())["skipped"].startswith("no CUDA device")
