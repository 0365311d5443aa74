"""Did each perturbation do anything? The energy-distance permutation test against the controls, per
perturbation, in one shared PCA (:mod:`.energy` states the statistic), with BH q-values."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from statsmodels.stats.multitest import multipletests

from perturbscope.models._checks import check_choice, check_float, check_int
from perturbscope.schema import PERTURBATION, UNPERTURBED

from . import de
from .energy import DISTANCES, energy_test

logger = logging.getLogger(__name__)

__all__ = ["EFFECT_TEST_COLUMNS", "effect_tests"]

EFFECT_TEST_COLUMNS = [
    PERTURBATION,
    "n_cells",
    "n_cells_tested",
    "n_control_tested",
    "energy_distance",
    "p_value",
    "q_value",
    "significant",
    "distance",
    "n_pcs",
    "n_permutations",
]


def effect_tests(
    screen: ad.AnnData,
    seed: int = 0,
    *,
    n_pcs: int = 100,
    distance: str = "euclidean",
    n_permutations: int = 999,
    max_cells: int = 500,
    max_control_cells: int = 1000,
    min_cells: int = 10,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Energy-distance permutation test of every perturbation against the controls.

    One PCA (``n_pcs`` components of the log-normalised ``X``) is fitted on the tested cells together:
    up to ``max_control_cells`` controls and up to ``max_cells`` cells of each perturbation with at least
    ``min_cells`` cells (random subsets drawn with ``seed``). Every perturbation is compared with the same
    control cells. ``distance``: ``euclidean`` (Székely-Rizzo energy distance: any change of distribution)
    or ``sqeuclidean`` (scPerturb's E-distance: a change of the mean only). ``p_value``: permutation
    test (the smallest possible p is ``1 / (1 + n_permutations)``); ``q_value``: BH over the tested
    perturbations; ``significant``: ``q_value < alpha``.
    """
    check_choice("distance", distance, DISTANCES)
    n_pcs = check_int("n_pcs", n_pcs, 1, "principal components of the shared PCA")
    n_permutations = check_int("n_permutations", n_permutations, 1, "e.g. 999")
    max_cells = check_int("max_cells", max_cells, 2, "cells per perturbation")
    max_control_cells = check_int("max_control_cells", max_control_cells, 2, "control cells")
    min_cells = check_int("min_cells", min_cells, 2, "perturbations with fewer cells are not tested")
    alpha = check_float("alpha", alpha, 0.0, 1.0, "e.g. 0.05")
    labels, is_control = de.checked_groups(screen)
    rng = np.random.default_rng(seed)
    controls = de.subsample(np.flatnonzero(is_control), max_control_cells, rng)
    sizes = pd.Series(labels[~is_control & (labels != UNPERTURBED)]).value_counts()
    tested = sorted(sizes.index[sizes >= min_cells].astype(str))
    if len(sizes) > len(tested):
        logger.info(
            "Effect test: %d perturbations with fewer than %d cells are not tested.",
            len(sizes) - len(tested),
            min_cells,
        )
    if not tested or controls.size < 2:
        return pd.DataFrame(columns=EFFECT_TEST_COLUMNS)
    members = {label: de.subsample(np.flatnonzero(labels == label), max_cells, rng) for label in tested}
    cells = np.concatenate([controls, *members.values()])
    n_comps = int(min(n_pcs, cells.size - 1, screen.n_vars - 1))
    pcs = sc.pp.pca(screen.X[cells].astype(np.float32), n_comps=n_comps, random_state=seed)
    position = {cell: i for i, cell in enumerate(cells)}
    control_pcs = pcs[: controls.size]
    rows = []
    for i, label in enumerate(tested):
        mine = pcs[[position[c] for c in members[label]]]
        e, p = energy_test(mine, control_pcs, n_permutations=n_permutations, distance=distance, seed=seed + i)
        rows.append(
            {
                PERTURBATION: label,
                "n_cells": int(sizes[label]),
                "n_cells_tested": len(mine),
                "n_control_tested": controls.size,
                "energy_distance": e,
                "p_value": p,
            }
        )
    table = pd.DataFrame(rows)
    table["q_value"] = multipletests(table["p_value"].to_numpy(), method="fdr_bh")[1]
    table["significant"] = table["q_value"] < alpha
    table["distance"], table["n_pcs"], table["n_permutations"] = distance, n_comps, n_permutations
    table = table.sort_values(["q_value", "energy_distance"], ascending=[True, False], kind="stable")
    logger.info(
        "Effect test: %d of %d perturbations differ from the controls (q < %g).",
        int(table["significant"].sum()),
        len(table),
        alpha,
    )
    return table[EFFECT_TEST_COLUMNS].reset_index(drop=True)
