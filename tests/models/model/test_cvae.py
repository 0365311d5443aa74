"""ConditionalVAE and its AnnData API (CVAE): construction, conditions, training with the shared loop,
generation, checkpoints."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from perturbscope.models import MinibatchSampler, TrainConfig, fit, from_checkpoint, seeded, to_checkpoint
from perturbscope.models.cvae import ConditionalVAE, UnknownPerturbationError
from perturbscope.models.model.cvae import CVAE, scale_factors

from ..synthetic import nb_counts

GENES = 40
# planted log-scale effects on disjoint gene blocks
EFFECTS = {"A": (slice(0, 8), 1.5), "B": (slice(8, 16), -1.0), "C": (slice(16, 24), 1.2)}


def _planted_adata(n_per: int = 150, seed: int = 0, labels=("control", "A", "B", "C", "A+C")) -> ad.AnnData:
    """Counts whose log-means are a control profile plus the sum of the perturbed genes' effects."""
    base = np.random.default_rng(1234).normal(np.log(2.0), 0.7, GENES)  # the same cell type for every seed
    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for label in labels:
        log_mu = base.copy()
        genes = [] if label == "control" else label.split("+")
        for g in genes:
            block, size = EFFECTS[g]
            log_mu[block] += size
        lib = np.exp(rng.normal(0.0, 0.2, n_per))
        rows.append(nb_counts(rng, lib[:, None] * np.exp(log_mu)[None, :], 10.0))
        obs += [(label, "+".join(sorted(genes)))] * n_per
    counts = sp.csr_matrix(np.vstack(rows))
    lib = np.asarray(counts.sum(axis=1)).reshape(-1)
    x = sp.csr_matrix(counts.multiply(1e3 / np.maximum(lib, 1)[:, None]))
    x.data = np.log1p(x.data)
    frame = pd.DataFrame(obs, columns=["perturbation", "perturbed_genes"])
    frame.index = [f"c{i}" for i in range(len(frame))]
    out = ad.AnnData(X=x.astype(np.float32), obs=frame, var=pd.DataFrame(index=[f"g{i}" for i in range(GENES)]))
    out.layers["counts"] = counts.astype(np.float32)
    return out


def _train(adata: ad.AnnData, likelihood: str = "gaussian", epochs: int = 60, **kw) -> ConditionalVAE:
    targets = adata.obs.loc[adata.obs["perturbed_genes"] != "", "perturbed_genes"]
    vocab = sorted({g for s in targets for g in s.split("+")})
    with seeded(0):
        model = ConditionalVAE.from_vocabulary(
            vocab, list(adata.var_names), likelihood=likelihood, n_hidden=64, n_layers=1, n_latent=4, **kw
        )
    data = CVAE(model).cell_data(adata)
    fit(
        model,
        MinibatchSampler(data, batch_size=128, seed=0),
        None,
        TrainConfig(max_epochs=epochs, kl_warmup_epochs=10, device="cpu", progress=False, lr=3e-3),
    )
    return model


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    return _planted_adata()


@pytest.fixture(scope="module")
def trained(adata: ad.AnnData) -> ConditionalVAE:
    # A+C trains; A+B is never seen (held out)
    return _train(adata)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="likelihood"):
        ConditionalVAE(n_genes=5, n_conditions=2, likelihood="zinb")
    with pytest.raises(ValueError, match="blind"):
        ConditionalVAE(n_genes=5, n_conditions=2, condition_shift=False, n_condition_embedding=0)
    with pytest.raises(ValueError, match="n_conditions"):
        ConditionalVAE(n_genes=5, n_conditions=0)
    with pytest.raises(ValueError, match="empty"):
        ConditionalVAE.from_vocabulary([], ["g0"])


def test_conditions_are_multi_hot_over_genes() -> None:
    model = ConditionalVAE.from_vocabulary(["B", "A", "C"], [f"g{i}" for i in range(5)])
    assert model.metadata["condition_genes"] == ["A", "B", "C"]
    c = model.encode_conditions(["control", "", "A", "C+A", "A+C"])
    np.testing.assert_array_equal(c, [[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 1], [1, 0, 1]])
    assert model.can_predict("A+B") and not model.can_predict("A+Z")
    with pytest.raises(UnknownPerturbationError, match="never saw"):
        model.encode_conditions(["A+Z"])


@pytest.mark.parametrize("likelihood", ["gaussian", "nb"])
def test_loss_terms_and_training_reduce_loss(adata: ad.AnnData, likelihood: str) -> None:
    with seeded(0):
        model = ConditionalVAE.from_vocabulary(
            ["A", "B", "C"], list(adata.var_names), likelihood=likelihood, n_hidden=32, n_layers=1
        )
    data = CVAE(model).cell_data(adata)
    batch = data.batch(torch.arange(64))
    out = model.loss(batch, kl_weight=0.5)
    assert set(out) == {"loss", "reconstruction", "kl"}
    assert torch.isclose(out["loss"], out["reconstruction"] + 0.5 * out["kl"])
    history = fit(
        model,
        MinibatchSampler(data, batch_size=128),
        None,
        TrainConfig(max_epochs=8, kl_warmup_epochs=4, device="cpu", progress=False, lr=3e-3),
    )
    assert history.kl_weight[:4] == [0.25, 0.5, 0.75, 1.0]  # β warm-up
    assert history.train_terms["reconstruction"][-1] < history.train_terms["reconstruction"][0]


def _delta(pred: ad.AnnData, label: str, c: np.ndarray) -> np.ndarray:
    return np.asarray(pred.layers["expected"][pred.obs["perturbation"] == label].mean(axis=0)).ravel() - c


def test_unseen_double_is_predicted_from_its_singles(adata: ad.AnnData, trained: ConditionalVAE) -> None:
    truth = _planted_adata(seed=5, labels=("control", "A+B"))
    c = np.asarray(adata.X[adata.obs["perturbation"].to_numpy() == "control"].mean(axis=0)).ravel()
    true_delta = np.asarray(truth.X[truth.obs["perturbation"].to_numpy() == "A+B"].mean(axis=0)).ravel() - c
    pred = CVAE(trained).sample_prior(["A+B"], n_cells=300, seed=1)
    r = np.corrcoef(_delta(pred, "A+B", c), true_delta)[0, 1]
    assert r > 0.9
    # both blocks move in the planted direction
    d = _delta(pred, "A+B", c)
    assert d[0:8].mean() > 0.5 and d[8:16].mean() < -0.5


def test_mode_b_keeps_controls_and_moves_them(adata: ad.AnnData, trained: ConditionalVAE) -> None:
    ctrl = np.flatnonzero(adata.obs["perturbation"].to_numpy() == "control")
    data = CVAE(trained).cell_data(adata)
    pred = CVAE(trained).transfer_controls(data, ctrl, ["control", "A"], n_cells=200, seed=0)
    assert pred.n_obs == 400 and set(pred.obs["mode"]) == {"controls"}
    assert set(pred.obs["source_cell"]) <= set(ctrl)
    c = np.asarray(adata.X[ctrl].mean(axis=0)).ravel()
    # decoding controls under "control" reproduces them; under "A" moves them like the A cells
    assert np.abs(_delta(pred, "control", c)).mean() < 0.1
    true_a = np.asarray(adata.X[adata.obs["perturbation"].to_numpy() == "A"].mean(axis=0)).ravel() - c
    d = _delta(pred, "A", c)
    assert np.corrcoef(d, true_a)[0, 1] > 0.95 and np.abs(d - true_a).mean() < 0.15
    assert pred.X.shape == pred.layers["expected"].shape
    assert list(pred.var_names) == list(adata.var_names)


def test_generation_is_seeded_and_checkpoint_round_trips(trained: ConditionalVAE) -> None:
    a = CVAE(trained).sample_prior(["A+B", "C"], n_cells=20, seed=3)
    b = CVAE(trained).sample_prior(["A+B", "C"], n_cells=20, seed=3)
    np.testing.assert_array_equal(a.X, b.X)
    assert list(a.obs["perturbation"].unique()) == ["A+B", "C"]
    clone = from_checkpoint(to_checkpoint(trained))
    assert clone.metadata["condition_genes"] == ["A", "B", "C"]
    np.testing.assert_allclose(CVAE(clone).sample_prior(["A+B", "C"], n_cells=20, seed=3).X, a.X, atol=1e-6)


def test_nb_generation_matches_the_processed_scale(adata: ad.AnnData) -> None:
    model = _train(adata, likelihood="nb", epochs=120)
    scales = scale_factors(adata)
    np.testing.assert_allclose(scales, 1e3 / np.asarray(adata.layers["counts"].sum(axis=1)).ravel(), rtol=1e-4)
    ctrl = np.flatnonzero(adata.obs["perturbation"].to_numpy() == "control")
    with pytest.raises(ValueError, match="library"):
        CVAE(model).sample_prior(["A"], n_cells=10)
    lib = np.asarray(adata.layers["counts"].sum(axis=1)).ravel()
    a_cells = np.flatnonzero(adata.obs["perturbation"].to_numpy() == "A")
    # NB draws are counts normalised like the screen: X = log1p(counts * scale); the log-normalised
    # mean depends on sequencing depth, so each perturbation gets the libraries of its own cells here
    pred = ad.concat(
        [
            CVAE(model).sample_prior(["control"], n_cells=300, library=lib[ctrl], scale=scales[ctrl], seed=0),
            CVAE(model).sample_prior(["A"], n_cells=300, library=lib[a_cells], scale=scales[a_cells], seed=0),
        ],
        index_unique="-",
    )
    assert (pred.X >= 0).all()
    c = np.asarray(adata.X[ctrl].mean(axis=0)).ravel()
    assert np.abs(_delta(pred, "control", c)).mean() < 0.1
    true_a = np.asarray(adata.X[a_cells].mean(axis=0)).ravel() - c
    d = _delta(pred, "A", c)
    assert np.corrcoef(d, true_a)[0, 1] > 0.95 and np.abs(d - true_a).mean() < 0.15
    data = CVAE(model).cell_data(adata)
    moved = CVAE(model).transfer_controls(data, ctrl, ["A"], scale=scales[ctrl], seed=0)
    assert moved.n_obs == ctrl.size  # default: one predicted cell per control


def test_make_cell_data_errors(adata: ad.AnnData, trained: ConditionalVAE) -> None:
    with pytest.raises(ValueError, match="genes"):
        CVAE(trained).cell_data(adata[:, :10])
    with pytest.raises(ValueError, match="perturbed genes"):
        CVAE(trained).cell_data(adata, labels_key="missing")
