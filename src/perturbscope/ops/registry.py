"""perturbscope models in the MLflow model registry: register, compare, promote, load.

Every trained model is registered under one name per model and screen
(``perturbscope-<model>-<screen>`` by default, ``retrain.model_name``). A version
holds the model's checkpoint (:mod:`perturbscope.models.io` format, the same bytes as
:class:`~perturbscope.datasets.TorchModelDataset`) as ``model.pt`` beside a
``model.json`` (class, hyperparameters), and carries as tags the data version (the
screen file's SHA-256 and the Kedro save version), the parameters and the key
metrics. The version that serves is the one with the alias ``champion``::

    from perturbscope.ops.registry import load_registered_model
    model = load_registered_model("perturbscope-contrastive-norman2019_subset")   # @champion
    model = load_registered_model("perturbscope-contrastive-norman2019_subset", 3)

A new version becomes champion only when none of its key metrics is worse than the
champion's by more than that metric's margin (:func:`compare_metrics`).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from torch import nn

from perturbscope.models.io import load_model, save_model

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT",
    "COMPARISON_COLUMNS",
    "MetricRule",
    "RegistryConfigError",
    "champion_version",
    "compare_metrics",
    "load_registered_model",
    "metric_rules",
    "model_uri",
    "register_model_version",
    "registered_data_hashes",
    "version_metrics",
]

CHECKPOINT = "model.pt"
"""File name of the checkpoint inside a registered version's artifacts."""

METRIC_TAG = "metric."
"""Prefix of the tags holding a version's key metrics."""

TAG_LIMIT = 5000
"""Tag values are cut to this many characters (MLflow's limit is 8000 on most stores)."""

COMPARISON_COLUMNS = [
    "model",
    "registered_model",
    "metric",
    "key",
    "higher_is_better",
    "margin",
    "champion_version",
    "champion_value",
    "candidate_version",
    "candidate_value",
    "change",
    "worse_by",
    "verdict",
    "decision",
]
"""Columns of the comparison table (one row per model and key metric)."""


class RegistryConfigError(ValueError):
    """The ``retrain.models`` parameters are malformed; the message names the key and the fix."""


# ------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class MetricRule:
    """A key metric of a model: compared with the champion's, within a margin.

    Attributes
    ----------
    name
        Short name (the key under ``retrain.models.<model>.metrics``).
    key
        The MLflow metric, e.g. ``contrastive.evaluation.ari.salient``.
    higher_is_better
        Direction of the metric.
    margin
        How much worse than the champion (in the metric's units) the candidate may
        be and still be promoted; 0 = not worse at all, negative = must improve.
    """

    name: str
    key: str
    higher_is_better: bool = True
    margin: float = 0.0


def metric_rules(model: str, metrics: Mapping[str, Any] | None) -> list[MetricRule]:
    """The rules of ``retrain.models.<model>.metrics`` (``{name: {metric, higher_is_better, margin}}``)."""
    rules = []
    for name, spec in dict(metrics or {}).items():
        spec = dict(spec or {})
        unknown = sorted(set(spec) - {"metric", "higher_is_better", "margin"})
        if unknown or not spec.get("metric"):
            raise RegistryConfigError(
                f"retrain.models.{model}.metrics.{name} needs `metric` (the MLflow metric key) and "
                f"takes `higher_is_better` and `margin`; got {sorted(spec)}."
            )
        try:
            margin = float(spec.get("margin", 0.0))
        except (TypeError, ValueError):
            raise RegistryConfigError(
                f"retrain.models.{model}.metrics.{name}.margin must be a number, got {spec.get('margin')!r}."
            ) from None
        rules.append(
            MetricRule(
                name=str(name),
                key=str(spec["metric"]),
                higher_is_better=bool(spec.get("higher_is_better", True)),
                margin=margin,
            )
        )
    return rules


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def compare_metrics(
    candidate: Mapping[str, float],
    champion: Mapping[str, float] | None,
    rules: list[MetricRule],
    *,
    block_on_missing: bool = True,
) -> tuple[pd.DataFrame, bool, str]:
    """Compare a candidate's key metrics with the champion's.

    Parameters
    ----------
    candidate, champion
        MLflow metric key -> value; ``champion`` is ``None`` when there is no champion.
    rules
        The key metrics.
    block_on_missing
        A key metric the champion has and the candidate lacks blocks the promotion.

    Returns
    -------
    (table, promote, reason)
        One row per rule (``metric``, ``key``, ``higher_is_better``, ``margin``,
        ``champion_value``, ``candidate_value``, ``change`` = candidate - champion,
        ``worse_by`` = how much worse the candidate is in the metric's direction,
        ``verdict``: better / equal / within margin (acceptable), worse / not better
        enough (beyond the margin: block), missing (blocks when ``block_on_missing``),
        no reference / not measured / no champion); whether to promote; and why.
    """
    rows, blockers = [], []
    for rule in rules:
        new = _finite(candidate.get(rule.key))
        old = _finite(champion.get(rule.key)) if champion is not None else None
        change = worse_by = None
        if champion is None:
            verdict = "no champion"
        elif new is None and old is None:
            verdict = "not measured"
        elif new is None:
            verdict = "missing"
            if block_on_missing:
                blockers.append(f"{rule.name} ({rule.key}) was not measured (champion: {old:.4g})")
        elif old is None:
            verdict = "no reference"
        else:
            change = new - old
            worse_by = -change if rule.higher_is_better else change
            tolerance = 1e-12 * max(1.0, abs(old))
            if worse_by > rule.margin + tolerance:
                verdict = "worse" if worse_by > tolerance else "not better enough"
                need = (
                    f"worse by {worse_by:.4g} > margin {rule.margin:g}"
                    if worse_by > tolerance
                    else f"improved by {-worse_by:.4g} < the {-rule.margin:g} the margin requires"
                )
                blockers.append(f"{rule.name} {new:.4g} vs champion {old:.4g}: {need}")
            elif worse_by < -tolerance:
                verdict = "better"
            elif worse_by <= tolerance:
                verdict = "equal"
            else:
                verdict = "within margin"
        rows.append(
            {
                "metric": rule.name,
                "key": rule.key,
                "higher_is_better": rule.higher_is_better,
                "margin": rule.margin,
                "champion_value": old,
                "candidate_value": new,
                "change": change,
                "worse_by": worse_by,
                "verdict": verdict,
            }
        )
    table = pd.DataFrame(
        rows,
        columns=[
            "metric",
            "key",
            "higher_is_better",
            "margin",
            "champion_value",
            "candidate_value",
            "change",
            "worse_by",
            "verdict",
        ],
    )
    if champion is None:
        return table, True, "first version: no champion yet"
    if blockers:
        return table, False, "; ".join(blockers)
    return table, True, "no key metric worse than the champion beyond its margin"


# --------------------------------------------------------------------------- registry
def model_uri(name: str, version_or_alias: int | str = "champion") -> str:
    """``models:/<name>/<version>`` for a version number, ``models:/<name>@<alias>`` otherwise."""
    text = str(version_or_alias)
    return f"models:/{name}/{text}" if text.isdigit() else f"models:/{name}@{text}"


def _tag(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= TAG_LIMIT else text[: TAG_LIMIT - 3] + "..."


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


def registered_data_hashes(client: MlflowClient, name: str) -> set[str]:
    """The ``data_sha256`` of every version of a registered model (empty if it does not exist)."""
    return {v.tags.get("data_sha256", "") for v in _versions(client, name)} - {""}


def champion_version(client: MlflowClient, name: str, alias: str = "champion") -> ModelVersion | None:
    """The version carrying ``alias``, or ``None`` (no such model or alias)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def version_metrics(version: ModelVersion) -> dict[str, float]:
    """The key metrics recorded on a version (its ``metric.<key>`` tags)."""
    out = {}
    for tag, value in (version.tags or {}).items():
        if tag.startswith(METRIC_TAG) and (number := _finite(value)) is not None:
            out[tag[len(METRIC_TAG) :]] = number
    return out


def register_model_version(
    client: MlflowClient,
    name: str,
    run_id: str,
    model: nn.Module,
    *,
    artifact_path: str,
    tags: Mapping[str, Any],
    metrics: Mapping[str, float],
    description: str = "",
    model_tags: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Log ``model`` to the run under ``artifact_path`` and register it as a new version of ``name``.

    The artifacts are ``model.pt`` (:func:`perturbscope.models.io.save_model`) and
    ``model.json`` (class, hyperparameters, metadata keys). ``tags`` (data version,
    parameters...) and ``metrics`` (as ``metric.<key>`` tags) go on the version;
    ``model_tags`` on the registered model, created when it does not exist.
    """
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, Path(folder) / CHECKPOINT)
        summary = {
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "hparams": getattr(model, "hparams", {}),
            "metadata_keys": sorted(getattr(model, "metadata", {}) or {}),
            "load_with": "perturbscope.ops.registry.load_registered_model(name, version_or_alias)",
        }
        (Path(folder) / "model.json").write_text(json.dumps(summary, indent=2, default=str))
        client.log_artifacts(run_id, folder, artifact_path)
    try:
        client.create_registered_model(name, tags={k: _tag(v) for k, v in (model_tags or {}).items()})
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    version_tags = {k: _tag(v) for k, v in tags.items() if v is not None}
    version_tags.update({f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items()})
    return client.create_model_version(name, source=source, run_id=run_id, tags=version_tags, description=description)


def load_registered_model(
    name: str,
    version_or_alias: int | str = "champion",
    *,
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    map_location: str = "cpu",
) -> nn.Module:
    """Load a registered perturbscope model: our ``nn.Module``, weights loaded, eval mode.

    Parameters
    ----------
    name
        Registered model name, e.g. ``perturbscope-contrastive-<screen>``.
    version_or_alias
        A version number (``3`` or ``"3"``) or an alias (``"champion"``).
    tracking_uri, registry_uri
        MLflow stores; ``None`` uses MLflow's current ones (set by kedro-mlflow in a
        Kedro session or notebook, or ``MLFLOW_TRACKING_URI``), e.g.
        ``sqlite:///mlflow.db`` in the project folder.
    map_location
        Device of the weights.

    Raises
    ------
    ValueError
        No such model, version or alias (the message lists the versions and aliases).
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    text = str(version_or_alias)
    try:
        version = (
            client.get_model_version(name, text) if text.isdigit() else client.get_model_version_by_alias(name, text)
        )
    except MlflowException as err:
        versions = sorted(_versions(client, name), key=lambda v: int(v.version))
        if not versions:
            raise ValueError(
                f"No registered model '{name}' in {registry_uri or mlflow.get_registry_uri()}. Names are "
                "perturbscope-<model>-<screen>; run `python -m perturbscope.ops.retrain` first, or "
                "pass the right tracking_uri."
            ) from err
        aliases = sorted(client.get_registered_model(name).aliases or {})
        raise ValueError(
            f"'{name}' has no version or alias '{text}': versions "
            f"{[int(v.version) for v in versions]}, aliases {aliases}."
        ) from err
    with tempfile.TemporaryDirectory() as folder:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=folder, tracking_uri=tracking_uri)
        )
        if not (local / CHECKPOINT).exists():
            raise ValueError(
                f"Version {version.version} of '{name}' has no {CHECKPOINT} (source {version.source}): "
                "it was not registered by perturbscope."
            )
        model = load_model(local / CHECKPOINT, map_location=map_location)
    logger.info("Loaded %s version %s (%s).", name, version.version, type(model).__name__)
    return model
