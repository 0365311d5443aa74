"""Time and peak memory of the whole default `kedro run` on a simulated screen of realistic size.

Usage::

    python bench/end_to_end.py --n-cells 20000 --n-doubles 6 --n-batches 2          # default training, Cell Ranger .h5
    python bench/end_to_end.py --n-cells 12000 --epochs 3                           # what CI runs

Simulates the screen into a temporary folder (``--keep DIR``: a new folder that stays, for
``bench/epoch_scaling.py`` to score), registers only its schema (the ``e2e``
environment: conf/base with every output under that folder), runs
``kedro run --env e2e --params screen=<name>`` under ``/usr/bin/time -v`` and appends a row
to bench/results/end_to_end.md: wall clock, peak RSS, epochs each model trained. Without
``--epochs`` every training budget is conf/base's (early stopping decides); with it, each
model's ``max_epochs`` is that number (conf/e2e uses 3).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "end_to_end.md"
MODELS = {
    "contrastive_model": "contrastive_training_history.csv",
    "linear_model": "linear_training_history.csv",
}


def _base_epochs() -> dict[str, int]:
    out = {}
    for pipeline in ("contrastive_model", "linear_model", "perturbation_prediction"):
        params = yaml.safe_load((ROOT / "conf" / "base" / f"parameters_{pipeline}.yml").read_text())
        out[pipeline] = int(params[pipeline]["training"]["max_epochs"])
    return out


def bench_screen(n_cells: int, n_genes: int, n_doubles: int, n_batches: int, seed: int):  # -> AnnData
    """The simulated screen of the bench (its truth for bench/epoch_scaling.py too)."""
    from perturbscope.simulation import simulate_screen

    return simulate_screen(
        n_cells=n_cells,
        n_genes=n_genes,
        n_doubles=n_doubles,
        n_batches=n_batches,
        n_programs=5,
        perturbations_per_program=4,
        seed=seed,
        **({"guides_per_target": 2, "guides_per_cell": 2, "multiplet_rate": 0.02} if n_doubles else {}),
    )


def _latest(path: Path) -> Path:
    return sorted(path.iterdir())[-1] / path.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--n-doubles", type=int, default=6)
    parser.add_argument("--n-batches", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="max_epochs of every model (default: conf/base's)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="run in this (new) folder and keep it, for scoring")
    args = parser.parse_args()
    from perturbscope.simulation import write_cellranger_h5

    screen = "sim_doubles_batch" if args.n_doubles else "sim_singles"  # the schemas in conf/e2e/screens.yml
    epochs = dict.fromkeys(_base_epochs(), args.epochs) if args.epochs else _base_epochs()
    params = ",".join(f"{p}.training.max_epochs={n}" for p, n in epochs.items())
    if args.keep is not None:
        args.keep.mkdir(parents=True)  # a new folder: two runs never share one
    keep = contextlib.nullcontext(str(args.keep.resolve())) if args.keep else None
    with keep or tempfile.TemporaryDirectory(prefix="perturbscope-e2e-") as tmp:
        root = Path(tmp)
        (root / "data" / "01_raw").mkdir(parents=True)
        adata = bench_screen(args.n_cells, args.n_genes, args.n_doubles, args.n_batches, args.seed)
        if screen == "sim_singles":
            adata = adata[adata.obs["n_perturbed_genes"] <= 1].copy()
            adata.write_h5ad(root / "data" / "01_raw" / f"{screen}.h5ad")
        else:  # a Cell Ranger output with guide counts and its feature reference, as conf/e2e/screens.yml says
            folder = root / "data" / "01_raw" / screen
            write_cellranger_h5(adata, folder / "filtered_feature_bc_matrix.h5", folder / "feature_reference.csv")
        env = {
            **os.environ,
            "PERTURBSCOPE_TEST_ROOT": str(root),
            "KEDRO_DISABLE_TELEMETRY": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        kedro = str(Path(sys.executable).with_name("kedro"))
        load = os.getloadavg()[0]
        proc = subprocess.run(
            ["/usr/bin/time", "-v", kedro, "run", "--env", "e2e", "--params", f"screen={screen},{params}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(proc.stdout[-4000:] + proc.stderr[-4000:])
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
        rss_gb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024**2
        reporting = root / "data" / "08_reporting" / screen
        trained = {m: len(pd.read_csv(_latest(reporting / f))) for m, f in MODELS.items()}
        models = root / "data" / "06_models" / screen
        for split in ("held_out_cells", "held_out_perturbations"):
            trained[f"cvae {split}"] = len(pd.read_csv(_latest(models / split / "cvae_training_history.csv")))
        summary = pd.read_csv(_latest(reporting / "prediction_summary.csv"))
        n_kept = int(pd.read_csv(_latest(reporting / "qc_summary.csv"))["cells_left"].iloc[-1])
    kind = f"{args.n_doubles} doubles, {args.n_batches} batch(es)" if args.n_doubles else "singles only"
    row = (
        f"| {datetime.now(UTC):%Y-%m-%d %H:%M} | {args.n_cells:,} × {args.n_genes:,} ({kind}; {n_kept:,} after QC) "
        f"| {'conf/base' if args.epochs is None else args.epochs} "
        f"| {', '.join(f'{k} {v}' for k, v in trained.items())} | {wall} | {rss_gb:.2f} | {load:.1f} | {os.cpu_count()} |"  # noqa: E501
    )
    if not RESULTS.exists():
        RESULTS.write_text(
            "# The whole default `kedro run` (all five pipelines) on simulated screens\n\n"
            "`python bench/end_to_end.py`; one run per row, 2-core CPU, no GPU.\n\n"
            "| finished (UTC) | screen (cells × genes) | max_epochs | epochs trained | wall clock (m:ss) "
            "| peak RSS (GB) | load avg at start | cores |\n|---|---|---|---|---|---|---|---|\n"
        )
    with RESULTS.open("a") as handle:
        handle.write(row + "\n")
    print(row)
    for line in re.findall(r"Slowest .*", proc.stdout + proc.stderr):
        print(line)
    print(summary[["evaluation", "method", "status", "n_perturbations"]].to_string(index=False))


if __name__ == "__main__":
    main()
