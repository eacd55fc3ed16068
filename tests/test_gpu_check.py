"""scripts/gpu_check.py, the prepared GPU check: it refuses to report GPU numbers without CUDA, and its dry run works.

The whole dry run (`bash scripts/gpu_check.sh --cpu-dry-run`, about 80 s) is run by hand; here only the
parts that take seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    return proc, summary, (tmp_path / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the full check would run")
def test_without_cuda_the_gpu_check_stops_and_says_so(tmp_path):
    proc, summary, md = run_check(tmp_path, "--only", "speed")
    assert proc.returncode == 1 and not summary["all_ok"] and summary["device"] == "cuda"
    assert [c["name"] for c in summary["checks"]] == ["environment"]  # nothing measured on another device
    assert "CUDA is not available" in md and "steps/s" not in md


def test_cpu_dry_run_times_every_bundled_model(tmp_path):
    from atomuq.models.registry import bundled_models

    proc, summary, md = run_check(tmp_path, "--cpu-dry-run", "--only", "speed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["dry_run"] and summary["device"] == "cpu" and "CPU DRY RUN" in md
    speed = summary["checks"][-1]
    assert speed["name"] == "speed" and set(speed["values"]["models"]) == set(bundled_models())
    for row in speed["values"]["models"].values():
        assert row["force_delta_steps_per_s"] > 0 and row["direct_steps_per_s"] > 0
        assert row["force_delta_over_direct_time"] == pytest.approx(
            row["direct_steps_per_s"] / row["force_delta_steps_per_s"])
