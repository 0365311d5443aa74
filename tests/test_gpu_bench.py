"""`bench/gpu.sh` on this machine: without CUDA its GPU tests skip and a CPU-sized bench runs (its smoke run)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import PROJECT


def test_the_gpu_script_runs_its_smoke_bench_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    done = subprocess.run(
        ["bash", str(PROJECT / "bench" / "gpu.sh"), "--smoke", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert {row["model"] for row in rows} == {"contrastive", "linear", "cvae"}
    assert any(row["streamed"] for row in rows)
    assert all(row["epoch_s"] > 0 and row["cells_per_s"] > 0 for row in rows)
    table = out.read_text()
    assert table.count("\n| ") == len(rows) + 1  # the header row and one row per case
    assert "skipped" in done.stdout or "no CUDA" in done.stdout  # the GPU tests skip cleanly here
