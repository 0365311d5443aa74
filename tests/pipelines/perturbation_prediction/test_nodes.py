"""The cVAE against the baselines on simulated screens with planted effects, and the leakage guard."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import perturbscope.models.model.base as model_base
from perturbscope.pipelines.perturbation_prediction import nodes
from perturbscope.pipelines.perturbation_prediction.splits import SplitError

from .conftest import SCHEMA

MODEL = {
    "likelihood": "gaussian",
    "n_latent": 6,
    "n_hidden": 64,
    "n_layers": 1,
    "dropout": 0.0,
    "n_condition_embedding": 8,
    "condition_shift": True,
}
TRAINING = {
    "batch_size": 128,
    "max_epochs": 40,
    "lr": 0.003,
    "kl_warmup_epochs": 10,
    "patience": 10,
    "seed": 0,
    "device": "cpu",
    "progress": False,
}
GENERATION = {"n_cells": 150}
EVALUATION = {"n_top_de": 20, "top_k": [25, 50, 100], "max_cells_energy": 150}
N_PCS = 10


def _run(screen: ad.AnnData, split_params: dict, likelihood: str) -> tuple[pd.DataFrame, pd.DataFrame, object]:
    split = nodes.make_prediction_split(screen, split_params, SCHEMA)
    model, history = nodes.train_cvae(screen, split, {**MODEL, "likelihood": likelihood}, TRAINING, {}, SCHEMA)
    cvae = nodes.predict_cvae(model, screen, split, GENERATION)
    base = nodes.predict_baselines(screen, split, GENERATION, SCHEMA)
    pca = nodes.fit_expression_pca(screen, N_PCS)
    table = nodes.evaluate_predictions(screen, split, cvae, base, pca, EVALUATION)
    return split, table, model


@pytest.fixture(scope="module", params=["gaussian", "nb"])
def held_out_cells(simulated_screen, request):
    return _run(simulated_screen, {"kind": "held_out_cells", "test_fraction": 0.2}, request.param)


@pytest.fixture(scope="module", params=["gaussian", "nb"])
def held_out_doubles(simulated_screen, request):
    return _run(simulated_screen, {"kind": "held_out_perturbations", "perturbations": "auto"}, request.param)


def _mean_by_method(table: pd.DataFrame, score: str) -> pd.Series:
    return table.groupby("method")[score].mean()


def test_cvae_beats_no_change_and_perturbed_mean_on_held_out_cells(simulated_screen, held_out_cells) -> None:
    _, table, _ = held_out_cells
    program = simulated_screen.obs.groupby("perturbation", observed=True)["program"].first().astype(str)
    scored = table[table["perturbation"].map(program) != "none"]  # leave out the null perturbation
    assert scored["perturbation"].nunique() == 9
    mse = _mean_by_method(scored, "mse")
    energy = _mean_by_method(scored, "energy_distance")
    r = _mean_by_method(scored, "pearson_delta")
    for mode in ("cvae_prior", "cvae_controls"):
        assert mse[mode] < 0.7 * mse["no_change"]
        assert mse[mode] < 0.85 * mse["perturbed_mean"]
        assert energy[mode] < energy["no_change"]
        assert r[mode] > r["perturbed_mean"] + 0.05
        assert r[mode] > 0.7
    # "no change" only correlates through the noise of the reference controls it does not share
    assert r["no_change"] < 0.4


def test_additive_double_is_predicted_from_its_singles(held_out_doubles) -> None:
    split, table, model = held_out_doubles
    assert set(table["perturbation"]) == {"PERT01+PERT02", "PERT05+PERT06", "PERT05+PERT07"}
    assert not set(table["perturbation"]) & set(model.metadata["train_perturbations"])
    for mode in ("cvae_prior", "cvae_controls"):
        rows = table[table["method"] == mode]
        assert (rows["pearson_delta"] > 0.7).all(), rows[["perturbation", "pearson_delta"]]
        assert rows["pearson_delta"].mean() > 0.78
        assert rows["direction_accuracy_top_de"].mean() >= 0.8
    # the planted effect is exactly additive (in log counts), so the additive baseline is near-perfect;
    # the cVAE learns the combination from the singles well above the perturbed mean
    r = _mean_by_method(table, "pearson_delta")
    assert r["additive"] > 0.85 and r["cvae_prior"] > r["perturbed_mean"] + 0.15
    assert "same_perturbation" not in set(table["method"])  # no training cells of a held-out double


def test_no_test_cell_reaches_training(simulated_screen, monkeypatch) -> None:
    """Every batch the training loop sees (train and validation) holds training cells only."""
    seen: list[np.ndarray] = []

    def spy_fit(model, train_sampler, val_sampler, config, **kwargs):
        for sampler in (s for s in (train_sampler, val_sampler) if s is not None):
            for batch in sampler:
                seen.append(batch["screen_row"].numpy())
        from perturbscope.models.training import History

        return History(epoch=[0], train_loss=[0.0], val_loss=[0.0], kl_weight=[1.0], seconds=[0.0])

    monkeypatch.setattr(model_base, "fit", spy_fit)  # the one training loop, as the model layer calls it
    for params, seed in (
        ({"kind": "held_out_perturbations", "perturbations": "auto"}, 0),
        ({"kind": "held_out_cells", "test_fraction": 0.3}, 1),
    ):
        split = nodes.as_split(nodes.make_prediction_split(simulated_screen, params, SCHEMA, seed), simulated_screen)
        seen.clear()
        model, _ = nodes.train_cvae(simulated_screen, split, MODEL, TRAINING, {}, SCHEMA)
        rows = np.concatenate(seen)
        roles = split["role"].to_numpy()
        assert rows.size == int(np.isin(roles, ["train", "validation"]).sum())  # each training cell once
        assert set(roles[rows]) == {"train", "validation"}  # never a test cell nor a reference control
        labels = set(split["perturbation"].to_numpy()[rows])
        held = set(split.loc[split["evaluation"] == "held_out_perturbations", "perturbation"])
        assert not labels & held
        assert model.metadata["n_training_cells"] == rows.size


def test_tampered_split_is_refused(simulated_screen) -> None:
    split = nodes.as_split(
        nodes.make_prediction_split(simulated_screen, {"kind": "held_out_perturbations"}, SCHEMA), simulated_screen
    )
    held = split.index[split["evaluation"] == "held_out_perturbations"]
    split.loc[held[:5], ["role", "evaluation"]] = ["train", ""]  # five cells of a held-out double "leak"
    with pytest.raises(ValueError, match="held-out perturbations are not test cells"):
        nodes.train_cvae(simulated_screen, split.reset_index(), MODEL, TRAINING, {}, SCHEMA)


def test_baselines_are_the_documented_means(simulated_screen) -> None:
    split = nodes.make_prediction_split(simulated_screen, {"kind": "held_out_cells"}, SCHEMA)
    base = nodes.predict_baselines(simulated_screen, split, {"n_cells": 50}, SCHEMA)
    s = nodes.as_split(split, simulated_screen)
    x = simulated_screen.X
    train = s["role"].isin(["train", "validation"]).to_numpy()
    ctrl = s["is_control"].to_numpy() & train  # the reference controls are no method's input
    lab = s["perturbation"].to_numpy()

    def mean(rows):
        return np.asarray(x[rows].mean(axis=0)).ravel()

    def pred(method, label):
        sel = (base.obs["method"] == method).to_numpy() & (base.obs["perturbation"] == label).to_numpy()
        return base.X[sel].mean(axis=0)

    c = mean(ctrl)
    np.testing.assert_allclose(pred("no_change", "PERT01"), c, atol=1e-5)
    np.testing.assert_allclose(pred("perturbed_mean", "PERT01"), mean(train & ~ctrl), atol=1e-5)
    np.testing.assert_allclose(pred("same_perturbation", "PERT01"), mean(train & (lab == "PERT01")), atol=1e-5)
    additive = c + (mean(train & (lab == "PERT01")) - c) + (mean(train & (lab == "PERT02")) - c)
    np.testing.assert_allclose(pred("additive", "PERT01+PERT02"), additive, atol=1e-5)
    assert "additive" not in set(base.obs.loc[base.obs["perturbation"] == "PERT01", "method"])


def test_screen_without_controls_is_refused(simulated_screen) -> None:
    screen = simulated_screen[~simulated_screen.obs["is_control"].to_numpy()].copy()
    with pytest.raises(SplitError, match="no control cells"):
        nodes.make_prediction_split(screen, {"kind": "held_out_cells"}, SCHEMA)


def test_singles_only_screen_marks_held_out_perturbations_not_applicable(simulated_screen) -> None:
    """Without doubles the held-out-perturbation split trains nothing and says why; the other split scores."""
    singles = simulated_screen[simulated_screen.obs["n_perturbed_genes"] <= 1].copy()
    params = {"kind": "held_out_perturbations", "perturbations": "auto"}
    split = nodes.make_prediction_split(singles, params, SCHEMA)
    model, history = nodes.train_cvae(singles, split, MODEL, {**TRAINING, "max_epochs": 2}, {}, SCHEMA)
    assert history.empty and "singles-only" in model.metadata["not_applicable"]
    cvae = nodes.predict_cvae(model, singles, split, GENERATION)
    base = nodes.predict_baselines(singles, split, GENERATION, SCHEMA)
    assert cvae.n_obs == 0 and base.n_obs == 0 and cvae.n_vars == singles.n_vars
    pca = nodes.fit_expression_pca(singles, N_PCS)
    empty = nodes.evaluate_predictions(singles, split, cvae, base, pca, EVALUATION)
    assert empty.empty
    drawn, index = nodes.plot_perturbations(singles, split, cvae, base, empty, pca, {"max_figures": 2})
    assert list(drawn) == ["not_applicable.png"] and list(index["file"]) == ["not_applicable.png"]
    _, scored, _ = _run(singles, {"kind": "held_out_cells", "test_fraction": 0.2}, "gaussian")
    metrics, summary, mlflow_metrics = nodes.summarise_metrics(held_out_cells=scored, held_out_perturbations=empty)
    skipped = summary[summary["evaluation"] == "held_out_perturbations"]
    assert len(skipped) == 1 and skipped["status"].iloc[0] == "not applicable"
    assert "singles-only" in skipped["reason"].iloc[0]
    assert (summary.loc[summary["evaluation"] == "held_out_cells", "status"] == "scored").all()
    assert set(metrics["evaluation"]) == {"held_out_cells"}
    assert all(k.startswith("held_out_cells.") for k in mlflow_metrics)
