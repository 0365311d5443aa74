"""Bad parameters, embedding new screens, checkpoints through the catalog dataset."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from kedro.io.core import Version

from perturbscope.datasets import TorchModelDataset
from perturbscope.models import EscapeMixture
from perturbscope.models.model import ContrastiveVI, ModelInputError
from perturbscope.parameters import ConfigError
from perturbscope.pipelines.contrastive_model import nodes

from .conftest import ESCAPE, MODEL, SCHEMA, TRAINING, Trained

FAST = {**TRAINING, "max_epochs": 1, "kl_warmup_epochs": 0}


def embed_screen(model, adata, **kwargs):
    return ContrastiveVI(model).embed(adata, **kwargs)


# ------------------------------------------------------------------ bad parameters
@pytest.mark.parametrize(
    ("model", "training", "match"),
    [
        ({"n_salient": 0}, {}, r"^contrastive_model\.model\.n_salient must be a positive integer"),
        ({"n_background": 0}, {}, r"^contrastive_model\.model\.n_background must be a positive integer"),
        ({"n_salient": 2.5}, {}, r"^contrastive_model\.model\.n_salient"),
        ({"n_latent": 10}, {}, r"^contrastive_model\.model\.n_latent is not a ContrastiveVAE argument"),
        ({"likelihood": "poisson"}, {}, r"^contrastive_model\.model\.likelihood must be one of .*got 'poisson'"),
        ({}, {"lr": -1.0}, r"^contrastive_model\.training\.lr must be a positive"),
        ({}, {"batch_size": 0}, r"^contrastive_model\.training\.batch_size must be an integer >= 1"),
        ({}, {"epochs": 3}, r"^contrastive_model\.training\.epochs is not a training setting"),
    ],
)
def test_bad_parameters_fail_naming_the_conf_key(
    sim_screen: ad.AnnData, model: dict, training: dict, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        nodes.train_contrastive_model(sim_screen, {**MODEL, **model}, {**FAST, **training}, {}, SCHEMA, 0)


def test_a_shared_training_key_is_named_where_it_was_set(sim_screen: ad.AnnData) -> None:
    with pytest.raises(ConfigError, match=r"^training\.batch_size must be"):
        nodes.train_contrastive_model(sim_screen, MODEL, FAST, {"batch_size": 0}, SCHEMA, 0)
    with pytest.raises(ConfigError, match=r"^contrastive_model\.training\.batch_size must be"):
        nodes.train_contrastive_model(sim_screen, MODEL, {**FAST, "batch_size": 0}, {"batch_size": 5}, SCHEMA, 0)


def test_no_target_cells(sim_screen: ad.AnnData) -> None:
    controls = sim_screen[sim_screen.obs["is_control"].to_numpy()].copy()
    with pytest.raises(ModelInputError, match="no target \\(perturbed\\) cells"):
        nodes.train_contrastive_model(controls, MODEL, FAST, {}, SCHEMA, 0)


def test_no_control_cells(sim_screen: ad.AnnData) -> None:
    targets = sim_screen[~sim_screen.obs["is_control"].to_numpy()].copy()
    with pytest.raises(ModelInputError, match="no control cells.*Labels present"):
        nodes.train_contrastive_model(targets, MODEL, FAST, {}, SCHEMA, 0)


def test_no_training_targets(sim_screen: ad.AnnData) -> None:
    screen = sim_screen.copy()
    screen.obs["split"] = np.where(screen.obs["is_control"], "train", "validation")
    with pytest.raises(ModelInputError, match="No target cells outside the validation split"):
        nodes.train_contrastive_model(screen, MODEL, FAST, {}, SCHEMA, 0)


# ------------------------------------------------------------ embedding new screens
def test_same_seed_same_model(sim_screen: ad.AnnData) -> None:
    small = sim_screen[:400].copy()
    first, _ = nodes.train_contrastive_model(small, MODEL, {**FAST, "max_epochs": 2}, {}, SCHEMA, 3)
    second, _ = nodes.train_contrastive_model(small, MODEL, {**FAST, "max_epochs": 2}, {}, SCHEMA, 3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch_equal(a, b), name


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_save_load_through_catalog_dataset_reproduces_embeddings(trained: Trained, tmp_path) -> None:
    dataset = TorchModelDataset(filepath=str(tmp_path / "contrastive_model.pt"), version=Version(None, None))
    dataset.save(trained.model)
    loaded = dataset.load()
    assert loaded.hparams == trained.model.hparams and loaded.metadata == trained.model.metadata
    before = embed_screen(trained.model, trained.screen)
    after = embed_screen(loaded, trained.screen)
    for key in ("X_salient", "X_background"):
        np.testing.assert_array_equal(before.obsm[key], after.obsm[key])
        np.testing.assert_array_equal(before.obsm[key], trained.embedded.obsm[key])
    with_a, without_a = trained.model.salient_expression(
        ContrastiveVI(trained.model).cell_data(trained.screen), np.arange(50)
    )
    with_b, without_b = loaded.salient_expression(ContrastiveVI(loaded).cell_data(trained.screen), np.arange(50))
    np.testing.assert_array_equal(with_a, with_b)
    np.testing.assert_array_equal(without_a, without_b)


def test_embed_new_screen_aligns_genes_by_name(trained: Trained) -> None:
    screen = trained.screen[:300].copy()
    reference = embed_screen(trained.model, screen)
    # a "new" screen: raw counts in X only, genes shuffled, two extra genes
    rng = np.random.default_rng(0)
    order = rng.permutation(screen.n_vars)
    counts = sp.csr_matrix(screen.layers["counts"])[:, order]
    extra = sp.csr_matrix(rng.poisson(1.0, size=(screen.n_obs, 2)).astype(np.float32))
    new = ad.AnnData(
        X=sp.hstack([counts, extra], format="csr"),
        obs=screen.obs[["perturbation"]].copy(),
        var={"gene": list(screen.var_names[order]) + ["EXTRA1", "EXTRA2"]},
    )
    new.var_names = new.var["gene"].astype(str).to_numpy()
    embedded = embed_screen(trained.model, new, umap=True)
    for key in ("X_salient", "X_background"):
        np.testing.assert_allclose(embedded.obsm[key], reference.obsm[key], rtol=1e-5, atol=1e-6)
    assert embedded.obsm["X_umap_salient"].shape == (new.n_obs, 2)
    assert embedded.n_vars == new.n_vars and "X_salient" not in new.obsm  # a copy, input untouched


def test_missing_genes_are_named(trained: Trained) -> None:
    screen = trained.screen[:50].copy()
    dropped = list(screen.var_names[[3, 10, 42]])
    keep = ~screen.var_names.isin(dropped)
    with pytest.raises(ModelInputError, match="3 of the model's 300 genes are missing") as err:
        embed_screen(trained.model, screen[:, keep].copy())
    for gene in dropped:
        assert gene in str(err.value)
    filled = embed_screen(trained.model, screen[:, keep].copy(), fill_missing=True)
    assert np.isfinite(filled.obsm["X_salient"]).all()


def test_normalised_matrix_without_counts_is_rejected(trained: Trained) -> None:
    screen = trained.screen[:50].copy()
    del screen.layers["counts"]  # X is log-normalised
    with pytest.raises(ModelInputError, match="does not hold raw UMI counts"):
        embed_screen(trained.model, screen)


def test_nodes_do_not_mutate_inputs(trained: Trained) -> None:
    screen = trained.screen[:200].copy()
    before_obs, before_obsm = screen.obs.copy(), set(screen.obsm)
    full, embedded = nodes.embed_cells(screen, trained.model, {"umap": False}, 0)
    assert full.X is screen.X and full.layers["counts"] is screen.layers["counts"]  # shared, not copied
    assert embedded.n_vars == 0 and set(embedded.obsm) == set(full.obsm) and embedded.obs.equals(full.obs)
    before_embedded = embedded.obs.copy()
    calls = nodes.call_perturbed_cells(embedded, trained.mixture, ESCAPE)
    nodes.rank_salient_genes(screen, calls, trained.model, {"top_genes": 5})
    nodes.escape_table(embedded, calls, trained.mixture)
    assert embedded.obs.equals(before_embedded)
    assert set(screen.obsm) == before_obsm
    assert screen.obs.equals(before_obs)


def test_umap_switched_off_gives_an_explaining_figure(trained: Trained) -> None:
    _, embedded = nodes.embed_cells(trained.screen[:200].copy(), trained.model, {"umap": False}, 0)
    assert "X_umap_salient" not in embedded.obsm
    fig = nodes.plot_embeddings(embedded, {"annotation_key": None}, SCHEMA)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("contrastive_model.embedding.umap is false" in t for t in texts)
    _, with_umap = nodes.embed_cells(trained.screen[:200].copy(), trained.model, {"umap": True, "n_neighbors": 10}, 0)
    assert len(nodes.plot_embeddings(with_umap, {"annotation_key": None}, SCHEMA).axes) >= 2


def test_diverging_training_names_the_kedro_parameter(sim_screen: ad.AnnData) -> None:
    """A NaN loss tells the user which `kedro run` parameter to change: the key they set."""
    from perturbscope.models import TrainingError

    with pytest.raises(TrainingError) as err:
        nodes.train_contrastive_model(sim_screen, MODEL, {**TRAINING, "max_epochs": 2, "lr": 1e6}, {}, SCHEMA, 0)
    message = str(err.value)
    assert "(contrastive_model.training.lr)" in message
    assert "(contrastive_model.training.grad_clip)" in message
    assert "(contrastive_model.model.likelihood)" in message
    # set in the shared block only: the shared key is named
    with pytest.raises(TrainingError) as err:
        nodes.train_contrastive_model(sim_screen, MODEL, {**TRAINING, "max_epochs": 2}, {"lr": 1e6}, SCHEMA, 0)
    assert "(training.lr)" in str(err.value)


def test_escape_mixture_outputs_through_the_nodes(sim_screen) -> None:
    """The escape mixture (on by default): its own artifact, the per-cell calls, the escape table and the
    called-perturbed scores; refitted with other settings without retraining."""
    from .conftest import EVALUATION

    model, _ = nodes.train_contrastive_model(
        sim_screen, MODEL, {**TRAINING, "max_epochs": 8, "kl_warmup_epochs": 2}, {}, SCHEMA, 0
    )
    _, embedded = nodes.embed_cells(sim_screen, model, {"umap": False}, 0)
    escape_params = {**ESCAPE, "mixture": {"min_cells": 10}}
    fitted = nodes.fit_escape_mixture(embedded, escape_params, 0)
    assert EscapeMixture.from_dict(fitted).perturbations == fitted["perturbations"]
    calls = nodes.call_perturbed_cells(embedded, fitted, escape_params)
    assert list(calls.index) == list(embedded.obs_names)
    probability = calls["perturbed_probability"].to_numpy()
    is_control = embedded.obs["is_control"].to_numpy().astype(bool)
    assert (probability[is_control] == 0).all()
    labels = embedded.obs["perturbation"].astype(str).to_numpy()
    has_mixture = np.isin(labels, fitted["perturbations"])
    assert np.isnan(probability[~is_control & ~has_mixture]).all()
    scored = probability[~is_control & has_mixture]
    assert ((scored >= 0) & (scored <= 1)).all()
    assert not calls["called_perturbed"].to_numpy()[is_control].any()
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(calls["called_perturbed"].to_numpy()[~is_control], probability[~is_control] > 0.5)

    escape = nodes.escape_table(embedded, calls, fitted)
    assert "control" not in set(escape["perturbation"])
    assert escape["n_cells"].sum() == (~is_control).sum()
    assert escape["n_called_perturbed"].sum() == calls["called_perturbed"].sum()
    shares = escape.set_index("perturbation")["estimated_perturbed_share"].dropna()
    assert set(shares.index) == set(fitted["perturbations"])
    assert ((shares >= 0) & (shares <= 1)).all()

    table = nodes.evaluate_embeddings(embedded, calls, {**EVALUATION, "responder_key": "responded"}, SCHEMA, 0)
    assert set(table["cells"]) == {"perturbed", "called_perturbed", "targets"}
    auroc = table[table["metric"] == "perturbed_probability_auroc"]
    responded = embedded.obs["responded"].to_numpy().astype(bool)
    from sklearn.metrics import roc_auc_score

    mask = ~is_control & has_mixture
    assert auroc["value"].iloc[0] == pytest.approx(roc_auc_score(responded[mask], probability[mask]))
    metrics = nodes.evaluation_metrics(table)
    assert metrics["perturbed_probability_auroc"]["value"] == auroc["value"].iloc[0]
    called_rows = table[table["cells"] == "called_perturbed"]
    # scored over the called cells, or one row saying why not (8 epochs call few cells)
    assert called_rows["value"].notna().all() or called_rows["note"].str.contains("called_perturbed").all()

    # refitted with other settings on the same embedding: no retraining, other calls
    strict = nodes.fit_escape_mixture(embedded, {**ESCAPE, "mixture": {"min_cells": 10, "min_separation": 50.0}}, 0)
    assert sum(strict["weight"]) < sum(fitted["weight"]) or sum(fitted["weight"]) == 0
    assert set(strict["perturbations"]) == set(fitted["perturbations"])

    # the escape mixture off: no calls, an empty table, every cell weighs the same
    off = nodes.fit_escape_mixture(embedded, {**ESCAPE, "enabled": False}, 0)
    assert off == {} and nodes.call_perturbed_cells(embedded, off, ESCAPE).empty
    assert nodes.escape_table(embedded, nodes.call_perturbed_cells(embedded, off, ESCAPE), off).empty
    with pytest.raises(ConfigError, match=r"contrastive_model\.escape\.mixture\.min_cell\b"):
        nodes.fit_escape_mixture(embedded, {**ESCAPE, "mixture": {"min_cell": 5}}, 0)

    genes = nodes.rank_salient_genes(sim_screen, calls, model, {"top_genes": 5})
    called = escape.set_index("perturbation")["n_called_perturbed"]
    assert (
        genes.groupby("perturbation")["n_called_perturbed"].first() == called.reindex(genes["perturbation"].unique())
    ).all()


# ------------------------------------------------------------------ large screens
def test_pca_baseline_of_a_large_screen_is_fitted_on_a_sample_the_same_in_memory_and_on_disk(
    trained: Trained, tmp_path
) -> None:
    """Above ``pca_max_cells`` the in-memory screen takes the on-disk path's PCA: fitted on the same drawn cells,
    every cell projected; the space is that of the full PCA."""
    from perturbscope.blocks import BlockScreen
    from perturbscope.pipelines.contrastive_model.tables import pca_baseline

    screen = trained.screen
    full = pca_baseline(screen, 5, screen.n_obs, seed=0)
    sampled = pca_baseline(screen, 5, 600, seed=0)
    assert sampled.shape == full.shape and np.isfinite(sampled).all()
    path = tmp_path / "screen.h5ad"
    screen.write_h5ad(path)
    on_disk = pca_baseline(BlockScreen.open(str(path), chunk_size=137), 5, 600, seed=0)
    np.testing.assert_allclose(sampled, on_disk, rtol=1e-4, atol=1e-4)
    # the sample's leading components span the full PCA's: each full component is explained by the sampled ones
    coef, *_ = np.linalg.lstsq(sampled[:, :3].astype(np.float64), full[:, :3].astype(np.float64), rcond=None)
    residual = full[:, :3] - sampled[:, :3] @ coef
    assert (1 - residual.var(0) / full[:, :3].var(0)).min() > 0.9


def test_salient_genes_decode_at_most_max_cells_per_perturbation(trained: Trained) -> None:
    params = {"top_genes": None, "scale": 1e4, "pseudocount": 0.01, "min_cells": 1, "batch_size": 256}
    everything = nodes.rank_salient_genes(trained.screen, trained.calls, trained.model, {**params, "max_cells": None})
    capped = nodes.rank_salient_genes(trained.screen, trained.calls, trained.model, {**params, "max_cells": 60})
    key = ["perturbation", "gene"]
    a, b = everything.set_index(key).sort_index(), capped.set_index(key).sort_index()
    assert a.index.equals(b.index)
    np.testing.assert_array_equal(a["n_cells"], b["n_cells"])  # every cell counted
    np.testing.assert_array_equal(a["n_called_perturbed"], b["n_called_perturbed"])
    assert not np.allclose(a["mean_log2fc"], b["mean_log2fc"])  # ... but 60 of them decoded
    assert np.corrcoef(a["mean_log2fc"], b["mean_log2fc"])[0, 1] > 0.9
    assert (a["n_cells"] > 60).all()
