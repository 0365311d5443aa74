"""Train / validation / test splits for perturbation prediction, with a leakage guard.

Two kinds of split (``kind`` in the split parameters):

``held_out_cells``
    A stratified share (``test_fraction``) of every perturbation's cells is
    held out as test cells (drawn from the cells the processed screen put in
    its ``train`` split); the rest of the perturbation trains. Controls are
    never test cells: they are the reference and the input of Mode B.
``held_out_perturbations``
    Every cell of the held-out perturbations is a test cell; nothing of them
    trains. ``perturbations: auto`` holds out the double perturbations whose
    single genes both have a single perturbation in the screen (as in the
    Norman 2019 benchmarks); or give a list of labels.

In both kinds a share (``reference_control_fraction``) of the control cells
becomes ``reference`` controls: no method sees them (not the model, not the
baselines, not Mode B); the scores measure deltas against their mean. This
keeps the evaluation unbiased: if the reference were the same controls the
methods use, its sampling noise would appear in the true delta *and* in every
predicted delta (twice in the additive baseline ``μA + μB - c``, whose delta is
``μA + μB - 2c``), inflating the correlations of the methods that reuse it
most. With 0 the reference is the training controls (the common, biased
practice).

Cells that are neither test nor reference keep the ``train`` /
``validation`` role of the processed screen's ``split`` column (validation
cells only drive early stopping). :func:`assert_no_leakage` checks, in code,
that nothing of a test perturbation's test cells (nor a reference control)
can reach training.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from perturbscope.schema import IS_CONTROL, PERTURBATION, PERTURBED_GENES, SPLIT

__all__ = [
    "SplitError",
    "LeakageError",
    "SPLIT_KINDS",
    "ROLES",
    "canonical",
    "auto_held_out_perturbations",
    "make_split",
    "not_applicable_reason",
    "assert_no_leakage",
    "training_mask",
    "reference_mask",
    "perturbations_with_test_cells",
]

SPLIT_KINDS = ("held_out_cells", "held_out_perturbations")
ROLES = ("train", "validation", "test", "reference")
_REQUIRED = (PERTURBATION, PERTURBED_GENES, IS_CONTROL, SPLIT)


NOT_APPLICABLE = {
    "held_out_perturbations": (
        "the screen has no double perturbation whose genes were each also perturbed on their own "
        "(e.g. a singles-only screen), so no combination can be held out and predicted"
    ),
    "held_out_cells": "no perturbation has enough cells to hold some out for testing",
}
"""Why a split kind that found no test cells is not applicable, for the summary and the report."""


def is_applicable(split: pd.DataFrame) -> bool:
    """Whether a split has test cells to score (a singles-only screen has none to hold out)."""
    return bool((split["role"].astype(str) == "test").any())


def not_applicable_reason(split: pd.DataFrame) -> str | None:
    """Why a split has no test cells (from its ``kind``, see ``NOT_APPLICABLE``); None if it has some."""
    if is_applicable(split):
        return None
    kind = str(split["kind"].iloc[0]) if "kind" in split and len(split) else ""
    return NOT_APPLICABLE.get(kind, "no test cells")


class SplitError(ValueError):
    """The split parameters do not fit the screen; the message says how to fix them."""


class LeakageError(ValueError):
    """Cells of a test perturbation would reach training."""


def canonical(label: str, separator: str = "+") -> str:
    """Canonical form of a label: its genes sorted and joined (``"SET+KLF1"`` → ``"KLF1+SET"``)."""
    parts = sorted({p.strip() for p in str(label).split(separator) if p.strip()})
    return separator.join(parts)


def _check_obs(obs: pd.DataFrame) -> None:
    missing = [c for c in _REQUIRED if c not in obs.columns]
    if missing:
        raise SplitError(
            f"the processed screen lacks obs column(s) {missing}; perturbation_prediction reads the "
            "output of the data_processing pipeline (run `kedro run --pipelines data_processing` first)"
        )
    if not obs[IS_CONTROL].astype(bool).any():
        raise SplitError(
            "the screen has no control cells; perturbation prediction needs controls (set "
            "schema.control_labels; a plain count matrix with perturbation_key: null cannot be used)"
        )
    if obs[IS_CONTROL].astype(bool).all():
        raise SplitError("the screen has only control cells: nothing to predict")


def _genes(label: str, separator: str) -> tuple[str, ...]:
    return tuple(p for p in str(label).split(separator) if p)


def auto_held_out_perturbations(obs: pd.DataFrame, separator: str = "+") -> list[str]:
    """Double (or higher) perturbations whose every gene has a single perturbation in the screen.

    Returns the perturbation labels (as in ``obs["perturbation"]``), sorted.
    """
    targets = obs.loc[~obs[IS_CONTROL].astype(bool)]
    per_label = targets.groupby(PERTURBATION, observed=True)[PERTURBED_GENES].first().astype(str)
    singles = {g for g in per_label if len(_genes(g, separator)) == 1}
    out = [
        str(label)
        for label, genes in per_label.items()
        if len(_genes(genes, separator)) >= 2 and all(g in singles for g in _genes(genes, separator))
    ]
    return sorted(out)


def _resolve_held_out(obs: pd.DataFrame, requested: Any, separator: str) -> list[str]:
    if requested is None or (isinstance(requested, str) and requested.lower() == "auto"):
        # may be empty (a singles-only screen): the split then has no test cells and is
        # reported as not applicable (see ``NOT_APPLICABLE``)
        return auto_held_out_perturbations(obs, separator)
    if isinstance(requested, str):
        requested = [requested]
    targets = obs.loc[~obs[IS_CONTROL].astype(bool)]
    by_canonical = (
        targets.groupby(PERTURBATION, observed=True)[PERTURBED_GENES]
        .first()
        .astype(str)
        .map(lambda g: canonical(g, separator))
    )
    lookup = {canon: str(label) for label, canon in by_canonical.items()}
    lookup.update({str(label): str(label) for label in by_canonical.index})
    held, unknown = [], []
    for label in requested:
        key = str(label)
        match = lookup.get(key) or lookup.get(canonical(key, separator))
        (held if match else unknown).append(match or key)
    if unknown:
        raise SplitError(
            f"held-out perturbation(s) {unknown} are not in the screen; pick from "
            f"{sorted(lookup)[:20]}{' ...' if len(lookup) > 20 else ''}"
        )
    return sorted(set(held))


def make_split(
    obs: pd.DataFrame,
    separator: str = "+",
    seed: int = 0,
    *,
    kind: str,
    test_fraction: float = 0.2,
    reference_control_fraction: float = 0.5,
    perturbations: str | list[str] = "auto",
) -> pd.DataFrame:
    """Assign every cell a role (``train``/``validation``/``test``) for one split.

    Parameters
    ----------
    obs
        The processed screen's ``obs`` (``perturbation``, ``perturbed_genes``,
        ``is_control``, ``split``).
    separator
        Separator of combinatorial labels.
    seed
        Seed of every draw.
    kind
        ``held_out_cells`` or ``held_out_perturbations``.
    test_fraction
        Held-out cells: the share of every perturbation's cells held out as test cells (drawn from its
        training cells).
    reference_control_fraction
        The share of the controls no method sees: the scores measure deltas against their mean.
    perturbations
        Held-out perturbations: ``auto`` (every double whose single genes were each perturbed on their
        own) or a list of labels.

    Returns
    -------
    pandas.DataFrame
        Indexed by cell name: ``perturbation``, ``perturbed_genes``,
        ``is_control``, ``role`` (``train``, ``validation``, ``test`` or
        ``reference``), ``evaluation`` (the split kind for test cells, ``""``
        otherwise), ``kind`` (the split kind, on every row: a split without test
        cells still says what it is).

    Raises
    ------
    SplitError
        Unknown kind, bad fraction, unknown or unpredictable held-out
        perturbations, a screen without controls.
    LeakageError
        If the resulting split would leak (never for a correct split).
    """
    _check_obs(obs)
    if kind not in SPLIT_KINDS:
        raise SplitError(f"split kind {kind!r} is not known; use one of {list(SPLIT_KINDS)}")
    labels = obs[PERTURBATION].astype(str).to_numpy()
    is_control = obs[IS_CONTROL].astype(bool).to_numpy()
    role = np.where(obs[SPLIT].astype(str).to_numpy() == "validation", "validation", "train").astype(object)
    rng = np.random.default_rng(int(seed))
    ref_fraction = float(reference_control_fraction)
    if not 0.0 <= ref_fraction < 1.0:
        raise SplitError(f"reference_control_fraction must be in [0, 1), got {ref_fraction}")
    controls = np.flatnonzero(is_control)
    n_ref = min(int(round(ref_fraction * controls.size)), controls.size - 1)
    if n_ref > 0:
        role[rng.choice(controls, size=n_ref, replace=False)] = "reference"

    if kind == "held_out_cells":
        fraction = float(test_fraction)
        if not 0.0 < fraction < 1.0:
            raise SplitError(f"test_fraction must be in (0, 1), got {fraction}")
        for label in sorted(set(labels[~is_control])):
            members = np.flatnonzero(labels == label)
            pool = members[role[members] == "train"]
            n_test = min(max(1, int(round(fraction * members.size))), pool.size - 1)
            if n_test >= 1:
                role[rng.choice(pool, size=n_test, replace=False)] = "test"
    else:
        held = _resolve_held_out(obs, perturbations, separator)
        held_mask = np.isin(labels, held) & ~is_control
        role[held_mask] = "test"
        trained = obs[PERTURBED_GENES].astype(str)[~held_mask & ~is_control]
        seen = {g for genes in trained for g in _genes(genes, separator)}
        for label in held:
            genes = obs.loc[labels == label, PERTURBED_GENES].astype(str).iloc[0]
            missing = [g for g in _genes(genes, separator) if g not in seen]
            if missing:
                raise SplitError(
                    f"held-out perturbation {label!r} perturbs {missing}, which no training cell perturbs; "
                    "the conditional VAE cannot predict a gene it never saw. Remove it from "
                    "held_out_perturbations (or use 'auto')"
                )

    out = pd.DataFrame(
        {
            PERTURBATION: labels,
            PERTURBED_GENES: obs[PERTURBED_GENES].astype(str).to_numpy(),
            IS_CONTROL: is_control,
            "role": pd.Categorical(role, categories=list(ROLES)),
            "evaluation": np.where(role == "test", kind, ""),
            "kind": kind,
        },
        index=pd.Index(obs.index.astype(str), name="cell"),
    )
    assert_no_leakage(out)
    return out


def training_mask(split: pd.DataFrame) -> np.ndarray:
    """Cells a method may learn from (role ``train`` or ``validation``; never test or reference cells)."""
    return split["role"].astype(str).isin(["train", "validation"]).to_numpy()


def reference_mask(split: pd.DataFrame) -> np.ndarray:
    """The controls that define the evaluation's reference mean.

    The ``reference`` controls, or the training controls when the split has none.
    """
    is_control = split[IS_CONTROL].astype(bool).to_numpy()
    ref = split["role"].astype(str).to_numpy() == "reference"
    return ref if ref.any() else is_control & training_mask(split)


def perturbations_with_test_cells(split: pd.DataFrame) -> list[str]:
    """Perturbations with test cells, sorted by label."""
    test = split["role"].astype(str) == "test"
    return sorted(set(split.loc[test, PERTURBATION].astype(str)))


def assert_no_leakage(split: pd.DataFrame, training_cells: Iterable[str] | None = None) -> None:
    """Raise :class:`LeakageError` if anything of a test cell could reach training.

    Checks that roles are valid, that no control cell is a test cell (and
    only controls are reference cells), that every cell of a
    ``held_out_perturbations`` test perturbation is a test cell, and, if
    ``training_cells`` (the names of the cells handed to a model) is given,
    that none of them is a test or reference cell or belongs to a held-out
    perturbation.
    """
    roles = split["role"].astype(str)
    bad_roles = sorted(set(roles) - set(ROLES))
    if bad_roles:
        raise LeakageError(f"unknown role(s) {bad_roles} in the split")
    test = roles == "test"
    if (test & split[IS_CONTROL].astype(bool)).any():
        raise LeakageError("control cells are marked as test cells")
    if ((roles == "reference") & ~split[IS_CONTROL].astype(bool)).any():
        raise LeakageError("perturbed cells are marked as reference controls")
    held = set(split.loc[split["evaluation"] == "held_out_perturbations", PERTURBATION].astype(str))
    if held:
        of_held = split[PERTURBATION].astype(str).isin(held)
        leaked = split.index[of_held & ~test]
        if len(leaked):
            raise LeakageError(
                f"{len(leaked)} cell(s) of held-out perturbations are not test cells "
                f"(e.g. {list(leaked[:3])}): they would reach training"
            )
    if training_cells is not None:
        names = pd.Index(pd.Index(list(training_cells)).astype(str))
        unknown = names.difference(split.index)
        if len(unknown):
            raise LeakageError(f"{len(unknown)} training cell(s) are not in the split, e.g. {list(unknown[:3])}")
        rows = split.loc[names]
        bad = rows.index[rows["role"].astype(str) == "test"]
        if len(bad):
            raise LeakageError(f"{len(bad)} test cell(s) reached training, e.g. {list(bad[:3])}")
        bad = rows.index[rows["role"].astype(str) == "reference"]
        if len(bad):
            raise LeakageError(f"{len(bad)} reference control(s) reached training, e.g. {list(bad[:3])}")
        bad_labels = sorted(set(rows[PERTURBATION].astype(str)) & held)
        if bad_labels:
            raise LeakageError(f"held-out perturbation(s) {bad_labels} reached training")


def as_split(split: pd.DataFrame, adata: ad.AnnData | None = None) -> pd.DataFrame:
    """Normalise a split table (also after a CSV round trip) and align it to ``adata``'s cells."""
    out = split.copy()
    if "cell" in out.columns:
        out = out.set_index("cell")
    out.index = pd.Index(out.index.astype(str), name="cell")
    out[PERTURBATION] = out[PERTURBATION].astype(str)
    out[PERTURBED_GENES] = out[PERTURBED_GENES].fillna("").astype(str)
    out[IS_CONTROL] = out[IS_CONTROL].astype(str).str.lower().isin(["true", "1"])
    out["evaluation"] = out["evaluation"].fillna("").astype(str)
    out["role"] = out["role"].astype(str)
    if adata is not None:
        names = adata.obs_names.astype(str)
        missing = names.difference(out.index)
        if len(missing):
            raise SplitError(
                f"{len(missing)} cell(s) of the screen are not in the split (e.g. {list(missing[:3])}); "
                "the split was made for another version of the processed screen: rerun the pipeline"
            )
        out = out.loc[names]
        out.index.name = "cell"
    return out
