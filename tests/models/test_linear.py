"""LinearVAE (LDVAE): contract, folded loadings, orientation, checkpoints, and the science."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from perturbscope.models import ParameterError, TrainConfig, fit, seeded
from perturbscope.models.data import CellData, MinibatchSampler
from perturbscope.models.io import load_model, save_model
from perturbscope.models.likelihoods import dense_log_likelihood
from perturbscope.models.linear import LinearVAE, varimax

from .synthetic import random_counts

N_GENES = 30


@pytest.fixture(scope="module")
def data() -> CellData:
    counts = random_counts(81, N_GENES, seed=4)
    return CellData(counts, obs={"batch": np.arange(81) % 2})


def _quick_fit(model: LinearVAE, data: CellData, epochs: int = 3, batch_size: int = 20) -> None:
    # 61 training cells in batches of 20 -> the last training minibatch holds one cell
    train = MinibatchSampler(data, np.arange(61), batch_size=batch_size, seed=0)
    val = MinibatchSampler(data, np.arange(61, 81), batch_size=64, shuffle=False)
    fit(model, train, val, TrainConfig(max_epochs=epochs, progress=False, seed=0, device="cpu"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_genes": 0}, "n_genes"),
        ({"n_latent": 0}, "n_latent"),
        ({"n_latent": 2.5}, "n_latent"),
        ({"n_layers": 0}, "n_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"likelihood": "poisson"}, r"likelihood must be one of \['nb', 'zinb'\].*got 'poisson'"),
        ({"gene_norm": "layer"}, "gene_norm must be one of.*got 'layer'"),
        ({"library": "fixed"}, "library must be 'observed'.*or 'learned', got 'fixed'"),
        ({"library": "learned"}, "library_log_mean"),
        ({"library": "learned", "library_log_mean": [1.0, 2.0], "library_log_var": [1.0, 1.0]}, "max\\(n_batch, 1\\)"),
        ({"loading_penalty": -1.0}, "loading_penalty"),
        ({"n_batch": -1}, "n_batch"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        LinearVAE(**{"n_genes": N_GENES, **kwargs})


@pytest.mark.parametrize("gene_norm", ["batch", "none"])
@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_trains_with_a_one_cell_final_minibatch(data: CellData, gene_norm: str, likelihood: str) -> None:
    with seeded(0):
        model = LinearVAE(N_GENES, n_latent=3, gene_norm=gene_norm, likelihood=likelihood)
    model.init_intercepts(data)
    model.train()
    single = data.batch(torch.tensor([5]))
    out = model.loss(single)  # BatchNorm in training mode with one cell: running statistics, no crash
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    _quick_fit(model, data)
    assert not model.training
    assert np.isfinite(model.reconstruction_log_likelihood(data)).all()


def test_batch_covariate_and_learned_library(data: CellData) -> None:
    mean, var = data.library_prior(None, "batch", 2)
    with seeded(0):
        model = LinearVAE(N_GENES, n_latent=3, n_batch=2, library="learned", library_log_mean=mean, library_log_var=var)
    out = model.loss(data.batch(torch.arange(10)))
    assert {"loss", "reconstruction", "kl_latent", "kl_library", "loading_penalty"} <= set(out)
    _quick_fit(model, data)
    z = model.embed(data)
    assert z.shape == (81, 3) and np.isfinite(z).all()
    with pytest.raises(KeyError, match="batch"):
        model.loss({k: v for k, v in data.batch(torch.arange(4)).items() if k != "batch"})


def test_reconstruction_log_likelihood_matches_dense_reference(data: CellData) -> None:
    with seeded(0):
        model = LinearVAE(N_GENES, n_latent=3)
    model.init_intercepts(data)
    model.eval()
    batch = data.batch(torch.arange(81))
    with torch.no_grad():
        z = model.encoder(torch.log1p(batch["x"]))[0]
        p = model.decoder(z, batch["log_library"])
        dense = dense_log_likelihood("nb", batch["x"].double(), p.log_mu.double(), p.log_theta.double())
    np.testing.assert_allclose(model.reconstruction_log_likelihood(data), dense.numpy(), rtol=1e-5)


def test_init_intercepts_start_at_the_average_profile(data: CellData) -> None:
    with seeded(0):
        model = LinearVAE(N_GENES, n_latent=2, gene_norm="none")
    model.init_intercepts(data, pseudocount=0.5)
    counts = np.zeros(N_GENES)
    for b in model.iter_batches(data):
        counts += b["x"].sum(0).numpy()
    share = np.log((counts + 0.5) / data.library.sum())
    np.testing.assert_allclose(model.decoder.bias.detach().numpy(), share - share.mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gene_norm", ["batch", "none"])
def test_loadings_are_the_folded_log_expression_slopes(data: CellData, gene_norm: str) -> None:
    """eta(z) - eta(0) == factor scores @ loadings.T in eval mode (BatchNorm folded, orientation applied)."""
    with seeded(0):
        model = LinearVAE(N_GENES, n_latent=4, gene_norm=gene_norm)
    model.init_intercepts(data)
    _quick_fit(model, data, epochs=4)
    model.orient(data)
    model.eval()
    raw = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        delta = (model.decoder.logits(raw) - model.decoder.logits(torch.zeros(1, 4))).double()
    scores = raw.double() @ model.factor_transform.double()
    loadings = model.loadings()
    assert list(loadings.columns) == [f"factor_{k}" for k in range(1, 5)]
    np.testing.assert_allclose(delta.numpy(), (scores @ torch.as_tensor(loadings.to_numpy()).T).numpy(), atol=1e-4)
    # the decoded expression does not depend on the orientation
    with torch.no_grad():
        before = model.decoder.log_proportions(raw)
        model.orient(data, rotation="none")
        after = model.decoder.log_proportions(raw)
    torch.testing.assert_close(before, after)


def test_orient_scales_signs_and_orders_factors(data: CellData) -> None:
    with seeded(0):
        model = LinearVAE(N_GENES, n_latent=4, gene_norm="none")
    model.init_intercepts(data)
    _quick_fit(model, data, epochs=4)
    model.orient(data)
    scores = model.embed(data)
    loadings = model.loadings().to_numpy()
    # varimax is orthogonal on unit-SD scores: SDs stay ~1 up to the scores' correlations
    assert np.all(scores.std(0, ddof=1) > 0.5)
    assert np.all((loadings**3).sum(0) >= 0)  # largest tail positive
    explained = (loadings**2).sum(0)
    assert np.all(np.diff(explained) <= 1e-9)  # ordered by explained variance
    with pytest.raises(ValueError, match="rotation"):
        model.orient(data, rotation="quartimax")


def test_varimax_recovers_a_rotated_simple_structure() -> None:
    rng = np.random.default_rng(0)
    simple = np.zeros((60, 3))
    for k in range(3):
        simple[k * 20 : (k + 1) * 20, k] = rng.uniform(0.5, 1.5, 20)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    mixed = torch.as_tensor(simple @ q)
    recovered = (mixed @ varimax(mixed)).numpy()
    # each recovered factor loads on exactly one block (up to sign and order)
    for k in range(3):
        block = np.abs(recovered[k * 20 : (k + 1) * 20])
        assert (block.argmax(1) == block.argmax(1)[0]).all()
        assert np.abs(recovered).sum(0).min() > 5


def test_checkpoint_round_trip_keeps_loadings_and_scores(data: CellData, tmp_path: Path) -> None:
    with seeded(0):
        model = LinearVAE(N_GENES, n_latent=3)
    model.init_intercepts(data)
    _quick_fit(model, data)
    model.orient(data)
    model.metadata = {"genes": [f"g{i}" for i in range(N_GENES)]}
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert isinstance(loaded, LinearVAE) and loaded.hparams == model.hparams
    assert list(loaded.loadings().index[:2]) == ["g0", "g1"]
    np.testing.assert_array_equal(loaded.loadings().to_numpy(), model.loadings().to_numpy())
    np.testing.assert_array_equal(loaded.embed(data), model.embed(data))


def test_same_seed_same_loadings(data: CellData) -> None:
    def run() -> np.ndarray:
        with seeded(3):
            model = LinearVAE(N_GENES, n_latent=3)
        model.init_intercepts(data)
        _quick_fit(model, data, epochs=3)
        model.orient(data)
        return model.loadings().to_numpy()

    np.testing.assert_array_equal(run(), run())


def _planted_factor_counts(n_cells: int = 1500, n_genes: int = 150, seed: int = 0):
    """Counts from a planted linear factor model: 3 independent programs on disjoint gene sets.

    Each cell switches each program on with probability 0.35 (activity uniform in
    [0.7, 1.3]); a program raises its 20 genes by 1.5 natural-log units per unit
    of activity. Programs can co-occur, so each needs its own factor.
    """
    rng = np.random.default_rng(seed)
    activity = (rng.random((n_cells, 3)) < 0.35) * rng.uniform(0.7, 1.3, (n_cells, 3))
    log_rate = np.tile(rng.normal(-0.5, 1.0, n_genes), (n_cells, 1))
    for k in range(3):
        log_rate[:, 20 * k : 20 * (k + 1)] += 1.5 * activity[:, [k]]
    share = np.exp(log_rate) / np.exp(log_rate).sum(1, keepdims=True)
    mu = share * 3.0 * n_genes * np.exp(rng.normal(0.0, 0.25, (n_cells, 1)))
    counts = rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float32)
    return sp.csr_matrix(counts), activity


def test_factors_recover_planted_gene_modules() -> None:
    """Each planted program gets a factor whose top-20 genes are the program's, and its cells score high on it."""
    counts, activity = _planted_factor_counts()
    data = CellData(counts)
    val = np.random.default_rng(0).random(data.n_cells) < 0.1
    with seeded(0):
        model = LinearVAE(data.n_genes, n_latent=6)
    model.init_intercepts(data, ~val)
    fit(
        model,
        MinibatchSampler(data, ~val, batch_size=128, seed=0),
        MinibatchSampler(data, val, batch_size=512, shuffle=False),
        TrainConfig(max_epochs=150, lr=3e-3, kl_warmup_epochs=40, patience=15, progress=False, device="cpu"),
    )
    model.orient(data)
    loadings = model.loadings()
    scores = model.embed(data)
    report = []
    for k in range(3):
        genes = {f"gene_{g}" for g in range(20 * k, 20 * (k + 1))}
        overlap = {f: len(set(loadings[f].abs().nlargest(20).index) & genes) / 20 for f in loadings.columns}
        best = max(overlap, key=overlap.get)
        j = loadings.columns.get_loc(best)
        sign = np.sign(loadings.loc[sorted(genes), best].mean())
        on = activity[:, k] > 0
        shift = sign * (scores[on, j].mean() - scores[~on, j].mean())
        report.append((k, best, overlap[best], round(float(shift), 2)))
    print(report)
    assert all(o >= 0.8 for _, _, o, _ in report), report
    assert all(s > 1.0 for *_, s in report), report  # in SDs of the cells
    assert len({b for _, b, _, _ in report}) == 3, report  # three different factors
