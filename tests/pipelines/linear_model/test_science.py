"""The science on a simulated screen: factors recover the planted programs, and the programs' perturbations move them.

The screen comes from ``perturbscope.simulation.simulate_screen`` (ground truth in
``var["program"]``, ``obs["program"]`` and ``obs["responded"]``) and goes through the
data_processing nodes, then the linear_model nodes with the shipped parameters. A
program's factor must recover its genes about as well as an oracle that knows which
cells responded (top genes of responders minus controls). Overlaps are printed (run
with ``-s`` to see them).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml

from perturbscope.pipelines.data_processing import nodes as dp
from perturbscope.pipelines.linear_model import nodes
from perturbscope.simulation import simulate_screen
from tests.conftest import PROJECT

SCHEMA = {
    "perturbation_key": "perturbation",
    "control_labels": ["control"],
    "counts_layer": None,
    "program_key": "program",
    "batch_key": None,
    "double_separator": "+",
}
# the shipped defaults (conf/base/parameters_linear_model.yml over the shared `training` of parameters.yml)
PARAMS = yaml.safe_load((PROJECT / "conf" / "base" / "parameters_linear_model.yml").read_text())["linear_model"]
SHARED_TRAINING = yaml.safe_load((PROJECT / "conf" / "base" / "parameters.yml").read_text())["training"]
MODEL = PARAMS["model"]
TRAINING = {**PARAMS["training"], "progress": False, "device": "cpu"}
FACTORS, EFFECTS = PARAMS["factors"], PARAMS["effects"]


def _processed_simulation(seed: int) -> tuple[pd.DataFrame, object]:
    sim = simulate_screen(
        n_cells=2000,
        n_genes=600,
        n_programs=3,
        genes_per_program=20,
        n_heterogeneity_genes=20,
        library_size_median=6000.0,
        seed=seed,
    )
    truth = sim.var["program"].astype(str).copy()
    screen = dp.validate_screen(sim, SCHEMA, "simulated")
    screen, _ = dp.quality_control(screen, {"min_genes_per_cell": 5, "min_cells_per_gene": 3, "max_mito_fraction": 0.2})
    screen = dp.normalise(screen, {"target_sum": 10000})
    screen = dp.select_highly_variable_genes(screen, {"n_top_genes": 2000}, None)
    screen = dp.label_cells(screen, SCHEMA, {"validation_fraction": 0.1}, seed=0).to_memory()
    return truth.reindex(screen.var_names), screen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factors_recover_programs_and_their_perturbations_move_them(seed: int) -> None:
    truth, screen = _processed_simulation(seed)
    model, _ = nodes.train_linear_model(screen, MODEL, TRAINING, SHARED_TRAINING, FACTORS["rotation"], SCHEMA, 0)
    embedded = nodes.embed_cells(screen, model, {})
    loadings = nodes.factor_loadings(model).set_index("gene")
    top = nodes.top_genes_per_factor(loadings.reset_index(), FACTORS["n_top_genes"])
    effects = nodes.factor_perturbation_effects(embedded, top, EFFECTS, SCHEMA)

    report, recovered = [], []
    for program in sorted(p for p in truth.unique() if p.startswith("program")):
        genes = set(truth.index[truth == program])
        n = len(genes)
        # a factor's top genes: its n strongest loadings of either sign
        overlaps = {f: len(set(loadings[f].abs().nlargest(n).index) & genes) / n for f in loadings.columns}
        factor = max(overlaps, key=overlaps.get)
        rows = effects[(effects["program"] == program) & (effects["factor"] == factor)]
        report.append(
            f"{program}: {factor} top-{n} overlap {overlaps[factor]:.2f}; effects "
            + ", ".join(
                f"{r.perturbation} {r.effect:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]" for r in rows.itertuples()
            )
        )
        # the oracle: the top genes of the mean difference between the program's responding cells and the
        # controls (log-normalised X), which needs the ground truth the model never sees
        responders = (screen.obs["program"] == program).to_numpy() & screen.obs["responded"].to_numpy(bool)
        controls = screen.obs["is_control"].to_numpy(bool)
        diff = np.asarray(screen.X[responders].mean(0)).ravel() - np.asarray(screen.X[controls].mean(0)).ravel()
        oracle = len(set(screen.var_names[np.argsort(-np.abs(diff))[:n]]) & genes) / n
        report[-1] += f" (oracle {oracle:.2f})"
        # in genes: at least 40 % of the program, and at most 15 % of it fewer than the oracle
        # (compared as counts: 0.55 - 0.1 is 0.45000000000000007 in floating point). Per program
        # this is a floor: the training path differs by CPU (float kernels by instruction set), and
        # on a CPU without AVX512-BF16 seed 1 spreads program_3 over two factors (8 of 20 genes in
        # its best one, oracle 11) while its three perturbations still move it significantly.
        hits, oracle_hits = round(overlaps[factor] * n), round(oracle * n)
        assert hits >= max(math.ceil(0.40 * n), oracle_hits - round(0.15 * n)), report[-1]
        recovered.append((hits, oracle_hits, n))
        # every perturbation of the program moves that factor: CI excludes 0, same direction, significant
        assert len(rows) == 3, report[-1]
        assert ((rows["ci_low"] > 0) | (rows["ci_high"] < 0)).all(), report[-1]
        assert rows["significant"].all() and rows["direction"].nunique() == 1, report[-1]
        # ... and its top genes are the ones the reading names
        assert len(set(rows.iloc[0]["genes_up"].split(", ") + rows.iloc[0]["genes_down"].split(", ")) & genes) >= 4
    # over the screen's programs: at least 45 % of their genes, and as many as the oracle less 10 %
    hits, oracle_hits, genes = (sum(column) for column in zip(*recovered))
    assert hits >= max(math.ceil(0.45 * genes), oracle_hits - round(0.1 * genes)), report
    # perturbations without an effect move no factor much
    null = effects[effects["program"] == "none"]
    assert (null["standardised_effect"].abs() < 0.5).all(), null.sort_values("q_value").head()
    print("\n" + "\n".join(report))
