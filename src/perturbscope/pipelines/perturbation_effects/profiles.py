"""Perturbation profiles, their similarity, clusters of perturbations and what each cluster does.

A perturbation's *profile* is what it did relative to the controls, in one of three spaces:

``pseudobulk``
    the shift of the mean log-normalised expression of the modelled genes (``X``);
``salient``
    the shift of the mean contrastiveVI salient code (``obsm["X_salient"]``);
``factors``
    the shift of the mean LDVAE factor values (``obsm["X_ldvae"]``).

Where contrastiveVI called escapers, each perturbed cell counts by its probability of having been perturbed
(``perturbed_probability``), so cells the perturbation did not reach do not dilute its profile; a perturbation
with less than ``min_cells`` cells' worth of that probability (the mixture found no responders) counts all
its cells equally. Perturbations
are compared by the Pearson correlation of their profiles (and, in the pseudobulk space, by the E-distance of
their cells, scPerturb's statistic, :mod:`.energy`), clustered by average linkage on ``1 - correlation`` with
the number of clusters that maximises the silhouette; perturbations the effect test found no effect for are
kept out of the clusters (cluster ``no effect``), so null perturbations are never forced into a program.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbscope.schema import IS_CONTROL, N_PERTURBED_GENES, PERTURBATION

logger = logging.getLogger(__name__)

__all__ = [
    "NO_EFFECT",
    "PROFILE_KINDS",
    "cluster_perturbations",
    "cluster_programs",
    "perturbation_profiles",
    "similarity_table",
]

PROFILE_KINDS = ("pseudobulk", "salient", "factors")
NO_EFFECT = "no effect"
SALIENT_KEY, FACTOR_KEY = "X_salient", "X_ldvae"


def _weighted_means(values: Any, groups: np.ndarray, names: list[str], weights: np.ndarray) -> np.ndarray:
    """Weighted mean of the rows of ``values`` (dense or sparse, cells x features) per group in ``names``."""
    index = {name: i for i, name in enumerate(names)}
    rows = np.array([index.get(g, -1) for g in groups])
    keep = rows >= 0
    indicator = sp.csr_matrix((weights[keep], (rows[keep], np.flatnonzero(keep))), shape=(len(names), len(groups)))
    totals = np.asarray(indicator.sum(axis=1)).ravel()
    means = indicator @ values
    means = means.toarray() if sp.issparse(means) else np.asarray(means)
    return means / np.maximum(totals, 1e-12)[:, None]


def perturbation_profiles(
    screen: ad.AnnData,
    embedded: ad.AnnData | None,
    factors: ad.AnnData | None,
    probability: pd.Series | None,
    min_cells: int = 20,
    include_doubles: bool = False,
) -> tuple[dict[str, pd.DataFrame], pd.Series]:
    """Profiles (perturbations x features) of every perturbation with at least ``min_cells`` cells, per kind
    available (``pseudobulk`` always; ``salient`` with the contrastive embedding; ``factors`` with the LDVAE's),
    and each perturbation's number of cells. Doubles are left out unless ``include_doubles``."""
    obs = screen.obs
    labels = obs[PERTURBATION].astype(str).to_numpy()
    control = obs[IS_CONTROL].to_numpy(dtype=bool)
    perturbed = ~control & (obs[N_PERTURBED_GENES].to_numpy() >= 1)
    if not include_doubles:
        perturbed &= obs[N_PERTURBED_GENES].to_numpy() == 1
    counts = pd.Series(labels[perturbed]).value_counts()
    names = sorted(counts.index[counts >= int(min_cells)])
    weights = np.ones(screen.n_obs)
    groups = np.where(control, "__control__", np.where(perturbed, labels, "__other__"))
    if probability is not None and len(probability):
        p = probability.reindex(obs.index).to_numpy(dtype=float)
        weights = np.where(control | ~np.isfinite(p), 1.0, p)
        # a perturbation the escape mixture found (almost) no perturbed cell of has no weighted mean: its cells
        # count equally, so its profile is its plain shift (about 0 for a perturbation that did nothing)
        mass = pd.Series(weights).groupby(groups).sum()
        unweighted = [name for name in names if mass.get(name, 0.0) < int(min_cells)]
        if unweighted:
            logger.info(
                "Profiles of %d perturbation(s) with fewer than %d cells' worth of perturbed probability use all "
                "their cells unweighted: %s",
                len(unweighted),
                int(min_cells),
                ", ".join(unweighted[:10]) + (" ..." if len(unweighted) > 10 else ""),
            )
            weights = np.where(np.isin(groups, unweighted), 1.0, weights)
    spaces: dict[str, tuple[Any, list[str]]] = {"pseudobulk": (screen.X, list(map(str, screen.var_names)))}
    if embedded is not None and SALIENT_KEY in embedded.obsm:
        salient = pd.DataFrame(np.asarray(embedded.obsm[SALIENT_KEY]), index=embedded.obs_names).reindex(obs.index)
        spaces["salient"] = (salient.to_numpy(), [f"salient_{i + 1}" for i in range(salient.shape[1])])
    if factors is not None and FACTOR_KEY in factors.obsm:
        table = pd.DataFrame(np.asarray(factors.obsm[FACTOR_KEY]), index=factors.obs_names).reindex(obs.index)
        factor_names = list((factors.uns.get("ldvae") or {}).get("factors", [])) or [
            f"factor_{i + 1}" for i in range(table.shape[1])
        ]
        spaces["factors"] = (table.to_numpy(), [str(f) for f in factor_names])
    profiles = {}
    for kind, (values, features) in spaces.items():
        usable = np.ones(screen.n_obs, dtype=bool)
        if not sp.issparse(values):
            usable = np.isfinite(np.asarray(values, dtype=float)).all(axis=1)
            values = np.where(usable[:, None], np.asarray(values, dtype=float), 0.0)
        w = weights * usable
        means = _weighted_means(values, groups, [*names, "__control__"], w)
        profiles[kind] = pd.DataFrame(
            means[:-1] - means[-1], index=pd.Index(names, name=PERTURBATION), columns=features
        )
        if kind == "pseudobulk" and control.any():  # the controls' spread: shifts in units of it rank the genes
            rows = values[control]
            squares = rows.multiply(rows) if sp.issparse(rows) else np.asarray(rows) ** 2
            variance = np.asarray(squares.mean(axis=0)).ravel() - means[-1] ** 2
            profiles[kind].attrs["control_sd"] = np.sqrt(np.maximum(variance, 0.0)).tolist()
    return profiles, counts.reindex(names).astype(int)


def _correlation(profile: pd.DataFrame) -> pd.DataFrame:
    values = profile.to_numpy(dtype=float)
    centred = values - values.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    corr = (centred @ centred.T) / np.maximum(np.outer(norms, norms), 1e-12)
    return pd.DataFrame(np.clip(corr, -1.0, 1.0), index=profile.index, columns=profile.index)


def _e_distances(screen: ad.AnnData, names: list[str], n_pcs: int, max_cells: int, seed: int) -> pd.DataFrame:
    """Pairwise energy distances between perturbations' cells in one PCA of ``X`` (scPerturb's E-distance)."""
    from sklearn.decomposition import PCA

    from .energy import energy_distance

    rng = np.random.default_rng(seed)
    labels = screen.obs[PERTURBATION].astype(str).to_numpy()
    cells = {}
    for name in names:
        members = np.flatnonzero(labels == name)
        cells[name] = np.sort(rng.choice(members, size=min(max_cells, members.size), replace=False))
    rows = np.concatenate(list(cells.values()))
    x = screen.X[rows]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    n_comp = int(min(n_pcs, x.shape[0] - 1, x.shape[1]))
    pcs = PCA(n_components=n_comp, random_state=seed).fit_transform(x.astype(np.float64))
    offsets = np.cumsum([0] + [cells[n].size for n in names])
    points = {n: pcs[offsets[i] : offsets[i + 1]] for i, n in enumerate(names)}
    out = np.zeros((len(names), len(names)))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            out[i, j] = out[j, i] = energy_distance(points[a], points[names[j]], "sqeuclidean")
    return pd.DataFrame(out, index=names, columns=names)


def similarity_table(
    profiles: Mapping[str, pd.DataFrame],
    screen: ad.AnnData | None = None,
    e_distance: bool = True,
    n_pcs: int = 30,
    max_cells: int = 300,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per profile kind and pair of perturbations: ``correlation`` of their profiles; in the
    pseudobulk space also ``e_distance`` (cells subsampled to ``max_cells`` per perturbation)."""
    rows = []
    for kind, profile in profiles.items():
        corr = _correlation(profile)
        names = list(profile.index)
        distance = None
        if kind == "pseudobulk" and e_distance and screen is not None and len(names) >= 2:
            distance = _e_distances(screen, names, n_pcs, max_cells, seed)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                row = {"profile": kind, "perturbation_a": a, "perturbation_b": b, "correlation": corr.loc[a, b]}
                if distance is not None:
                    row["e_distance"] = distance.loc[a, b]
                rows.append(row)
    return pd.DataFrame(rows, columns=["profile", "perturbation_a", "perturbation_b", "correlation", "e_distance"])


def _choose_clusters(distance: np.ndarray, max_clusters: int, min_silhouette: float) -> tuple[np.ndarray, float]:
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    n = distance.shape[0]
    if n < 3:
        return np.zeros(n, dtype=int), float("nan")
    best = (np.zeros(n, dtype=int), -1.0)
    for k in range(2, min(int(max_clusters), n - 1) + 1):
        labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(distance)
        score = float(silhouette_score(distance, labels, metric="precomputed"))
        if score > best[1] + 1e-9:
            best = (labels, score)
    if best[1] < min_silhouette:  # no structure worth a split: one cluster
        return np.zeros(n, dtype=int), best[1]
    return best


def cluster_perturbations(
    profiles: Mapping[str, pd.DataFrame],
    n_cells: pd.Series,
    effect_tests: pd.DataFrame | None = None,
    programs: pd.Series | None = None,
    max_clusters: int = 20,
    min_silhouette: float = 0.1,
    n_nearest: int = 3,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Clusters of perturbations per profile kind, and a summary per kind.

    Perturbations without a significant effect (``effect_tests``) form the cluster ``no effect``; the others
    are clustered by average linkage on ``1 - correlation``, the number of clusters (2 to ``max_clusters``)
    chosen by the silhouette, one cluster when no split reaches ``min_silhouette``. Returns the clusters
    (``profile, perturbation, cluster, n_cells, nearest_<i>, similarity_<i>``, and ``program`` with an
    annotation) and per kind ``n_clusters``, ``silhouette`` and the ``ari`` of the clusters against
    ``programs`` (perturbation -> program; the perturbations with an effect and an annotation).
    """
    from sklearn.metrics import adjusted_rand_score

    null = set()
    if effect_tests is not None and len(effect_tests):
        significant = effect_tests["significant"].astype(str).str.lower().isin(["true", "1"])
        null = set(effect_tests.loc[~significant, PERTURBATION].astype(str))
    rows, summary = [], []
    for kind, profile in profiles.items():
        corr = _correlation(profile)
        names = list(profile.index)
        active = [n for n in names if n not in null]
        labels = pd.Series(NO_EFFECT, index=names, dtype=object)
        silhouette = float("nan")
        if active:
            distance = 1.0 - corr.loc[active, active].to_numpy()
            np.fill_diagonal(distance, 0.0)
            codes, silhouette = _choose_clusters(np.clip(distance, 0.0, 2.0), max_clusters, min_silhouette)
            labels[active] = [f"cluster_{c + 1}" for c in codes]
        for name in names:
            others = corr.loc[name].drop(name).sort_values(ascending=False).head(int(n_nearest))
            row = {"profile": kind, "perturbation": name, "cluster": labels[name], "n_cells": int(n_cells.get(name, 0))}
            for i, (other, value) in enumerate(others.items(), start=1):
                row[f"nearest_{i}"], row[f"similarity_{i}"] = other, round(float(value), 4)
            if programs is not None:
                row["program"] = programs.get(name, "")
            rows.append(row)
        ari = float("nan")
        if programs is not None and active:
            known = [n for n in active if str(programs.get(n, "")).lower() not in ("", "nan", "none", "unassigned")]
            if len(known) >= 2 and len({programs[n] for n in known}) >= 2:
                ari = float(adjusted_rand_score([programs[n] for n in known], [labels[n] for n in known]))
        summary.append(
            {
                "profile": kind,
                "n_perturbations": len(names),
                "n_no_effect": len(names) - len(active),
                "n_clusters": len({labels[n] for n in active}),
                "silhouette": silhouette,
                "ari_vs_program": ari,
            }
        )
    return pd.DataFrame(rows), pd.DataFrame(summary)


def cluster_programs(
    clusters: pd.DataFrame,
    profiles: Mapping[str, pd.DataFrame],
    profile: str = "pseudobulk",
    n_top_genes: int = 20,
    n_top_factors: int = 3,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What each cluster (of the ``profile`` kind) does: its members' mean pseudobulk shift, in units of the
    controls' standard deviation of each gene, ranks its shared up and down genes (``n_top_genes`` each), their
    mean factor shift its LDVAE factors (``n_top_factors`` by absolute shift). Returns ``(genes, factors)``:
    ``cluster, direction, rank, gene, mean_shift`` (standardised) and ``cluster, rank, factor, mean_shift``."""
    members = clusters[(clusters["profile"] == profile) & (clusters["cluster"] != NO_EFFECT)]
    gene_rows, factor_rows = [], []
    for cluster, group in members.groupby("cluster", sort=True):
        names = group["perturbation"].tolist()
        pseudobulk = profiles["pseudobulk"]
        spread = np.asarray(pseudobulk.attrs.get("control_sd", np.ones(pseudobulk.shape[1])), dtype=float)
        # in units of the controls' spread: a small shift of a quiet gene outranks the noise of a loud one
        shift = (pseudobulk.loc[names] / np.maximum(spread, 0.05)).mean(axis=0)
        for direction, ordered in (("up", shift.sort_values(ascending=False)), ("down", shift.sort_values())):
            chosen = ordered[ordered > 0] if direction == "up" else ordered[ordered < 0]
            for rank, (gene, value) in enumerate(chosen.head(int(n_top_genes)).items(), start=1):
                gene_rows.append(
                    {"cluster": cluster, "direction": direction, "rank": rank, "gene": gene, "mean_shift": value}
                )
        if "factors" in profiles:
            moved = profiles["factors"].loc[names].mean(axis=0)
            for rank, factor in enumerate(moved.abs().sort_values(ascending=False).head(int(n_top_factors)).index, 1):
                factor_rows.append({"cluster": cluster, "rank": rank, "factor": factor, "mean_shift": moved[factor]})
    return (
        pd.DataFrame(gene_rows, columns=["cluster", "direction", "rank", "gene", "mean_shift"]),
        pd.DataFrame(factor_rows, columns=["cluster", "rank", "factor", "mean_shift"]),
    )


def enrichment(genes: pd.DataFrame, universe: list[str], gene_sets_path: str | None, min_size: int = 5) -> pd.DataFrame:
    """Over-representation of each cluster's up and down genes in the gene sets of a GMT file (read by decoupler):
    a one-sided Fisher's exact test against the modelled genes as background, BH over all tests; empty without
    a file. Written on scipy rather than decoupler's `mt.ora`, which scores a ranked matrix against a fixed
    background of 20,000 genes by default, not a gene list against the genes a screen measured."""
    columns = ["cluster", "direction", "gene_set", "odds_ratio", "p_value", "q_value", "overlap"]
    if not gene_sets_path or genes.empty:
        return pd.DataFrame(columns=columns)
    import decoupler as dc
    from scipy.stats import fisher_exact

    universe_set = set(universe)
    net = dc.pp.read_gmt(str(gene_sets_path))
    sets = net[net["target"].isin(universe_set)].groupby("source")["target"].apply(set)
    sets = sets[sets.map(len) >= int(min_size)]
    n_universe = len(universe_set)
    rows = []
    for (cluster, direction), group in genes.groupby(["cluster", "direction"], sort=True):
        chosen = set(group["gene"]) & universe_set
        for gene_set, members in sets.items():
            overlap = chosen & members
            a = len(overlap)
            b = len(chosen) - a
            c = len(members) - a
            d = n_universe - a - b - c
            odds, p_value = fisher_exact([[a, b], [c, d]], alternative="greater")
            rows.append(
                {
                    "cluster": cluster,
                    "direction": direction,
                    "gene_set": gene_set,
                    "odds_ratio": float(odds),
                    "p_value": float(p_value),
                    "overlap": ", ".join(sorted(overlap)),
                }
            )
    table = pd.DataFrame(rows, columns=[c for c in columns if c != "q_value"])
    if table.empty:
        return pd.DataFrame(columns=columns)
    from statsmodels.stats.multitest import multipletests

    table["q_value"] = multipletests(table["p_value"].fillna(1.0), method="fdr_bh")[1]
    return table.sort_values(["cluster", "direction", "p_value"]).reset_index(drop=True)[columns]
