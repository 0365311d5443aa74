"""The default `kedro run` on simulated screens of realistic size, as a user runs it.

The demo screen (3,375 cells, 169 genes) hides what breaks on real screens: kNN graphs
switch to pynndescent from 8,192 cells on, knockout screens have no doubles, screens
come with a batch and without a program annotation. Each test writes a simulated screen
of 10,000+ cells x 2,000 genes, registers only its schema (conf/e2e/screens.yml), runs
`kedro run --env e2e --params screen=<name>` (conf/base with 3 training epochs and every
output under a temporary folder) and checks every promised output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from perturbscope.simulation import simulate_screen, write_cellranger_h5
from tests.conftest import PROJECT, latest_version

SECTIONS = (
    "data_processing",
    "contrastive_model",
    "perturbation_effects",
    "linear_model",
    "perturbation_prediction",
    "provenance",
)


def _kedro_run(root: Path, screen: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PERTURBSCOPE_TEST_ROOT": str(root),
        "KEDRO_DISABLE_TELEMETRY": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env", "e2e", "--params", f"screen={screen}"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def _run_screen(root: Path, screen: str, cellranger: bool = False, **simulation: object) -> dict[str, Path]:
    raw = root / "data" / "01_raw"
    raw.mkdir(parents=True, exist_ok=True)
    adata = simulate_screen(n_genes=2000, **simulation)
    if cellranger:  # Cell Ranger output: gene and guide counts, the feature reference beside it
        folder = raw / screen
        write_cellranger_h5(adata, folder / "filtered_feature_bc_matrix.h5", folder / "feature_reference.csv")
        adata.write_h5ad(root / "truth.h5ad")
    else:
        adata.write_h5ad(raw / f"{screen}.h5ad")
    done = _kedro_run(root, screen)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    data = root / "data"
    return {
        "processed": latest_version(data / "03_primary" / screen / "processed_screen.h5ad"),
        "contrastive": latest_version(data / "07_model_output" / screen / "contrastive_embedded_screen.h5ad"),
        "linear": latest_version(data / "07_model_output" / screen / "linear_embedded_screen.h5ad"),
        "cell_calls": latest_version(data / "07_model_output" / screen / "contrastive_cell_calls.parquet"),
        "reporting": data / "08_reporting" / screen,
        "models": data / "06_models" / screen,
        "log": done.stdout + done.stderr,
    }


def _check_common(out: dict, n_cells: int) -> tuple[ad.AnnData, pd.DataFrame, pd.DataFrame]:
    processed = ad.read_h5ad(out["processed"], backed="r")
    assert processed.n_obs > 0.9 * n_cells and processed.n_vars >= 1500
    assert "counts" in processed.layers
    for column in ("perturbation", "is_control", "split", "phase", "perturbed_genes"):
        assert column in processed.obs

    embedded = ad.read_h5ad(out["contrastive"])
    for key in ("X_salient", "X_background", "X_pca_baseline"):
        assert embedded.obsm[key].shape[0] == embedded.n_obs and np.isfinite(embedded.obsm[key]).all()
    for key in ("X_umap_salient", "X_umap_background"):  # UMAPs of >= 8,192 cells (pynndescent kNN)
        umap = embedded.obsm[key]
        assert umap.shape == (embedded.n_obs, 2) and np.isfinite(umap).all() and umap.std(axis=0).min() > 0
    assert embedded.obsm["X_salient"].shape[1] == 10 and embedded.obsm["X_background"].shape[1] == 10
    linear = ad.read_h5ad(out["linear"], backed="r")
    assert linear.obsm["X_ldvae"].shape == (linear.n_obs, 10)

    reporting = out["reporting"]
    evaluation = pd.read_csv(latest_version(reporting / "contrastive_evaluation.csv"))
    scored = evaluation[evaluation["note"].isna()]  # a row with a note says why a score is missing
    assert len(scored) >= 6 and scored["value"].notna().all()
    effects = pd.read_csv(latest_version(reporting / "linear_factor_effects.csv"))
    assert len(effects) and effects["perturbation"].nunique() >= 10
    summary = pd.read_csv(latest_version(reporting / "prediction_summary.csv"))
    cells = summary[summary["evaluation"] == "held_out_cells"]
    assert (cells["status"] == "scored").all() and cells["pearson_delta_mean"].notna().all()
    # escapers: a probability for every target cell of a fitted perturbation, 0 for controls, one row each
    calls = pd.read_parquet(out["cell_calls"]).reindex(embedded.obs_names)
    assert calls.notna().any(axis=1).all()  # one row per embedded cell
    probability = calls["perturbed_probability"].to_numpy(dtype=float)
    is_control = embedded.obs["is_control"].to_numpy().astype(bool)
    assert (probability[is_control] == 0).all()
    assert np.isfinite(probability[~is_control]).mean() > 0.9
    assert np.nanmin(probability) >= 0 and np.nanmax(probability) <= 1
    escape = pd.read_csv(latest_version(reporting / "contrastive_escape.csv"))
    assert escape["n_cells"].sum() == (~is_control).sum()
    assert escape["estimated_perturbed_share"].between(0, 1).all()
    # did each perturbation work: one test per perturbation; DE by both methods
    tests = pd.read_csv(latest_version(reporting / "perturbation_effect_tests.csv"))
    assert tests["perturbation"].nunique() >= 10 and tests["q_value"].between(0, 1).all()
    de = pd.read_csv(latest_version(reporting / "differential_expression.csv"))
    assert set(de["method"]) == {"pseudobulk_deseq2", "wilcoxon"} and de["p_value"].notna().mean() > 0.5
    for model in ("contrastive_model.pt", "linear_model.pt"):
        assert latest_version(out["models"] / model).stat().st_size > 10_000
    page = latest_version(reporting / "report.html").read_text()
    for section in SECTIONS:
        assert f'data-section="{section}"' in page, section
    assert page.count("data:image/png;base64") >= 8  # figures are embedded
    return evaluation, summary, pd.read_csv(latest_version(reporting / "screen_summary.csv"))


@pytest.mark.e2e
def test_singles_only_knockout_screen(tmp_path: Path) -> None:
    """12,000 cells, single perturbations only, a program annotation, no batch."""
    out = _run_screen(tmp_path, "sim_singles", n_cells=12_000, n_programs=5, perturbations_per_program=4, seed=0)
    # the map: perturbations of a program cluster together in at least one profile; nulls stay apart
    summary_map = pd.read_csv(latest_version(out["reporting"] / "perturbation_map_summary.csv"))
    assert summary_map["ari_vs_program"].max() >= 0.9, summary_map
    evaluation, summary, screen_summary = _check_common(out, 12_000)
    skipped = summary[summary["evaluation"] == "held_out_perturbations"]
    assert len(skipped) == 1 and skipped["status"].iloc[0] == "not applicable"
    assert "singles-only" in skipped["reason"].iloc[0]
    assert "not applicable to this screen" in latest_version(out["reporting"] / "report.html").read_text()
    assert {"program", "phase"} <= set(evaluation["key"])  # programs scored, phase leakage measured
    assert set(evaluation["space"]) >= {"salient", "background", "pca"}
    assert (screen_summary["n_perturbed_genes"] <= 1).all()
    # the effect test calls every perturbation with a true effect, and neither null one
    truth = ad.read_h5ad(tmp_path / "data" / "01_raw" / "sim_singles.h5ad", backed="r").uns["perturbation_truth"]
    tests = pd.read_csv(latest_version(out["reporting"] / "perturbation_effect_tests.csv")).set_index("perturbation")
    has_effect = pd.Series(truth["has_effect"]).astype(bool)
    assert tests.loc[has_effect[has_effect].index, "significant"].all(), tests
    assert not tests.loc[has_effect[~has_effect].index, "significant"].any(), tests
    # escapers: scored against the simulation's responders (3 epochs here: tests/pipelines/contrastive_model
    # /test_science.py and bench/escape_vs_scvi.py score a trained model); null perturbations call nobody
    auroc = evaluation.loc[evaluation["metric"] == "perturbed_probability_auroc", "value"]
    assert len(auroc) == 1 and 0 <= auroc.iloc[0] <= 1, evaluation
    escape = pd.read_csv(latest_version(out["reporting"] / "contrastive_escape.csv")).set_index("perturbation")
    assert (escape.loc[has_effect[~has_effect].index, "n_called_perturbed"] == 0).all(), escape


@pytest.mark.e2e
def test_cell_ranger_screen_with_doubles_and_batches(tmp_path: Path) -> None:
    """A Cell Ranger .h5 of 11,000 cells (two GEM wells) with guide counts, a combinatorial design (two guides
    per cell), planted genetic interactions, no program annotation: guides called, knockdown checked, the map
    and the interactions drawn, every pipeline run."""
    out = _run_screen(
        tmp_path,
        "sim_doubles_batch",
        cellranger=True,
        n_cells=11_000,
        n_programs=4,
        perturbations_per_program=3,
        n_doubles=10,
        interaction_classes=1,
        n_batches=2,
        guides_per_target=2,
        guides_per_cell=2,
        multiplet_rate=0.02,
        seed=1,
    )
    evaluation, summary, _ = _check_common(out, 10_000)
    truth = ad.read_h5ad(tmp_path / "truth.h5ad")
    reporting = out["reporting"]
    # guides: called per guide, unassigned cells and multiplets dropped and counted
    calls = pd.read_csv(latest_version(reporting / "guide_calls.csv"))
    assert set(calls["guide"]) == set(truth.uns["guides"]["guide"]) and (calls["cells_called"] > 0).all()
    qc = pd.read_csv(latest_version(reporting / "qc_summary.csv"))
    assert qc["step"].str.startswith("guides").sum() == 2
    processed = ad.read_h5ad(out["processed"], backed="r")
    cells = processed.obs_names.str.rsplit("-", n=1).str[0]  # barcodes carry their GEM well: "<cell>-<well>"
    assert (processed.obs["gem_group"].astype(str) == processed.obs_names.str.rsplit("-", n=1).str[1]).all()
    # two guides per cell, each lost in 3 % of the cells (capture failures): about 6 % of the cells cannot have
    # both called, and a double that lost one reads as its single
    right = processed.obs["guide_identity"].to_numpy() == truth.obs.loc[cells, "true_guides"].to_numpy()
    label = processed.obs["perturbation"].astype(str).to_numpy() == truth.obs.loc[cells, "perturbation"].astype(str)
    assert right.mean() >= 0.9 and label.mean() >= 0.94, (right.mean(), label.mean())
    # the knockdown check finds the failed guides
    knockdown = pd.read_csv(latest_version(reporting / "knockdown.csv")).set_index("guide")
    guide_truth = truth.uns["guide_truth"]
    measured = knockdown[knockdown["remaining"].notna()]
    failed = guide_truth.loc[measured.index, "failed"].astype(bool)
    assert roc_auc_score(~failed, 1.0 - measured["remaining"]) >= 0.95  # the remaining share ranks them
    assert not (measured.loc[failed[failed].index, "call"] == "knocked_down").any()
    # ~180 cells per guide: a weak guide (64 % knockdown) of a target with 0.2 UMIs per cell can go unseen
    assert (measured.loc[failed[~failed].index, "call"] == "knocked_down").mean() >= 0.75
    # the map and the interactions
    clusters = pd.read_csv(latest_version(reporting / "perturbation_clusters.csv"))
    assert {"pseudobulk", "salient", "factors"} <= set(clusters["profile"])
    interactions = pd.read_csv(latest_version(reporting / "genetic_interactions.csv")).set_index("double")
    planted = truth.uns["perturbation_truth"]["interaction"]
    planted = planted[planted != ""]
    assert set(interactions.index) == set(planted.index)
    assert (interactions.loc[planted.index, "interaction"] == planted).mean() >= 0.8
    # prediction, batches and no annotation as before
    doubles = summary[summary["evaluation"] == "held_out_perturbations"]
    assert (doubles["status"] == "scored").all() and doubles["n_perturbations"].min() >= 1
    assert set(summary["method"]) >= {"cvae_prior", "cvae_controls", "additive"}
    assert "gem_group" in set(evaluation["key"])  # the GEM wells' leakage is measured
    assert "program" not in set(evaluation["key"])  # no annotation: no program scores, no crash,
    assert evaluation["note"].fillna("").str.contains("no annotation").any()  # and the reason is stated
    page = latest_version(reporting / "report.html").read_text()
    for key in ("guide_calls", "knockdown", "perturbation_map", "genetic_interactions"):
        assert key in page, key
