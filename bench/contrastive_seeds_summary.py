"""Summarise several training seeds of ``contrastive_vs_scvi.py`` on the same screen.

One side-by-side run is one draw: on a screen at its separability ceiling the
final program ARI of either tool moves by about +-0.01 with the training
seed. This script reads the tables of runs that differ only in
``--train-seed`` and writes, per tool, the mean and range of each figure,
plus the per-run verdicts of the three benchmark goals.

Usage::

    .venv-bench/bin/python bench/contrastive_vs_scvi.py --seed 0                  # training seed 0
    .venv-bench/bin/python bench/contrastive_vs_scvi.py --seed 0 --train-seed 1 --name contrastive_vs_scvi_train1
    .venv-bench/bin/python bench/contrastive_vs_scvi.py --seed 0 --train-seed 2 --name contrastive_vs_scvi_train2
    .venv-bench/bin/python bench/contrastive_seeds_summary.py \
        contrastive_vs_scvi contrastive_vs_scvi_train1 contrastive_vs_scvi_train2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = [
    "s_per_epoch_median",
    "train_seconds_total",
    "val_neg_elbo_per_cell",
    "program_ari",
    "program_ari_one_leiden_run",
    "phase_leakage_salient",
    "phase_chance",
]


def verdicts(table: pd.DataFrame) -> dict[str, object]:
    ours, scvi = table.set_index("tool").loc["perturbscope"], table.set_index("tool").loc["scvi-tools"]
    to_target = ours["time_to_scvi_final_ari_s"]
    return {
        "speed_per_epoch": scvi["s_per_epoch_median"] / ours["s_per_epoch_median"],
        "time_to_scvi_final_ari_fraction": to_target / scvi["train_seconds_total"],
        "final_ari_ours_minus_scvi": ours["program_ari"] - scvi["program_ari"],
        "leakage_ours_minus_scvi": ours["phase_leakage_salient"] - scvi["phase_leakage_salient"],
        "a_speed_ge_1.5x": bool(scvi["s_per_epoch_median"] / ours["s_per_epoch_median"] >= 1.5),
        "b_time_le_one_third": bool(to_target / scvi["train_seconds_total"] <= 1 / 3),
        "c_ari_ge_and_leakage_lt": bool(
            ours["program_ari"] >= scvi["program_ari"] and ours["phase_leakage_salient"] < scvi["phase_leakage_salient"]
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="+", help="result names in bench/results (without .csv)")
    parser.add_argument("--out", default="contrastive_vs_scvi_seeds")
    args = parser.parse_args(argv)
    runs = {name: pd.read_csv(RESULTS / f"{name}.csv") for name in args.names}
    long = pd.concat([t.assign(run=name) for name, t in runs.items()])
    summary = long.groupby("tool")[FIGURES].agg(["mean", "min", "max"])
    per_run = pd.DataFrame({name: verdicts(t) for name, t in runs.items()}).T
    per_run.index.name = "run"
    per_run.to_csv(RESULTS / f"{args.out}.csv")
    lines = [
        f"# contrastiveVI vs scvi-tools over {len(runs)} training seeds of one screen",
        "",
        f"Runs: {', '.join(f'`{n}`' for n in runs)} (each a full `contrastive_vs_scvi.py` table).",
        "",
        "Mean [min, max] per tool:",
        "",
        "| figure | " + " | ".join(summary.index) + " |",
        "|---|" + "---|" * len(summary.index),
    ]
    for figure in FIGURES:
        cells = [
            f"{summary.loc[tool, (figure, 'mean')]:.3f} [{summary.loc[tool, (figure, 'min')]:.3f}, "
            f"{summary.loc[tool, (figure, 'max')]:.3f}]"
            for tool in summary.index
        ]
        lines.append(f"| {figure} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per run:",
        "",
        "| run | " + " | ".join(per_run.columns) + " |",
        "|---|" + "---|" * len(per_run.columns),
    ]
    for name, row in per_run.iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
