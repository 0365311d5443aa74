"""How fast cells come off a backed .h5ad: contiguous blocks (what training streams) vs random minibatches.

anndata's backed sparse dataset (``anndata.io.sparse_dataset``) read three ways, each repeated:

* ``blocks``: contiguous blocks of ``--block`` cells, as ``StreamingCellData`` reads them (the
  block-wise shuffle then shuffles cells within a window of blocks in memory);
* ``random_sorted``: minibatches of ``--batch`` random cells (sorted indices, one fancy-indexed read
  each), what a fully random sampler over the backed file would do;
* ``random_rows``: the same minibatches read row by row.

Usage::

    .venv/bin/python bench/streaming_reads.py \
        data/03_primary/<screen>/processed_screen.h5ad/<version>/processed_screen.h5ad
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import h5py
import numpy as np
from anndata.io import sparse_dataset

RESULTS = Path(__file__).resolve().parent / "results"


def _blocks(ds, n: int, block: int, budget: int) -> int:
    cells = 0
    for start in range(0, min(n, budget), block):
        cells += ds[start : min(start + block, n)].shape[0]
    return cells


def _random(ds, n: int, batch: int, budget: int, rng: np.random.Generator, row_by_row: bool) -> int:
    cells = 0
    while cells < budget:
        idx = np.sort(rng.choice(n, batch, replace=False))
        if row_by_row:
            for i in idx:
                ds[int(i) : int(i) + 1]
        else:
            ds[idx]
        cells += batch
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--key", default="layers/counts")
    parser.add_argument("--block", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    with h5py.File(args.path, "r") as f:
        ds = sparse_dataset(f[args.key])
        n = ds.shape[0]
        modes = {
            "blocks": lambda rng: _blocks(ds, n, args.block, n),
            "random_sorted": lambda rng: _random(ds, n, args.batch, 20 * args.batch, rng, False),
            "random_rows": lambda rng: _random(ds, n, args.batch, 4 * args.batch, rng, True),
        }
        for repeat in range(args.repeats):
            for mode, read in modes.items():  # interleaved, so the modes see the same machine state
                start = time.perf_counter()
                cells = read(np.random.default_rng(repeat))
                seconds = time.perf_counter() - start
                rows.append(
                    {
                        "mode": mode,
                        "repeat": repeat,
                        "cells": cells,
                        "seconds": round(seconds, 3),
                        "cells_per_s": round(cells / seconds),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    by_mode = {m: [r["cells_per_s"] for r in rows if r["mode"] == m] for m in modes}
    median = {m: float(np.median(v)) for m, v in by_mode.items()}
    lines = [
        "# Streaming reads from a backed .h5ad (anndata sparse_dataset)",
        "",
        f"`bench/streaming_reads.py` on `{Path(args.path).name}` ({n:,} cells, `{args.key}`), "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"{args.repeats} repeats per mode, interleaved. Blocks of {args.block:,} cells; minibatches of {args.batch}.",
        "",
        "| mode | cells/s per repeat | median cells/s | vs blocks |",
        "|---|---|---:|---:|",
    ]
    for mode, values in by_mode.items():
        lines.append(
            f"| {mode} | {', '.join(f'{v:,}' for v in values)} | {median[mode]:,.0f} | "
            f"{median[mode] / median['blocks']:.4f} |"
        )
    (RESULTS / "streaming_reads.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
