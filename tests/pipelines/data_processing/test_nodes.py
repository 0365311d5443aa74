from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbscope.blocks import BlockScreen
from perturbscope.pipelines.data_processing import nodes
from perturbscope.schema import ScreenSchema, ScreenValidationError, parse_perturbation
from tests.conftest import PROJECT

SCHEMA = {"perturbation_key": "guide", "control_labels": ["non-targeting", "ctrl"]}
QC = {"min_genes_per_cell": 1, "min_cells_per_gene": 1, "max_mito_fraction": 0.2, "mito_prefix": "MT-"}


def _screen(n_obs: int = 60, n_vars: int = 30, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    counts = rng.negative_binomial(2, 0.3, size=(n_obs, n_vars)).astype(np.float32)
    guides = np.array(["non-targeting", "KLF1", "KLF1+CEBPA", "CEBPA+ctrl"])[np.arange(n_obs) % 4]
    return ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"guide": guides, "lane": "L1"}, index=[f"c{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"G{j}" for j in range(n_vars)]),
    )


def _assert_same(a: ad.AnnData | BlockScreen, b: ad.AnnData | BlockScreen) -> None:
    a, b = (x.to_memory() if isinstance(x, BlockScreen) else x for x in (a, b))
    assert a.shape == b.shape
    assert (sp.csr_matrix(a.X) != sp.csr_matrix(b.X)).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert set(a.layers) == set(b.layers)


# ------------------------------------------------------------------ bad input
def test_missing_perturbation_column_lists_columns() -> None:
    with pytest.raises(ScreenValidationError, match=r"no obs column 'gene'.*\['guide', 'lane'\]"):
        nodes.validate_screen(_screen(), {**SCHEMA, "perturbation_key": "gene"}, "s")


def test_no_control_cells_lists_labels_present() -> None:
    with pytest.raises(ScreenValidationError, match=r"No cell matches.*'KLF1' \(15\)"):
        nodes.validate_screen(_screen(), {**SCHEMA, "control_labels": ["NTC"]}, "s")


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1.0, "negative"), (0.5, "non-integer"), (np.nan, "NaN"), (np.inf, "infinite")],
)
def test_bad_counts(value: float, message: str) -> None:
    screen = _screen()
    dense = screen.X.toarray()
    dense[3, 4] = value
    screen.X = sp.csr_matrix(dense)
    with pytest.raises(ScreenValidationError, match=message):
        nodes.validate_screen(screen, SCHEMA, "s")


def test_bad_counts_in_dense_layer() -> None:
    screen = _screen()
    screen.layers["raw"] = screen.X.toarray() + 0.25
    with pytest.raises(ScreenValidationError, match=r"layers\['raw'\].*non-integer"):
        nodes.validate_screen(screen, {**SCHEMA, "counts_layer": "raw"}, "s")


def test_missing_counts_layer_lists_layers() -> None:
    with pytest.raises(ScreenValidationError, match=r"schema\.counts_layer: .*no layer 'raw' \(layers: \[\]\)"):
        nodes.validate_screen(_screen(), {**SCHEMA, "counts_layer": "raw"}, "s")


@pytest.mark.parametrize("axis", ["obs", "var"])
def test_duplicate_names(axis: str) -> None:
    screen = _screen()
    names = list(getattr(screen, f"{axis}_names"))
    names[1] = names[0]
    setattr(screen, f"{axis}_names", names)
    what = "cell" if axis == "obs" else "gene"
    with pytest.raises(ScreenValidationError, match=rf"1 duplicate {what} name\(s\), e.g. {names[0]}"):
        nodes.validate_screen(screen, SCHEMA, "s")


def test_missing_labels_are_reported() -> None:
    screen = _screen()
    screen.obs.loc["c5", "guide"] = None
    with pytest.raises(ScreenValidationError, match=r"1 cell\(s\) have no label.*c5"):
        nodes.validate_screen(screen, SCHEMA, "s")


def test_unknown_optional_column() -> None:
    with pytest.raises(ScreenValidationError, match=r"schema.batch_key is 'batch'"):
        nodes.validate_screen(_screen(), {**SCHEMA, "batch_key": "batch"}, "s")


def test_empty_after_qc_names_thresholds() -> None:
    validated = nodes.validate_screen(_screen(), SCHEMA, "s")
    with pytest.raises(ScreenValidationError, match=r"empty after QC.*min_genes_per_cell=1000"):
        nodes.quality_control(validated, {**QC, "min_genes_per_cell": 1000})


# ------------------------------------------------------------------ behaviour
def test_validate_standardises_labels_and_counts() -> None:
    screen = _screen()
    screen.X = screen.X.toarray()  # dense input becomes CSR
    out = nodes.validate_screen(screen, SCHEMA, "s")
    assert isinstance(out, BlockScreen) and not out.on_disk
    counts = out.to_memory().X
    assert sp.isspmatrix_csr(counts) and counts.dtype == np.float32
    assert set(out.obs["perturbation"]) == {"control", "KLF1", "KLF1+CEBPA", "CEBPA+ctrl"}
    assert out.uns["perturbscope"]["screen"] == "s"


def test_qc_removes_mito_heavy_cells_and_records_steps() -> None:
    screen = _screen()
    screen.var_names = ["MT-CO1"] + list(screen.var_names[1:])
    dense = screen.X.toarray()
    dense[:5, 0] = 10_000  # five cells almost entirely mitochondrial
    screen.X = sp.csr_matrix(dense)
    validated = nodes.validate_screen(screen, SCHEMA, "s")
    out, table = nodes.quality_control(validated, QC)
    assert out.n_obs == screen.n_obs - 5
    mito_row = table[table["step"].str.startswith("max_mito_fraction")].iloc[0]
    assert mito_row["cells_removed"] == 5
    assert table["cells_left"].iloc[-1] == out.n_obs


def test_normalise_keeps_counts_layer() -> None:
    validated = nodes.validate_screen(_screen(), SCHEMA, "s")
    out = nodes.normalise(validated, {"target_sum": 1e4}).to_memory()
    raw = validated.to_memory().X
    assert (out.layers["counts"] != raw).nnz == 0
    expected = np.log1p(raw.toarray() / raw.toarray().sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(out.X.toarray(), expected, rtol=1e-5)


def test_hvg_keeps_all_genes_when_fewer_than_n_top() -> None:
    validated = nodes.validate_screen(_screen(), SCHEMA, "s")
    normalised = nodes.normalise(validated, {"target_sum": 1e4})
    out = nodes.select_highly_variable_genes(normalised, {"n_top_genes": 100})
    assert out.n_vars == normalised.n_vars and out.var["highly_variable"].all()
    fewer = nodes.select_highly_variable_genes(normalised, {"n_top_genes": 10})
    assert fewer.n_vars == 10 and "counts" in fewer.layers


def test_cell_cycle_unknown_when_genes_missing(caplog: pytest.LogCaptureFixture) -> None:
    validated = nodes.validate_screen(_screen(), SCHEMA, "s")
    out = nodes.score_cell_cycle(nodes.normalise(validated, {"target_sum": 1e4}), {"min_genes_per_phase": 5})
    assert set(out.obs["phase"]) == {"unknown"}
    assert out.obs["S_score"].isna().all()
    assert "cell-cycle phase is marked 'unknown'" in caplog.text


def test_labels_and_split() -> None:
    validated = nodes.validate_screen(_screen(n_obs=200), SCHEMA, "s")
    out = nodes.label_cells(validated, SCHEMA, {"validation_fraction": 0.2}, seed=3)
    obs = out.obs
    assert obs.loc[obs["perturbation"] == "CEBPA+ctrl", "n_perturbed_genes"].eq(1).all()
    assert obs.loc[obs["perturbation"] == "KLF1+CEBPA", "perturbed_genes"].eq("CEBPA+KLF1").all()
    assert obs.loc[obs["is_control"], "n_perturbed_genes"].eq(0).all()
    shares = obs.groupby("perturbation", observed=True)["split"].apply(lambda s: (s == "validation").mean())
    np.testing.assert_allclose(shares.to_numpy(), 0.2)
    again = nodes.label_cells(validated, SCHEMA, {"validation_fraction": 0.2}, seed=3)
    assert (again.obs["split"] == obs["split"]).all()
    other = nodes.label_cells(validated, SCHEMA, {"validation_fraction": 0.2}, seed=4)
    assert (other.obs["split"] != obs["split"]).any()


def test_nodes_do_not_mutate_inputs() -> None:
    screen = _screen()
    before = screen.copy()
    validated = nodes.validate_screen(screen, SCHEMA, "s")
    _assert_same(screen, before)
    for step in (
        lambda a: nodes.quality_control(a, QC)[0],
        lambda a: nodes.normalise(a, {"target_sum": 1e4}),
    ):
        snapshot = validated.copy()
        result = step(validated)
        _assert_same(validated, snapshot)
        validated = result
    snapshot = validated.copy()
    nodes.score_cell_cycle(validated, {"min_genes_per_phase": 5})
    nodes.select_highly_variable_genes(validated, {"n_top_genes": 10})
    nodes.label_cells(validated, SCHEMA, {"validation_fraction": 0.1}, seed=0)
    _assert_same(validated, snapshot)


def test_parse_perturbation() -> None:
    assert parse_perturbation("B+A") == ("A", "B")
    assert parse_perturbation("KLF1+ctrl", "+", ["ctrl"]) == ("KLF1",)
    assert parse_perturbation("control") == ()
    assert ScreenSchema.from_params({"control_labels": "NTC"}).is_control_label("ntc")
    with pytest.raises(ScreenValidationError, match="Unknown schema parameter"):
        ScreenSchema.from_params({"perturbation_column": "x"})


def test_plain_count_matrix_without_perturbations() -> None:
    """The 10x PBMC 1k counts (no perturbation column) process with perturbation_key null."""
    from tests.conftest import PROJECT

    pbmc = ad.read_h5ad(PROJECT / "tests" / "data" / "pbmc1k_v3.h5ad")
    schema = {"perturbation_key": None, "control_labels": ["control"]}
    validated = nodes.validate_screen(pbmc, schema, "pbmc")
    assert set(validated.obs["perturbation"]) == {"unperturbed"}
    qc, table = nodes.quality_control(
        validated, {"min_genes_per_cell": 200, "min_cells_per_gene": 3, "max_mito_fraction": 0.2}
    )
    assert table.loc[table["step"] == "max_mito_fraction=0.2", "cells_removed"].iloc[0] > 0
    phased = nodes.score_cell_cycle(nodes.normalise(qc, {"target_sum": 1e4}), {"min_genes_per_phase": 5})
    assert {"G1", "S", "G2M"} >= set(phased.obs["phase"]) and phased.obs["S_score"].notna().all()
    hvg = nodes.select_highly_variable_genes(phased, {"n_top_genes": 500})
    out = nodes.label_cells(hvg, schema, {"validation_fraction": 0.1}, seed=0)
    assert out.n_vars == 500 and not out.obs["is_control"].any()
    assert out.obs["n_perturbed_genes"].eq(0).all()


def test_cell_cycle_phase_recovers_simulated_truth() -> None:
    """On a simulated screen with the real Tirosh genes, called phases match the truth."""
    from perturbscope.simulation import simulate_screen

    screen = simulate_screen(n_cells=1500, n_genes=1000, seed=1)
    schema = {"perturbation_key": "perturbation", "control_labels": ["control"]}
    normalised = nodes.normalise(nodes.validate_screen(screen, schema, "sim"), {"target_sum": 1e4})
    out = nodes.score_cell_cycle(normalised, {"min_genes_per_phase": 5})
    assert (out.obs["phase_original"] == screen.obs["phase"]).all()
    agreement = (out.obs["phase"].astype(str) == out.obs["phase_original"].astype(str)).mean()
    assert agreement > 0.7, agreement
    assert out.uns["perturbscope"]["cell_cycle_genes_used"] == {"S": 43, "G2M": 54}


# ------------------------------------------------------------- degenerate screens
def test_empty_label_is_rejected_with_the_cells() -> None:
    screen = _screen()
    screen.obs["guide"] = screen.obs["guide"].astype(str)
    screen.obs.loc[["c1", "c5"], "guide"] = ["", "  "]
    with pytest.raises(ScreenValidationError, match=r"2 cell\(s\) have an empty label in obs\['guide'\].*'c1', 'c5'"):
        nodes.validate_screen(screen, SCHEMA, "s")


def test_qc_step_removing_most_cells_names_step_and_threshold() -> None:
    """The demo screen cut to 50 genes: min_genes_per_cell=5 removes almost every cell."""
    demo = ad.read_h5ad(PROJECT / "data" / "01_raw" / "norman2019_subset.h5ad")
    narrow = demo[:, demo.var_names[:50]].copy()
    validated = nodes.validate_screen(narrow, {"perturbation_key": "perturbation", "control_labels": ["control"]}, "d")
    with pytest.raises(ScreenValidationError) as err:
        nodes.quality_control(validated, {**QC, "min_genes_per_cell": 5})
    message = str(err.value)
    assert "data_processing.qc.min_genes_per_cell=5" in message
    assert "max_fraction_removed_per_step=0.5" in message
    assert f"of {narrow.n_obs:,} cells" in message


def test_too_few_cells_or_genes_left_after_qc() -> None:
    validated = nodes.validate_screen(_screen(), SCHEMA, "s")
    with pytest.raises(ScreenValidationError, match=r"Only 60 cells x 30 genes.*min_cells_after_qc=100"):
        nodes.quality_control(validated, {**QC, "min_cells_after_qc": 100})
    with pytest.raises(ScreenValidationError, match=r"fewer than data_processing.qc.min_genes_after_qc=40"):
        nodes.quality_control(validated, {**QC, "min_genes_after_qc": 40})


def test_thin_perturbations_are_dropped_and_listed(caplog: pytest.LogCaptureFixture) -> None:
    screen = _screen(n_obs=80)
    screen.obs["guide"] = screen.obs["guide"].astype(str)
    screen.obs.loc["c1", "guide"] = "LONELY"  # a perturbation with one cell
    validated = nodes.validate_screen(screen, SCHEMA, "s")
    with caplog.at_level("WARNING"):
        out, table = nodes.quality_control(validated, {**QC, "min_cells_per_perturbation": 10})
    assert "LONELY" not in set(out.obs["perturbation"].astype(str)) and out.n_obs == 79
    assert "LONELY (1)" in caplog.text and "min_cells_per_perturbation" in caplog.text
    row = table[table["step"] == "min_cells_per_perturbation=10"].iloc[0]
    assert row["cells_removed"] == 1 and row["perturbations_dropped"] == "LONELY"
    processed = nodes.label_cells(out, SCHEMA, {"validation_fraction": 0.1}, seed=0)
    summary, _ = nodes.summarise_screen(nodes.count_cells_per_perturbation(validated), processed, table)
    lonely = summary.set_index("perturbation").loc["LONELY"]
    assert lonely["cells_kept"] == 0 and lonely["note"].startswith("dropped")
    # controls are never dropped, and a screen whose every perturbation is thin is an error
    with pytest.raises(ScreenValidationError, match="Every perturbation has fewer than"):
        nodes.quality_control(validated, {**QC, "min_cells_per_perturbation": 1000})
