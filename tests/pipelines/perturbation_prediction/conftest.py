"""Simulated screens with planted effects, processed by the data_processing nodes."""

from __future__ import annotations

import anndata as ad
import pytest

from perturbscope.pipelines.data_processing import nodes as dp
from perturbscope.simulation import simulate_screen

SCHEMA = {"perturbation_key": "perturbation", "control_labels": ["control"], "double_separator": "+"}
QC = {"min_genes_per_cell": 5, "min_cells_per_gene": 3, "max_mito_fraction": 0.2, "mito_prefix": "MT-"}


def process(raw: ad.AnnData) -> ad.AnnData:
    """The data_processing nodes, in pipeline order (validation split 10 %, seed 0)."""
    screen = dp.validate_screen(raw, SCHEMA, "simulated")
    screen, _ = dp.quality_control(screen, QC)
    screen = dp.normalise(screen, {"target_sum": 10000})
    screen = dp.score_cell_cycle(screen, {"min_genes_per_phase": 5, "n_bins": 25}, seed=0)
    screen = dp.select_highly_variable_genes(screen, {"n_top_genes": 2000})
    return dp.label_cells(screen, SCHEMA, {"validation_fraction": 0.1}, seed=0).to_memory()


@pytest.fixture(scope="session")
def simulated_screen() -> ad.AnnData:
    """3 programs x 2 single perturbations + 1 null; 3 exactly additive doubles (no interaction).

    Every perturbed cell responds (penetrance 1) so that held-out truths of ~60 cells are
    informative; a library of ~3,000 UMIs over 150 genes.
    """
    raw = simulate_screen(
        n_cells=2700,
        n_genes=150,
        n_programs=3,
        perturbations_per_program=2,
        n_null_perturbations=1,
        n_doubles=3,
        interaction_scale=0.0,
        genes_per_program=15,
        n_heterogeneity_genes=10,
        penetrance=1.0,
        library_size_median=3000,
        control_fraction=0.2,
        seed=3,
    )
    return process(raw)
