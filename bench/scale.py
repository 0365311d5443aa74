"""Scale benchmark: data_processing from disk and one streamed epoch of contrastiveVI, per screen size.

For each size a simulated screen is written to ``data/01_raw/scale_<cells>x<genes>.h5ad`` (not
timed), then two processes run under ``/usr/bin/time -v`` (wall clock, peak RSS):

1. ``kedro run --pipelines data_processing --params screen=...,on_disk_above_gb=0`` — the screen is
   read from disk in blocks of ``chunk_size`` cells (globals.yml) and the processed screen written
   block by block;
2. ``python bench/scale.py --train <processed screen>`` — contrastiveVI (conf/base model) trained
   one epoch from the processed file with the targets streaming (``StreamingCellData``), then
   every cell embedded for the escape mixture, streaming too.

Rows are appended to ``bench/results/scale.csv`` and the table ``bench/results/scale.md`` is
rewritten from it. A GPU column is added when the training ran on CUDA.

``--in-memory``: the same screens on the in-memory path instead (their counts are under
``on_disk_above_gb``), as one process: ``kedro run --env e2e --pipelines data_processing,contrastive_model``
with one epoch of contrastiveVI, outputs under a temporary folder. Peak RSS is compared with the counts'
size as CSR (float32 values + int32 indices + row pointers); rows go to ``bench/results/scale_in_memory.csv``,
shown in ``scale.md`` too.

Usage::

    .venv/bin/python bench/scale.py --cells 100000 500000 2000000 --genes 2000
    .venv/bin/python bench/scale.py --cells 300000 --genes 8000
    .venv/bin/python bench/scale.py --in-memory --cells 500000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ENV = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) and output of ``cmd`` under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=env or ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"{cmd[0]} failed with exit code {proc.returncode}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return seconds, rss_kb / 1024**2, proc.stdout + proc.stderr


def train_one_epoch(path: str) -> dict:
    """Child process: one epoch of contrastiveVI from the processed screen on disk."""
    import torch
    import yaml

    from perturbscope.blocks import BlockScreen
    from perturbscope.models.model import ContrastiveVI

    conf = ROOT / "conf" / "base"
    params = yaml.safe_load((conf / "parameters_contrastive_model.yml").read_text())["contrastive_model"]
    shared = yaml.safe_load((conf / "parameters.yml").read_text())["training"]
    training = {**shared, **params["training"], "max_epochs": 1, "kl_warmup_epochs": 1, "progress": False}
    screen = BlockScreen.open(path)
    start = time.perf_counter()
    api = ContrastiveVI.fit(screen, params["model"], training, seed=0)
    total = time.perf_counter() - start
    n_target = int((~screen.obs["is_control"].to_numpy()).sum())
    return {
        "epoch_seconds": float(api.history["seconds"].iloc[0]),
        "fit_seconds": total,
        "n_target": n_target,
        "device": str(api.module.device) if hasattr(api.module, "device") else "cpu",
        "cuda": bool(torch.cuda.is_available()),
    }


def _latest(folder: Path) -> Path:
    versions = sorted(p for p in folder.iterdir() if p.is_dir())
    return versions[-1] / folder.name


def run_size(n_cells: int, n_genes: int) -> dict:
    screen = f"scale_{n_cells}x{n_genes}"
    raw = _raw_screen(n_cells, n_genes)
    kedro = str(Path(sys.executable).with_name("kedro"))
    load = os.getloadavg()[0]
    proc_s, proc_rss, _ = _timed(
        [kedro, "run", "--pipelines", "data_processing", "--params", f"screen={screen},on_disk_above_gb=0"]
    )
    processed = _latest(ROOT / "data" / "03_primary" / screen / "processed_screen.h5ad")
    train_s, train_rss, out = _timed([sys.executable, str(Path(__file__).resolve()), "--train", str(processed)])
    fit = json.loads(
        out.strip().splitlines()[[i for i, line in enumerate(out.strip().splitlines()) if line.startswith("{")][-1]]
    )
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "cells": n_cells,
        "genes": n_genes,
        "raw_gb_on_disk": round(raw.stat().st_size / 1e9, 2),
        "processing_s": round(proc_s, 1),
        "processing_peak_rss_gb": round(proc_rss, 2),
        "processing_cells_per_s": round(n_cells / proc_s),
        "epoch_s": round(fit["epoch_seconds"], 1),
        "train_process_s": round(train_s, 1),
        "train_peak_rss_gb": round(train_rss, 2),
        "epoch_cells_per_s": round(fit["n_target"] / fit["epoch_seconds"]),
        "gpu": "cuda" if fit["cuda"] else "",
        "load_avg_at_start": round(load, 1),
        "cores": os.cpu_count(),
    }


def _raw_screen(n_cells: int, n_genes: int) -> Path:
    """The simulated screen of this size in data/01_raw/ (written once, not timed)."""
    raw = ROOT / "data" / "01_raw" / f"scale_{n_cells}x{n_genes}.h5ad"
    if not raw.exists():
        subprocess.run(
            [sys.executable, "-m", "perturbscope.simulation", "--out", str(raw), "--n-cells", str(n_cells)]
            + ["--n-genes", str(n_genes), "--seed", "0"],
            cwd=ROOT,
            env=ENV,
            check=True,
        )
    return raw


def run_in_memory(n_cells: int, n_genes: int) -> dict:
    """data_processing + contrastive_model (one epoch) on the in-memory path, one process, its own folder."""
    import tempfile

    import h5py

    raw = _raw_screen(n_cells, n_genes)
    with h5py.File(raw, "r") as f:
        nnz = int(f["X"]["data"].shape[0])
    csr_bytes = nnz * 8 + (n_cells + 1) * 4  # float32 values, int32 column indices and row pointers
    kedro = str(Path(sys.executable).with_name("kedro"))
    with tempfile.TemporaryDirectory(prefix="perturbscope-scale-") as tmp:
        (Path(tmp) / "data" / "01_raw").mkdir(parents=True)
        (Path(tmp) / "data" / "01_raw" / raw.name).symlink_to(raw)
        load = os.getloadavg()[0]
        params = f"screen={raw.stem},contrastive_model.training.max_epochs=1"
        wall, rss_gib, out = _timed(
            [kedro, "run", "--env", "e2e", "--pipelines", "data_processing,contrastive_model", "--params", params],
            {**ENV, "PERTURBSCOPE_TEST_ROOT": tmp},
        )
    slowest = " ".join(re.findall(r"Slowest nodes: ([^(]*)", out, flags=re.S)[:1])
    slowest = re.sub(r"\s+", " ", re.sub(r"\S+\.py:\d+", "", slowest)).strip(" ,")
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "cells": n_cells,
        "genes": n_genes,
        "nonzeros_m": round(nnz / 1e6, 1),
        "counts_csr_gb": round(csr_bytes / 1e9, 3),
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(rss_gib * 1024**3 / 1e9, 2),
        "peak_over_counts": round(rss_gib * 1024**3 / csr_bytes, 2),
        "slowest_nodes": slowest,
        "load_avg_at_start": round(load, 1),
        "cores": os.cpu_count(),
        "code": subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
    }


def _rows(frame) -> list[str]:
    """The lines of a markdown table of ``frame``, values as they are written."""
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.fillna("").itertuples(index=False)]
    return ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns), *body]


def write_table(rows: list[dict], name: str = "scale") -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    csv = RESULTS / f"{name}.csv"
    if csv.exists():
        frame = pd.concat([pd.read_csv(csv), frame], ignore_index=True)
    frame.to_csv(csv, index=False)
    frame = pd.read_csv(RESULTS / "scale.csv")
    lines = [
        "# Scale: data_processing from disk and one streamed contrastiveVI epoch",
        "",
        "`bench/scale.py` (one row per run; simulated screens, `kedro run --pipelines data_processing` with "
        "`on_disk_above_gb=0`, then one epoch of contrastiveVI with conf/base settings streaming from the processed "
        "file, plus the streamed embedding of every cell for the escape mixture). Peak RSS is that of each process "
        "(`/usr/bin/time -v`). `train_process_s` includes loading, the control cells read into memory, the epoch "
        "(training + validation) and the escape embedding.",
        "",
        *_rows(frame),
    ]
    memory = RESULTS / "scale_in_memory.csv"
    if memory.exists():
        frame = pd.read_csv(memory)
        lines += [
            "",
            "## The in-memory path",
            "",
            "`bench/scale.py --in-memory` (one row per run): screens whose counts are under `on_disk_above_gb`, "
            "`kedro run --env e2e --pipelines data_processing,contrastive_model` with one epoch of contrastiveVI in "
            "one process (`/usr/bin/time -v`). `peak_over_counts`: peak RSS over the counts' size as CSR (float32 "
            "values, int32 indices). Issue 28's starting point, the same command on a 500,000 x 2,000 screen: "
            "10:43 at 8.55 GB (116 M non-zeros); on this screen (98 M) before the changes of 2026-12-05: 519.7 s "
            "at 7.92 GB (10.1x its counts); the goal: at most half the wall time, a peak at most 4x the counts.",
            "",
            *_rows(frame),
        ]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--in-memory", action="store_true", help="the in-memory path (see the module docstring)")
    parser.add_argument("--train", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train:
        print(json.dumps(train_one_epoch(args.train)), flush=True)
        return 0
    if args.in_memory:
        for n in args.cells:
            row = run_in_memory(n, args.genes)
            print(json.dumps(row), flush=True)
            write_table([row], "scale_in_memory")
        return 0
    for n in args.cells:
        row = run_size(n, args.genes)
        print(json.dumps(row), flush=True)
        write_table([row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
