"""Count / Gaussian likelihoods: sparse path == dense reference == torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import NegativeBinomial, Normal

from perturbscope.models.likelihoods import (
    batch_log_likelihood,
    dense_log_likelihood,
    gaussian_log_likelihood,
    log_likelihood,
    nb_log_prob,
    zinb_log_prob,
)


def _problem(B: int = 24, G: int = 37, seed: int = 0, dtype: torch.dtype = torch.float64, per_cell_theta: bool = False):
    g = torch.Generator().manual_seed(seed)
    log_mu = torch.randn(B, G, generator=g, dtype=dtype) * 1.5 - 0.5
    log_theta = (
        torch.randn(B, G, generator=g, dtype=dtype) if per_cell_theta else torch.randn(G, generator=g, dtype=dtype)
    )
    zi = torch.randn(B, G, generator=g, dtype=dtype) * 2
    # ~80 % zeros, some large counts
    x = torch.poisson(torch.exp(log_mu) * 0.3, generator=g) * (torch.rand(B, G, generator=g, dtype=dtype) < 0.5)
    x[0, 0] = 250.0
    x[1] = 0.0  # an all-zero cell
    nz = x.nonzero()
    r, c = nz[:, 0].contiguous(), nz[:, 1].contiguous()
    return x, log_mu, log_theta, zi, r, c, x[r, c]


def test_problem_is_sparse() -> None:
    x = _problem()[0]
    assert 0.6 < (x == 0).double().mean() < 0.95


def test_nb_dense_matches_torch_distributions() -> None:
    x, log_mu, log_theta, *_ = _problem()
    ref = NegativeBinomial(total_count=log_theta.exp().expand_as(log_mu), logits=log_mu - log_theta).log_prob(x)
    torch.testing.assert_close(nb_log_prob(x, log_mu, log_theta), ref, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("per_cell_theta", [False, True])
@pytest.mark.parametrize("kind", ["nb", "zinb"])
def test_sparse_matches_dense(kind: str, per_cell_theta: bool) -> None:
    x, log_mu, log_theta, zi, r, c, v = _problem(per_cell_theta=per_cell_theta)
    zl = zi if kind == "zinb" else None
    dense = dense_log_likelihood(kind, x, log_mu, log_theta, zl)
    sparse = log_likelihood(kind, log_mu, log_theta, r, c, v, zi_logits=zl)
    sparse_pre = log_likelihood(kind, log_mu, log_theta, r, c, v, zi_logits=zl, nz_lgamma=torch.lgamma(v + 1))
    assert sparse.shape == (x.shape[0],)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-4)
    torch.testing.assert_close(sparse_pre, dense, rtol=0, atol=1e-4)


def test_sparse_nb_matches_torch_distributions_per_cell() -> None:
    x, log_mu, log_theta, _, r, c, v = _problem()
    ref = NegativeBinomial(total_count=log_theta.exp().expand_as(log_mu), logits=log_mu - log_theta).log_prob(x).sum(-1)
    torch.testing.assert_close(log_likelihood("nb", log_mu, log_theta, r, c, v), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["nb", "zinb"])
def test_sparse_matches_dense_float32_and_gradients(kind: str) -> None:
    x, log_mu, log_theta, zi, r, c, v = _problem(B=64, G=300, dtype=torch.float32, seed=3)
    grads = []
    values = []
    for fn in ("dense", "sparse"):
        lm, lt, zl = (t.clone().requires_grad_(True) for t in (log_mu, log_theta, zi))
        zl_arg = zl if kind == "zinb" else None
        if fn == "dense":
            out = dense_log_likelihood(kind, x, lm, lt, zl_arg)
        else:
            out = log_likelihood(kind, lm, lt, r, c, v, zi_logits=zl_arg)
        out.sum().backward()
        values.append(out.detach())
        grads.append((lm.grad, lt.grad, zl.grad if kind == "zinb" else torch.zeros(1)))
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-3)
    for gs, gd in zip(grads[1], grads[0]):
        torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-4)


def test_zinb_matches_mixture_definition() -> None:
    x, log_mu, log_theta, zi, *_ = _problem()
    pi = torch.sigmoid(zi)
    nb = NegativeBinomial(total_count=log_theta.exp().expand_as(log_mu), logits=log_mu - log_theta).log_prob(x).exp()
    ref = torch.log(torch.where(x == 0, pi + (1 - pi) * nb, (1 - pi) * nb))
    ours = zinb_log_prob(x, log_mu, log_theta, zi)
    ok = torch.isfinite(ref)  # the naive reference underflows for the huge count
    assert ok.sum() >= ok.numel() - 1 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours[ok], ref[ok], rtol=1e-8, atol=1e-8)


def test_extreme_parameters_stay_finite() -> None:
    B = 4
    log_mu = torch.tensor([[-30.0, 30.0, 0.0, -5.0, 12.0, 1.0]] * B)
    log_theta = torch.tensor([-8.0, 8.0, 15.0, -15.0, 0.0, 3.0])
    zi = torch.tensor([[-40.0, 40.0, 0.0, 20.0, -20.0, 5.0]] * B)
    x = torch.tensor([[0.0, 5000.0, 3.0, 0.0, 1e5, 1.0]] * B)
    nz = x.nonzero()
    r, c = nz[:, 0].contiguous(), nz[:, 1].contiguous()
    for kind in ("nb", "zinb"):
        lm, lt, zl = (t.clone().requires_grad_(True) for t in (log_mu, log_theta, zi))
        out = log_likelihood(kind, lm, lt, r, c, x[r, c], zi_logits=zl if kind == "zinb" else None)
        out.sum().backward()
        assert torch.isfinite(out).all(), kind
        assert all(torch.isfinite(t.grad).all() for t in (lm, lt)), kind
        assert (out <= 1e-4).all()  # log-probabilities of discrete data


def test_batch_log_likelihood_reads_batch() -> None:
    x, log_mu, log_theta, zi, r, c, v = _problem()
    batch = {"nz_row": r, "nz_col": c, "nz_val": v, "nz_lgamma": torch.lgamma(v + 1)}
    torch.testing.assert_close(
        batch_log_likelihood("zinb", batch, log_mu, log_theta, zi),
        dense_log_likelihood("zinb", x, log_mu, log_theta, zi),
    )


def test_unknown_kind_and_missing_zi() -> None:
    x, log_mu, log_theta, zi, r, c, v = _problem()
    with pytest.raises(ValueError, match="'nb', 'zinb'"):
        log_likelihood("poisson", log_mu, log_theta, r, c, v)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="zi_logits"):
        log_likelihood("zinb", log_mu, log_theta, r, c, v)


def test_gaussian_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    log_var = torch.randn(5, generator=g)
    ref = Normal(mean, torch.exp(0.5 * log_var)).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean, log_var), ref)
    assert math.isclose(
        float(gaussian_log_likelihood(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1))),
        -0.5 * math.log(2 * math.pi),
        rel_tol=1e-6,
    )


@pytest.mark.parametrize("per_cell_theta", [False, True])
@pytest.mark.parametrize("kind", ["nb", "zinb"])
def test_closed_form_gradients_match_autograd_of_dense_reference(kind: str, per_cell_theta: bool) -> None:
    """The sparse path's hand-written backward equals autograd through the dense formula (float64),
    for a non-uniform incoming gradient and with only some inputs requiring gradients."""
    x, log_mu, log_theta, zi, r, c, v = _problem(B=20, G=31, seed=7, per_cell_theta=per_cell_theta)
    weights = torch.linspace(-1.0, 2.0, x.shape[0], dtype=torch.float64)
    grads = {}
    for fn in ("dense", "sparse"):
        lm, lt, zl = (t.clone().requires_grad_(True) for t in (log_mu, log_theta, zi))
        zl_arg = zl if kind == "zinb" else None
        out = (
            dense_log_likelihood(kind, x, lm, lt, zl_arg)
            if fn == "dense"
            else log_likelihood(kind, lm, lt, r, c, v, zl_arg)
        )
        (out * weights).sum().backward()
        grads[fn] = [lm.grad, lt.grad] + ([zl.grad] if kind == "zinb" else [])
    for name, gs, gd in zip(["log_mu", "log_theta", "zi_logits"], grads["sparse"], grads["dense"]):
        assert gs.shape == gd.shape, name
        torch.testing.assert_close(gs, gd, rtol=1e-8, atol=1e-8, msg=name)
    # only log_mu requiring a gradient (as when the dispersion is fixed)
    lm_sparse, lm_dense = log_mu.clone().requires_grad_(True), log_mu.clone().requires_grad_(True)
    zl = zi if kind == "zinb" else None
    log_likelihood(kind, lm_sparse, log_theta, r, c, v, zl).sum().backward()
    dense_log_likelihood(kind, x, lm_dense, log_theta, zl).sum().backward()
    torch.testing.assert_close(lm_sparse.grad, lm_dense.grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kind", ["nb", "zinb"])
def test_gradcheck(kind: str) -> None:
    x, log_mu, log_theta, zi, r, c, v = _problem(B=5, G=7, seed=11)
    inputs = [t.clone().requires_grad_(True) for t in (log_mu, log_theta, zi)]

    def f(lm, lt, zl):
        return log_likelihood(kind, lm, lt, r, c, v, zl if kind == "zinb" else None)

    assert torch.autograd.gradcheck(f, inputs if kind == "zinb" else inputs[:2] + [inputs[2].detach()])


@pytest.mark.parametrize(
    ("mu", "theta", "scale"),
    [
        (0.01, 1.0, 1.0),  # almost always 0
        (1.0, 0.1, 1.0),  # heavily over-dispersed, long tail
        (5.0, 0.02, 1.0),
        (50.0, 2.0, 0.1),  # mass past the exact head
        (3000.0, 0.3, 0.5),  # past k_max: the tail integral
        (20000.0, 1.0, 0.5),
        (5000.0, 1000.0, 1.0),  # narrow peak far out
        (100.0, 100.0, 1.0),  # near-Poisson, straddling k_max
    ],
)
def test_nb_expected_log1p_matches_a_brute_force_sum(mu: float, theta: float, scale: float) -> None:
    """The exact NB expectation of log1p(scale * x) agrees with summing the pmf over 3 million counts."""
    import numpy as np
    from scipy import stats

    from perturbscope.models.likelihoods import nb_expected_log1p

    k = np.arange(3_000_000)
    reference = float(np.sum(np.log1p(scale * k) * stats.nbinom.pmf(k, theta, theta / (theta + mu))))
    got = nb_expected_log1p(np.array([[mu]]), np.array([theta]), np.array([scale]))
    assert got.shape == (1, 1)
    assert got[0, 0] == pytest.approx(reference, abs=2e-3)


def test_nb_expected_log1p_is_the_mean_of_many_draws_per_entry() -> None:
    """Mixed entries of one block (cells x genes, per-cell scale): the mean of 20,000 NB draws per entry."""
    import numpy as np

    from perturbscope.models.likelihoods import nb_expected_log1p

    rng = np.random.default_rng(0)
    mu = rng.gamma(0.4, 5.0, size=(6, 5))
    theta = np.array([0.2, 0.8, 2.0, 10.0, 50.0])
    scale = np.array([0.3, 0.7, 1.0, 1.5, 2.0, 4.0])
    draws = rng.negative_binomial(theta, theta / (theta + mu), size=(20_000, *mu.shape))
    monte_carlo = np.log1p(draws * scale[:, None]).mean(axis=0)
    sd = np.log1p(draws * scale[:, None]).std(axis=0) / np.sqrt(draws.shape[0])
    got = nb_expected_log1p(mu, theta, scale)
    assert got.shape == mu.shape
    assert (np.abs(got - monte_carlo) < 5 * sd + 1e-3).all()
