"""The science on small simulated screens: programs in the salient space, phase in the background."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from perturbscope import tracking
from perturbscope.pipelines.contrastive_model import nodes

from .conftest import Trained, simulated, train_and_evaluate

KEY = "program_responded"
PHASE = "phase_original"


def _value(
    table: pd.DataFrame, metric: str, key: str, space: str, column: str = "value", cells: str = "perturbed"
) -> float:
    row = table[
        (table["metric"] == metric) & (table["key"] == key) & (table["space"] == space) & (table["cells"] == cells)
    ]
    assert len(row) == 1, f"no {metric}/{key}/{space} row in\n{table}"
    return float(row[column].iloc[0])


def _check_science(run: Trained) -> None:
    table = run.evaluation
    ari = {space: _value(table, "ari", KEY, space) for space in ("salient", "background", "pca")}
    knn = {space: _value(table, "knn_accuracy", KEY, space) for space in ("salient", "background", "pca")}
    leak = {space: _value(table, "leakage_knn_accuracy", PHASE, space) for space in ("salient", "background", "pca")}
    chance = _value(table, "leakage_knn_accuracy", PHASE, "salient", "chance_level")
    summary = f"ARI {ari}, kNN {knn}, phase leakage {leak} (chance {chance:.3f})"
    # perturbed cells cluster by their true program in the salient space ...
    assert ari["salient"] >= 0.8, summary
    assert knn["salient"] >= 0.9, summary
    # ... which the cell cycle hides in the background space and in PCA
    assert ari["salient"] > max(ari["background"], ari["pca"]) + 0.5, summary
    # phase is at chance level in the salient space, and carried by the background space
    assert leak["salient"] <= chance + 0.1, summary
    assert leak["background"] >= 0.9, summary
    # controls sit at the origin of the salient space, perturbed cells that responded do not
    salient = run.embedded.obsm["X_salient"]
    norm = np.linalg.norm(salient, axis=1)
    is_control = run.embedded.obs["is_control"].to_numpy()
    responded = (
        run.embedded.obs["responded"].to_numpy().astype(bool) & (run.embedded.obs["program"] != "none").to_numpy()
    )
    assert np.median(norm[is_control]) < 0.3 * np.median(norm[responded]), summary


def test_salient_space_separates_programs_and_drops_phase(trained: Trained) -> None:
    _check_science(trained)


def test_escape_probability_ranks_responders_and_spares_null_perturbations(trained: Trained) -> None:
    from sklearn.metrics import roc_auc_score

    obs = trained.embedded.obs
    probability = trained.calls["perturbed_probability"].reindex(obs.index).to_numpy()
    target = ~obs["is_control"].to_numpy().astype(bool)
    effect = target & (obs["program"].astype(str) != "none").to_numpy()
    responded = obs["responded"].to_numpy().astype(bool)
    scored = effect & np.isfinite(probability)
    auroc = roc_auc_score(responded[scored], probability[scored])
    null = target & (obs["program"].astype(str) == "none").to_numpy()
    called_null = float(np.mean(probability[null] > 0.5))
    assert auroc >= 0.95, f"escape AUROC {auroc:.3f}"  # measured 0.996
    assert called_null <= 0.05, f"cells of null perturbations called perturbed: {called_null:.3f}"  # measured 0


def test_science_holds_on_another_screen() -> None:
    """Same defaults on a screen with more programs, a stronger cell cycle and smaller programs."""
    _, screen = simulated(n_programs=4, cell_cycle_strength=3.0, genes_per_program=25, n_cells=2000, seed=7)
    _check_science(train_and_evaluate(screen))


def test_salient_genes_recover_each_programs_genes(trained: Trained, sim_pair) -> None:
    raw, screen = sim_pair
    truth = raw.varm["true_log2fc"]
    table = nodes.rank_salient_genes(screen, trained.calls, trained.model, {"top_genes": 20})
    assert set(table["perturbation"]) == set(screen.obs.loc[~screen.obs["is_control"], "perturbation"].astype(str))
    assert (table.groupby("perturbation")["rank"].max() == 20).all()
    program = raw.uns["perturbation_truth"]["program"]
    effects, nulls, precision = [], [], []
    for perturbation, genes in table.groupby("perturbation"):
        true = truth.loc[genes["gene"], perturbation].to_numpy()
        if program[perturbation] == "none":
            nulls.append(genes["mean_log2fc"].abs().mean())
            continue
        effects.append(genes["mean_log2fc"].abs().mean())
        moved = true != 0
        precision.append(moved.mean())
        # the strongest genes are the program's genes, every one moved in its true direction
        assert moved[:5].all(), (perturbation, genes)
        assert (np.sign(genes["mean_log2fc"].to_numpy()[moved]) == np.sign(true[moved])).mean() >= 0.95
        assert genes["fraction_same_direction"].to_numpy()[moved].mean() >= 0.8
    # most of each top 20 are its program's genes (a program has 30: 15 up, 15 down)
    assert np.mean(precision) >= 0.75 and min(precision) >= 0.6, precision
    # a perturbation without an effect moves nothing much
    assert max(nulls) < 0.3 * min(effects), (nulls, effects)


def test_training_history_and_metadata(trained: Trained) -> None:
    history = trained.history
    assert history["best"].sum() == 1
    assert {"train_loss", "val_loss", "train_wasserstein", "val_kl_salient"} <= set(history.columns)
    assert history["val_loss"].notna().all()
    # validation loss kept improving well after the first epoch (which already removes most of it)
    assert history["val_loss"].min() < 0.9 * history["val_loss"].iloc[0]
    meta = trained.model.metadata
    assert meta["genes"] == list(trained.screen.var_names)
    assert meta["n_control_cells"] == int(trained.screen.obs["is_control"].sum())
    metrics = tracking.training_history_metrics(history)
    assert len(metrics["train_loss"]) == len(history)
    assert metrics["train_loss"][0] == {"step": 0, "value": pytest.approx(history["train_loss"].iloc[0])}
    assert metrics["best_epoch"]["value"] == float(history.loc[history["best"], "epoch"].iloc[0])
