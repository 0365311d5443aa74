"""Escapers, programs and "did it work?" on simulated screens with 60-80 % penetrance, side by side
with scvi-tools' ContrastiveVI.

Each screen: 12,000 cells x 2,000 genes, 5 programs x 8 perturbations + 4 null ones, a strong
cell cycle (2.5 log2), a fraction ``penetrance`` of the guide-carrying cells responding (the
others, escapers, are drawn like controls), median library size ``--library-size`` and
``--high-expression-share`` of the UMIs on housekeeping genes. Per tool:

* ``auroc_probability``: AUROC of ``perturbed_probability`` for the target cells that truly
  responded. Ours: the model's escape mixture (conf/base). scvi-tools has no such output, so the
  same mixture (``perturbscope.models.escape``) is fitted on its salient codes;
* ``auroc_salient_norm``: the same with the norm of the salient code as the score;
* ``kmeans_ari_responders``: KMeans (k = programs) on the salient codes of the responders vs their program;
* ``leiden_ari_called``: Leiden (as many clusters as programs, median of 5 seeds) over the cells
  called perturbed (probability > 0.5) of perturbations with a program, against that program;
* ``phase_leakage``: kNN accuracy of the true phase from the salient codes of all target cells
  (chance: the majority share);
* ``oracle_*``: what the true fold changes give on the log-normalised counts (the screen's ceiling):
  KMeans ARI of the responders' projections on the 5 true program directions, and the AUROC of each
  cell's projection on its perturbation's true fold changes;
* the energy-distance effect test (model-free, the same for both): true effects called, null ones called.

Ours runs as ``kedro run`` would (conf/base: early stopping, its epochs); scvi-tools with its
defaults for ``--scvi-epochs`` epochs (lr 1e-3, KL warm-up 30 epochs).

Usage (bench environment with scvi-tools; ``.venv-bench/bin/pip install -e . --no-deps``)::

    .venv-bench/bin/python bench/escape_vs_scvi.py --scvi-epochs 200   # writes bench/results/escape_vs_scvi.{md,csv}

Re-running ours after a change to its defaults, with the scvi-tools rows of an earlier run on the same
screens (scvi-tools needs about 100 CPU minutes for the three)::

    .venv/bin/python bench/escape_vs_scvi.py --skip-scvi --scvi-from escape_vs_scvi --name escape_vs_scvi
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
import torch
from contrastive_vs_scvi import processed_like
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from perturbscope.models.escape import fit_escape_mixture
from perturbscope.models.model import ContrastiveVI
from perturbscope.pipelines.contrastive_model import nodes
from perturbscope.pipelines.contrastive_model.evaluation import chance_accuracy, knn_accuracy, program_scores
from perturbscope.pipelines.perturbation_effects import nodes as effects
from perturbscope.simulation import simulate_screen

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {"perturbation_key": "perturbation", "control_labels": ["control"], "program_key": "program"}
CONF = Path(__file__).resolve().parents[1] / "conf" / "base"


def _yaml(name: str) -> dict:
    import yaml

    return yaml.safe_load((CONF / name).read_text())


def make_screen(penetrance: float, seed: int, n_cells: int, library_size: float, high_expression_share: float):
    raw = simulate_screen(
        n_cells=n_cells,
        n_genes=2000,
        n_programs=5,
        perturbations_per_program=8,
        n_null_perturbations=4,
        penetrance=penetrance,
        cell_cycle_strength=2.5,
        high_expression_share=high_expression_share,
        library_size_median=library_size,
        seed=seed,
    )
    return raw, processed_like(raw)


def run_ours(screen, seed: int) -> dict:
    params = _yaml("parameters_contrastive_model.yml")["contrastive_model"]
    training = {**params["training"], "progress": False}
    start = time.perf_counter()
    model, history = nodes.train_contrastive_model(
        screen, params["model"], training, _yaml("parameters.yml")["training"], SCHEMA, seed
    )
    seconds = time.perf_counter() - start
    embedded = ContrastiveVI(model).embed(screen)
    mixture = nodes.fit_escape_mixture(embedded, params["escape"], seed)
    calls = nodes.call_perturbed_cells(embedded, mixture, params["escape"])
    return {
        "salient": embedded.obsm["X_salient"],
        "probability": calls["perturbed_probability"].reindex(embedded.obs_names).to_numpy(),
        "epochs": len(history),
        "seconds": seconds,
    }


def escape_probability(screen, salient: np.ndarray, seed: int) -> np.ndarray:
    """The escape mixture of conf/base on any salient codes (null: the validation controls)."""
    params = _yaml("parameters_contrastive_model.yml")["contrastive_model"]["escape"]
    is_control = screen.obs["is_control"].to_numpy().astype(bool)
    is_val = (screen.obs["split"] == "validation").to_numpy()
    labels = screen.obs["perturbation"].astype(str).to_numpy()
    settings = params["mixture"]
    mixture, _ = fit_escape_mixture(
        salient[~is_control], labels[~is_control], salient[is_control & is_val], seed=seed, **settings
    )
    probability = mixture.probability(salient, labels)
    probability[is_control] = 0.0
    return probability


def run_scvi(screen, seed: int, epochs: int) -> dict:
    import scvi

    scvi.settings.seed = seed
    scvi.settings.verbosity = logging.WARNING
    adata = screen.copy()
    scvi.external.ContrastiveVI.setup_anndata(adata, layer="counts")
    model = scvi.external.ContrastiveVI(
        adata,
        n_hidden=128,
        n_background_latent=10,
        n_salient_latent=10,
        n_layers=1,
        dropout_rate=0.1,
        use_observed_lib_size=True,
    )
    is_control = screen.obs["is_control"].to_numpy().astype(bool)
    is_val = (screen.obs["split"] == "validation").to_numpy()
    start = time.perf_counter()
    model.train(
        background_indices=np.flatnonzero(is_control).tolist(),
        target_indices=np.flatnonzero(~is_control).tolist(),
        max_epochs=epochs,
        batch_size=128,
        accelerator="cpu",
        early_stopping=False,
        enable_progress_bar=False,
        datasplitter_kwargs={
            "external_indexing": [np.flatnonzero(~is_val), np.flatnonzero(is_val), np.array([], dtype=int)]
        },
        plan_kwargs={"lr": 1e-3, "n_epochs_kl_warmup": 30},
    )
    seconds = time.perf_counter() - start
    salient = model.get_latent_representation(adata, representation_kind="salient")
    return {
        "salient": salient,
        "probability": escape_probability(screen, salient, seed),
        "epochs": epochs,
        "seconds": seconds,
    }


def score(raw, screen, run: dict) -> dict:
    obs = raw.obs
    target = ~screen.obs["is_control"].to_numpy().astype(bool)
    responded = obs["responded"].to_numpy().astype(bool)
    programs = obs["program"].astype(str).to_numpy()
    phase = obs["phase"].astype(str).to_numpy()
    salient = np.asarray(run["salient"])
    probability = np.asarray(run["probability"], dtype=np.float64)
    norm = np.linalg.norm(salient - np.median(salient[~target], axis=0), axis=1)
    scored = target & np.isfinite(probability)
    called = scored & (probability > 0.5)
    out = {
        "epochs": run["epochs"],
        "train_seconds": round(run["seconds"], 1),
        "auroc_probability": roc_auc_score(responded[scored], probability[scored]),
        "auroc_salient_norm": roc_auc_score(responded[target], norm[target]),
        "called_precision": float(responded[called].mean()),
        "called_recall": float(called[responded].mean()),
    }
    resp = target & responded
    k = len(np.unique(programs[resp]))
    clusters = KMeans(k, n_init=10, random_state=0).fit_predict(salient[resp])
    out["kmeans_ari_responders"] = adjusted_rand_score(programs[resp], clusters)
    annotated = called & (programs != "none")
    out["leiden_ari_called"] = program_scores(salient[annotated], programs[annotated], seed=0, leiden_runs=5)["ari"]
    out["phase_leakage"] = knn_accuracy(salient[target], phase[target], seed=0)
    out["phase_chance"] = chance_accuracy(phase[target])
    return out


def oracle(raw) -> dict:
    """The screen's ceiling: the true fold changes applied to the log-normalised counts."""
    adata = raw.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    x = adata.X.toarray()
    fc = np.asarray(raw.varm["true_log2fc"])
    truth = raw.uns["perturbation_truth"]
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    programs = adata.obs["program"].astype(str).to_numpy()
    responded = adata.obs["responded"].to_numpy().astype(bool)
    x = x - x[labels == "control"].mean(0)
    names = sorted(set(truth["program"]) - {"none"})
    directions = np.array([fc[:, (truth["program"] == name).to_numpy()].mean(1) for name in names])
    resp = responded & (labels != "control")
    clusters = KMeans(len(names), n_init=10, random_state=0).fit_predict(x[resp] @ directions.T)
    scores, truths = [], []
    for j, label in enumerate(truth.index):
        if truth.loc[label, "has_effect"]:
            members = labels == label
            scores.append(x[members] @ fc[:, j])
            truths.append(responded[members])
    return {
        "oracle_kmeans_ari": adjusted_rand_score(programs[resp], clusters),
        "oracle_auroc": roc_auc_score(np.concatenate(truths), np.concatenate(scores)),
    }


def effect_test(raw, screen, seed: int) -> dict:
    params = _yaml("parameters_perturbation_effects.yml")["perturbation_effects"]["effect_test"]
    table = effects.run_effect_tests(screen, params, seed).set_index("perturbation")
    truth = raw.uns["perturbation_truth"]["has_effect"].astype(bool)
    return {
        "true_effects_called": f"{int(table.loc[truth[truth].index, 'significant'].sum())}/{int(truth.sum())}",
        "null_effects_called": f"{int(table.loc[truth[~truth].index, 'significant'].sum())}/{int((~truth).sum())}",
    }


def write_tables(table: pd.DataFrame, args: argparse.Namespace) -> None:
    """``bench/results/<name>.{csv,md}``; the scvi-tools epochs are those of its rows (carried or run)."""
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / f"{args.name}.csv", index=False)
    shown = table.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
    scvi_epochs = sorted({int(e) for e in table.loc[table["tool"] == "scvi-tools", "epochs"]}) or [args.scvi_epochs]
    lines = [
        f"# Escapers, programs and effect tests vs scvi-tools ({datetime.date.today()})",
        "",
        f"Simulated screens: {args.n_cells} cells x 2,000 genes, 5 programs x 8 perturbations + 4 null, "
        f"cell cycle 2.5 log2, median library {args.library_size:.0f}, housekeeping share "
        f"{args.high_expression_share}; one screen per penetrance. Ours: conf/base (early stopping); scvi-tools: "
        f"{', '.join(map(str, scvi_epochs))} epochs, lr 1e-3, KL warm-up 30. CPU, 2 threads. Training seeds of "
        f"ours: {args.train_seeds}; one run per seed. `run`: the date of the run, or the earlier table a row "
        "was carried from (`--scvi-from`: the same screens, scored by the same code).",
        "",
        "| " + " | ".join(shown.columns) + " |",
        "|" + "---|" * len(shown.columns),
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--penetrance", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    parser.add_argument("--library-size", type=float, default=8000.0)
    parser.add_argument("--high-expression-share", type=float, default=0.4)
    parser.add_argument("--n-cells", type=int, default=12000)
    parser.add_argument("--scvi-epochs", type=int, default=100)
    parser.add_argument("--skip-scvi", action="store_true")
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds of ours per screen (repeated runs; scvi-tools: the first)",
    )
    parser.add_argument(
        "--scvi-from",
        default=None,
        help="with --skip-scvi: carry the scvi-tools rows of an earlier table of these screens "
        "(a name in bench/results, e.g. escape_vs_scvi), marked in the `run` column",
    )
    parser.add_argument("--name", default="escape_vs_scvi")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    rows = []
    for i, penetrance in enumerate(args.penetrance):
        raw, screen = make_screen(
            penetrance,
            seed=i,
            n_cells=args.n_cells,
            library_size=args.library_size,
            high_expression_share=args.high_expression_share,
        )
        tests = {**effect_test(raw, screen, seed=0), **oracle(raw)}
        runs = {("perturbscope", seed): run_ours(screen, seed=seed) for seed in args.train_seeds}
        if not args.skip_scvi:
            runs[("scvi-tools", args.train_seeds[0])] = run_scvi(
                screen, seed=args.train_seeds[0], epochs=args.scvi_epochs
            )
        for (tool, seed), run in runs.items():
            row = {
                "screen_seed": i,
                "penetrance": penetrance,
                "tool": tool,
                "train_seed": seed,
                "run": str(datetime.date.today()),
                **score(raw, screen, run),
                **tests,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    table = pd.DataFrame(rows)
    if args.scvi_from:  # the same screens (simulated from the screen seed), scored by the same code
        earlier = pd.read_csv(RESULTS / f"{args.scvi_from}.csv")
        earlier = earlier[(earlier["tool"] == "scvi-tools") & earlier["penetrance"].isin(args.penetrance)].copy()
        earlier["run"] = f"carried from {args.scvi_from}.csv"
        if "train_seed" not in earlier:  # tables before --train-seeds: scvi-tools ran with seed 0
            earlier["train_seed"] = 0
        table = pd.concat([table, earlier[[c for c in table.columns if c in earlier.columns]]], ignore_index=True)
        table = table.sort_values(["screen_seed", "tool", "train_seed"], kind="stable").reset_index(drop=True)
    write_tables(table, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
