"""Nodes of the perturbation_effects pipeline: which perturbations did anything, and to which genes.

Model-free statistics on the processed screen, next to what the models say; each node is a thin call
of one function whose signature owns its parameters' defaults (:func:`perturbscope.parameters.options`):

* :func:`run_effect_tests` -- per perturbation, the energy distance of its cells to the controls in a
  shared PCA with a permutation p-value and BH q-value (:mod:`.effect_tests`, :mod:`.energy`);
* :func:`differential_expression` -- pseudobulk PyDESeq2 and scanpy's Wilcoxon per perturbation vs the
  controls (:mod:`.de`);
* :func:`compare_with_salient_genes` -- how the contrastive model's salient gene table agrees with that
  differential expression;
* :func:`check_knockdown` -- did each guide knock its own target down (:func:`perturbscope.guides.knockdown_table`);
* the perturbation map (:mod:`.profiles`): :func:`compute_profiles`, :func:`compare_perturbations`,
  :func:`cluster_perturbations`, :func:`describe_clusters`, :func:`enrich_clusters`;
* :func:`call_interactions` -- genetic interactions of the doubles (:mod:`.interactions`).
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from perturbscope import guides
from perturbscope.parameters import conf_errors, options, required
from perturbscope.schema import PERTURBATION, ScreenSchema
from perturbscope.tracking import metric_name

from . import de, figures, interactions, profiles
from .effect_tests import effect_tests

__all__ = [
    "call_interactions",
    "check_knockdown",
    "cluster_perturbations",
    "compare_perturbations",
    "compute_profiles",
    "describe_clusters",
    "enrich_clusters",
    "interaction_metrics",
    "map_metrics",
    "plot_interactions",
    "plot_perturbation_map",
    "compare_with_salient_genes",
    "knockdown_metrics",
    "plot_knockdown",
    "differential_expression",
    "effect_test_metrics",
    "plot_effect_tests",
    "run_effect_tests",
]

SECTION = "perturbation_effects"


def run_effect_tests(screen: ad.AnnData, params: dict[str, Any], seed: int) -> pd.DataFrame:
    """Energy-distance permutation test of every perturbation against the controls (:func:`effect_tests`)."""
    section = f"{SECTION}.effect_test"
    with conf_errors(section):
        return effect_tests(screen, seed, **options(effect_tests, params, section, exclude={"screen", "seed"}))


def effect_test_metrics(table: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """MLflow metrics: how many perturbations were tested and had an effect, and each one's energy distance and
    q-value (``energy_distance.<perturbation>``, ``q_value.<perturbation>``)."""
    out: dict[str, dict[str, float | int]] = {
        "n_tested": {"value": len(table), "step": 0},
        "n_significant": {"value": int(table["significant"].astype(bool).sum()) if len(table) else 0, "step": 0},
    }
    for row in table.itertuples(index=False):
        label = getattr(row, PERTURBATION)
        out[metric_name("energy_distance", label)] = {"value": float(row.energy_distance), "step": 0}
        out[metric_name("q_value", label)] = {"value": float(row.q_value), "step": 0}
    return out


def plot_effect_tests(table: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """Energy distance to the controls per perturbation, largest first; red = significant."""
    return figures.effect_tests_figure(
        table, **options(figures.effect_tests_figure, params, f"{SECTION}.figure", exclude={"table"})
    )


def differential_expression(
    screen: ad.AnnData, params: dict[str, Any], schema_params: dict[str, Any], seed: int
) -> pd.DataFrame:
    """Per perturbation vs controls: pseudobulk PyDESeq2 and/or Wilcoxon (:func:`.de.differential_expression`)."""
    section = f"{SECTION}.differential_expression"
    settings = options(de.differential_expression, params, section, exclude={"screen", "batch_key", "seed"})
    with conf_errors(section):
        return de.differential_expression(screen, ScreenSchema.from_params(schema_params).batch_key, seed, **settings)


def compare_with_salient_genes(de_table: pd.DataFrame, salient_genes: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """How the contrastive model's salient gene table agrees with the DE (:func:`.de.salient_agreement`)."""
    return de.salient_agreement(de_table, salient_genes, alpha)


def _guide_of_cell(screen: ad.AnnData, schema: ScreenSchema) -> tuple[np.ndarray, dict[str, str]]:
    """Per cell the guide whose knockdown it measures ("" for none: controls, doubles) and each guide's target;
    a screen labelled by perturbation has one "guide" per single perturbation, its gene the target."""
    obs = screen.obs
    single = obs["n_perturbed_genes"].to_numpy() == 1
    if "guide_identity" in obs and guides.GUIDES in screen.uns:
        table = guides.guide_table(screen)
        target_of = dict(zip(table["guide"], table["target"], strict=True))
        guide = guides.targeting_guide(obs["guide_identity"].astype(str), target_of, schema.control_labels)
        return np.where(single, guide, ""), target_of
    labels = obs[PERTURBATION].astype(str).to_numpy()
    guide = np.where(single, labels, "")
    target_of = {label: obs.loc[labels == label, "perturbed_genes"].iloc[0] for label in set(guide) - {""}}
    return np.asarray(guide, dtype=object), target_of


def check_knockdown(screen: ad.AnnData, params: dict[str, Any], schema_params: dict[str, Any]) -> pd.DataFrame:
    """Per guide (per single perturbation for a screen without guide counts): its own target's expression in
    its cells against the controls, in the direction of ``schema.modality``
    (:func:`perturbscope.guides.knockdown_table`): remaining fraction, log2 fold change, p and BH q, and a call
    (knocked down / activated, no knockdown, not measurable)."""
    exclude = {"adata", "counts", "guide_of_cell", "target_of_guide", "is_control", "modality"}
    settings = options(guides.knockdown_table, params, f"{SECTION}.knockdown", exclude=exclude)
    schema = ScreenSchema.from_params(schema_params)
    guide, target_of = _guide_of_cell(screen, schema)
    counts = screen.layers.get("counts", screen.X)
    is_control = screen.obs["is_control"].to_numpy(dtype=bool)
    return guides.knockdown_table(screen, counts, guide, target_of, is_control, schema.modality, **settings)


def knockdown_metrics(table: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """MLflow metrics: guides per knockdown call (``n_guides.knocked_down``, ``n_guides.no_knockdown`` ...)."""
    counts = table["call"].value_counts() if len(table) else pd.Series(dtype=int)
    calls = ["knocked_down", "activated", "no knockdown", "no activation", "not measurable"]
    return {
        metric_name("n_guides", call.replace(" ", "_")): {"value": int(counts.get(call, 0)), "step": 0}
        for call in calls
    }


def plot_knockdown(table: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """Remaining target expression per guide, grouped by target, coloured by the call."""
    return figures.knockdown_figure(
        table, **options(figures.knockdown_figure, params, f"{SECTION}.knockdown_figure", exclude={"table"})
    )


# ---------------------------------------------------------------------------------------------- the map
def compute_profiles(
    screen: ad.AnnData,
    embedded: ad.AnnData,
    calls: pd.DataFrame,
    linear_embedded: ad.AnnData,
    params: dict[str, Any],
) -> tuple[dict[str, pd.DataFrame], pd.Series]:
    """What each perturbation did relative to the controls, as pseudobulk, salient and LDVAE-factor profiles,
    each perturbed cell weighted by its probability of having been perturbed
    (:func:`.profiles.perturbation_profiles`)."""
    section = f"{SECTION}.map.profiles"
    settings = options(
        profiles.perturbation_profiles, params, section, exclude={"screen", "embedded", "factors", "probability"}
    )
    probability = calls["perturbed_probability"] if calls is not None and "perturbed_probability" in calls else None
    return profiles.perturbation_profiles(screen, embedded, linear_embedded, probability, **settings)


def compare_perturbations(
    perturbation_profiles: dict[str, pd.DataFrame], screen: ad.AnnData, params: dict[str, Any], seed: int
) -> pd.DataFrame:
    """Pairwise similarity of the perturbations per profile kind (:func:`.profiles.similarity_table`)."""
    section = f"{SECTION}.map.similarity"
    settings = options(profiles.similarity_table, params, section, exclude={"profiles", "screen", "seed"})
    return profiles.similarity_table(perturbation_profiles, screen, seed=seed, **settings)


def cluster_perturbations(
    perturbation_profiles: dict[str, pd.DataFrame],
    n_cells: pd.Series,
    tests: pd.DataFrame,
    screen: ad.AnnData,
    params: dict[str, Any],
    schema_params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clusters of perturbations per profile kind, with each one's nearest perturbations, and per kind the
    number of clusters, silhouette and the ARI against ``schema.program_key``
    (:func:`.profiles.cluster_perturbations`)."""
    section = f"{SECTION}.map.clusters"
    settings = options(
        profiles.cluster_perturbations, params, section, exclude={"profiles", "n_cells", "effect_tests", "programs"}
    )
    key = ScreenSchema.from_params(schema_params).program_key
    programs = None
    if key and key in screen.obs:
        programs = screen.obs.groupby(PERTURBATION, observed=True)[key].first().astype(str)
    return profiles.cluster_perturbations(perturbation_profiles, n_cells, tests, programs, **settings)


def map_metrics(summary: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """MLflow metrics of the map: ``<profile>.n_clusters``, ``.silhouette``, ``.ari_vs_program``."""
    out: dict[str, dict[str, float | int]] = {}
    for row in summary.itertuples(index=False):
        for column in ("n_clusters", "silhouette", "ari_vs_program"):
            value = float(getattr(row, column))
            if np.isfinite(value):
                out[metric_name(row.profile, column)] = {"value": value, "step": 0}
    return out


def describe_clusters(
    clusters: pd.DataFrame, perturbation_profiles: dict[str, pd.DataFrame], params: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each cluster's shared up and down genes and the LDVAE factors it moves (:func:`.profiles.cluster_programs`)."""
    section = f"{SECTION}.map.programs"
    settings = options(profiles.cluster_programs, params, section, exclude={"clusters", "profiles"})
    return profiles.cluster_programs(clusters, perturbation_profiles, **settings)


def enrich_clusters(genes: pd.DataFrame, screen: ad.AnnData, params: dict[str, Any]) -> pd.DataFrame:
    """Over-representation of each cluster's genes in the gene sets of ``gene_sets_path`` (a GMT file; Fisher's
    exact test against the modelled genes, BH); empty without one (:func:`.profiles.enrichment`)."""
    section = f"{SECTION}.map.enrichment"
    settings = options(profiles.enrichment, params, section, exclude={"genes", "universe"})
    return profiles.enrichment(genes, list(map(str, screen.var_names)), **settings)


def plot_perturbation_map(
    perturbation_profiles: dict[str, pd.DataFrame], clusters: pd.DataFrame, params: dict[str, Any], profile: str
) -> tuple[Figure, Figure]:
    """The clustered similarity heatmap and the 2-D map of the perturbations (``map.programs.profile``)."""
    settings = options(
        figures.perturbation_map_figures, params, f"{SECTION}.map.figure", exclude={"profiles", "clusters", "profile"}
    )
    return figures.perturbation_map_figures(perturbation_profiles, clusters, profile, **settings)


# ---------------------------------------------------------------------------------------------- doubles
def call_interactions(
    screen: ad.AnnData, params: dict[str, Any], schema_params: dict[str, Any], seed: int
) -> pd.DataFrame:
    """Norman et al.'s model of every double whose singles were measured
    (:func:`.interactions.genetic_interactions`)."""
    section = f"{SECTION}.genetic_interactions"
    settings = options(interactions.genetic_interactions, params, section, exclude={"screen", "seed", "separator"})
    separator = ScreenSchema.from_params(schema_params).double_separator
    return interactions.genetic_interactions(screen, seed=seed, separator=separator, **settings)


def interaction_metrics(table: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """MLflow metrics: doubles per class and each double's magnitude and fit."""
    out: dict[str, dict[str, float | int]] = {"n_doubles": {"value": len(table), "step": 0}}
    for kind, n in table["interaction"].value_counts().items() if len(table) else []:
        out[metric_name("n", str(kind))] = {"value": int(n), "step": 0}
    for row in table[table["interaction"] != interactions.NOT_FITTED].itertuples(index=False):
        out[metric_name("magnitude", row.double)] = {"value": float(row.magnitude), "step": 0}
        out[metric_name("fit", row.double)] = {"value": float(row.fit), "step": 0}
    return out


def plot_interactions(table: pd.DataFrame, params: dict[str, Any]) -> Figure:
    """Magnitude against fit of the doubles, coloured by class."""
    section = f"{SECTION}.genetic_interactions"
    return figures.interactions_figure(
        table,
        float(required(params, "synergy_magnitude", section)),
        float(required(params, "buffering_magnitude", section)),
    )
