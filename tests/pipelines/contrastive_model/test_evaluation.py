"""The evaluation scores on embeddings whose answer is known."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbscope.pipelines.contrastive_model.evaluation import (
    chance_accuracy,
    evaluate_spaces,
    knn_accuracy,
    metrics_for_mlflow,
    program_scores,
)


def _blobs(n_per: int = 60, n_classes: int = 3, spread: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(n_classes, 4))
    labels = np.repeat([f"p{i}" for i in range(n_classes)], n_per)
    return centres[np.repeat(np.arange(n_classes), n_per)] + rng.normal(0, spread, (labels.size, 4)), labels


def test_separated_programs_score_perfectly() -> None:
    emb, labels = _blobs()
    scores = program_scores(emb, labels)
    assert scores["ari"] == pytest.approx(1.0) and scores["nmi"] == pytest.approx(1.0)
    assert scores["knn_accuracy"] == 1.0 and scores["silhouette"] > 0.8


def test_uninformative_space_is_at_chance() -> None:
    rng = np.random.default_rng(1)
    labels = rng.choice(["G1", "S", "G2M"], p=[0.5, 0.3, 0.2], size=900)
    chance = chance_accuracy(labels)
    assert chance == pytest.approx(np.mean(labels == "G1"))
    assert abs(knn_accuracy(rng.normal(size=(900, 10)), labels) - chance) < 0.06
    assert abs(program_scores(rng.normal(size=(900, 10)), labels)["ari"]) < 0.05


def test_leiden_runs_score_the_median_run() -> None:
    """Touching classes: Leiden's seed moves the ARI; leiden_runs reports the median of the runs."""
    emb, labels = _blobs(n_per=80, n_classes=4, spread=2.5, seed=3)
    singles = [program_scores(emb, labels, seed=0, leiden_runs=1)["ari"]]
    from perturbscope.pipelines.contrastive_model import evaluation

    graph = evaluation._neighbors(emb, 15, 0)
    first, found_at = evaluation._leiden(graph, 4, None, 0)
    runs = [first] + [evaluation._leiden(graph, 4, None, seed, start=found_at)[0] for seed in range(1, 5)]
    assert all(len(np.unique(run)) == 4 for run in runs)
    aris = [evaluation.adjusted_rand_score(labels, run) for run in runs]
    assert singles[0] == pytest.approx(aris[0])
    median = program_scores(emb, labels, seed=0, leiden_runs=5)
    assert median["ari"] == pytest.approx(float(np.median(aris)))
    assert 0.0 < median["ari"] < 1.0
    with pytest.raises(ValueError, match="leiden_runs"):
        program_scores(emb, labels, leiden_runs=0)


def test_a_warm_start_that_misses_falls_back_to_the_bisection() -> None:
    """A start resolution that gives the wrong number of clusters is only a first try."""
    from perturbscope.pipelines.contrastive_model import evaluation

    emb, _ = _blobs(n_per=80, n_classes=4, spread=2.5, seed=3)
    graph = evaluation._neighbors(emb, 15, 0)
    cold, at = evaluation._leiden(graph, 4, None, 1)
    missed, at_missed = evaluation._leiden(graph, 4, None, 1, start=1e-3)  # one cluster at this resolution
    assert len(np.unique(missed)) == len(np.unique(cold)) == 4
    assert at_missed == pytest.approx(at) and (missed == cold).all()


def _screen() -> ad.AnnData:
    emb, programs = _blobs(n_per=50)
    n = programs.size + 30
    rng = np.random.default_rng(2)
    obs = pd.DataFrame(
        {
            "is_control": [False] * programs.size + [True] * 30,
            "program": list(programs) + ["Ctrl"] * 30,
            "phase": ["unknown"] * n,
            "lane": rng.choice(["a", "b"], size=n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32), obs=obs)
    adata.obsm["X_good"] = np.vstack([emb, np.zeros((30, 4))])
    adata.obsm["X_noise"] = rng.normal(size=(n, 4))
    return adata


def test_table_skips_unknown_or_absent_confounders_with_a_note(caplog: pytest.LogCaptureFixture) -> None:
    adata = _screen()
    adata.obs.loc[adata.obs_names[:5], "program"] = "unassigned"
    with caplog.at_level(logging.INFO):
        table = evaluate_spaces(
            adata,
            {"good": "X_good", "noise": "X_noise"},
            ~adata.obs["is_control"].to_numpy(),
            "program",
            confounders=["phase", "replicate", "lane"],
            ignore_labels=["unassigned", "ctrl"],
        )
    ari = table[(table["metric"] == "ari")].set_index("space")["value"]
    assert ari["good"] > 0.99 and abs(ari["noise"]) < 0.1
    assert (table.loc[table["metric"] == "ari", "n_cells"] == 145).all()  # controls and 'unassigned' left out
    skipped = table[table["note"].fillna("") != ""]
    assert set(skipped["key"]) == {"phase", "replicate"}
    assert "Confounder 'phase' skipped" in caplog.text and "Confounder 'replicate' skipped" in caplog.text
    lane = table[table["key"] == "lane"]
    assert set(lane["space"]) == {"good", "noise"}
    assert (lane["chance_level"] >= 0.5).all()

    metrics = metrics_for_mlflow(table)
    assert metrics["ari.good"]["value"] == pytest.approx(ari["good"])
    assert {"leakage_knn_accuracy.lane.good", "leakage_knn_accuracy.lane.chance", "knn_accuracy.chance"} <= set(metrics)
    assert not any("phase" in name for name in metrics)
    assert all(np.isfinite(m["value"]) and m["step"] == 0 for m in metrics.values())


def test_missing_annotation_is_a_note_not_an_error() -> None:
    adata = _screen()
    table = evaluate_spaces(adata, {"good": "X_good"}, ~adata.obs["is_control"].to_numpy(), None, confounders=[])
    assert len(table) == 1 and "no annotation" in table["note"].iloc[0]
    table = evaluate_spaces(
        adata, {"good": "X_good"}, ~adata.obs["is_control"].to_numpy(), "gene_program", confounders=[]
    )
    assert "no column 'gene_program'" in table["note"].iloc[0]
