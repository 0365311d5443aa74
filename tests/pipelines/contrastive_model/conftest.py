"""Small simulated screens (known programs and phases) and a model trained on one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbscope.models import ContrastiveVAE
from perturbscope.pipelines.contrastive_model import nodes
from perturbscope.pipelines.data_processing import nodes as dp
from perturbscope.simulation import simulate_screen

SCHEMA = {"perturbation_key": "perturbation", "control_labels": ["control"], "program_key": "program"}
MODEL: dict[str, Any] = {}  # the defaults (ContrastiveVAE's signature, what `kedro run` trains)
# ContrastiveVI's training defaults except a smaller epoch budget (tests run on a shared 2-core CPU).
# One torch thread: on a shared 2-core machine oversubscribed threads make training ~10x slower.
TRAINING = {"max_epochs": 80, "kl_warmup_epochs": 30, "progress": False, "device": "cpu", "num_threads": 1}
EVALUATION = {"annotation_key": "program_responded", "confounders": ["phase_original"]}
ESCAPE = {"enabled": True, "mixture": {}, "call_threshold": 0.5}


def process(raw: ad.AnnData) -> ad.AnnData:
    """The data_processing nodes on a simulated screen (its true phase ends up in ``phase_original``)."""
    screen = dp.validate_screen(raw, SCHEMA, "simulated")
    screen, _ = dp.quality_control(
        screen, {"min_genes_per_cell": 5, "min_cells_per_gene": 3, "max_mito_fraction": 0.2, "mito_prefix": "MT-"}
    )
    screen = dp.normalise(screen, {"target_sum": 10000})
    screen = dp.score_cell_cycle(screen, {"min_genes_per_phase": 5, "n_bins": 25}, seed=0)
    screen = dp.select_highly_variable_genes(screen, {"n_top_genes": 2000, "span": 0.3})
    screen = dp.label_cells(screen, SCHEMA, {"validation_fraction": 0.1}, seed=0).to_memory()
    # ground truth for the evaluation: the program of cells that responded to their perturbation
    responded = screen.obs["responded"].to_numpy().astype(bool)
    screen.obs["program_responded"] = pd.Categorical(np.where(responded, screen.obs["program"].astype(str), "none"))
    return screen


def simulated(**overrides: Any) -> tuple[ad.AnnData, ad.AnnData]:
    """(raw, processed) screen whose programs are detectable but hidden behind a strong cell cycle in PCA."""
    config = dict(
        n_cells=1500,
        n_genes=300,
        n_programs=3,
        perturbations_per_program=2,
        n_null_perturbations=1,
        cell_cycle_strength=2.0,
        high_expression_share=0.6,
        seed=2,
    )
    config.update(overrides)
    raw = simulate_screen(**config)
    return raw, process(raw)


@dataclass
class Trained:
    screen: ad.AnnData
    model: ContrastiveVAE
    history: pd.DataFrame
    embedded: ad.AnnData
    mixture: dict[str, Any]
    calls: pd.DataFrame
    evaluation: pd.DataFrame


def train_and_evaluate(screen: ad.AnnData, training: dict[str, Any] | None = None) -> Trained:
    model, history = nodes.train_contrastive_model(screen, MODEL, {**TRAINING, **(training or {})}, {}, SCHEMA, 0)
    _, embedded = nodes.embed_cells(screen, model, {"umap": False}, 0)  # the embeddings the pipeline passes on
    mixture = nodes.fit_escape_mixture(embedded, ESCAPE, 0)
    calls = nodes.call_perturbed_cells(embedded, mixture, ESCAPE)
    evaluation = nodes.evaluate_embeddings(embedded, calls, EVALUATION, SCHEMA, 0)
    return Trained(screen, model, history, embedded, mixture, calls, evaluation)


@pytest.fixture(scope="session")
def sim_pair() -> tuple[ad.AnnData, ad.AnnData]:
    return simulated()


@pytest.fixture(scope="session")
def sim_screen(sim_pair: tuple[ad.AnnData, ad.AnnData]) -> ad.AnnData:
    return sim_pair[1]


@pytest.fixture(scope="session")
def trained(sim_screen: ad.AnnData) -> Trained:
    return train_and_evaluate(sim_screen)
