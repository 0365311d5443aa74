"""Report sections on known inputs: the numbers they show are the numbers of the data."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from perturbscope.pipelines.reporting.figures import plot_training_curves
from perturbscope.pipelines.reporting.report import ReportSection
from perturbscope.pipelines.reporting.sections import SECTIONS, available_sections
from perturbscope.pipelines.reporting.sections import data_processing as dp_section

PARAMS = {
    "figure_dpi": 40,
    "max_table_rows": 40,
    "inline_table_rows": 15,
    "data_processing": {"max_perturbations_shown": 60},
}


def test_every_section_reports_a_distinct_pipeline_and_figures() -> None:
    names = [s.pipeline for s in SECTIONS]
    assert names[0] == "data_processing" and len(set(names)) == len(names)
    keys = [k for s in SECTIONS for k in s.figures]
    assert len(set(keys)) == len(keys)
    assert "data_processing" in [s.pipeline for s in available_sections()]


def test_data_processing_section_shows_the_screen(processed_sim) -> None:
    processed, summary, qc = processed_sim
    schema = {"program_key": "program"}
    result = dp_section.report_data_processing(processed, summary, qc, pd.DataFrame(), PARAMS, schema, "sim")
    section: ReportSection = result["section"]
    assert section.name == "data_processing"
    assert section.figure_keys == list(dp_section.FIGURES)
    for key in dp_section.FIGURES:
        assert result[key].axes  # a drawn matplotlib figure, written by the catalog

    obs = processed.obs
    facts = section.facts
    assert facts["cells after QC"] == f"{processed.n_obs:,}"
    assert facts["control cells"] == f"{int(obs['is_control'].sum()):,}"
    labels = obs["perturbation"].astype(str)
    singles = {p for p in labels.unique() if p != "control" and "+" not in p}
    doubles = {p for p in labels.unique() if "+" in p}
    assert facts["single perturbations"] == str(len(singles))
    assert facts["double perturbations (A+B)"] == str(len(doubles))
    counts = processed.layers["counts"]
    assert facts["median UMIs per cell (HVGs)"] == f"{float(np.median(np.asarray(counts.sum(axis=1)).ravel())):,.4g}"

    # the simulated screen has the Tirosh genes: real phases, counted per cell group
    phases = {t.key: t for t in section.tables}["phase_table"].frame.set_index("phase")
    assert set(phases.index) == {"G1", "S", "G2M"}
    assert phases["total"].sum() == processed.n_obs
    assert phases.loc["G1", "control"] == int(((obs["phase"] == "G1") & obs["is_control"]).sum())
    assert phases["fraction"].sum() == pytest.approx(1.0, abs=1e-2)


def test_phase_is_unknown_without_tirosh_genes(processed_sim) -> None:
    processed, summary, qc = processed_sim
    unknown = processed.copy()
    unknown.obs["phase"] = pd.Categorical(["unknown"] * unknown.n_obs)
    table = dp_section.phase_table(unknown)
    assert table["phase"].tolist() == ["unknown"] and table["total"].iloc[0] == unknown.n_obs
    spec = dp_section.phase_counts_figure(unknown, 10, dpi=40)
    assert "lacks the Tirosh genes" in spec.caption


def test_training_curves_mark_the_kept_epoch() -> None:
    history = pd.DataFrame(
        {"epoch": range(6), "train_loss": [9, 7, 6, 5, 4.5, 4], "val_loss": [9.5, 7.5, 6.5, 6.0, 6.2, 6.4]}
    )
    fig = plot_training_curves({"model": history}, dpi=40)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["train"].get_ydata(), history["train_loss"])
    np.testing.assert_allclose(lines["validation"].get_ydata(), history["val_loss"])
    marked = [line for line in ax.get_lines() if line.get_linestyle() == ":"][0]
    assert marked.get_xdata()[0] == 3  # lowest validation loss
    kept = plot_training_curves({"m": history.assign(best_epoch=2)}, dpi=40).axes[0]
    assert [line for line in kept.get_lines() if line.get_linestyle() == ":"][0].get_xdata()[0] == 2
    with pytest.raises(ValueError, match="train_loss"):
        plot_training_curves({"m": history.drop(columns="train_loss")}, dpi=40)


# ------------------------------------------------------------------ contrastive_model
def _knn_purity(xy: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean share of a cell's k nearest neighbours (2-D) that carry its label."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(xy).kneighbors(xy, return_distance=False)[:, 1:]
    return float((labels[idx] == labels[:, None]).mean())


def test_contrastive_umaps_tell_the_story(processed_sim) -> None:
    """With a salient space that holds only the programs, the salient UMAP groups cells by
    program and no longer by phase; the PCA UMAP keeps the phase structure."""
    import anndata as ad

    from perturbscope.pipelines.reporting.sections import contrastive_model as cm

    processed, _, _ = processed_sim
    rng = np.random.default_rng(0)
    programs = processed.obs["program"].astype(str)
    codes = pd.Categorical(programs).codes
    salient = np.eye(codes.max() + 1)[codes] * 4 + rng.normal(scale=0.3, size=(processed.n_obs, codes.max() + 1))
    embedding = ad.AnnData(obs=processed.obs[[]].copy(), obsm={cm.SALIENT_KEY: salient.astype(np.float32)})
    params = {"n_pcs": 20, "n_neighbors": 15, "min_dist": 0.3, "max_cells": 400, "max_categories": 12, "seed": 0}
    umap = cm.story_umaps(processed, embedding, params, {"program_key": "program"})

    assert len(umap) == 400 and not umap["perturbation"].eq("control").any()
    assert umap["cell"].is_unique and set(umap["cell"]) <= set(processed.obs_names)
    # rows carry the labels of their own cells
    obs = processed.obs.loc[umap["cell"]]
    assert (umap["program"].to_numpy() == obs["program"].astype(str).to_numpy()).all()
    assert (umap["phase"].to_numpy() == obs["phase"].astype(str).to_numpy()).all()

    pca, sal = umap[["pca_umap_1", "pca_umap_2"]].to_numpy(), umap[["salient_umap_1", "salient_umap_2"]].to_numpy()
    program, phase = umap["program"].to_numpy(), umap["phase"].to_numpy()
    assert _knn_purity(sal, program) > 0.9 > _knn_purity(pca, program)
    assert _knn_purity(pca, phase) > _knn_purity(sal, phase) + 0.1

    result = cm.report_contrastive_model(
        umap,
        pd.DataFrame({"epoch": [0, 1], "train_loss": [2.0, 1.0], "val_loss": [2.5, 1.5]}),
        pd.DataFrame({"metric": ["asw_program"], "value": [0.5]}),
        {**PARAMS, "contrastive_model": {"point_size": 4}},
    )
    story = result["contrastive_story"]
    assert len(story.axes) >= 2 * 3  # 2 representations x (phase, program, perturbation) + legends
    assert result["section"].figure_keys == list(cm.FIGURES)
    assert [t.key for t in result["section"].tables] == ["contrastive_evaluation"]  # no escape table given

    escape = pd.DataFrame(
        {
            "perturbation": ["A", "B"],
            "n_cells": [100, 80],
            "n_called_perturbed": [70, 0],
            "fraction_called_perturbed": [0.7, 0.0],
        }
    )
    with_escape = cm.report_contrastive_model(
        umap,
        pd.DataFrame({"epoch": [0, 1], "train_loss": [2.0, 1.0], "val_loss": [2.5, 1.5]}),
        pd.DataFrame({"metric": ["asw_program"], "value": [0.5]}),
        {**PARAMS, "contrastive_model": {"point_size": 4}},
        escape,
    )["section"]
    table = {t.key: t for t in with_escape.tables}["contrastive_escape"]
    assert list(table.frame["perturbation"]) == ["B", "A"]  # the lowest called share first
    assert with_escape.facts["target cells called perturbed"] == "70 of 180"
    assert with_escape.facts["perturbations calling no cell perturbed"] == "1"


def test_contrastive_umaps_refuse_a_foreign_embedding(processed_sim) -> None:
    import anndata as ad

    from perturbscope.pipelines.reporting.sections import contrastive_model as cm

    processed, _, _ = processed_sim
    params = {"n_pcs": 5, "n_neighbors": 5, "min_dist": 0.3, "max_cells": 50, "max_categories": 5, "seed": 0}
    other = ad.AnnData(obs=pd.DataFrame(index=[f"x{i}" for i in range(10)]), obsm={cm.SALIENT_KEY: np.zeros((10, 2))})
    with pytest.raises(cm.ContrastiveReportError, match="another version"):
        cm.story_umaps(processed, other, params, {})
    with pytest.raises(cm.ContrastiveReportError, match="obsm"):
        cm.story_umaps(processed, ad.AnnData(obs=processed.obs[[]].copy()), params, {})


# ------------------------------------------------------------------ linear_model
def test_ldvae_section_picks_the_right_genes_and_effects() -> None:
    from perturbscope.pipelines.reporting.sections import linear_model as lm

    genes = [f"G{i}" for i in range(12)]
    loadings = pd.DataFrame(0.01, index=pd.Index(genes, name="gene"), columns=["factor_1", "factor_2"])
    loadings.loc[["G3", "G7"], "factor_1"] = [2.0, -3.0]
    loadings.loc[["G1", "G7"], "factor_2"] = [1.5, 0.5]
    top = lm.top_gene_loadings(loadings.reset_index(), n_top=2)
    assert top.index.tolist() == ["G7", "G3", "G1"]  # factor_1 by |loading|, then factor_2's new gene
    assert top.loc["G7", "factor_1"] == -3.0

    effects = pd.DataFrame(
        {
            "perturbation": ["A", "A", "B", "B", "C", "C"],
            "factor": ["factor_1", "factor_2"] * 3,
            "standardised_effect": [0.1, 2.5, -4.0, 0.2, 1.0, 0.0],
            "q_value": [0.9, 0.001, 0.0001, 0.8, 0.01, 1.0],
            "significant": [False, True, True, False, True, False],
            "reading": ["a1", "a2", "b1", "b2", "c1", "c2"],
        }
    )
    strongest = lm.strongest_effects(effects, n=2)
    assert strongest["reading"].tolist() == ["b1", "a2"]
    facts = lm.effect_facts(effects)
    assert facts["significant perturbation x factor effects"] == 3
    assert facts["perturbations moving at least one factor"] == "3 of 3"
    assert lm.strongest_effects(effects.iloc[:0], n=3).empty


# ------------------------------------------------------------------ perturbation_prediction
def test_prediction_section_reads_the_pipelines_own_tables() -> None:
    pytest.importorskip("perturbscope.pipelines.perturbation_prediction")
    from perturbscope.pipelines.perturbation_prediction.nodes import plot_summary, summarise_metrics
    from perturbscope.pipelines.reporting.sections import perturbation_prediction as pp

    rng = np.random.default_rng(0)
    rows = []
    for evaluation, perturbations in (("held_out_cells", ["A", "B", "C"]), ("held_out_perturbations", ["A+B"])):
        for perturbation in perturbations:
            for method, quality in (("cvae_controls", 0.6), ("no_change", np.nan), ("additive", 0.8)):
                rows.append(
                    {
                        "evaluation": evaluation,
                        "perturbation": perturbation,
                        "method": method,
                        "pearson_delta": quality + rng.normal(scale=0.05),
                        "mse": rng.uniform(0, 1),
                    }
                )
    metrics, summary, _ = summarise_metrics(held_out_cells=pd.DataFrame(rows))
    history = pd.DataFrame({"epoch": [0, 1, 2], "train_loss": [3.0, 2.0, 1.5], "val_loss": [3.2, 2.1, 1.9]})
    scores = ["pearson_delta", "mse"]
    panel = io.BytesIO()  # the pipeline's own summary panel, as the catalog hands it to the report (PNG)
    plot_summary(summary, metrics, scores).savefig(panel, format="png")
    result = pp.report_perturbation_prediction(summary, metrics, panel.getvalue(), scores, PARAMS, history, history)
    section = result["section"]
    assert section.figure_keys == list(pp.FIGURES)
    assert section.facts["test perturbations (held_out_cells)"] == "3"
    assert section.facts["best method by pearson_delta (held_out_perturbations)"].startswith("additive")
    table = section.tables[0].frame
    assert list(table.columns) == ["evaluation", "method", "status", "n_perturbations", "pearson_delta", "mse"]
    mean = metrics.query("evaluation == 'held_out_cells' and method == 'cvae_controls'")["pearson_delta"].mean()
    cell = table.query("evaluation == 'held_out_cells' and method == 'cvae_controls'")["pearson_delta"].iloc[0]
    assert cell.startswith(f"{mean:.3g} ± ")
    assert table.query("method == 'no_change'")["pearson_delta"].eq("n/a").all()


def test_contrastive_evaluation_is_one_row_per_metric_and_a_column_per_space() -> None:
    from perturbscope.pipelines.reporting.sections import contrastive_model as cm

    rows = []
    for space, accuracy in (("salient", 0.8), ("background", 0.5), ("pca", 0.45)):
        rows += [
            {
                "metric": "ari",
                "key": "program",
                "space": space,
                "value": accuracy / 2,
                "chance_level": np.nan,
                "note": np.nan,
            },
            {
                "metric": "knn_accuracy",
                "key": "program",
                "space": space,
                "value": accuracy,
                "chance_level": 0.3,
                "note": np.nan,
            },
        ]
    rows.append(
        {
            "metric": "leakage_knn_accuracy",
            "key": "phase",
            "space": np.nan,
            "value": np.nan,
            "chance_level": np.nan,
            "note": "'phase' is unknown",
        }
    )
    evaluation = pd.DataFrame(rows)
    table = cm.evaluation_table(evaluation)
    assert table.columns.tolist() == ["metric", "key", "salient", "background", "pca", "chance level"]
    assert table.set_index("metric").loc["knn_accuracy", "salient"] == 0.8
    assert cm.evaluation_facts(evaluation) == {
        "program kNN accuracy": "salient 0.80, background 0.50, pca 0.45 (chance 0.30)"
    }


def test_data_processing_section_of_a_plain_count_matrix() -> None:
    """schema.perturbation_key: null: every cell 'unperturbed', no controls; the section still renders."""
    from perturbscope.pipelines.data_processing import nodes as dp
    from perturbscope.simulation import simulate_screen

    raw = simulate_screen(n_cells=200, n_genes=200, seed=1)
    schema = {"perturbation_key": None, "control_labels": ["control"]}
    validated = dp.validate_screen(raw, schema, "plain")
    qc, qc_table = dp.quality_control(
        validated, {"min_genes_per_cell": 5, "min_cells_per_gene": 3, "max_mito_fraction": 0.2}
    )
    processed = dp.label_cells(
        dp.score_cell_cycle(dp.normalise(qc, {"target_sum": 1e4}), {"min_genes_per_phase": 5}),
        schema,
        {"validation_fraction": 0.1},
        seed=0,
    ).to_memory()
    summary, qc_summary = dp.summarise_screen(dp.count_cells_per_perturbation(validated), processed, qc_table)
    section = dp_section.report_data_processing(
        processed, summary, qc_summary, pd.DataFrame(), PARAMS, schema, "plain"
    )["section"]
    assert section.facts["perturbations"] == "0" and section.facts["control cells"] == "0"
    assert section.facts["cells after QC"] == f"{processed.n_obs:,}"
