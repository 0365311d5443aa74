"""One default per setting: conf/base names what a user tunes, and each value equals the default of the
function it goes to (its signature, a model class's training defaults, TrainConfig's), unless its line
says why not; the README's train-outside-Kedro example trains the same model as `kedro run`."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kedro.config import OmegaConfigLoader

from perturbscope import guides
from perturbscope.models import ConditionalVAE, ContrastiveVAE, LinearVAE, TrainConfig
from perturbscope.models.model import CVAE, LDVAE, ContrastiveVI, call_escapers, fit_escapers
from perturbscope.pipelines.contrastive_model import evaluation as contrastive_evaluation
from perturbscope.pipelines.contrastive_model import nodes as contrastive
from perturbscope.pipelines.contrastive_model import tables as contrastive_tables
from perturbscope.pipelines.data_processing import guide_calling, qc
from perturbscope.pipelines.data_processing import nodes as processing
from perturbscope.pipelines.linear_model import effects as linear_effects
from perturbscope.pipelines.linear_model import figures as linear_figures
from perturbscope.pipelines.linear_model import nodes as linear
from perturbscope.pipelines.perturbation_effects import de, effect_tests
from perturbscope.pipelines.perturbation_effects import figures as effect_figures
from perturbscope.pipelines.perturbation_effects import interactions as effect_interactions
from perturbscope.pipelines.perturbation_effects import profiles as effect_profiles
from perturbscope.pipelines.perturbation_prediction import evaluation as prediction_evaluation
from perturbscope.pipelines.perturbation_prediction import figures as prediction_figures
from perturbscope.pipelines.perturbation_prediction import nodes as prediction
from perturbscope.pipelines.perturbation_prediction import splits
from perturbscope.settings import CONFIG_LOADER_ARGS
from tests.conftest import PROJECT

CONF = PROJECT / "conf" / "base"
DIFFERS = "differs from the code default:"
"""What a conf/base line must say (and why) when its value is not the code's default."""

# conf section -> the function whose keyword arguments the block is (the signature owns the defaults)
SIGNATURES: dict[str, Callable[..., Any]] = {
    "contrastive_model.model": ContrastiveVAE.__init__,
    "contrastive_model.embedding": contrastive_tables.embed_with_baseline,
    "contrastive_model.escape.mixture": fit_escapers,
    "contrastive_model.evaluation": contrastive_evaluation.evaluate_spaces,
    "contrastive_model.salient_expression": contrastive_tables.salient_gene_table,
    "data_processing.guides": guide_calling.call_guides,
    "data_processing.qc": qc.quality_control,
    "data_processing.normalisation": processing._normalise,
    "data_processing.cell_cycle": processing._cell_cycle,
    "data_processing.hvg": processing._hvg,
    "data_processing.split": processing._split,
    "linear_model.model": LinearVAE.__init__,
    "linear_model.embedding": LDVAE.embed,
    "linear_model.effects": linear_effects.factor_effects,
    "linear_model.figure": linear_figures.plot_factor_effects,
    "perturbation_effects.effect_test": effect_tests.effect_tests,
    "perturbation_effects.figure": effect_figures.effect_tests_figure,
    "perturbation_effects.knockdown": guides.knockdown_table,
    "perturbation_effects.map.profiles": effect_profiles.perturbation_profiles,
    "perturbation_effects.map.similarity": effect_profiles.similarity_table,
    "perturbation_effects.map.clusters": effect_profiles.cluster_perturbations,
    "perturbation_effects.map.programs": effect_profiles.cluster_programs,
    "perturbation_effects.map.enrichment": effect_profiles.enrichment,
    "perturbation_effects.map.figure": effect_figures.perturbation_map_figures,
    "perturbation_effects.genetic_interactions": effect_interactions.genetic_interactions,
    "perturbation_effects.knockdown_figure": effect_figures.knockdown_figure,
    "perturbation_effects.differential_expression": de.differential_expression,
    "perturbation_effects.salient_agreement": de.salient_agreement,
    "perturbation_prediction.model": ConditionalVAE.__init__,
    "perturbation_prediction.splits.held_out_cells": splits.make_split,
    "perturbation_prediction.splits.held_out_perturbations": splits.make_split,
    "perturbation_prediction.generation": prediction.generation_settings,
    "perturbation_prediction.evaluation": prediction_evaluation.score_split,
    "perturbation_prediction.figures": prediction_figures.perturbation_figures,
    "perturbation_prediction.summary_figure": prediction_figures.summary_figure,
}
# single values -> (function, argument)
VALUES: dict[str, tuple[Callable[..., Any], str]] = {
    "contrastive_model.escape.call_threshold": (call_escapers, "call_threshold"),
    "linear_model.factors.rotation": (LDVAE.fit, "rotation"),
    "linear_model.factors.n_top_genes": (linear.top_genes_per_factor, "n_top_genes"),
}
# each model's training block over the shared one -> the model class that owns the defaults
TRAINING = {"contrastive_model": ContrastiveVI, "linear_model": LDVAE, "perturbation_prediction": CVAE}
# owned by the conf alone (no function has a default for them), or not a knob of a function
CONF_ONLY = (
    "screen",
    "seed",
    "schema",
    "reporting",
    "retrain",
    "contrastive_model.escape.enabled",
    "perturbation_prediction.splits.held_out_cells.kind",
    "perturbation_prediction.splits.held_out_perturbations.kind",
    "perturbation_prediction.expression_pca.n_pcs",
)


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    return OmegaConfigLoader(conf_source=str(PROJECT / "conf"), env="base", **CONFIG_LOADER_ARGS)["parameters"]


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_leaves(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _default(fn: Callable[..., Any], name: str) -> Any:
    parameter = inspect.signature(fn).parameters.get(name)
    assert parameter is not None, f"{fn.__qualname__} takes no argument {name!r}"
    return parameter.default


def _same(conf: Any, code: Any) -> bool:
    if isinstance(conf, list | tuple) and isinstance(code, list | tuple):
        return list(conf) == list(code)
    if isinstance(conf, bool) or isinstance(code, bool):
        return conf is code
    return conf == code


def _explained(key: str) -> bool:
    """Whether the conf/base line of ``key`` says why it differs from the code default."""
    name = key.split(".")[-1]
    for path in sorted(Path(CONF).glob("parameters*.yml")):
        for line in path.read_text().splitlines():
            if re.match(rf"\s*{re.escape(name)}:", line) and DIFFERS in line:
                return True
    return False


def test_every_conf_value_is_its_functions_default(params: dict[str, Any]) -> None:
    mismatches = []
    for section, fn in SIGNATURES.items():
        for key, value in _leaves(_get(params, section)).items():
            name = key.split(".")[0]
            default = _default(fn, name)
            if default is inspect.Parameter.empty:
                continue  # required (e.g. a split's kind): the conf is its only owner
            if not _same(value, default) and not _explained(f"{section}.{name}"):
                mismatches.append(f"{section}.{name}: conf {value!r}, {fn.__qualname__} default {default!r}")
    for key, (fn, name) in VALUES.items():
        value, default = _get(params, key), _default(fn, name)
        if not _same(value, default) and not _explained(key):
            mismatches.append(f"{key}: conf {value!r}, {fn.__qualname__} default {default!r}")
    assert not mismatches, "conf/base and the code disagree (or say why on the line):\n" + "\n".join(mismatches)


def test_every_training_block_gives_the_model_class_defaults(params: dict[str, Any]) -> None:
    shared = params["training"]
    assert TrainConfig.from_mapping(shared) == TrainConfig(), "the shared block must hold TrainConfig's defaults"
    for section, api in TRAINING.items():
        conf = api.train_config({**shared, **params[section]["training"]})
        assert conf == api.train_config(), f"{section}.training: {conf} != {api.train_config()}"


def test_every_conf_knob_has_an_owner(params: dict[str, Any]) -> None:
    owned = set(SIGNATURES) | set(VALUES) | {"training"} | {f"{s}.training" for s in TRAINING}
    orphans = [
        key for key in _leaves(params) if not any(key == o or key.startswith(f"{o}.") for o in (*owned, *CONF_ONLY))
    ]
    assert not orphans, f"conf/base knobs no test ties to a code default: {orphans}"


def test_unknown_keys_are_refused_naming_them(params: dict[str, Any]) -> None:
    from perturbscope.parameters import ConfigError, options

    with pytest.raises(ConfigError, match=r"Unknown parameter\(s\) data_processing\.qc\.min_gene_per_cell"):
        options(qc.quality_control, {"min_gene_per_cell": 3}, "data_processing.qc", exclude={"screen"})


def test_the_python_example_trains_the_same_model_as_kedro_run(params: dict[str, Any]) -> None:
    """README: ``ContrastiveVI.fit(processed_screen, seed=0)`` is the model `kedro run` trains (the same weights
    at one seed; a short epoch budget in both)."""
    from tests.pipelines.contrastive_model.conftest import simulated

    _, screen = simulated(n_cells=600, n_genes=150, seed=3)
    short = {"max_epochs": 2, "progress": False, "device": "cpu"}
    node_model, _ = contrastive.train_contrastive_model(
        screen,
        params["contrastive_model"]["model"],
        {**params["contrastive_model"]["training"], **short},
        params["training"],
        {"batch_key": None},
        params["seed"],
    )
    python_model = ContrastiveVI.fit(screen, training=short, seed=0).module
    assert node_model.hparams == python_model.hparams
    for name, value in node_model.state_dict().items():
        assert torch.equal(value, python_model.state_dict()[name]), name
    np.testing.assert_array_equal(
        ContrastiveVI(node_model).embed(screen).obsm["X_salient"],
        ContrastiveVI(python_model).embed(screen).obsm["X_salient"],
    )
