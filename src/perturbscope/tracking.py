"""MLflow shaping shared by the model pipelines: what a node returns for kedro-mlflow's datasets.

* :func:`training_history_metrics` -- a training history (``History.to_frame()``) as MLflow
  metric histories (step = epoch) plus a run summary;
* :func:`artifact_copy` -- the pass-through node feeding the MLflow artifact copy of a
  versioned catalog entry.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import pandas as pd

__all__ = ["artifact_copy", "metric_name", "training_history_metrics"]

T = TypeVar("T")


def metric_name(*parts: Any) -> str:
    """An MLflow metric name from parts joined by ``.``: characters other than letters, digits,
    ``_`` and ``-`` become ``_`` (e.g. a perturbation ``A+B``), empty parts are left out."""
    clean = []
    for part in parts:
        text = "".join(ch if (ch.isalnum() or ch in "_-") else "_" for ch in str(part))
        if text:
            clean.append(text)
    return ".".join(clean)


def artifact_copy(value: T) -> T:
    """The input unchanged: its output is the MLflow artifact copy of a versioned catalog entry.

    (A Kedro-versioned dataset cannot itself be wrapped in ``MlflowArtifactDataset``: the
    wrapper's version clashes with the catalog's save version.)
    """
    return value


def training_history_metrics(history: pd.DataFrame) -> dict[str, Any]:
    """The history as MLflow metric histories (step = epoch) plus a run summary.

    Every numeric column but ``epoch`` / ``best`` becomes one metric with one value per
    epoch (NaN epochs left out); ``epochs``, ``seconds_total``, ``seconds_per_epoch``,
    ``best_epoch`` and ``best_val_loss`` are single values.
    """
    out: dict[str, Any] = {}
    steps = history["epoch"].astype(int).to_numpy()
    for column in history.columns:
        if column in ("epoch", "best") or not pd.api.types.is_numeric_dtype(history[column]):
            continue
        values = history[column].to_numpy(dtype=float)
        points = [{"step": int(s), "value": float(v)} for s, v in zip(steps, values) if np.isfinite(v)]
        if points:
            out[column] = points
    out["epochs"] = {"step": 0, "value": float(len(history))}
    if len(history):
        out["seconds_total"] = {"step": 0, "value": float(history["seconds"].sum())}
        out["seconds_per_epoch"] = {"step": 0, "value": float(history["seconds"].mean())}
    best = history.loc[history["best"].astype(bool)] if "best" in history else history.iloc[0:0]
    if len(best):
        out["best_epoch"] = {"step": 0, "value": float(best["epoch"].iloc[0])}
        if np.isfinite(best["val_loss"].iloc[0]):
            out["best_val_loss"] = {"step": 0, "value": float(best["val_loss"].iloc[0])}
    return out
