"""Tests of the synthetic screen simulator ``perturbscope.simulation``.

Effects are checked on data, not only on the truth tables: pseudo-bulk log2
ratios of a group of cells against the controls must follow the true effects.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from perturbscope.simulation import (
    CONTROL_LABEL,
    SimulationConfig,
    _sample_negative_binomial,
    load_cell_cycle_genes,
    simulate_screen,
)

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = {"n_cells": 2000, "n_genes": 500}


@pytest.fixture(scope="module")
def screen() -> ad.AnnData:
    """A small screen with doubles, shared by the read-only tests."""
    return simulate_screen(**SMALL, n_doubles=3, seed=7)


def _pseudobulk(adata: ad.AnnData, mask: np.ndarray) -> np.ndarray:
    """Per-gene fraction of the UMIs of the cells in ``mask``, with a pseudocount of
    0.01 UMI per cell (so that groups of different sizes are not biased apart)."""
    mask = np.asarray(mask, dtype=bool)
    assert mask.sum() > 0
    counts = np.asarray(adata.X[mask].sum(axis=0)).ravel()
    return (counts + 0.01 * mask.sum()) / adata.obs["library_size"].to_numpy()[mask].sum()


def _log2_ratio(adata: ad.AnnData, mask: np.ndarray) -> np.ndarray:
    """Pseudo-bulk log2 ratio of the cells in ``mask`` against the controls."""
    control = (adata.obs["perturbation"] == CONTROL_LABEL).to_numpy()
    return np.log2(_pseudobulk(adata, mask) / _pseudobulk(adata, control))


def _same_matrix(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    return (
        a.shape == b.shape
        and np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
        and np.array_equal(a.data, b.data)
    )


# --- determinism -------------------------------------------------------------------


def test_same_seed_gives_identical_screen() -> None:
    a = simulate_screen(**SMALL, n_doubles=2, seed=3)
    b = simulate_screen(SimulationConfig(**SMALL, n_doubles=2, seed=3))
    assert _same_matrix(a.X, b.X)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    pd.testing.assert_frame_equal(a.varm["true_log2fc"], b.varm["true_log2fc"])


def test_different_seed_gives_different_screen() -> None:
    a = simulate_screen(**SMALL, seed=3)
    b = simulate_screen(**SMALL, seed=4)
    assert a.shape == b.shape
    assert not _same_matrix(a.X, b.X)
    assert not a.obs["perturbation"].equals(b.obs["perturbation"])
    assert not np.allclose(a.var["true_base_mean"], b.var["true_base_mean"])


def test_many_chunks_are_deterministic_and_distinct() -> None:
    # 2**19 // 2000 = 262 cells per chunk: several chunks, each with its own stream.
    a = simulate_screen(n_cells=800, n_genes=2000, seed=5)
    b = simulate_screen(n_cells=800, n_genes=2000, seed=5)
    assert _same_matrix(a.X, b.X)
    first, second = a.X[:262].toarray(), a.X[262:524].toarray()
    assert not np.array_equal(first, second)


# --- structure, dtypes, sparsity ----------------------------------------------------


def test_shapes_dtypes_and_integer_counts(screen: ad.AnnData) -> None:
    X = screen.X
    assert screen.shape == (2000, 500)
    assert isinstance(X, sp.csr_matrix)
    assert X.dtype == np.float32
    assert X.has_canonical_format
    assert np.all(X.data > 0) and np.array_equal(X.data, np.round(X.data))
    assert screen.obs_names.is_unique and screen.var_names.is_unique

    obs = screen.obs
    assert list(obs.columns) == [
        "perturbation",
        "program",
        "responded",
        "phase",
        "heterogeneity",
        "n_perturbed_genes",
        "library_size",
    ]
    assert obs["responded"].dtype == bool
    assert obs["heterogeneity"].dtype == np.float64
    assert set(obs["phase"].astype(str)) == {"G1", "S", "G2M"}
    assert set(obs["n_perturbed_genes"]) == {0, 1, 2}
    np.testing.assert_array_equal(obs["library_size"], np.asarray(X.sum(axis=1)).ravel())
    assert list(screen.var.columns) == ["program", "true_base_mean", "true_heterogeneity_weight"]
    assert np.all(screen.var["true_base_mean"] > 0)


def test_sparsity_and_library_size_are_realistic() -> None:
    adata = simulate_screen(n_cells=1500, n_genes=2000, seed=11)
    zeros = 1.0 - adata.X.nnz / np.prod(adata.shape)
    assert 0.85 <= zeros <= 0.95
    median_library = float(np.median(adata.obs["library_size"]))
    assert 3000 <= median_library <= 5000
    # Library sizes spread log-normally (sigma 0.4 by default), not all alike.
    assert 0.25 < np.std(np.log(adata.obs["library_size"])) < 0.6


def test_perturbation_labels_and_balance(screen: ad.AnnData) -> None:
    obs = screen.obs
    labels = obs["perturbation"].astype(str)
    assert (labels == CONTROL_LABEL).sum() == 400  # control_fraction 0.2
    singles = sorted(label for label in set(labels) if re.fullmatch(r"PERT\d{2}", label))
    doubles = sorted(label for label in set(labels) if "+" in label)
    assert len(singles) == 4 * 3 + 2 and len(doubles) == 3
    for double in doubles:
        a, b = double.split("+")
        assert a in singles and b in singles and a < b
    counts = labels[labels != CONTROL_LABEL].value_counts()
    assert counts.max() - counts.min() <= 1  # perturbed cells are split evenly
    n_genes = labels.str.count(r"\+") + 1
    n_genes[labels == CONTROL_LABEL] = 0
    np.testing.assert_array_equal(obs["n_perturbed_genes"], n_genes)


def test_truth_tables_agree_with_obs(screen: ad.AnnData) -> None:
    obs = screen.obs
    truth = screen.uns["perturbation_truth"]
    lfc = screen.varm["true_log2fc"]
    assert list(truth.index) == list(lfc.columns)
    perturbed = obs[obs["perturbation"] != CONTROL_LABEL]
    program_of = perturbed["perturbation"].astype(str).map(truth["program"])
    assert (perturbed["program"].astype(str) == program_of).all()
    assert (obs.loc[obs["perturbation"] == CONTROL_LABEL, "program"] == CONTROL_LABEL).all()

    # Programs: each program's singles move exactly its genes, up and down.
    var_program = screen.var["program"].astype(str)
    for program in [f"program_{k}" for k in range(1, 5)]:
        singles = truth.index[(truth["program"] == program) & (truth["n_perturbed_genes"] == 1)]
        assert len(singles) == 3
        genes = (var_program == program).to_numpy()
        assert genes.sum() == 30
        effects = lfc.loc[:, singles].to_numpy()
        assert np.all(effects[~genes] == 0)
        assert np.all(effects[genes] != 0)
        assert (effects[genes, 0] > 0).sum() == 15  # up_fraction 0.5
        # Same signs within a program, but not identical effects.
        assert np.all(np.sign(effects[genes]) == np.sign(effects[genes, :1]))
        assert not np.allclose(effects[:, 0], effects[:, 1])
    nulls = truth.index[truth["program"] == "none"]
    assert len(nulls) == 2 and np.all(lfc.loc[:, nulls].to_numpy() == 0)
    assert not truth.loc[nulls, "has_effect"].any()

    # Doubles: program labels joined by "+" (or one when they agree).
    for double in truth.index[truth["n_perturbed_genes"] == 2]:
        a, b = double.split("+")
        pa, pb = truth.loc[a, "program"], truth.loc[b, "program"]
        assert truth.loc[double, "program"] == (pa if pa == pb else f"{pa}+{pb}")


def _has_effect(adata: ad.AnnData) -> np.ndarray:
    """Per cell: whether its perturbation has any effect (False for controls)."""
    truth = adata.uns["perturbation_truth"]["has_effect"].to_dict()
    return adata.obs["perturbation"].astype(str).map(truth).eq(True).to_numpy()


def test_responded_follows_penetrance(screen: ad.AnnData) -> None:
    obs = screen.obs
    is_control = (obs["perturbation"] == CONTROL_LABEL).to_numpy()
    has_effect = _has_effect(screen)
    truth = screen.uns["perturbation_truth"]
    assert has_effect.sum() == truth.loc[truth["has_effect"], "n_cells"].sum() > 1000
    assert not obs["responded"][is_control].any()
    assert not obs["responded"][~is_control & ~has_effect].any()  # null perturbations
    rate = obs["responded"][has_effect].mean()
    assert 0.75 <= rate <= 0.85  # penetrance 0.8 over ~1400 cells
    low = simulate_screen(**SMALL, penetrance=0.3, seed=7)
    assert 0.25 <= low.obs["responded"][_has_effect(low)].mean() <= 0.35


# --- cell cycle ---------------------------------------------------------------------


def test_tirosh_genes_are_present_and_labelled(screen: ad.AnnData) -> None:
    s_genes, g2m_genes = load_cell_cycle_genes()
    assert len(s_genes) == 43 and len(g2m_genes) == 54
    assert s_genes[:3] == ["MCM5", "PCNA", "TYMS"] and "CENPA" in g2m_genes
    var_program = screen.var["program"].astype(str)
    assert set(s_genes) <= set(screen.var_names)
    assert set(g2m_genes) <= set(screen.var_names)
    assert (var_program[s_genes] == "cell_cycle_S").all()
    assert (var_program[g2m_genes] == "cell_cycle_G2M").all()
    others = screen.var_names.difference(s_genes + g2m_genes)
    assert all(re.fullmatch(r"SIM\d{5}", name) for name in others)


def test_too_few_genes_keeps_as_many_cell_cycle_genes_as_fit() -> None:
    config = SimulationConfig(n_cells=200, n_genes=150, n_programs=2, genes_per_program=20, n_heterogeneity_genes=10)
    adata = simulate_screen(config)
    s_genes, g2m_genes = load_cell_cycle_genes()
    var_program = adata.var["program"].astype(str)
    n_ordinary = 150 - config.n_housekeeping_genes
    n_cc = n_ordinary - 2 * 20 - 10
    kept_s = [g for g in adata.var_names if var_program[g] == "cell_cycle_S"]
    kept_g2m = [g for g in adata.var_names if var_program[g] == "cell_cycle_G2M"]
    assert len(kept_s) + len(kept_g2m) == n_cc < 97
    assert set(kept_s) == set(s_genes[: len(kept_s)])  # the first ones of each list
    assert set(kept_g2m) == set(g2m_genes[: len(kept_g2m)])
    assert abs(len(kept_s) / n_cc - 43 / 97) < 0.05
    with pytest.raises(ValueError, match="too small"):
        SimulationConfig(n_genes=100)  # 4 x 30 program genes do not fit


def test_cell_cycle_genes_are_higher_in_their_phase(screen: ad.AnnData) -> None:
    var_program = screen.var["program"].astype(str).to_numpy()
    phase = screen.obs["phase"].astype(str).to_numpy()

    def score(genes: str, cells: str) -> float:
        """Share of the UMIs of ``cells`` that fall on the ``genes`` set."""
        return float(_pseudobulk(screen, phase == cells)[var_program == genes].sum())

    # cell_cycle_strength 2 (log2): about 4-fold.
    assert score("cell_cycle_S", "S") / score("cell_cycle_S", "G1") > 3.0
    assert score("cell_cycle_G2M", "G2M") / score("cell_cycle_G2M", "G1") > 3.0
    # Each set is specific to its phase.
    assert 0.8 < score("cell_cycle_S", "G2M") / score("cell_cycle_S", "G1") < 1.25
    assert 0.8 < score("cell_cycle_G2M", "S") / score("cell_cycle_G2M", "G1") < 1.25
    # Phase proportions (0.5, 0.3, 0.2).
    shares = pd.Series(phase).value_counts(normalize=True)
    assert abs(shares["G1"] - 0.5) < 0.04 and abs(shares["S"] - 0.3) < 0.04
    # Without a cell-cycle effect the S genes do not move.
    flat = simulate_screen(**SMALL, n_doubles=3, seed=7, cell_cycle_strength=0.0)
    flat_phase = flat.obs["phase"].astype(str).to_numpy()
    genes = flat.var["program"].astype(str).to_numpy() == "cell_cycle_S"
    ratio = _pseudobulk(flat, flat_phase == "S")[genes].sum() / _pseudobulk(flat, flat_phase == "G1")[genes].sum()
    assert 0.8 < ratio < 1.25


# --- perturbation effects --------------------------------------------------------------


def test_program_genes_move_in_responders_only(screen: ad.AnnData) -> None:
    obs, truth, lfc = screen.obs, screen.uns["perturbation_truth"], screen.varm["true_log2fc"]
    var_program = screen.var["program"].astype(str).to_numpy()
    responded = obs["responded"].to_numpy()
    responder_shift, nonresponder_shift = [], []
    for program in [f"program_{k}" for k in range(1, 5)]:
        singles = truth.index[(truth["program"] == program) & (truth["n_perturbed_genes"] == 1)]
        genes = var_program == program
        true = lfc.loc[:, singles].to_numpy().mean(axis=1)[genes]
        cells = obs["perturbation"].isin(singles).to_numpy()
        hit = _log2_ratio(screen, cells & responded)[genes]
        miss = _log2_ratio(screen, cells & ~responded)[genes]
        assert np.corrcoef(hit, true)[0, 1] > 0.6
        assert (np.sign(hit) == np.sign(true)).mean() >= 0.8  # up genes up, down genes down
        assert hit[true > 0].mean() > 0.5 and hit[true < 0].mean() < -0.3
        responder_shift.append(hit * np.sign(true))
        nonresponder_shift.append(miss * np.sign(true))
        # Genes outside every program stay put in responders.
        rest = var_program == "none"
        assert abs(_log2_ratio(screen, cells & responded)[rest].mean()) < 0.15
    assert np.concatenate(responder_shift).mean() > 0.9
    assert abs(np.concatenate(nonresponder_shift).mean()) < 0.25


def test_null_perturbations_look_like_controls(screen: ad.AnnData) -> None:
    truth = screen.uns["perturbation_truth"]
    nulls = truth.index[truth["program"] == "none"]
    cells = screen.obs["perturbation"].isin(nulls).to_numpy()
    structured = screen.var["program"].astype(str).str.startswith("program_").to_numpy()
    assert abs(_log2_ratio(screen, cells)[structured].mean()) < 0.15


def _double_vs_sum(adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed log2 ratio of doubles, sum of their singles' and true interaction."""
    obs, truth, lfc = adata.obs, adata.uns["perturbation_truth"], adata.varm["true_log2fc"]
    responded = obs["responded"].to_numpy()
    expressed = adata.var["true_base_mean"].to_numpy() > 0.1

    def observed(label: str) -> np.ndarray:
        cells = (obs["perturbation"] == label).to_numpy()
        return _log2_ratio(adata, cells & responded if truth.loc[label, "has_effect"] else cells)

    doubles, sums, interactions = [], [], []
    for double in truth.index[truth["n_perturbed_genes"] == 2]:
        a, b = double.split("+")
        genes = ((lfc[a] != 0) | (lfc[b] != 0)).to_numpy() & expressed
        doubles.append(observed(double)[genes])
        sums.append((observed(a) + observed(b))[genes])
        interactions.append((lfc[double] - lfc[a] - lfc[b]).to_numpy()[genes])
    return np.concatenate(doubles), np.concatenate(sums), np.concatenate(interactions)


def test_doubles_are_additive_without_interaction() -> None:
    adata = simulate_screen(n_cells=4000, n_genes=500, n_doubles=6, seed=0)
    lfc, truth = adata.varm["true_log2fc"], adata.uns["perturbation_truth"]
    for double in truth.index[truth["n_perturbed_genes"] == 2]:
        a, b = double.split("+")
        np.testing.assert_allclose(lfc[double], lfc[a] + lfc[b])
    observed, predicted, _ = _double_vs_sum(adata)
    assert observed.size > 50
    assert np.corrcoef(observed, predicted)[0, 1] > 0.85
    slope = np.polyfit(predicted, observed, 1)[0]
    assert 0.75 < slope < 1.25
    assert np.median(np.abs(observed - predicted)) < 0.4


def test_interaction_term_breaks_additivity() -> None:
    adata = simulate_screen(n_cells=4000, n_genes=500, n_doubles=6, interaction_scale=1.0, seed=0)
    observed, predicted, interaction = _double_vs_sum(adata)
    assert np.std(interaction) > 0.7  # the truth holds the interaction ...
    assert np.median(np.abs(observed - predicted)) > 0.5  # ... the data show it ...
    assert np.corrcoef(observed - predicted, interaction)[0, 1] > 0.6  # ... where it is
    lfc = adata.varm["true_log2fc"]
    for double in lfc.columns[lfc.columns.str.contains("+", regex=False)]:
        a, b = double.split("+")
        untouched = ((lfc[a] == 0) & (lfc[b] == 0)).to_numpy()
        assert np.all(lfc[double].to_numpy()[untouched] == 0)


def _heterogeneity_correlation(adata: ad.AnnData, cells: np.ndarray) -> float:
    """Spearman correlation of ``obs["heterogeneity"]`` with the weighted heterogeneity genes."""
    weight = adata.var["true_heterogeneity_weight"].to_numpy()
    X = adata.X[cells][:, weight != 0].toarray()
    norm = np.log1p(X / adata.obs["library_size"].to_numpy()[cells, None] * 1e4)
    return float(stats.spearmanr(norm @ weight[weight != 0], adata.obs["heterogeneity"][cells])[0])


def test_heterogeneity_axis_moves_its_genes_in_controls_too(screen: ad.AnnData) -> None:
    control = (screen.obs["perturbation"] == CONTROL_LABEL).to_numpy()
    h = screen.obs["heterogeneity"].to_numpy()
    assert abs(h.mean()) < 0.1 and 0.9 < h.std() < 1.1
    weight = screen.var["true_heterogeneity_weight"]
    het_genes = (screen.var["program"] == "heterogeneity").to_numpy()
    assert np.all(weight[het_genes] != 0) and np.all(weight[~het_genes] == 0)
    assert (weight[het_genes] > 0).sum() == 15  # half up, half down
    assert _heterogeneity_correlation(screen, control) > 0.3
    assert _heterogeneity_correlation(screen, ~control) > 0.3
    flat = simulate_screen(**SMALL, n_doubles=3, seed=7, heterogeneity_strength=0.0)
    assert abs(_heterogeneity_correlation(flat, np.ones(flat.n_obs, bool))) < 0.1


# --- negative-binomial sampler ---------------------------------------------------------


@pytest.mark.parametrize("dispersion", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("mean", [0.05, 1.0, 7.5, 30.0])
def test_negative_binomial_sampler_matches_theory(dispersion: float, mean: float) -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    x = _sample_negative_binomial(np.full(n, mean), dispersion, rng)
    if dispersion > 0:
        r = 1 / dispersion
        reference = stats.nbinom(r, r / (r + mean))
    else:
        reference = stats.poisson(mean)
    sd = np.sqrt(reference.var())
    assert abs(x.mean() - mean) < 5 * sd / np.sqrt(n)
    assert abs(x.var() / reference.var() - 1) < 0.06
    for k in (0, 1):
        p = reference.pmf(k)
        assert abs((x == k).mean() - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-4


# --- config and serialisation ------------------------------------------------------------


def test_config_is_frozen_coerced_and_validated() -> None:
    config = SimulationConfig(dispersion=1, n_cells=10.0)
    assert isinstance(config.dispersion, float) and isinstance(config.n_cells, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.n_cells = 5  # type: ignore[misc]
    for bad in (
        {"n_cells": 0},
        {"n_cells": 2.5},
        {"penetrance": 1.5},
        {"control_fraction": 1.0},
        {"s_fraction": 0.6, "g2m_fraction": 0.6},
        {"effect_size_min": 2.0, "effect_size_max": 1.0},
        {"dispersion": -0.1},
        {"n_doubles": 1000},
        {"n_programs": 0, "n_null_perturbations": 0},
        {"seed": True},
    ):
        with pytest.raises(ValueError):
            SimulationConfig(**bad)
    with pytest.raises(TypeError):
        simulate_screen(n_cell=10)  # a typo is not silently ignored
    with pytest.raises(ValueError, match="unknown"):
        SimulationConfig.from_dict({"n_cells": 10, "bogus": 1})


def test_h5ad_round_trip_keeps_truth(screen: ad.AnnData, tmp_path: Path) -> None:
    path = tmp_path / "screen.h5ad"
    screen.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert _same_matrix(screen.X, back.X) and isinstance(back.X, sp.csr_matrix)
    pd.testing.assert_frame_equal(screen.obs, back.obs)
    pd.testing.assert_frame_equal(screen.var, back.var)
    pd.testing.assert_frame_equal(screen.varm["true_log2fc"], back.varm["true_log2fc"])
    pd.testing.assert_frame_equal(screen.uns["perturbation_truth"], back.uns["perturbation_truth"], check_dtype=False)
    config = SimulationConfig.from_dict(back.uns["simulation"])
    assert config == SimulationConfig(**SMALL, n_doubles=3, seed=7)
    stored = {k: v.item() if hasattr(v, "item") else v for k, v in back.uns["simulation"].items()}
    assert stored == config.to_dict()
    rebuilt = simulate_screen(config)
    assert _same_matrix(rebuilt.X, screen.X)


def test_uns_config_is_plain_json_types(screen: ad.AnnData) -> None:
    import json

    values = screen.uns["simulation"]
    assert all(type(v) in (int, float) for v in values.values())
    assert json.loads(json.dumps(values)) == values


# --- command line -------------------------------------------------------------------------


def test_cli_writes_a_readable_screen(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "dir" / "sim.h5ad"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "perturbscope.simulation",
            "--out",
            str(out),
            "--n-cells",
            "300",
            "--n-genes",
            "400",
            "--seed",
            "2",
            "--n-doubles",
            "2",
            "--penetrance",
            "0.5",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "300 cells x 400 genes" in lines[0]
    adata = ad.read_h5ad(out)
    assert adata.shape == (300, 400)
    config = SimulationConfig.from_dict(adata.uns["simulation"])
    assert (config.seed, config.n_doubles, config.penetrance) == (2, 2, 0.5)
    expected = simulate_screen(n_cells=300, n_genes=400, seed=2, n_doubles=2, penetrance=0.5)
    assert _same_matrix(adata.X, expected.X)

    bad = subprocess.run(
        [sys.executable, "-m", "perturbscope.simulation", "--out", str(out), "--penetrance", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert bad.returncode != 0 and "penetrance" in bad.stderr
