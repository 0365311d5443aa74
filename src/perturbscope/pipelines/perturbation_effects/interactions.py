"""Genetic interactions of double perturbations: Norman et al. (2019)'s model on the pseudobulk shifts.

For a double ``A+B`` whose singles were measured, with ``Δ`` the shift of a perturbation's mean log-normalised
expression from the controls' (the same ``Δ`` the ``additive`` baseline of perturbation_prediction adds up,
``c + ΔA + ΔB``), a robust linear fit over the genes (scikit-learn's Huber regression, no intercept)

    Δ_AB ≈ c_A Δ_A + c_B Δ_B

gives the double's interaction:

``magnitude``
    ``sqrt(c_A² + c_B²) / sqrt(2)``: 1 for an additive double (``c_A = c_B = 1``, the prediction's additive
    baseline), above for synergy, below for buffering;
``fit``
    the correlation of the fitted ``c_A Δ_A + c_B Δ_B`` with ``Δ_AB`` over the genes the three clearly move:
    low when the double does something neither single does (neomorphic);
``dominance``
    ``|log10(|c_A| / |c_B|)|``: one single dominates (epistasis);
``equality``
    ``min(|c_A|, |c_B|) / max(|c_A|, |c_B|)``: equal contributions.

Confidence intervals come from refitting on bootstrap resamples of the cells of the controls, A, B and A+B.
The class follows thresholds from conf: neomorphic (fit below ``neomorphic_fit``), else epistasis (dominance
above ``epistasis_dominance``), else synergy / buffering (magnitude above ``synergy_magnitude`` / below
``buffering_magnitude``), else additive.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbscope.schema import IS_CONTROL, PERTURBATION, PERTURBED_GENES

__all__ = ["INTERACTION_COLUMNS", "NOT_FITTED", "classify", "genetic_interactions", "shifts"]

INTERACTION_COLUMNS = [
    "double",
    "perturbation_a",
    "perturbation_b",
    "n_cells",
    "c_a",
    "c_b",
    "magnitude",
    "fit",
    "dominance",
    "equality",
    "c_a_low",
    "c_a_high",
    "c_b_low",
    "c_b_high",
    "magnitude_low",
    "magnitude_high",
    "fit_low",
    "fit_high",
    "additive_error",
    "n_genes",
    "interaction",
    "note",
]
NOT_FITTED = "not fitted"


def _mean(x, rows: np.ndarray) -> np.ndarray:
    sub = x[rows]
    return np.asarray(sub.mean(axis=0), dtype=np.float64).reshape(-1)


def shifts(x, groups: dict[str, np.ndarray], control: np.ndarray) -> dict[str, np.ndarray]:
    """``Δ`` per group: the mean of its rows of ``x`` minus the controls' mean."""
    c = _mean(x, control)
    return {name: _mean(x, rows) - c for name, rows in groups.items()}


def _fit(delta_a: np.ndarray, delta_b: np.ndarray, delta_ab: np.ndarray) -> tuple[float, float, float]:
    from sklearn.linear_model import HuberRegressor

    design = np.column_stack([delta_a, delta_b])
    scale = float(np.std(delta_ab)) or 1.0  # Huber's epsilon is in units of the residuals' scale
    model = HuberRegressor(fit_intercept=False, epsilon=1.35, alpha=0.0, max_iter=500).fit(design, delta_ab / scale)
    c_a, c_b = (float(v) * scale for v in model.coef_)
    predicted = c_a * delta_a + c_b * delta_b
    fit = float(np.corrcoef(predicted, delta_ab)[0, 1]) if np.std(predicted) > 0 and np.std(delta_ab) > 0 else 0.0
    return c_a, c_b, fit


def _scores(c_a: float, c_b: float) -> tuple[float, float, float]:
    magnitude = float(np.hypot(c_a, c_b) / np.sqrt(2.0))
    big, small = max(abs(c_a), abs(c_b)), min(abs(c_a), abs(c_b))
    dominance = float(abs(np.log10(max(abs(c_a), 1e-6) / max(abs(c_b), 1e-6))))
    return magnitude, dominance, small / big if big > 0 else float("nan")


def classify(
    magnitude: float,
    fit: float,
    dominance: float,
    synergy_magnitude: float = 1.3,
    buffering_magnitude: float = 0.75,
    epistasis_dominance: float = 0.5,
    neomorphic_fit: float = 0.9,
) -> str:
    """The interaction class of one double from its scores (thresholds: see the module docstring)."""
    if not np.isfinite(fit) or fit < neomorphic_fit:
        return "neomorphic"
    if dominance > epistasis_dominance:
        return "epistasis"
    if magnitude > synergy_magnitude:
        return "synergy"
    if magnitude < buffering_magnitude:
        return "buffering"
    return "additive"


def _variance(x, rows: np.ndarray) -> np.ndarray:
    sub = x[rows]
    squares = sub.multiply(sub) if sp.issparse(sub) else np.asarray(sub) ** 2
    mean = np.asarray(sub.mean(axis=0), dtype=np.float64).reshape(-1)
    return np.maximum(np.asarray(squares.mean(axis=0), dtype=np.float64).reshape(-1) - mean**2, 0.0)


def _informative(
    x,
    groups: dict[str, np.ndarray],
    control: np.ndarray,
    delta: dict[str, np.ndarray],
    n_genes: int,
    min_z: float,
    min_genes: int,
) -> np.ndarray:
    """The genes A, B or A+B clearly move: a shift above ``min_z`` standard errors in any of the three, the
    ``n_genes`` largest; the ``min_genes`` strongest when fewer pass (two coefficients fitted on a handful of
    genes would fit anything). Noise in the singles' shifts would pull the fitted coefficients towards 0
    (errors in the regressors), so genes that only look moved by chance stay out."""
    var_c = _variance(x, control) / control.size
    z = np.zeros(x.shape[1])
    for name, rows in groups.items():
        se = np.sqrt(_variance(x, rows) / rows.size + var_c)
        z = np.maximum(z, np.abs(delta[name]) / np.maximum(se, 1e-9))
    chosen = np.flatnonzero(z >= min_z)
    if chosen.size < int(min_genes):  # few genes clearly moved: the strongest genes all the same
        chosen = np.argsort(z)[::-1][: int(min_genes)]
    return chosen[np.argsort(z[chosen])[::-1][: int(n_genes)]]


def genetic_interactions(
    screen,
    min_cells: int = 20,
    n_genes: int = 200,
    min_z: float = 5.0,
    min_genes: int = 10,
    n_bootstrap: int = 100,
    confidence: float = 0.9,
    synergy_magnitude: float = 1.3,
    buffering_magnitude: float = 0.75,
    epistasis_dominance: float = 0.5,
    neomorphic_fit: float = 0.9,
    seed: int = 0,
    separator: str = "+",
) -> pd.DataFrame:
    """One row per double ``A+B`` with both singles measured (``min_cells`` cells each): the fit over the genes
    A, B or A+B clearly moves (a shift above ``min_z`` standard errors; ``n_genes`` at most), its scores,
    ``confidence`` bootstrap intervals (``n_bootstrap`` resamples of the cells; 0: none), the error of the
    additive prediction (``c + ΔA + ΔB``, root mean square over genes) and the class. Every other double gets
    a row too, ``not fitted``, with the reason in ``note`` (a single not in the screen, too few cells)."""
    obs = screen.obs
    labels = obs[PERTURBATION].astype(str).to_numpy()
    control = np.flatnonzero(obs[IS_CONTROL].to_numpy(dtype=bool))
    counts = pd.Series(labels).value_counts()
    genes_of = obs.groupby(PERTURBATION, observed=True)[PERTURBED_GENES].first().astype(str)
    singles = {
        genes_of[label]: label for label in genes_of.index if genes_of[label] and separator not in genes_of[label]
    }
    x = screen.X if sp.issparse(screen.X) else np.asarray(screen.X)
    rng = np.random.default_rng(seed)
    rows = []
    for label in sorted(genes_of.index):
        parts = [p for p in str(genes_of[label]).split(separator) if p]
        if len(parts) != 2:
            continue
        skipped = {"double": label, "perturbation_a": parts[0], "perturbation_b": parts[1], "interaction": NOT_FITTED}
        skipped["n_cells"] = int(counts.get(label, 0))
        missing = [p for p in parts if p not in singles]
        if missing:
            rows.append({**skipped, "note": f"single(s) not in the screen: {', '.join(missing)}"})
            continue
        a, b = singles[parts[0]], singles[parts[1]]
        thin = {n: int(counts.get(n, 0)) for n in (label, a, b) if counts.get(n, 0) < int(min_cells)}
        if control.size < int(min_cells):
            thin["controls"] = int(control.size)
        if thin:
            listed = ", ".join(f"{n} ({k})" for n, k in thin.items())
            rows.append({**skipped, "note": f"fewer than {int(min_cells)} cells: {listed}"})
            continue
        groups = {name: np.flatnonzero(labels == name) for name in (a, b, label)}
        delta = shifts(x, groups, control)
        genes = _informative(x, groups, control, delta, n_genes, min_z, min_genes)
        c_a, c_b, fit = _fit(delta[a][genes], delta[b][genes], delta[label][genes])
        magnitude, dominance, equality = _scores(c_a, c_b)
        row = {
            "double": label,
            "perturbation_a": a,
            "perturbation_b": b,
            "n_cells": int(counts[label]),
            "c_a": c_a,
            "c_b": c_b,
            "magnitude": magnitude,
            "fit": fit,
            "dominance": dominance,
            "equality": equality,
            "additive_error": float(np.sqrt(np.mean((delta[a] + delta[b] - delta[label]) ** 2))),
            "n_genes": int(genes.size),
            "note": "",
        }
        if n_bootstrap:
            draws = []
            fitted = x[:, genes]  # the resamples only need the fitted genes' shifts
            for _ in range(int(n_bootstrap)):
                resampled = {name: rng.choice(rows_, size=rows_.size) for name, rows_ in groups.items()}
                boot = shifts(fitted, resampled, rng.choice(control, size=control.size))
                ba, bb, bf = _fit(boot[a], boot[b], boot[label])
                draws.append((ba, bb, _scores(ba, bb)[0], bf))
            draws = np.asarray(draws)
            tail = (1.0 - float(confidence)) / 2.0 * 100.0
            low, high = np.percentile(draws, [tail, 100.0 - tail], axis=0)
            for i, name in enumerate(("c_a", "c_b", "magnitude", "fit")):
                row[f"{name}_low"], row[f"{name}_high"] = float(low[i]), float(high[i])
        row["interaction"] = classify(
            magnitude, fit, dominance, synergy_magnitude, buffering_magnitude, epistasis_dominance, neomorphic_fit
        )
        rows.append(row)
    return pd.DataFrame(rows, columns=INTERACTION_COLUMNS)
