"""The perturbation map and the genetic interactions, on a simulated screen with planted programs, null
perturbations and doubles of every interaction class."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from perturbscope.pipelines.perturbation_effects import nodes, profiles
from perturbscope.simulation import simulate_screen
from tests.pipelines.contrastive_model.conftest import process

SCHEMA = {"program_key": "program"}
CLUSTERS = {"max_clusters": 20, "min_silhouette": 0.1, "n_nearest": 3}


@pytest.fixture(scope="module")
def screen():
    raw = simulate_screen(
        n_cells=7000,
        n_genes=500,
        n_programs=3,
        perturbations_per_program=3,
        n_null_perturbations=2,
        n_doubles=10,
        interaction_classes=1,
        genes_per_program=25,
        penetrance=0.9,
        seed=11,
    )
    return raw, process(raw)


@pytest.fixture(scope="module")
def tests_table(screen) -> pd.DataFrame:
    _, processed = screen
    return nodes.run_effect_tests(processed, {"n_permutations": 199, "max_cells": 200}, 0)


def test_perturbations_of_a_program_cluster_together_and_nulls_stay_apart(screen, tests_table) -> None:
    raw, processed = screen
    found, n_cells = nodes.compute_profiles(processed, None, None, None, {"min_cells": 20})
    assert set(found) == {"pseudobulk"} and len(found["pseudobulk"]) == 11  # the singles
    clusters, summary = nodes.cluster_perturbations(found, n_cells, tests_table, processed, CLUSTERS, SCHEMA)
    truth = raw.uns["perturbation_truth"]
    table = clusters.set_index("perturbation")
    nulls = truth.index[(truth["n_perturbed_genes"] == 1) & ~truth["has_effect"]]
    assert (table.loc[nulls, "cluster"] == profiles.NO_EFFECT).all()
    row = summary.set_index("profile").loc["pseudobulk"]
    assert row["ari_vs_program"] >= 0.9 and row["n_clusters"] == 3
    # each perturbation's nearest neighbour shares its program
    active = table[table["cluster"] != profiles.NO_EFFECT]
    same = [truth.loc[p, "program"] == truth.loc[row_.nearest_1, "program"] for p, row_ in active.iterrows()]
    assert np.mean(same) == 1.0
    genes, factors = nodes.describe_clusters(clusters, found, {"profile": "pseudobulk"})
    program_genes = raw.var.index[raw.var["program"].str.startswith("program")]
    top = genes[genes["rank"] <= 10]  # a program moves ~12 genes each way: its top ten are its own
    assert top["gene"].isin(program_genes).mean() >= 0.85 and factors.empty
    similarity = nodes.compare_perturbations(found, processed, {"max_cells": 100, "n_pcs": 10}, 0)
    assert len(similarity) == 11 * 10 // 2 and similarity["e_distance"].notna().all()


def test_every_planted_interaction_class_is_called(screen) -> None:
    raw, processed = screen
    params = {"n_bootstrap": 20, "min_cells": 20}
    table = nodes.call_interactions(processed, params, {}, 0).set_index("double")
    truth = raw.uns["perturbation_truth"]["interaction"]
    planted = truth[truth != ""]
    assert set(table.index) == set(planted.index)
    right = (table.loc[planted.index, "interaction"] == planted).mean()
    assert right >= 0.8, table[["c_a", "c_b", "magnitude", "fit", "dominance", "interaction"]].assign(truth=planted)
    magnitude = table["magnitude"].groupby(planted).mean()
    assert magnitude["synergy"] > magnitude["additive"] > magnitude["buffering"]
    assert (table["magnitude_low"] <= table["magnitude"]).all() and (
        table["magnitude"] <= table["magnitude_high"]
    ).all()
    # "additive" is the prediction's additive baseline: c_A = c_B = 1 on the same shifts
    additive = table[planted.loc[table.index] == "additive"]
    assert (additive["magnitude"].between(0.8, 1.2)).all()
    assert (table["note"] == "").all() and (table["n_genes"] >= 10).all()


def test_a_double_without_its_singles_is_listed_with_the_reason(screen) -> None:
    """Every double gets a row: one whose single is missing or thin says which, with no scores."""
    raw, processed = screen
    doubles = raw.uns["perturbation_truth"]["interaction"]
    first = sorted(doubles[doubles != ""].index)[0]
    gone = first.split("+")[0]
    second = next(d for d in sorted(doubles[doubles != ""].index) if gone not in d.split("+"))
    thin = second.split("+")[1]
    labels = processed.obs["perturbation"].astype(str)
    keep = (labels != gone).to_numpy()
    keep &= ~((labels == thin) & (processed.obs.groupby("perturbation", observed=True).cumcount() >= 5)).to_numpy()
    table = nodes.call_interactions(processed[keep].copy(), {"n_bootstrap": 0}, {}, 0).set_index("double")
    assert set(table.index) == set(doubles[doubles != ""].index)
    skipped = table[table["interaction"] == "not fitted"]
    assert skipped["magnitude"].isna().all() and skipped.loc[first, "note"].endswith(gone)
    assert f"{thin} (5)" in skipped.loc[second, "note"]
    assert (table.drop(skipped.index)["note"] == "").all()


def test_enrichment_reads_a_gmt_file(tmp_path, screen) -> None:
    raw, processed = screen
    found, n_cells = nodes.compute_profiles(processed, None, None, None, {"min_cells": 20})
    clusters, _ = nodes.cluster_perturbations(found, n_cells, None, processed, CLUSTERS, SCHEMA)
    genes, _ = nodes.describe_clusters(clusters, found, {"profile": "pseudobulk", "n_top_genes": 15})
    programs = raw.var.groupby("program", observed=True).groups
    lines = [f"{name}\tplanted\t" + "\t".join(map(str, members)) for name, members in programs.items()]
    (tmp_path / "sets.gmt").write_text("\n".join(lines) + "\n")
    table = nodes.enrich_clusters(genes, processed, {"gene_sets_path": str(tmp_path / "sets.gmt"), "min_size": 5})
    # a cluster of one program's perturbations: its top set, up and down, is that program's genes
    members = clusters[clusters["profile"] == "pseudobulk"].groupby("cluster")["program"].agg(set)
    programs = {cluster: next(iter(p)) for cluster, p in members.items() if len(p) == 1 and "none" not in p}
    assert len(programs) == 3
    best = table.sort_values("p_value").groupby(["cluster", "direction"]).head(1).set_index("cluster")
    best = best.loc[list(programs)]
    assert (best["gene_set"] == best.index.map(programs)).all() and (best["q_value"] < 0.01).all(), best
    assert nodes.enrich_clusters(genes, processed, {"gene_sets_path": None}).empty


def test_a_perturbation_with_no_called_responders_keeps_its_plain_profile(screen) -> None:
    """An undertrained model's escape mixture can call no cell perturbed: weights of 0 must not erase the
    profiles (every perturbation would then be minus the controls' mean, all alike)."""
    _, processed = screen
    plain, _ = profiles.perturbation_profiles(processed, None, None, None)
    none_called = pd.Series(0.0, index=processed.obs_names)
    weighted, _ = profiles.perturbation_profiles(processed, None, None, none_called)
    pd.testing.assert_frame_equal(weighted["pseudobulk"], plain["pseudobulk"])
    # where the mixture did call responders, the weights are used: a perturbation's escapers drop out
    half = pd.Series(np.where(np.arange(processed.n_obs) % 2 == 0, 1.0, 0.0), index=processed.obs_names)
    halved, _ = profiles.perturbation_profiles(processed, None, None, half)
    assert not np.allclose(halved["pseudobulk"].to_numpy(), plain["pseudobulk"].to_numpy())
