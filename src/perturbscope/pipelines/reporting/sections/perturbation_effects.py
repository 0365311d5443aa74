"""Report section of ``perturbation_effects``: which perturbations did anything (the energy-distance
test, its figure and table) and how the salient gene table agrees with differential expression."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from kedro.pipeline import Node, Pipeline

from perturbscope.pipelines.reporting.report import FigureSpec, ReportTable, make_section
from perturbscope.pipelines.reporting.sections.base import Section, section_result
from perturbscope.schema import PERTURBATION

PIPELINE = "perturbation_effects"
FIGURES = (
    "perturbation_effect_tests",
    "knockdown",
    "perturbation_map",
    "perturbation_map_heatmap",
    "genetic_interactions",
)

# Catalog outputs of the perturbation_effects pipeline read here.
TESTS = "perturbation_effect_tests"
"""One row per perturbation: ``energy_distance``, ``p_value``, ``q_value``, ``significant``..."""
FIGURE = "perturbation_effect_tests_figure"
"""The pipeline's bar chart of the energy distances (PNG)."""
KNOCKDOWN = "knockdown"
"""Per guide: its target's remaining expression, p, q and the knockdown call."""
KNOCKDOWN_FIGURE = "knockdown_figure"
"""The pipeline's bar chart of the remaining target expression per guide (PNG)."""
CLUSTERS = "perturbation_clusters"
"""Per profile kind and perturbation: cluster, cells, nearest perturbations."""
MAP_SUMMARY = "perturbation_map_summary"
"""Per profile kind: clusters, silhouette, ARI against the program annotation."""
CLUSTER_GENES = "perturbation_cluster_genes"
"""Per cluster: shared up / down genes."""
ENRICHMENT = "perturbation_cluster_enrichment"
"""Per cluster and direction: gene-set over-representation (empty without a GMT file)."""
MAP_HEATMAP, MAP_FIGURE = "perturbation_map_heatmap", "perturbation_map_figure"
INTERACTIONS, INTERACTIONS_FIGURE = "genetic_interactions", "genetic_interactions_figure"
AGREEMENT = "salient_de_agreement"
"""Per perturbation and DE method: ``spearman``, ``fraction_significant_same_direction``."""

TEST_COLUMNS = [PERTURBATION, "n_cells", "energy_distance", "p_value", "q_value", "significant"]


def _significant(table: pd.DataFrame) -> pd.Series:
    return table["significant"].astype(str).str.lower().isin(["true", "1"])


def effect_facts(tests: pd.DataFrame) -> dict[str, Any]:
    if tests.empty:
        return {"perturbations tested": "none (too few cells or no controls)"}
    significant = _significant(tests)
    return {
        "perturbations tested": len(tests),
        "perturbations that differ from the controls (q < alpha)": f"{int(significant.sum())} of {len(tests)}",
        "test": f"energy distance ({tests['distance'].iloc[0]}) in {int(tests['n_pcs'].iloc[0])} PCs, "
        f"{int(tests['n_permutations'].iloc[0])} permutations, BH",
    }


def agreement_summary(agreement: pd.DataFrame) -> pd.DataFrame:
    """Per DE method: median Spearman and median share of salient genes DE in the same direction."""
    if agreement.empty:
        return pd.DataFrame(columns=["method", "perturbations", "median_spearman", "median_fraction_confirmed"])
    grouped = agreement.groupby("method", sort=True)
    return pd.DataFrame(
        {
            "perturbations": grouped[PERTURBATION].nunique(),
            "median_spearman": grouped["spearman"].median().round(3),
            "median_fraction_confirmed": grouped["fraction_significant_same_direction"].median().round(3),
        }
    ).reset_index()


def knockdown_facts(knockdown: pd.DataFrame, modality: str, dropped: bool) -> dict[str, Any]:
    if knockdown.empty:
        return {"knockdown check": "no guide or single perturbation to check"}
    calls = knockdown["call"].value_counts()
    works = int(calls.get("knocked_down", 0) + calls.get("activated", 0))
    fails = int(calls.get("no knockdown", 0) + calls.get("no activation", 0))
    facts = {
        f"guides that moved their target ({modality})": f"{works} of {works + fails} measurable",
        "guides whose target is not measurable": int(calls.get("not measurable", 0)),
    }
    failed = knockdown.loc[knockdown["call"].isin(["no knockdown", "no activation"]), "guide"].astype(str).tolist()
    if failed:
        facts["guides without knockdown"] = ", ".join(failed[:15]) + (" ..." if len(failed) > 15 else "")
    facts["cells of guides without knockdown"] = (
        "dropped before the models trained (data_processing.guides.drop_without_knockdown)"
        if dropped
        else "kept (data_processing.guides.drop_without_knockdown: false)"
    )
    return facts


def map_facts(summary: pd.DataFrame, clusters: pd.DataFrame, profile: str) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for row in summary.itertuples(index=False):
        text = f"{int(row.n_clusters)} cluster(s) of {int(row.n_perturbations) - int(row.n_no_effect)} perturbations"
        if np.isfinite(row.ari_vs_program):
            text += f", ARI vs the annotated programs {row.ari_vs_program:.2f}"
        facts[f"perturbation map ({row.profile} profiles)"] = text
    shown = clusters[clusters["profile"] == profile]
    if len(shown):
        facts["perturbations with no effect (kept apart)"] = int((shown["cluster"] == "no effect").sum())
    return facts


def interaction_facts(table: pd.DataFrame) -> dict[str, Any]:
    if table.empty:
        return {"genetic interactions": "no double with both singles measured"}
    counts = table["interaction"].value_counts()
    return {"doubles by interaction": ", ".join(f"{k}: {v}" for k, v in counts.items())}


def report_perturbation_effects(
    tests: pd.DataFrame,
    figure: bytes,
    knockdown: pd.DataFrame,
    knockdown_png: bytes,
    clusters: pd.DataFrame,
    map_summary: pd.DataFrame,
    cluster_genes: pd.DataFrame,
    enrichment: pd.DataFrame,
    map_heatmap: bytes,
    map_png: bytes,
    interactions: pd.DataFrame,
    interactions_png: bytes,
    agreement: pd.DataFrame,
    params: dict[str, Any],
    schema: dict[str, Any],
    guide_params: dict[str, Any],
    map_profile: str,
) -> dict[str, Any]:
    """The perturbation_effects section: effect-test figure and table, the knockdown check, salient vs DE
    agreement."""
    modality = str(schema.get("modality", "CRISPRi"))
    figures = {
        "perturbation_effect_tests": FigureSpec(
            figure,
            "Did it work? Energy distance of each perturbation to the controls",
            "Energy distance between a perturbation's cells and the control cells in one PCA of the "
            "log-normalised data; red bars differ from the controls (permutation test, Benjamini-Hochberg).",
        ),
        "perturbation_map": FigureSpec(
            map_png,
            "Which perturbations act alike: a map",
            f"Each perturbation's {map_profile} profile (what it did relative to the controls); distances are "
            "1 - correlation of the profiles (metric MDS); colours are the clusters (number chosen by the "
            "silhouette); grey: no effect in the effect test, kept out of the clusters.",
        ),
        "perturbation_map_heatmap": FigureSpec(
            map_heatmap,
            "Similarity of the perturbations, grouped by cluster",
            "Correlation of the perturbations' profiles, ordered by cluster (in brackets).",
        ),
        "genetic_interactions": FigureSpec(
            interactions_png,
            "Genetic interactions of the doubles",
            "Each double fitted as c_A·Δ_A + c_B·Δ_B of its singles' shifts (Norman et al. 2019): magnitude "
            "(1 = additive, the additive baseline of the prediction section), and how well the singles explain "
            "the double; bars: bootstrap intervals; colours: the class.",
        ),
        "knockdown": FigureSpec(
            knockdown_png,
            "Did the guides work? Each guide's own target",
            f"Mean expression (counts per 10,000) of each guide's target in its cells over the controls' "
            f"({modality}: a working guide {'raises' if modality == 'CRISPRa' else 'lowers'} it); green: "
            "moved (one-sided Mann-Whitney, BH q < alpha, beyond the threshold), red: not, grey: not measurable "
            "(target not in the panel, rarely detected, or too few cells).",
        ),
    }
    shown = tests[[c for c in TEST_COLUMNS if c in tests.columns]].copy()
    if not shown.empty:
        shown = shown.round({"energy_distance": 4})
        shown["p_value"] = shown["p_value"].map(lambda v: f"{v:.3g}")
        shown["q_value"] = shown["q_value"].map(lambda v: f"{v:.3g}")
    summary = agreement_summary(agreement)
    facts = {
        **effect_facts(tests),
        **knockdown_facts(knockdown, modality, bool(guide_params["drop_without_knockdown"])),
        **map_facts(map_summary, clusters, map_profile),
        **interaction_facts(interactions),
    }
    cluster_table = clusters[clusters["profile"] == map_profile].drop(columns=["profile"])
    genes_table = (
        cluster_genes[cluster_genes["rank"] <= 10]
        .groupby(["cluster", "direction"], sort=True)["gene"]
        .apply(lambda g: ", ".join(g))
        .reset_index()
        if len(cluster_genes)
        else pd.DataFrame(columns=["cluster", "direction", "gene"])
    )
    interactions_shown = interactions.round(3)
    knockdown_shown = knockdown.copy()
    for column in ("remaining", "log2_fold_change", "mean_guide", "mean_control"):
        if column in knockdown_shown:
            knockdown_shown[column] = knockdown_shown[column].astype(float).round(3)
    for column in ("p_value", "q_value"):
        if column in knockdown_shown:
            knockdown_shown[column] = knockdown_shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
    if len(summary):
        for row in summary.itertuples(index=False):
            facts[f"salient genes vs {row.method}: median Spearman"] = (
                f"{row.median_spearman:.2f}" if np.isfinite(row.median_spearman) else "n/a"
            )
    section = make_section(
        PIPELINE,
        "Perturbation effects",
        intro=(
            "Model-free answers to the first questions of a screen: did each perturbation change the cells "
            "(energy-distance permutation test against the controls), and which genes did it move "
            "(pseudobulk PyDESeq2 and Wilcoxon, in differential_expression.csv)."
        ),
        facts=facts,
        tables=[
            ReportTable(
                "perturbation_effect_tests",
                "Effect test per perturbation",
                shown,
                "q: Benjamini-Hochberg over the tested perturbations; significant: q < alpha.",
            ),
            ReportTable(
                "perturbation_clusters",
                f"Clusters of perturbations ({map_profile} profiles)",
                cluster_table.round(3),
                "Each perturbation's cluster and its three nearest perturbations with the correlation of their "
                "profiles; every profile kind: perturbation_clusters.csv.",
            ),
            ReportTable(
                "perturbation_map_summary",
                "Which profile sorts the perturbations best",
                map_summary.round(3),
                "Per profile kind: clusters, silhouette, and the ARI of the clusters against the annotated programs "
                "(schema.program_key) where there is one.",
            ),
            ReportTable(
                "perturbation_cluster_genes",
                "What each cluster does",
                genes_table,
                "The top genes its perturbations move together (mean pseudobulk shift); the LDVAE factors: "
                "perturbation_cluster_factors.csv"
                + ("" if enrichment.empty else "; gene-set enrichment: perturbation_cluster_enrichment.csv")
                + ".",
            ),
            ReportTable(
                "genetic_interactions",
                "Genetic interactions of the doubles",
                interactions_shown,
                "c_a, c_b: the fitted coefficients; magnitude: sqrt(c_a² + c_b²)/sqrt(2) (1 = additive); fit: "
                "correlation of the fit with the double's shift; dominance |log10(c_a/c_b)|; *_low / *_high: "
                "bootstrap interval; additive_error: RMS error of the additive prediction c + ΔA + ΔB.",
            ),
            ReportTable(
                "knockdown",
                "Knockdown of each guide's target",
                knockdown_shown,
                "remaining: the target's mean expression in the guide's cells over the controls'; q: "
                "Benjamini-Hochberg over the measurable guides.",
            ),
            ReportTable(
                "salient_de_agreement",
                "Salient genes vs differential expression",
                summary,
                "Over each perturbation's salient genes (contrastive model): Spearman correlation of "
                "its salient log2 fold change with the DE log2 fold change, and the share of those "
                "genes called DE (q < alpha) in the same direction; medians over perturbations.",
            ),
        ],
        figures=figures,
    )
    return section_result(section, figures)


def create_pipeline() -> Pipeline:
    return Pipeline(
        [
            Node(
                report_perturbation_effects,
                inputs=[
                    TESTS,
                    FIGURE,
                    KNOCKDOWN,
                    KNOCKDOWN_FIGURE,
                    CLUSTERS,
                    MAP_SUMMARY,
                    CLUSTER_GENES,
                    ENRICHMENT,
                    MAP_HEATMAP,
                    MAP_FIGURE,
                    INTERACTIONS,
                    INTERACTIONS_FIGURE,
                    AGREEMENT,
                    "params:reporting",
                    "params:schema",
                    "params:data_processing.guides",
                    "params:perturbation_effects.map.programs.profile",
                ],
                outputs=SECTION.node_outputs(),
                name="report_perturbation_effects",
            )
        ]
    )


SECTION = Section(pipeline=PIPELINE, figures=FIGURES, create_pipeline=create_pipeline)
