"""Nodes of the linear_model pipeline: tables, statistics and clear errors (fast, no training to speak of)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from perturbscope import tracking
from perturbscope.models.linear import LinearVAE
from perturbscope.models.model import LDVAE, ModelInputError
from perturbscope.parameters import ConfigError
from perturbscope.pipelines.linear_model import nodes
from perturbscope.pipelines.linear_model.nodes import (
    EFFECT_COLUMNS,
    factor_perturbation_effects,
    top_genes_per_factor,
)

EFFECTS = {"confidence": 0.95, "alpha": 0.05, "min_standardised_effect": 0.2, "min_cells": 2, "n_genes_shown": 3}


def _loadings() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "gene": ["G1", "G2", "G3", "G4", "G5"],
            "factor_1": [2.0, -1.0, 0.5, -3.0, 0.0],
            "factor_2": [0.1, 0.9, -0.4, 0.2, -0.8],
        }
    )


def test_top_genes_per_factor_lists_both_tails() -> None:
    top = top_genes_per_factor(_loadings(), 2)
    f1 = top[top["factor"] == "factor_1"]
    assert f1[f1["direction"] == "positive"]["gene"].tolist() == ["G1", "G3"]
    assert f1[f1["direction"] == "negative"]["gene"].tolist() == ["G4", "G2"]
    assert f1["rank"].tolist() == [1, 2, 1, 2]
    with pytest.raises(ConfigError, match=r"^linear_model\.factors\.n_top_genes must be a positive integer"):
        top_genes_per_factor(_loadings(), 0)


def _embedded(seed: int = 0) -> ad.AnnData:
    """Controls, A (shifted +1 on factor_2), B (no shift), C (one cell)."""
    rng = np.random.default_rng(seed)
    labels = ["control"] * 150 + ["A"] * 60 + ["B"] * 60 + ["C"]
    scores = rng.normal(size=(len(labels), 2))
    scores[150:210, 1] += 1.0
    adata = ad.AnnData(
        np.zeros((len(labels), 5), dtype=np.float32),
        obs=pd.DataFrame(
            {"perturbation": labels, "gene_program": ["Ctrl"] * 150 + ["P1"] * 60 + ["P2"] * 60 + ["P3"]},
            index=[f"c{i}" for i in range(len(labels))],
        ),
    )
    adata.obsm["X_ldvae"] = scores.astype(np.float32)
    adata.uns["ldvae"] = {"factors": ["factor_1", "factor_2"]}
    return adata


def test_effects_welch_intervals_and_reading() -> None:
    adata = _embedded()
    top = top_genes_per_factor(_loadings(), 5)
    table = factor_perturbation_effects(adata, top, EFFECTS, {"program_key": "gene_program"})
    assert list(table.columns) == EFFECT_COLUMNS
    assert set(table["perturbation"]) == {"A", "B"}  # C has one cell < min_cells
    a2 = table[(table["perturbation"] == "A") & (table["factor"] == "factor_2")].iloc[0]
    assert a2["rank"] == 1 and a2["significant"] and a2["direction"] == "raises" and a2["program"] == "P1"
    assert a2["ci_low"] > 0 and a2["ci_low"] < 1.0 < a2["ci_high"]  # the planted shift, inside the CI
    # identical to scipy's Welch test
    scores = adata.obsm["X_ldvae"].astype(np.float64)
    labels = adata.obs["perturbation"].to_numpy()
    test = stats.ttest_ind(scores[labels == "A", 1], scores[labels == "control", 1], equal_var=False)
    ci = test.confidence_interval(0.95)
    assert a2["ci_low"] == pytest.approx(ci.low) and a2["ci_high"] == pytest.approx(ci.high)
    assert a2["p_value"] == pytest.approx(test.pvalue)
    control_sd = scores[labels == "control", 1].std(ddof=1)
    assert a2["standardised_effect"] == pytest.approx(a2["effect"] / control_sd)
    # genes: factor_2's positive genes go up with A, its negative ones down
    assert a2["genes_up"] == "G2, G4, G1" and a2["genes_down"] == "G5, G3"
    assert a2["reading"].startswith("A raises factor_2 by ") and "up: G2, G4, G1" in a2["reading"]
    # no planted effect on B, nor on factor_1
    assert not table.loc[table["perturbation"] == "B", "significant"].any()
    assert not table.loc[table["factor"] == "factor_1", "significant"].any()
    assert ((table["q_value"] >= table["p_value"]) | table["p_value"].isna()).all()


def test_effects_on_a_lowered_factor_swap_the_gene_lists() -> None:
    adata = _embedded()
    adata.obsm["X_ldvae"][150:210, 1] -= 2.0  # A now lowers factor_2
    table = factor_perturbation_effects(adata, top_genes_per_factor(_loadings(), 5), EFFECTS, {})
    a2 = table[(table["perturbation"] == "A") & (table["factor"] == "factor_2")].iloc[0]
    assert a2["direction"] == "lowers" and a2["ci_high"] < 0
    assert a2["genes_up"] == "G5, G3" and a2["genes_down"] == "G2, G4, G1"
    assert a2["program"] == ""  # no program_key


def test_effects_table_is_empty_without_perturbations() -> None:
    adata = _embedded()
    adata.obs["perturbation"] = "unperturbed"
    table = factor_perturbation_effects(adata, top_genes_per_factor(_loadings()), EFFECTS, {})
    assert list(table.columns) == EFFECT_COLUMNS and len(table) == 0
    fig = nodes.plot_factor_effects(table)
    assert fig is not None


def test_effects_need_the_embedding() -> None:
    adata = _embedded()
    del adata.obsm["X_ldvae"]
    with pytest.raises(ModelInputError, match="X_ldvae"):
        factor_perturbation_effects(adata, top_genes_per_factor(_loadings()), EFFECTS, {})


def _processed(n_cells: int = 40, n_genes: int = 12, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = sp.csr_matrix(rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32))
    adata = ad.AnnData(
        counts.copy(),
        obs=pd.DataFrame(
            {
                "perturbation": ["control"] * 20 + ["A"] * 20,
                "split": (["train"] * 18 + ["validation"] * 2) * 2,
            },
            index=[f"c{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    adata.layers["counts"] = counts
    return adata


TRAINING = {"max_epochs": 2, "kl_warmup_epochs": 1, "progress": False, "batch_size": 16, "num_threads": 1}


def test_train_embed_and_tables_on_a_tiny_screen() -> None:
    screen = _processed()
    model, history = nodes.train_linear_model(screen, {"n_latent": 3}, TRAINING, {}, "promax", {"batch_key": None}, 0)
    assert isinstance(model, LinearVAE) and len(history) == 2 and history["best"].sum() == 1
    assert model.metadata["genes"] == list(screen.var_names)
    assert np.isfinite(model.metadata["validation_reconstruction_log_likelihood"])
    embedded = nodes.embed_cells(screen, model, {"batch_size": 7})
    assert "X_ldvae" not in screen.obsm  # the input is not modified
    assert embedded.obsm["X_ldvae"].shape == (40, 3)
    loadings = nodes.factor_loadings(model)
    assert loadings["gene"].tolist() == list(screen.var_names)
    metrics = tracking.training_history_metrics(history)
    assert len(metrics["train_loss"]) == 2 and metrics["epochs"]["value"] == 2.0
    table = factor_perturbation_effects(embedded, top_genes_per_factor(loadings), EFFECTS, {})
    assert len(table) == 3 and set(table["perturbation"]) == {"A"}
    assert nodes.linear_model_metrics(model, table)["n_factors"]["value"] == 3.0
    # a reordered screen is aligned by gene name
    shuffled = screen[:, screen.var_names[::-1]].copy()
    np.testing.assert_allclose(LDVAE(model).embed(shuffled).obsm["X_ldvae"], embedded.obsm["X_ldvae"], atol=1e-5)


def test_batch_covariate_from_the_schema() -> None:
    screen = _processed()
    screen.obs["lane"] = ["L1", "L2"] * 20
    model, _ = nodes.train_linear_model(screen, {"n_latent": 2}, TRAINING, {}, "promax", {"batch_key": "lane"}, 0)
    assert model.n_batch == 2 and model.metadata["batch_categories"] == ["L1", "L2"]
    screen.obs["lane"] = "L3"
    with pytest.raises(ModelInputError, match="not seen in training"):
        LDVAE(model).embed(screen)


@pytest.mark.parametrize(
    ("model_params", "training", "rotation", "match"),
    [
        ({"n_latnet": 3}, TRAINING, "promax", r"^linear_model\.model\.n_latnet is not a LinearVAE argument"),
        ({"n_latent": 0}, TRAINING, "promax", r"^linear_model\.model\.n_latent must be"),
        ({}, {**TRAINING, "epochs": 3}, "promax", r"^linear_model\.training\.epochs is not a training setting"),
        ({}, {**TRAINING, "batch_size": 0}, "promax", r"^linear_model\.training\.batch_size must be"),
        ({}, {**TRAINING, "lr": -1.0}, "promax", r"^linear_model\.training\.lr must be"),
        ({}, TRAINING, "oblimin", r"^linear_model\.factors\.rotation must be one of"),
    ],
)
def test_bad_parameters_name_the_conf_key(model_params: dict, training: dict, rotation: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        nodes.train_linear_model(_processed(), model_params, training, {}, rotation, {}, 0)


def test_log_normalised_input_is_rejected() -> None:
    screen = _processed()
    screen.layers["counts"] = sp.csr_matrix(np.log1p(screen.layers["counts"].toarray()) + 0.1)
    with pytest.raises(ModelInputError, match="raw UMI counts"):
        nodes.train_linear_model(screen, {}, TRAINING, {}, "promax", {}, 0)


def test_same_seed_same_loadings() -> None:
    screen = _processed()

    def loadings(seed: int) -> np.ndarray:
        model, _ = nodes.train_linear_model(screen, {"n_latent": 3}, TRAINING, {}, "promax", {}, seed)
        return nodes.factor_loadings(model).iloc[:, 1:].to_numpy()

    first = loadings(0)
    np.testing.assert_array_equal(first, loadings(0))
    assert not np.allclose(first, loadings(1))


def test_diverging_training_names_the_kedro_parameter() -> None:
    """A NaN loss names `linear_model.training.lr`, the knob the user edits."""
    from perturbscope.models import TrainingError

    with pytest.raises(TrainingError) as err:
        nodes.train_linear_model(_processed(), {"n_latent": 3}, {**TRAINING, "lr": 1e8}, {}, "promax", {}, 0)
    assert "(linear_model.training.lr)" in str(err.value)
