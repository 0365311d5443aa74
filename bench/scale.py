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

Usage::

    .venv/bin/python bench/scale.py --cells 100000 500000 2000000 --genes 2000
    .venv/bin/python bench/scale.py --cells 300000 --genes 8000
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


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GB) and output of ``cmd`` under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True)
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
    raw = ROOT / "data" / "01_raw" / f"{screen}.h5ad"
    if not raw.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "perturbscope.simulation",
                "--out",
                str(raw),
                "--n-cells",
                str(n_cells),
                "--n-genes",
                str(n_genes),
                "--seed",
                "0",
            ],
            cwd=ROOT,
            env=ENV,
            check=True,
        )
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


def write_table(rows: list[dict]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    csv = RESULTS / "scale.csv"
    if csv.exists():
        frame = pd.concat([pd.read_csv(csv), frame], ignore_index=True)
    frame.to_csv(csv, index=False)
    lines = [
        "# Scale: data_processing from disk and one streamed contrastiveVI epoch",
        "",
        "`bench/scale.py` (one row per run; simulated screens, `kedro run --pipelines data_processing` with "
        "`on_disk_above_gb=0`, then one epoch of contrastiveVI with conf/base settings streaming from the processed "
        "file, plus the streamed embedding of every cell for the escape mixture). Peak RSS is that of each process "
        "(`/usr/bin/time -v`). `train_process_s` includes loading, the control cells read into memory, the epoch "
        "(training + validation) and the escape embedding.",
        "",
        "| " + " | ".join(frame.columns) + " |",
        "|" + "---|" * len(frame.columns),
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.fillna("").itertuples(index=False)]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train:
        print(json.dumps(train_one_epoch(args.train)), flush=True)
        return 0
    for n in args.cells:
        row = run_size(n, args.genes)
        print(json.dumps(row), flush=True)
        write_table([row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
