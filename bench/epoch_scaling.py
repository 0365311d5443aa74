"""Science figures of kept `bench/end_to_end.py` runs, scored against the simulation's truth.

What `training.reference_epoch_cells` (epoch counts scaled to the screen's size) changes on the
20,000-cell bench screen: the escape calls, the perturbation map, the LDVAE's held-out likelihood and
factor effects, the predictions, the interaction calls, and the epochs and seconds of training::

    python bench/end_to_end.py --keep /tmp/e2e_after                  # the default run, kept
    python bench/epoch_scaling.py score /tmp/e2e_before /tmp/e2e_after
    # contrastiveVI alone at other seeds, epochs scaled or not, from a kept run's processed screen:
    python bench/epoch_scaling.py contrastive /tmp/e2e_after --seeds 1 2 --references 10000 null
    python bench/epoch_scaling.py score /tmp/e2e_after-contrastive-*

The truth is re-simulated with the bench's arguments (``--n-cells`` etc. as given to end_to_end.py;
its defaults here). ``score`` prints one column per folder; ``contrastive`` runs
``kedro run --env e2e --pipelines contrastive_model`` into a new folder per seed and reference (one
torch thread each, two at a time).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
from end_to_end import bench_screen  # bench/ is on sys.path when a bench runs as a script
from sklearn.metrics import adjusted_rand_score, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
SCREEN = "sim_doubles_batch"
METRICS = {
    "linear.evaluation.validation_reconstruction_log_likelihood": "LDVAE held-out log-lik / cell",
    "linear.evaluation.n_significant_effects": "LDVAE significant factor effects",
    "contrastive.evaluation.leakage_knn_accuracy.phase.salient": "phase leakage, salient (kNN acc.)",
    "contrastive.evaluation.leakage_knn_accuracy.phase.chance": "phase leakage, chance",
    "perturbation_effects.map.salient.silhouette": "map silhouette, salient",
    "perturbation_effects.map.factors.silhouette": "map silhouette, factors",
    "perturbation_effects.n_significant": "effect tests: significant",
}


def _latest(root: Path, name: str) -> Path | None:
    found = sorted(glob.glob(f"{root}/data/*/{SCREEN}/**/{name}/*/{name}", recursive=True))
    return Path(found[-1]) if found else None


def _truth(args: argparse.Namespace) -> pd.DataFrame:
    return bench_screen(args.n_cells, args.n_genes, args.n_doubles, args.n_batches, args.seed).obs


def _history(path: Path | None) -> dict[str, object]:
    if path is None:
        return {}
    h = pd.read_csv(path)
    eligible = h[h["kl_weight"] >= 1]
    best = int(eligible["val_loss"].idxmin()) if len(eligible) else None
    return {"epochs": len(h), "best epoch": best, "train s": round(float(h["seconds"].sum()), 1)}


def score(root: Path, obs: pd.DataFrame) -> dict[str, object]:
    row: dict[str, object] = {}
    for name, label in (
        ("contrastive_training_history.csv", "contrastiveVI"),
        ("linear_training_history.csv", "LDVAE"),
    ):
        for key, value in _history(_latest(root, name)).items():
            row[f"{label} {key}"] = value
    for split in ("held_out_cells", "held_out_perturbations"):
        for key, value in _history(
            _latest(root / "data" / "06_models" / SCREEN / split, "cvae_training_history.csv")
        ).items():
            row[f"cVAE {split} {key}"] = value
    calls_path = _latest(root, "contrastive_cell_calls.parquet")
    if calls_path is not None:
        calls = pd.read_parquet(calls_path)
        calls.index = calls.index.str.replace(r"-\d+$", "", regex=True)  # the GEM well suffix of the barcodes
        truth = obs.loc[calls.index]
        target = truth["perturbation"].astype(str) != "control"
        responded = truth.loc[target, "responded"].astype(bool)
        prob = calls.loc[target, "perturbed_probability"]
        called = calls.loc[target, "called_perturbed"].astype(bool)
        ok = prob.notna()
        row["escape AUROC (responded)"] = round(roc_auc_score(responded[ok], prob[ok]), 4)
        row["escape calls: precision"] = round(float((called & responded).sum() / max(called.sum(), 1)), 3)
        row["escape calls: recall"] = round(float((called & responded).sum() / responded.sum()), 3)
    clusters = _latest(root, "perturbation_clusters.csv")
    if clusters is not None:
        program = obs.groupby("perturbation", observed=True)["program"].first().astype(str)
        table = pd.read_csv(clusters)
        for profile, group in table.groupby("profile"):
            singles = group[
                group["perturbation"].isin(program.index) & ~group["perturbation"].str.contains("+", regex=False)
            ]
            row[f"map ARI vs programs ({profile})"] = round(
                adjusted_rand_score(program.loc[singles["perturbation"]].values, singles["cluster"].values), 3
            )
    runs = sorted((root / "data" / "09_runs" / SCREEN).glob("*.json"))
    if runs:
        import mlflow

        run = json.loads(runs[-1].read_text())
        mlflow.set_tracking_uri(run["tracking_uri"])
        metrics = mlflow.get_run(run["mlflow_run_id"]).data.metrics
        for key, label in METRICS.items():
            if key in metrics:
                row[label] = round(metrics[key], 3)
        row["node seconds"] = round(sum(run["node_seconds"].values()), 1)
    summary = _latest(root, "prediction_summary.csv")
    if summary is not None:
        for _, r in pd.read_csv(summary).iterrows():
            if r["method"] in ("cvae_prior", "cvae_controls", "additive"):
                row[f"{r['evaluation']} {r['method']}: pearson delta"] = round(r["pearson_delta_mean"], 3)
                row[f"{r['evaluation']} {r['method']}: energy distance"] = round(r["energy_distance_mean"], 3)
    interactions = _latest(root, "genetic_interactions.csv")
    if interactions is not None:
        classes = pd.read_csv(interactions)["interaction"].value_counts()
        row["interaction classes"] = ", ".join(f"{k} {v}" for k, v in sorted(classes.items()))
    return row


def contrastive(source: Path, seeds: list[int], references: list[str]) -> None:
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    kedro = str(Path(sys.executable).with_name("kedro"))
    jobs = []
    for seed in seeds:
        for reference in references:
            out = source.with_name(f"{source.name}-contrastive-seed{seed}-ref{reference}")
            (out / "data").mkdir(parents=True)  # a new folder: never another run's
            shutil.copytree(source / "data" / "03_primary", out / "data" / "03_primary")
            params = (
                f"screen={SCREEN},seed={seed},training.num_threads=1,contrastive_model.training.max_epochs=300,"
                f"contrastive_model.training.reference_epoch_cells={reference}"
            )
            cmd = [kedro, "run", "--env", "e2e", "--pipelines", "contrastive_model", "--params", params]
            jobs.append((out, cmd))
    for start in range(0, len(jobs), 2):
        procs = []
        for out, cmd in jobs[start : start + 2]:
            log = (out / "kedro.log").open("w")
            procs.append(
                (
                    out,
                    subprocess.Popen(
                        cmd, cwd=ROOT, env={**env, "PERTURBSCOPE_TEST_ROOT": str(out)}, stdout=log, stderr=log
                    ),
                )
            )
        for out, proc in procs:
            if proc.wait() != 0:
                sys.exit(f"{out}: kedro run failed, see {out / 'kedro.log'}")
            print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    scoring = sub.add_parser("score")
    scoring.add_argument("roots", type=Path, nargs="+")
    scoring.add_argument("--n-cells", type=int, default=20_000)
    scoring.add_argument("--n-genes", type=int, default=2_000)
    scoring.add_argument("--n-doubles", type=int, default=6)
    scoring.add_argument("--n-batches", type=int, default=2)
    scoring.add_argument("--seed", type=int, default=1)
    rerun = sub.add_parser("contrastive")
    rerun.add_argument("source", type=Path)
    rerun.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    rerun.add_argument("--references", nargs="+", default=["10000", "null"])
    args = parser.parse_args()
    if args.command == "contrastive":
        contrastive(args.source.resolve(), args.seeds, args.references)
        return
    obs = _truth(args)
    table = pd.DataFrame({str(root): score(root, obs) for root in args.roots})
    pd.set_option("display.width", 250)
    pd.set_option("display.max_colwidth", 80)
    print(table.to_string())


if __name__ == "__main__":
    main()
