"""Retrain the registered screens whose file is new or changed; register, compare, promote.

::

    python -m perturbscope.ops.retrain                      # every registered screen that needs it
    python -m perturbscope.ops.retrain --screens a b --env airflow
    python -m perturbscope.ops.retrain --dry-run            # what would retrain, and is each file valid
    python -m perturbscope.ops.retrain --plan               # last line: JSON list of the screens to retrain
    python -m perturbscope.ops.retrain --screens a --json   # last line: a's retrain_status row as JSON
    python -m perturbscope.ops.retrain --force --params "retrain.preflight_cells=null"

For each screen of the registry (``conf/<env>/screens.yml``, ``retrain: true``):

1. The file (the catalog's ``raw_screen`` for that screen) is hashed (SHA-256). The
   screen is *up to date* when every model it trains has a registered version with
   that hash; it is skipped then (``--force`` retrains anyway).
2. The file is checked before anything runs (:func:`perturbscope.ops.screens.check_screen_file`):
   an unreadable, half-copied or wrongly labelled file is reported (log line and a row
   of ``retrain_status``) and skipped, nothing is written for it and the registered
   models are untouched. Other screens go on.
3. One MLflow run is opened in the screen's experiment; the ``retrain.pipelines`` run
   in a Kedro session (``runtime_params: {screen: <name>}``) and log into it.
4. Each model of ``retrain.models`` is compared with its ``champion`` version: its key
   metrics against the champion's (``retrain_comparison`` table, per screen); it is to
   become champion only when none is worse beyond its margin.
5. The ``retrain.report_pipelines`` (the report) run in a second session, in the same
   MLflow run, so the report shows the comparison.
6. Only when all of that succeeded is each model registered as a new version of
   ``perturbscope-<model>-<screen>`` with the data version (file hash, Kedro save version),
   parameters and key metrics, and then promoted where step 4 said so. A run that fails at
   any step registers and promotes nothing.

The exit status is 1 when a screen was invalid or failed (after all screens were
tried), so a scheduler flags it; ``retrain_status`` says which and why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from kedro.framework.project import pipelines as project_pipelines
from kedro.framework.project import settings as project_settings
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io.core import Version, generate_timestamp, get_protocol_and_path
from kedro.utils import find_kedro_project
from mlflow import MlflowClient
from omegaconf import OmegaConf

from perturbscope.hooks import resolve_mlflow_config
from perturbscope.ops.registry import (
    COMPARISON_COLUMNS,
    MetricRule,
    RegistryConfigError,
    champion_version,
    compare_metrics,
    metric_rules,
    register_model_version,
    registered_data_hashes,
    version_metrics,
)
from perturbscope.ops.screens import (
    ScreenFileError,
    ScreenRegistryError,
    check_screen_file,
    file_stamp,
    fingerprint,
    validate_registry,
)
from perturbscope.runs import ledger_of
from perturbscope.schema import ScreenValidationError
from perturbscope.store import open_store

# named explicitly: under `python -m perturbscope.ops.retrain` __name__ is "__main__", a logger that
# Kedro's logging configuration (INFO for the project's package) does not reach
logger = logging.getLogger("perturbscope.ops.retrain")

__all__ = ["STATUS_COLUMNS", "RetrainConfig", "main", "retrain"]

STATUS_COLUMNS = [
    "screen",
    "status",
    "detail",
    "file",
    "data_sha256",
    "mlflow_run_id",
    "kedro_session_id",
    "save_version",
    "registered",
    "promoted",
    "seconds",
    "finished_at",
]
"""Columns of ``retrain_status`` (one row per screen and invocation)."""

FAILED = ("invalid", "failed")
"""Statuses that make the command exit with 1."""

PLANNED = ("would_retrain", "invalid")
"""Dry-run statuses of the screens ``--plan`` lists: those to retrain, and the invalid ones (their own
task fails and says why; a screen with no file yet or up to date gets no task)."""


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ModelSpec:
    """One model of ``retrain.models``."""

    key: str
    pipeline: str
    dataset: str
    parameters: str | None
    rules: list[MetricRule] = field(default_factory=list)


@dataclass(frozen=True)
class RetrainConfig:
    """The ``retrain`` parameters (conf/base/ops/parameters_retrain.yml)."""

    pipelines: list[str]
    report_pipelines: list[str]
    preflight_cells: int | None
    model_name: str
    alias: str
    block_on_missing_metric: bool
    models: list[ModelSpec]

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> RetrainConfig:
        if not params:
            raise RegistryConfigError("No `retrain` parameters: conf/base/ops/parameters_retrain.yml is missing.")
        models = []
        for key, spec in dict(params.get("models") or {}).items():
            spec = dict(spec or {})
            missing = [k for k in ("pipeline", "dataset") if not spec.get(k)]
            if missing:
                raise RegistryConfigError(
                    f"retrain.models.{key} needs {missing}: the pipeline that trains the model "
                    "and the Kedro dataset it is saved to."
                )
            models.append(
                ModelSpec(
                    key=str(key),
                    pipeline=str(spec["pipeline"]),
                    dataset=str(spec["dataset"]),
                    parameters=spec.get("parameters"),
                    rules=metric_rules(str(key), spec.get("metrics")),
                )
            )
        template = str(params.get("model_name", "perturbscope-{model}-{screen}"))
        if "{model}" not in template or "{screen}" not in template:
            raise RegistryConfigError(f"retrain.model_name '{template}' must contain {{model}} and {{screen}}.")
        cells = params.get("preflight_cells", 2000)
        return cls(
            pipelines=list(params.get("pipelines") or []),
            report_pipelines=list(params.get("report_pipelines") or []),
            preflight_cells=None if cells is None else int(cells),
            model_name=template,
            alias=str(params.get("alias", "champion")),
            block_on_missing_metric=bool(params.get("block_on_missing_metric", True)),
            models=models,
        )

    def name(self, model: str, screen: str) -> str:
        """The registered model name of a model and screen."""
        return self.model_name.format(model=model, screen=screen)


# ---------------------------------------------------------------------------- helpers
def _absolute(path: str, project_path: Path) -> str:
    """A local relative catalog path resolved against the project, as Kedro does."""
    protocol, _ = get_protocol_and_path(path)
    if protocol == "file" and not Path(path).is_absolute():
        return str((project_path / path).resolve())
    return path


def _available(names: Sequence[str], what: str) -> list[str]:
    """The pipelines of ``names`` that exist; a warning for the others."""
    project_pipelines.set_requested(None)  # a session.run loads only its own pipelines; see them all
    present = [n for n in names if n in project_pipelines]
    missing = [n for n in names if n not in project_pipelines]
    if missing:
        logger.warning("retrain.%s: pipeline(s) %s do not exist (yet); skipped.", what, missing)
    return present


@contextlib.contextmanager
def _orchestrated_run() -> Iterator[None]:
    """Quieten kedro-mlflow's warnings about the run this module opens on purpose.

    kedro-mlflow logs into a run that is active before a session starts ("enables an
    orchestrator to start the run by itself") and warns each time; here that is the plan.
    """
    hook_logger = logging.getLogger("kedro_mlflow.framework.hooks.mlflow_hook")
    level = hook_logger.level
    hook_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hook_logger.setLevel(level)


_BOOTSTRAPPED: list[Path] = []


def _bootstrap(project_path: Path) -> None:
    """``bootstrap_project`` unless this process last bootstrapped the same project (it takes seconds)."""
    if _BOOTSTRAPPED[-1:] != [project_path]:
        bootstrap_project(project_path)
        _BOOTSTRAPPED[:] = [project_path]


@dataclass
class _ProjectConfig:
    """The project's configuration for one set of runtime parameters, read without a Kedro context.

    Creating a context fires the project's hooks, and kedro-mlflow's creates the screen's MLflow
    experiment: reading the configuration this way lets the CLI check a screen first and write
    nothing (no experiment) for one it rejects.
    """

    project_path: Path
    env: str | None
    runtime: dict[str, Any]

    def __post_init__(self) -> None:
        self.loader = project_settings.CONFIG_LOADER_CLASS(
            conf_source=str(self.project_path / project_settings.CONF_SOURCE),
            env=self.env,
            runtime_params=self.runtime,
            **project_settings.CONFIG_LOADER_ARGS,
        )
        merged = OmegaConf.merge(self.loader["parameters"], self.runtime)  # runtime params on top, as a context does
        self.params = OmegaConf.to_container(merged, resolve=True)

    def use_mlflow_store(self) -> None:
        """Point mlflow at the project's store (resolved against the project root), as a run would."""
        server = resolve_mlflow_config(self.loader["mlflow"], self.project_path).get("server", {})
        open_store(server.get("mlflow_tracking_uri"))  # created under its lock, as a run does
        if server.get("mlflow_tracking_uri"):
            mlflow.set_tracking_uri(server["mlflow_tracking_uri"])
        mlflow.set_registry_uri(server.get("mlflow_registry_uri"))  # None: the tracking store, as kedro-mlflow does

    def dataset_path(self, name: str) -> str:
        return _absolute(str(self.loader["catalog"][name]["filepath"]), self.project_path)


def _short(err: BaseException, limit: int = 600) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- one screen
@dataclass
class _Screen:
    """What one screen's retrain did (a row of ``retrain_status``)."""

    screen: str
    status: str = "pending"
    detail: str = ""
    file: str = ""
    data_sha256: str = ""
    mlflow_run_id: str = ""
    kedro_session_id: str = ""
    save_version: str = ""  # of the run's outputs: the session id, unless a run started in the same ms had it
    registered: list[str] = field(default_factory=list)
    promoted: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def row(self) -> dict[str, Any]:
        return {
            "screen": self.screen,
            "status": self.status,
            "detail": self.detail,
            "file": self.file,
            "data_sha256": self.data_sha256,
            "mlflow_run_id": self.mlflow_run_id,
            "kedro_session_id": self.kedro_session_id,
            "save_version": self.save_version,
            "registered": "; ".join(self.registered),
            "promoted": "; ".join(self.promoted),
            "seconds": round(time.time() - self.started, 1),
            "finished_at": _now(),
        }


def _description(screen: str, spec: ModelSpec, info: _Screen, table: pd.DataFrame, decision: str, env: str) -> str:
    lines = [
        f"perturbscope `{spec.key}` model of screen `{screen}` (pipeline `{spec.pipeline}`, dataset `{spec.dataset}`).",
        "",
        f"Data: `{info.file}`, sha256 `{info.data_sha256}`; Kedro save version "
        f"`{info.save_version}` (env `{env}`); MLflow run `{info.mlflow_run_id}`.",
        "",
        f"Promotion: {decision}.",
    ]
    if len(table):
        lines += ["", "| metric | candidate | champion | verdict |", "|---|---|---|---|"]
        for row in table.itertuples(index=False):
            fmt = lambda v: "" if v is None or pd.isna(v) else f"{v:.4g}"  # noqa: E731
            lines.append(f"| {row.key} | {fmt(row.candidate_value)} | {fmt(row.champion_value)} | {row.verdict} |")
    return "\n".join(lines)


@dataclass
class _Candidate:
    """One trained model of a finished run, compared with its champion, not yet registered."""

    spec: ModelSpec
    name: str
    model: Any
    metrics: dict[str, float]
    champion: Any
    promote: bool
    decision: str
    table: pd.DataFrame


def _compare(
    context: Any, config: RetrainConfig, models: list[ModelSpec], info: _Screen
) -> tuple[list[_Candidate], pd.DataFrame]:
    """Every model of a finished run next to its champion: the candidates to register and the comparison
    table (``candidate_version`` empty until they are registered). Nothing is written to the registry."""
    client = MlflowClient()
    run_metrics = client.get_run(info.mlflow_run_id).data.metrics
    candidates, frames = [], []
    for spec in models:
        name = config.name(spec.key, info.screen)
        model = context.catalog.load(spec.dataset, version=info.save_version)
        skipped = (getattr(model, "metadata", None) or {}).get("not_applicable")
        if skipped:  # e.g. the held-out-perturbation cVAE of a singles-only screen trains nothing
            logger.info("Model %s of screen %s is not applicable (%s): not registered.", spec.key, info.screen, skipped)
            row = {"model": spec.key, "registered_model": name, "verdict": f"not applicable: {skipped}"}
            frames.append(pd.DataFrame([{**row, "decision": "not registered"}]).reindex(columns=COMPARISON_COLUMNS))
            continue
        candidate = {r.key: run_metrics[r.key] for r in spec.rules if r.key in run_metrics}
        for rule in spec.rules:
            if rule.key not in run_metrics:
                logger.warning(
                    "Key metric %s of model %s was not logged by the run; check retrain.models.%s.metrics.%s.metric.",
                    rule.key,
                    spec.key,
                    spec.key,
                    rule.name,
                )
        champion = champion_version(client, name, config.alias)
        table, promote, reason = compare_metrics(
            candidate,
            version_metrics(champion) if champion is not None else None,
            spec.rules,
            block_on_missing=config.block_on_missing_metric,
        )
        if promote:
            decision = f"promoted to @{config.alias}: {reason}"
        else:
            decision = f"not promoted, @{config.alias} stays version {champion.version}: {reason}"
        table.insert(0, "model", spec.key)
        table.insert(1, "registered_model", name)
        table["champion_version"] = champion.version if champion is not None else None
        table["candidate_version"] = None
        table["decision"] = "promoted" if promote else "not promoted"
        if table.empty:
            table = pd.DataFrame(
                [
                    {
                        "model": spec.key,
                        "registered_model": name,
                        "champion_version": champion.version if champion is not None else None,
                        "verdict": "no key metrics",
                        "decision": "promoted" if promote else "not promoted",
                    }
                ]
            )
        table = table.reindex(columns=COMPARISON_COLUMNS)
        candidates.append(_Candidate(spec, name, model, candidate, champion, promote, decision, table))
        frames.append(table)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COMPARISON_COLUMNS)
    return candidates, table


def _register(
    context: Any, config: RetrainConfig, candidates: list[_Candidate], info: _Screen, env: str
) -> dict[str, str]:
    """Register every candidate (after the whole run succeeded), then promote; ``{model: version}``.

    Every version is registered before any alias moves, so a registry error half-way promotes nothing.
    """
    client = MlflowClient()
    versions: dict[str, str] = {}
    for item in candidates:
        spec = item.spec
        parameters = context.params.get(spec.parameters) if spec.parameters else None
        version = register_model_version(
            client,
            item.name,
            info.mlflow_run_id,
            item.model,
            artifact_path=f"registry/{spec.key}",
            tags={
                "screen": info.screen,
                "model": spec.key,
                "pipeline": spec.pipeline,
                "kedro_dataset": spec.dataset,
                "kedro_env": env,
                "kedro_save_version": info.save_version,
                "data_file": info.file,
                "data_sha256": info.data_sha256,
                "schema": context.params.get("schema"),
                "parameters": parameters,
                "hparams": getattr(item.model, "hparams", {}),
                "promotion": item.decision,
                "champion_before": item.champion.version if item.champion is not None else "",
            },
            metrics=item.metrics,
            description=_description(info.screen, spec, info, item.table, item.decision, env),
            model_tags={"screen": info.screen, "model": spec.key, "project": "perturbscope"},
        )
        versions[spec.key] = str(version.version)
        info.registered.append(f"{item.name} v{version.version}")
        logger.info("Registered %s version %s; %s.", item.name, version.version, item.decision)
    for item in candidates:
        if item.promote:
            client.set_registered_model_alias(item.name, config.alias, versions[item.spec.key])
            info.promoted.append(f"{item.name} v{versions[item.spec.key]}")
    return versions


def _retrain_screen(
    project_path: Path,
    env: str | None,
    screen: str,
    extra_params: Mapping[str, Any],
    *,
    force: bool,
    dry_run: bool,
) -> _Screen:
    info = _Screen(screen)
    runtime = {**extra_params, "screen": screen}
    project = _ProjectConfig(project_path, env, runtime)
    project.use_mlflow_store()
    config = RetrainConfig.from_params(project.params.get("retrain"))
    info.file = project.dataset_path("raw_screen")
    # nothing below writes anything (no MLflow experiment) until the file has passed its checks
    # 1. hash; up to date?
    try:
        stamp = file_stamp(info.file)  # before the hash: a change while hashing shows later
        info.data_sha256 = fingerprint(info.file).sha256
    except FileNotFoundError:
        info.status, info.detail = "skipped", f"no file at {info.file} yet"
        logger.warning("Screen %s: no file at %s yet; skipped.", screen, info.file)
        return info
    except OSError as err:
        info.status, info.detail = "invalid", f"cannot read {info.file}: {_short(err)}"
        logger.error("Screen %s: %s; skipped.", screen, info.detail)
        return info
    trained = _available(config.pipelines, "pipelines")
    models = [m for m in config.models if m.pipeline in trained]
    client = MlflowClient()
    stale = [
        m.key for m in models if info.data_sha256 not in registered_data_hashes(client, config.name(m.key, screen))
    ]
    if not stale and not force:
        info.status = "up_to_date"
        info.detail = f"every model has a registered version for sha256 {info.data_sha256[:12]}"
        logger.info("Screen %s is up to date (%s).", screen, info.detail)
        return info
    # 2. check the file before anything runs
    try:
        entry = (project.loader["globals"].get("screens") or {}).get(screen) or {}
        checked = check_screen_file(
            info.file,
            project.params["schema"],
            screen,
            n_cells=config.preflight_cells,
            feature_reference=entry.get("feature_reference"),
        )
    except Exception as err:
        clear = isinstance(err, (ScreenFileError, ScreenValidationError))
        info.status, info.detail = "invalid", str(err) if clear else _short(err)
        logger.error(
            "Screen %s skipped, nothing was written and its registered models are untouched: %s",
            screen,
            info.detail,
        )
        return info
    reason = "forced" if not stale else f"new or changed file for model(s) {stale}"
    if dry_run:
        info.status = "would_retrain"
        info.detail = f"{reason}; file valid ({checked['n_obs']} cells x {checked['n_vars']} genes)"
        return info
    logger.info(
        "Retraining screen %s (%s; %d cells x %d genes): pipelines %s.",
        screen,
        reason,
        checked["n_obs"],
        checked["n_vars"],
        trained,
    )
    session = KedroSession.create(project_path=project_path, env=env, runtime_params=runtime)
    with session:
        context = session.load_context()  # from here on the screen's MLflow experiment exists
        env_name = context.env or "local"
        # 3. one MLflow run in the screen's experiment; the pipelines log into it
        experiment = mlflow.get_experiment_by_name(context.mlflow.tracking.experiment.name)
        run = mlflow.start_run(
            experiment_id=experiment.experiment_id if experiment is not None else None,
            run_name=screen,
            tags={
                "screen": screen,
                "retrain": "true",
                "data_file": info.file,
                "data_sha256": info.data_sha256,
                "retrain_reason": reason,
            },
        )
        info.mlflow_run_id = run.info.run_id
        info.kedro_session_id = session.session_id
        status = "FAILED"
        try:
            with _orchestrated_run():
                session.run(pipeline_names=trained)
            ledger = ledger_of(context)
            info.save_version = ledger.version_of_session(session.session_id, info.mlflow_run_id) or session.session_id
            if file_stamp(info.file) != stamp:
                info.status = "failed"
                info.detail = (
                    "the file changed while the models trained; nothing registered, the next retrain uses the new file"
                )
                logger.error("Screen %s: %s.", screen, info.detail)
                return info
            # 4. compare with the champions; nothing registered yet
            candidates, comparison = _compare(context, config, models, info)
            context.catalog.save("retrain_comparison", comparison)
            # 5. the report, now that the comparison exists
            reports = _available(config.report_pipelines, "report_pipelines")
            if reports:
                # kedro-mlflow tags the run with each session's run_params: keep the training
                # session's (its id is the save version of the models), note the report's
                kept = {
                    k: v
                    for k, v in MlflowClient().get_run(info.mlflow_run_id).data.tags.items()
                    if k in ("run_id", "pipeline_names", "kedro_command", "runtime_params")
                }
                with (
                    KedroSession.create(project_path=project_path, env=env, runtime_params=runtime) as report_session,
                    _orchestrated_run(),
                ):
                    report_session.run(pipeline_names=reports)
                    mlflow.set_tags({**kept, "report_session_id": report_session.session_id})
            # 6. the whole run succeeded: register, then promote
            versions = _register(context, config, candidates, info, env_name)
            comparison["candidate_version"] = comparison["model"].map(versions)
            # the table again, now with the versions: a newer version of the dataset than the report's
            final = context.catalog.get("retrain_comparison")
            final._copy(_version=Version(None, generate_timestamp())).save(comparison)
            mlflow.log_text(comparison.to_csv(index=False), "retrain/retrain_comparison.csv")
            info.status = "retrained"
            info.detail = reason
            status = "FINISHED"
        except Exception as err:  # a node or the registry failed: report it, go on with other screens
            info.status, info.detail = "failed", _short(err)
            logger.exception("Screen %s failed; retrain_status lists what was registered before.", screen)
        finally:
            mlflow.end_run(status)
    return info


# ------------------------------------------------------------------------------ entry
def retrain(
    screens: Sequence[str] | None = None,
    *,
    env: str | None = None,
    project_path: str | Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    extra_params: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Retrain the registered screens that need it (see the module docstring).

    Parameters
    ----------
    screens
        Names from the registry; ``None`` = every entry with ``retrain: true``.
    env
        Kedro environment (``None``: the default run env, ``local``).
    project_path
        The Kedro project; ``None`` = the one containing the working directory.
    force
        Retrain even when every model has a version for the file's hash.
    dry_run
        Hash and check the files, report what would retrain; run nothing.
    extra_params
        Runtime parameters for every session, like ``kedro run --params``.

    Returns
    -------
    pandas.DataFrame
        The ``retrain_status`` rows (also saved to the catalog entry of that name).
    """
    project_path = Path(project_path) if project_path else find_kedro_project(Path.cwd())
    if project_path is None:
        raise ScreenRegistryError("No Kedro project here: run from the perturbscope folder or pass --project-path.")
    project_path = Path(project_path).resolve()
    _bootstrap(project_path)
    extra = dict(extra_params or {})
    extra.pop("screen", None)
    project = _ProjectConfig(project_path, env, extra)
    registry = validate_registry(project.loader["globals"].get("screens"))
    RetrainConfig.from_params(project.params.get("retrain"))  # fail early on bad parameters
    if screens:
        names = list(dict.fromkeys(screens))
    else:
        names = [name for name, entry in registry.items() if entry["retrain"]]
        if not names:
            logger.warning("The screens registry (conf/%s/screens.yml) has no screen to retrain.", env or "base")
    rows = []
    for screen in names:
        if screen not in registry:
            info = _Screen(
                screen,
                status="failed",
                detail=(f"'{screen}' is not in the screens registry; registered: {sorted(registry)}"),
            )
            logger.error("Screen %s: %s.", screen, info.detail)
        else:
            try:
                info = _retrain_screen(project_path, env, screen, extra, force=force, dry_run=dry_run)
            except Exception as err:
                logger.exception("Screen %s failed before training.", screen)
                info = _Screen(screen, status="failed", detail=_short(err))
        rows.append(info.row())
        if mlflow.active_run() is not None:  # never leak a run into the next screen
            mlflow.end_run("FAILED")
    status = pd.DataFrame(rows, columns=STATUS_COLUMNS)
    if not dry_run and len(status):
        _save_status(project, status)
    for row in status.itertuples(index=False):
        log = logger.error if row.status in FAILED else logger.info
        log("retrain %-12s %-13s %s", row.screen, row.status, row.detail)
    return status


def _save_status(project: _ProjectConfig, status: pd.DataFrame) -> None:
    """Write ``retrain_status`` through its catalog entry (no session: no MLflow experiment)."""
    from kedro.io import DataCatalog

    entry = {"retrain_status": dict(project.loader["catalog"]["retrain_status"])}
    entry["retrain_status"]["filepath"] = project.dataset_path("retrain_status")
    DataCatalog.from_config(entry).save("retrain_status", status)


def _parse_params(text: str | None) -> dict[str, Any]:
    """``"a.b=1,c=[x,y]"`` -> ``{"a": {"b": 1}, "c": ["x", "y"]}`` (YAML values), like ``kedro run --params``."""
    if not text:
        return {}
    items, depth, current = [], 0, ""
    for char in text:  # split on the commas outside brackets
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items = [item.strip() for item in [*items, current] if item.strip()]
    bad = [item for item in items if "=" not in item]
    if bad:
        raise SystemExit(f"--params takes key=value pairs separated by commas; got {bad}.")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items), resolve=True)  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (1 when a screen was invalid or failed)."""
    parser = argparse.ArgumentParser(
        prog="python -m perturbscope.ops.retrain",
        description="Retrain the registered screens whose file is new or changed; register the "
        "models in MLflow, compare them with the champion and promote the better ones.",
    )
    parser.add_argument("--screens", nargs="+", help="registered screens (default: all with retrain: true)")
    parser.add_argument("--env", "-e", default=None, help="Kedro environment (default: local)")
    parser.add_argument("--project-path", default=None, help="the Kedro project (default: the current one)")
    parser.add_argument("--force", action="store_true", help="retrain even if the file did not change")
    parser.add_argument("--dry-run", action="store_true", help="hash and check the files only")
    parser.add_argument("--params", default=None, help="runtime parameters, e.g. 'retrain.preflight_cells=500'")
    parser.add_argument(
        "--plan",
        action="store_true",
        help="check the files only and print, as the last line, the JSON list of the screens a "
        "retrain would run: new or changed files, and invalid ones (so that their task fails)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the retrain_status rows as one JSON list on the last line (Airflow's XCom)",
    )
    args = parser.parse_args(argv)
    status = retrain(
        args.screens,
        env=args.env,
        project_path=args.project_path,
        force=args.force,
        dry_run=args.dry_run or args.plan,
        extra_params=_parse_params(args.params),
    )
    if args.plan:
        planned = status.loc[status["status"].isin(PLANNED), "screen"].astype(str).tolist()
        print(json.dumps(planned), flush=True)
        return 0
    if args.json:
        print(status.astype(object).where(status.notna(), None).to_json(orient="records"), flush=True)
    return 1 if status["status"].isin(FAILED).any() else 0


if __name__ == "__main__":
    sys.exit(main())
