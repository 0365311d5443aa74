"""The perturbation_effects nodes on a small simulated screen with known effects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from perturbscope.parameters import ConfigError
from perturbscope.pipelines.perturbation_effects import de, nodes
from perturbscope.schema import ScreenValidationError
from perturbscope.simulation import simulate_screen
from tests.pipelines.contrastive_model.conftest import SCHEMA, process

EFFECT_TEST = {
    "n_pcs": 30,
    "distance": "euclidean",
    "n_permutations": 199,
    "max_cells": 500,
    "max_control_cells": 600,
    "min_cells": 10,
    "alpha": 0.05,
}
DE = {
    "methods": ["pseudobulk_deseq2", "wilcoxon"],
    "min_cells": 20,
    "n_pseudo_replicates": 3,
    "wilcoxon_max_cells": 2000,
    "n_cpus": 1,
}


@pytest.fixture(scope="module")
def screen():
    raw = simulate_screen(
        n_cells=3000,
        n_genes=400,
        n_programs=3,
        perturbations_per_program=2,
        n_null_perturbations=2,
        penetrance=0.7,
        high_expression_share=0.6,
        seed=5,
    )
    return raw, process(raw)


def test_effect_test_calls_true_effects_and_spares_null_ones(screen) -> None:
    raw, processed = screen
    before = processed.copy()
    table = nodes.run_effect_tests(processed, EFFECT_TEST, 0)
    truth = raw.uns["perturbation_truth"]["has_effect"]
    table = table.set_index("perturbation")
    assert set(table.index) == set(truth.index)
    assert table.loc[truth[truth].index, "significant"].all(), table
    assert not table.loc[truth[~truth].index, "significant"].any(), table
    assert (table["q_value"] >= table["p_value"]).all()
    assert (
        table.loc[truth[truth].index, "energy_distance"].min() > table.loc[truth[~truth].index, "energy_distance"].max()
    )
    # pure: the input is untouched; same seed, same table
    assert before.obs.equals(processed.obs) and (before.X != processed.X).nnz == 0
    assert nodes.run_effect_tests(processed, EFFECT_TEST, 0).set_index("perturbation").equals(table)
    metrics = nodes.effect_test_metrics(table.reset_index())
    assert metrics["n_significant"]["value"] == int(truth.sum())
    assert nodes.plot_effect_tests(table.reset_index(), {"max_shown": 5}).axes


def test_pseudobulk_sums_the_counts_of_each_replicate(screen) -> None:
    _, processed = screen
    tested = de.tested_perturbations(processed, 20)
    counts, meta = de.pseudobulk(processed, tested, 3, None, seed=0)
    assert set(meta["replicate"]) == {"rep1", "rep2", "rep3"}
    assert set(meta["condition"]) == {"control", *tested}
    labels = np.where(processed.obs["is_control"], "control", processed.obs["perturbation"].astype(str))
    for condition, group in meta.groupby("condition"):
        raw_sum = processed.layers["counts"][labels == condition].sum()
        assert counts.loc[group.index].to_numpy().sum() == pytest.approx(raw_sum)
        assert group["n_cells"].sum() == (labels == condition).sum()


def test_differential_expression_finds_the_program_genes(screen) -> None:
    raw, processed = screen
    table = nodes.differential_expression(processed, DE, SCHEMA, 0)
    assert set(table["method"]) == {"pseudobulk_deseq2", "wilcoxon"}
    assert list(table.columns) == de.DE_COLUMNS
    true_lfc = raw.varm["true_log2fc"]
    truth = raw.uns["perturbation_truth"]
    for method, group in table.groupby("method"):
        for label in truth.index[truth["has_effect"]]:
            rows = group[group["perturbation"] == label].set_index("gene")
            # genes it moves clearly, expressed enough to be seen in a few hundred cells
            clear = (true_lfc[label].abs() > 1.0) & (raw.var["true_base_mean"] > 0.5)
            moved = true_lfc.index[clear].intersection(rows.index)
            assert len(moved) >= 5
            called = rows.index[rows["q_value"] < 0.05]
            anything = true_lfc.index[true_lfc[label].abs() > 0]
            # most of the genes it moves are called, nearly nothing else is
            assert len(called.intersection(moved)) >= 0.5 * len(moved), (method, label)
            assert len(called.difference(anything)) <= 0.1 * len(called) + 2, (method, label)
            signs = np.sign(rows.loc[called.intersection(moved), "log2_fold_change"])
            assert (signs == np.sign(true_lfc.loc[called.intersection(moved), label])).mean() >= 0.95
        for label in truth.index[~truth["has_effect"]]:
            rows = group[group["perturbation"] == label]
            assert (rows["q_value"] < 0.05).sum() <= 2, (method, label)


def test_agreement_with_the_salient_genes() -> None:
    de_table = pd.DataFrame(
        {
            "perturbation": "A",
            "gene": ["g1", "g2", "g3", "g4"],
            "method": "wilcoxon",
            "log2_fold_change": [2.0, 1.0, -1.0, -3.0],
            "q_value": [0.001, 0.01, 0.5, 0.001],
        }
    )
    salient = pd.DataFrame(
        {"perturbation": "A", "gene": ["g1", "g2", "g3", "g4"], "mean_log2fc": [1.5, 0.7, -0.2, -2.0]}
    )
    table = nodes.compare_with_salient_genes(de_table, salient, 0.05)
    row = table.iloc[0]
    assert row["spearman"] == pytest.approx(1.0)
    assert row["fraction_significant_same_direction"] == pytest.approx(0.75)
    assert row["n_significant_de_genes"] == 3


def test_bad_parameters_name_the_fix(screen) -> None:
    _, processed = screen
    with pytest.raises(
        ConfigError, match=r"^perturbation_effects\.differential_expression\.methods must be one of .*got 'edger'"
    ):
        nodes.differential_expression(processed, {**DE, "methods": ["edger"]}, SCHEMA, 0)
    with pytest.raises(ConfigError, match=r"^perturbation_effects\.effect_test\.n_permutations must be a positive"):
        nodes.run_effect_tests(processed, {**EFFECT_TEST, "n_permutations": 0}, 0)
    with pytest.raises(ConfigError, match=r"^Unknown parameter\(s\) perturbation_effects\.effect_test\.n_perms"):
        nodes.run_effect_tests(processed, {**EFFECT_TEST, "n_perms": 0}, 0)
    no_controls = processed[~processed.obs["is_control"].to_numpy()].copy()
    with pytest.raises(ScreenValidationError, match="no control cells"):
        nodes.run_effect_tests(no_controls, EFFECT_TEST, 0)


def test_vectorised_wald_test_equals_pydeseq2s_own(screen) -> None:
    """The batched Wald test gives PyDESeq2's own p-values, statistics and standard errors."""
    from unittest import mock

    from pydeseq2.default_inference import DefaultInference

    processed = screen[1]
    tested = de.tested_perturbations(processed, 20)[:4]
    ours = de.pseudobulk_deseq2(processed, tested, 3, None, 0)
    with mock.patch.object(de, "_vectorised_inference", lambda n_cpus: DefaultInference(n_cpus=n_cpus)):
        theirs = de.pseudobulk_deseq2(processed, tested, 3, None, 0)
    assert len(ours) == len(theirs) > 0
    for column in ("log2_fold_change", "p_value", "q_value"):
        np.testing.assert_allclose(ours[column], theirs[column], rtol=1e-9, atol=1e-14, equal_nan=True)
