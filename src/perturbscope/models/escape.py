"""Escapers: which guide-carrying cells a perturbation reached, read off the salient code.

In a CRISPR screen a share of the cells that carry a guide show no effect (20-50 % in
published knockout screens; Papalexi et al. 2021, Mixscape). contrastiveVI's salient code
holds what a perturbation did and is ~0 for controls, so an escaper's code looks like a
control's. Per perturbation ``p`` (Mixscape's model, in the salient space instead of
gene space):

1. ``u_p``: the unit direction from the controls' mean code ``c`` to the mean code of
   the cells of ``p``. It is **cross-fitted**: each cell is projected on a direction
   estimated from the other folds of ``p``'s cells, so that an escaper's projection is not
   pulled towards ``p`` by its own noise (with ~100 cells in 10 dimensions that bias alone
   looks like an effect).
2. ``t = (s - c) · u_p``: one number per cell.
3. The null component ``N(m0, sd0)`` is the projection of **held-out** control cells
   (the validation controls: the training controls are pulled to 0 by the Wasserstein
   penalty and memorised, so they are tighter than any unseen cell). Its mean is fixed.
4. The cells of ``p`` are a two-component mixture ``(1 - pi) N(m0, sd0) + pi N(m1, sd1)``;
   EM fits ``pi, m1, sd1`` (``m1 >= m0``) and the null's width (at least the held-out
   controls'; escapers the model trained on spread a little wider). The mixture competes by
   BIC with "every cell escaped" and "every cell alike" (one Gaussian): a perturbation has an
   effect if the mixture wins with components at least ``min_separation`` null sds apart, or
   "alike" wins at least that far above ``m0``. Without an effect ``pi = 0``: a null
   perturbation, or one that shifts all its cells a little, calls no cell perturbed.
5. ``P(perturbed | t)`` is the posterior of the second component.

Plain numpy and scipy, no Kedro; :class:`EscapeMixture` is JSON-serialisable (it is
stored in the model's ``metadata``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import expit, logsumexp
from scipy.stats import norm

__all__ = ["EscapeMixture", "fit_escape_mixture"]

_FLOOR = 1e-3  # smallest sd, relative to the null's


@dataclasses.dataclass(frozen=True)
class EscapeMixture:
    """Per-perturbation two-component mixtures on the salient code (see the module docstring).

    Arrays have one row per entry of ``perturbations``; ``directions`` is the direction
    fitted on all of a perturbation's cells (used for cells not seen when fitting).
    """

    perturbations: list[str]
    center: np.ndarray  # (n_salient,)
    directions: np.ndarray  # (n_perturbations, n_salient)
    null_mean: np.ndarray
    null_sd: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    weight: np.ndarray  # pi: the share of the perturbation's cells that were perturbed
    n_cells: np.ndarray
    control_false_calls: np.ndarray  # share of the held-out controls the mixture calls perturbed

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: np.asarray(getattr(self, f.name)).tolist()
            if f.name != "perturbations"
            else list(self.perturbations)
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EscapeMixture:
        return cls(
            **{
                f.name: list(values[f.name]) if f.name == "perturbations" else np.asarray(values[f.name])
                for f in dataclasses.fields(cls)
            }
        )

    def table(self) -> list[dict[str, Any]]:
        """One dict per perturbation: cells fitted, estimated perturbed share, separation of the two
        components in null sds, and the share of held-out controls it would call perturbed."""
        return [
            {
                "perturbation": p,
                "n_cells_fitted": int(self.n_cells[i]),
                "estimated_perturbed_share": float(self.weight[i]),
                "separation": float((self.mean[i] - self.null_mean[i]) / self.null_sd[i])
                if self.weight[i] > 0
                else 0.0,
                "control_false_call_rate": float(self.control_false_calls[i]),
            }
            for i, p in enumerate(self.perturbations)
        ]

    def posterior(self, t: np.ndarray, row: int) -> np.ndarray:
        """``P(perturbed | t)`` of projections ``t`` under perturbation ``row``'s mixture."""
        return _posterior(
            t, float(self.weight[row]), self.mean[row], self.sd[row], self.null_mean[row], self.null_sd[row]
        )

    def probability(self, salient: np.ndarray, labels: Sequence[str]) -> np.ndarray:
        """Each cell's probability of having been perturbed by its label's perturbation.

        NaN for labels without a fitted mixture (controls, unknown or too-rare perturbations).
        Uses each perturbation's full-data direction (for new cells; :func:`fit_escape_mixture`
        returns the cross-fitted probabilities of the cells it was fitted on).
        """
        salient = np.asarray(salient, dtype=np.float64)
        out = np.full(salient.shape[0], np.nan)
        rows = {p: row for row, p in enumerate(self.perturbations)}
        for label, members in _groups(labels).items():
            row = rows.get(label)
            if row is not None:
                out[members] = self.posterior((salient[members] - self.center) @ self.directions[row], row)
        return out


def _groups(labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Cell positions of each label, in one pass over the labels (sorted by label)."""
    names, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(names.size + 1))
    return {str(name): order[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}


def _posterior(t: np.ndarray, pi: float, m1: float, s1: float, m0: float, s0: float) -> np.ndarray:
    """Posterior of the perturbed component ``N(m1, s1)`` against escapers ``N(m0, s0)`` with weight ``pi``."""
    if pi <= 0.0:
        return np.zeros(t.shape)
    if pi >= 1.0:
        return np.ones(t.shape)
    log_odds = np.log(pi) + norm.logpdf(t, m1, s1) - np.log1p(-pi) - norm.logpdf(t, m0, s0)
    return expit(log_odds)


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def _fit_one(
    t: np.ndarray, m0: float, s0_min: float, min_separation: float, max_iter: int, tol: float
) -> tuple[float, float, float, float]:
    """Fit one perturbation's projections ``t``; returns ``(pi, m1, sd1, sd0)``.

    Three models compete by BIC: every cell an escaper (``N(m0, sd0)``), every cell alike
    (one free Gaussian), and the mixture (EM for ``pi, m1, sd1, sd0``; ``m1 >= m0``). The
    perturbation has an effect if the mixture wins with components ``min_separation`` null sds
    apart, or "alike" wins ``min_separation`` null sds above ``m0``; then the mixture's posterior
    calls its cells (or every cell, if the components overlap). ``sd0`` is at least the held-out
    controls' ``s0_min``: escapers the model trained on spread a little wider.
    """
    n = t.size
    log_n = np.log(n)
    sd_all = max(float(np.sqrt(((t - m0) ** 2).mean())), s0_min)
    bic_escaped = -2.0 * float(norm.logpdf(t, m0, sd_all).sum()) + log_n
    mean_one, sd_one = float(t.mean()), max(float(t.std()), s0_min * _FLOOR)
    bic_alike = -2.0 * float(norm.logpdf(t, mean_one, sd_one).sum()) + 2 * log_n

    upper = t[t > np.median(t)]
    pi, m1, s1, s0 = 0.5, float(upper.mean()), max(float(upper.std()), s0_min * 0.5), s0_min
    previous = -np.inf
    for _ in range(max_iter):
        joint = np.stack([np.log1p(-pi) + norm.logpdf(t, m0, s0), np.log(pi) + norm.logpdf(t, m1, s1)])
        total = logsumexp(joint, axis=0)
        ll = float(total.sum())
        r = np.exp(joint[1] - total)
        pi = float(np.clip(r.mean(), 1e-6, 1 - 1e-6))
        m1 = max(float((r * t).sum() / r.sum()), m0)
        s1 = max(float(np.sqrt((r * (t - m1) ** 2).sum() / r.sum())), s0_min * _FLOOR)
        q = 1.0 - r
        s0 = max(float(np.sqrt((q * (t - m0) ** 2).sum() / max(q.sum(), 1e-12))), s0_min)
        if ll - previous < tol * n:
            break
        previous = ll
    bic_mixture = -2.0 * ll + 4 * log_n

    best = min(bic_escaped, bic_alike, bic_mixture)
    separated = m1 - m0 >= min_separation * s0
    effect = (best == bic_mixture and separated) or (best == bic_alike and mean_one - m0 >= min_separation * s0_min)
    if not effect:
        return 0.0, m1, s1, sd_all
    # an effect: the mixture tells its cells apart where its components do not overlap
    return (pi, m1, s1, s0) if separated else (1.0, mean_one, sd_one, s0_min)


def fit_escape_mixture(
    salient: np.ndarray,
    labels: Sequence[str],
    null_salient: np.ndarray,
    *,
    min_cells: int = 20,
    min_separation: float = 1.0,
    folds: int = 5,
    max_iter: int = 500,
    tol: float = 1e-8,
    seed: int = 0,
) -> tuple[EscapeMixture, np.ndarray]:
    """Fit one mixture per perturbation; return it and the fitted cells' cross-fitted probabilities.

    Parameters
    ----------
    salient
        ``(n, n_salient)`` salient means of the target cells.
    labels
        Each target cell's perturbation.
    null_salient
        Salient means of control cells the model did not train on (the null component).
    min_cells
        Perturbations with fewer cells get no mixture (probability NaN).
    min_separation
        The perturbed component's mean must lie at least this many null sds above the
        null's, else nobody is called (two overlapping components tell no cell apart).
    folds
        Folds of the cross-fitted directions (at least 2).
    seed
        Seed of the fold assignment.
    """
    salient = np.asarray(salient, dtype=np.float64)
    null_salient = np.asarray(null_salient, dtype=np.float64)
    labels = np.asarray(labels, dtype=str)
    if salient.ndim != 2 or salient.shape[0] != labels.size:
        raise ValueError(
            f"salient must be (n_cells, n_salient) with one label per cell; got {salient.shape} "
            f"and {labels.size} labels"
        )
    if null_salient.ndim != 2 or null_salient.shape[0] < 2 or null_salient.shape[1] != salient.shape[1]:
        raise ValueError(
            "null_salient must hold the salient means of at least 2 control cells "
            f"({salient.shape[1]} columns); got shape {null_salient.shape}"
        )
    folds = max(2, int(folds))
    rng = np.random.default_rng(seed)
    center = null_salient.mean(0)
    probability = np.full(labels.size, np.nan)
    rows: dict[str, list[Any]] = {k: [] for k in ("p", "u", "m0", "s0", "m1", "s1", "pi", "n", "fc")}
    for p, members in _groups(labels).items():
        if members.size < max(int(min_cells), 2 * folds):
            continue
        codes = salient[members] - center
        fold = rng.permutation(np.arange(members.size) % folds)
        t = np.empty(members.size)
        null_t = []
        for k in range(folds):
            u = _unit(codes[fold != k].mean(0))
            t[fold == k] = codes[fold == k] @ u
            null_t.append((null_salient - center) @ u)
        # the null of the cross-fitted projections: held-out controls on every fold's direction
        null_t = np.concatenate(null_t)
        m0, s0 = float(null_t.mean()), max(float(null_t.std()), 1e-8)
        pi, m1, s1, s0 = _fit_one(t, m0, s0, min_separation, max_iter, tol)
        probability[members] = _posterior(t, pi, m1, s1, m0, s0)
        false_calls = float((_posterior(null_t, pi, m1, s1, m0, s0) > 0.5).mean())
        for key, value in (
            ("p", p),
            ("u", _unit(codes.mean(0))),
            ("m0", m0),
            ("s0", s0),
            ("m1", m1),
            ("s1", s1),
            ("pi", pi),
            ("n", members.size),
            ("fc", false_calls),
        ):
            rows[key].append(value)
    n_salient = salient.shape[1]
    mixture = EscapeMixture(
        rows["p"],
        center,
        np.array(rows["u"]).reshape(-1, n_salient),
        *(np.array(rows[k], dtype=np.float64) for k in ("m0", "s0", "m1", "s1", "pi")),
        np.array(rows["n"], dtype=int),
        np.array(rows["fc"], dtype=np.float64),
    )
    return mixture, probability
