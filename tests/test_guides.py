"""Guide calling and the knockdown check (perturbscope.guides), on simulated screens with known guides."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbscope import guides
from perturbscope.pipelines.data_processing import nodes as dp
from perturbscope.schema import ScreenValidationError
from perturbscope.simulation import simulate_screen, write_cellranger_h5

SCHEMA = {"control_labels": ["non-targeting"], "modality": "CRISPRi"}


@pytest.fixture(scope="module")
def screen() -> ad.AnnData:
    return simulate_screen(
        n_cells=6000,
        n_genes=600,
        n_programs=3,
        perturbations_per_program=3,
        n_null_perturbations=1,
        genes_per_program=20,
        guides_per_target=2,
        seed=3,
    )


def _called_sets(counts: sp.csr_matrix, names: np.ndarray, **kwargs) -> list[str]:
    mixtures = guides.fit_guide_mixtures(counts, names)
    called = guides.call_guides(counts, mixtures, names, **kwargs)
    return [
        ";".join(sorted(names[called.indices[called.indptr[i] : called.indptr[i + 1]]]))
        for i in range(len(counts.indptr) - 1)
    ]


def test_the_mixture_calls_the_guides_each_cell_carries(screen: ad.AnnData) -> None:
    counts, names = guides.guide_counts(screen), np.asarray(screen.uns["guides"]["guide"], dtype=object)
    called = np.asarray(_called_sets(counts, names))
    truth = screen.obs["true_guides"].to_numpy()
    sizes = np.array([len(s.split(";")) if s else 0 for s in called])
    right = called == truth
    assigned = sizes == 1
    assert right[assigned].mean() >= 0.98  # precision: the called guide is the true one
    assert right.mean() >= 0.92  # recall over every cell, multiplets included (both their guides)
    multiplet = screen.obs["true_multiplet"].to_numpy()
    assert (sizes[multiplet] >= 2).mean() >= 0.8  # most doublets show both guides
    # a global threshold that calls ambient UMIs: far less precise on the same counts
    naive = np.asarray(_called_sets(counts, names, probability=1e-9, min_umis=1))
    assert (naive == truth).mean() < right.mean() - 0.2


def test_labels_follow_the_design() -> None:
    table = pd.DataFrame({"guide": ["A-1", "A-2", "B-1", "NTC-1"], "target": ["A", "A", "B", "Non-Targeting"]})
    called = sp.csr_matrix(np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 0]], bool))
    singles = guides.label_cells(called, table, ["non-targeting"], max_per_cell=1)
    assert singles["label"].tolist() == ["A", "unassigned", "multiplet", "non-targeting", "multiplet"]
    assert singles["n_guides"].tolist() == [1, 0, 2, 1, 3]
    assert singles.loc[2, "guide_identity"] == "A-1;B-1"
    doubles = guides.label_cells(called, table, ["non-targeting"], max_per_cell=2)
    assert doubles["label"].tolist() == ["A", "unassigned", "A+B", "non-targeting", "multiplet"]


def test_cell_ranger_output_reads_as_genes_and_guides(screen: ad.AnnData, tmp_path: Path) -> None:
    path = write_cellranger_h5(screen, tmp_path / "filtered_feature_bc_matrix.h5", tmp_path / "feature_reference.csv")
    read = guides.read_screen(path)
    assert read.shape == screen.shape and (read.X != screen.X).nnz == 0
    assert list(read.uns["guides"]["target"]) == list(screen.uns["guides"]["target"])
    assert (guides.guide_counts(read) != screen.obsm["guide_counts"]).nnz == 0
    # the targets from the feature reference instead, the guides named by id
    with_reference = guides.read_screen(path, tmp_path / "feature_reference.csv")
    assert list(with_reference.uns["guides"]["target"]) == list(screen.uns["guides"]["target"])
    # pertpy's MuData layout
    import mudata as md

    crispr = ad.AnnData(
        screen.obsm["guide_counts"],
        obs=pd.DataFrame(index=screen.obs_names),
        var=pd.DataFrame({"target_gene_name": screen.uns["guides"]["target"]}, index=screen.uns["guides"]["guide"]),
    )
    gex = ad.AnnData(screen.X, obs=pd.DataFrame(index=screen.obs_names), var=pd.DataFrame(index=screen.var_names))
    md.MuData({"gex": gex, "crispr": crispr}).write(tmp_path / "screen.h5mu")
    mudata = guides.read_screen(tmp_path / "screen.h5mu")
    assert mudata.shape == screen.shape and list(mudata.uns["guides"]["guide"]) == list(screen.uns["guides"]["guide"])
    # an .h5ad with the guide counts as a table in obsm and a feature reference
    table = pd.DataFrame(
        screen.obsm["guide_counts"].toarray(), index=screen.obs_names, columns=screen.uns["guides"]["guide"]
    )
    plain = ad.AnnData(screen.X, obs=pd.DataFrame(index=screen.obs_names), var=pd.DataFrame(index=screen.var_names))
    plain.obsm["guide_counts"] = table
    plain.write_h5ad(tmp_path / "obsm.h5ad")
    from_obsm = guides.read_screen(tmp_path / "obsm.h5ad", tmp_path / "feature_reference.csv")
    assert (guides.guide_counts(from_obsm) != screen.obsm["guide_counts"]).nnz == 0


def test_bad_guide_input_names_the_problem(screen: ad.AnnData, tmp_path: Path) -> None:
    path = write_cellranger_h5(screen, tmp_path / "m.h5", tmp_path / "ref.csv")
    reference = pd.read_csv(tmp_path / "ref.csv")
    reference.iloc[:3].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(guides.GuideInputError, match=r"guide\(s\) of the counts are not in the feature reference"):
        guides.read_screen(path, tmp_path / "short.csv")
    no_target = reference.assign(target_gene_name="")
    no_target.to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(guides.GuideInputError, match="have no target"):
        guides.read_screen(path, tmp_path / "empty.csv")
    genes_only = ad.AnnData(screen.X, var=pd.DataFrame(index=screen.var_names))
    genes_only.obsm["guide_counts"] = screen.obsm["guide_counts"]
    with pytest.raises(guides.GuideInputError, match="without guide names"):
        guides.with_obsm_guides(genes_only)
    with pytest.raises(guides.GuideInputError, match=r"No guide targets a control label \['control'\]"):
        guides.check_guides(guides.guide_table(screen), ["control"])
    # a Cell Ranger file without guide features
    import h5py

    with h5py.File(path, "r+") as f:
        types = f["matrix/features/feature_type"][:]
        f["matrix/features/feature_type"][...] = np.where(types == b"CRISPR Guide Capture", b"Gene Expression", types)
    with pytest.raises(guides.GuideInputError, match="no 'CRISPR Guide Capture' features"):
        guides.read_screen(path)


def test_the_guide_node_labels_cells_and_drops_the_unassigned(screen: ad.AnnData) -> None:
    guided, calls, steps = dp.call_guides(screen, {}, SCHEMA)
    obs = guided.obs
    assert {"guide_identity", "n_guides"} <= set(obs.columns) and (obs["n_guides"] == 1).all()
    assert not obs["perturbation"].isin(["unassigned", "multiplet"]).any()
    assert guided.n_obs + int(steps["cells_removed"].sum()) == screen.n_obs
    assert list(steps["step"].str.startswith("guides")) == [True, True]
    assert set(calls["guide"]) == set(screen.uns["guides"]["guide"]) and (calls["cells_called"] > 0).all()
    truth = screen.obs.loc[guided.obs_names, "true_guides"]
    assert (obs["guide_identity"] == truth).mean() >= 0.98
    assert "guide_counts" in guided.obsm  # each cell's guide UMIs stay with it
    # a screen that came labelled passes unchanged
    labelled = ad.AnnData(screen.X, obs=screen.obs[["perturbation"]].copy(), var=pd.DataFrame(index=screen.var_names))
    same, none_called, no_steps = dp.call_guides(labelled, {}, SCHEMA)
    assert same.n_obs == labelled.n_obs and none_called.empty and no_steps.empty
    # no cell gets a guide: the error says so and what to check
    silent = screen.copy()
    silent.obsm["guide_counts"] = sp.csr_matrix(silent.obsm["guide_counts"].shape, dtype=np.float32)
    with pytest.raises(ScreenValidationError, match="No cell got a guide"):
        dp.call_guides(silent, {}, SCHEMA)
    with pytest.raises(ScreenValidationError, match="No guide targets a control label"):
        dp.call_guides(screen, {}, {**SCHEMA, "control_labels": ["control"]})


def test_the_knockdown_check_finds_the_failed_guides(screen: ad.AnnData) -> None:
    from sklearn.metrics import roc_auc_score

    from perturbscope.pipelines.perturbation_effects import nodes as pe

    guided, _, _ = dp.call_guides(screen, {}, SCHEMA)
    validated = dp.validate_screen(guided, SCHEMA, "sim")
    processed = dp.label_cells(
        dp.select_highly_variable_genes(
            dp.score_cell_cycle(dp.normalise(dp.quality_control(validated, {})[0], {}), {}, 0), {}, None
        ),
        SCHEMA,
        {},
        0,
    ).to_memory()
    table = pe.check_knockdown(processed, {}, SCHEMA)
    truth = screen.uns["guide_truth"]
    measured = table[table["remaining"].notna()]
    assert len(measured) >= 0.9 * (len(truth) - 4)  # every targeting guide's target is in the panel
    failed = truth.loc[measured["guide"], "failed"].to_numpy()
    assert failed.any() and not failed.all()
    assert roc_auc_score(~failed, 1 - measured["remaining"]) >= 0.95
    called_failed = set(measured.loc[measured["call"] == "no knockdown", "guide"])
    assert called_failed <= set(truth.index[truth["failed"]])  # a working guide is never called failed
    # CRISPRa reads the other direction: a knocked-down target is not 'activated'
    activation = pe.check_knockdown(processed, {}, {**SCHEMA, "modality": "CRISPRa"})
    assert not (activation["call"] == "activated").any()
    with pytest.raises(ScreenValidationError, match="schema.modality"):
        pe.check_knockdown(processed, {}, {**SCHEMA, "modality": "CRISPRx"})


def test_a_single_perturbation_cell_of_a_combinatorial_design_measures_its_targeting_guide() -> None:
    """Two guides per cell: a single perturbation's cell carries its guide beside a non-targeting one; the
    knockdown check reads that cell for its targeting guide, never one with two targeting guides or none."""
    target_of = {"A-1": "A", "A-2": "A", "B-1": "B", "NTC-1": "non-targeting", "NTC-2": "Non-Targeting"}
    identity = ["A-1;NTC-1", "A-2", "A-1;B-1", "NTC-1;NTC-2", "", "NTC-2;B-1"]
    found = guides.targeting_guide(identity, target_of, ["non-targeting"])
    assert found.tolist() == ["A-1", "A-2", "", "", "", "B-1"]
