"""Time and peak memory of the data_processing pipeline on a large simulated screen.

Usage::

    python bench/data_processing_scale.py --n-cells 200000 --n-genes 2000

Simulates the screen into data/01_raw/, runs ``kedro run --pipelines data_processing``
under ``/usr/bin/time -v`` and appends a row to bench/results/data_processing_scale.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "data_processing_scale.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-cells", type=int, default=200_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    args = parser.parse_args()
    screen = f"sim_{args.n_cells}x{args.n_genes}"
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "perturbscope.simulation",
            "--out",
            f"data/01_raw/{screen}.h5ad",
            "--n-cells",
            str(args.n_cells),
            "--n-genes",
            str(args.n_genes),
            "--seed",
            "0",
        ],
        cwd=ROOT,
        env=env,
        check=True,
    )
    kedro = str(Path(sys.executable).with_name("kedro"))
    load = os.getloadavg()[0]
    proc = subprocess.run(
        [
            "/usr/bin/time",
            "-v",
            kedro,
            "run",
            "--pipelines",
            "data_processing",
            "--params",
            f"screen={screen},schema.program_key=program",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    wall = re.search(r"Elapsed \(wall clock\) time .*: (\S+)", proc.stderr).group(1)
    rss_gb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024**2
    if not RESULTS.exists():
        RESULTS.write_text(
            "# data_processing at scale\n\n"
            "| date (UTC) | screen | wall clock (m:ss) | peak RSS (GB) | load avg at start | cores |\n"
            "|---|---|---|---|---|---|\n"
        )
    row = (
        f"| {datetime.now(UTC):%Y-%m-%d %H:%M} | {args.n_cells:,} cells × {args.n_genes:,} genes "
        f"| {wall} | {rss_gb:.2f} | {load:.1f} | {os.cpu_count()} |\n"
    )
    with RESULTS.open("a") as handle:
        handle.write(row)
    print(row, end="")


if __name__ == "__main__":
    main()
