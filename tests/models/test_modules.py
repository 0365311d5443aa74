"""Shared building blocks."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from perturbscope.models.modules import (
    MLP,
    CountDecoder,
    GaussianEncoder,
    LibraryEncoder,
    first_layers,
    kl_normal,
    kl_standard_normal,
    one_hot,
    reparameterize,
    wasserstein_to_origin,
)


def test_mlp_single_cell_in_training_mode_and_covariates() -> None:
    torch.manual_seed(0)
    mlp = MLP(5, n_hidden=8, n_layers=2, dropout=0.2, n_cov=3).train()
    out = mlp(torch.randn(1, 5), one_hot(torch.tensor([2]), 3))
    assert out.shape == (1, 8) and torch.isfinite(out).all()
    # covariates change the output
    mlp.eval()
    x = torch.randn(4, 5)
    a = mlp(x, one_hot(torch.zeros(4, dtype=torch.long), 3))
    b = mlp(x, one_hot(torch.ones(4, dtype=torch.long), 3))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="n_layers"):
        MLP(5, n_layers=0)


def test_gaussian_and_library_encoder_shapes() -> None:
    torch.manual_seed(0)
    enc = GaussianEncoder(6, 3, n_hidden=8)
    mean, var = enc(torch.randn(4, 6))
    assert mean.shape == var.shape == (4, 3) and (var > 0).all()
    m, v, z = enc.sample(torch.randn(4, 6))
    assert z.shape == (4, 3)
    lm, lv = LibraryEncoder(6, n_hidden=8)(torch.randn(4, 6))
    assert lm.shape == lv.shape == (4,)


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_count_decoder(likelihood: str) -> None:
    torch.manual_seed(0)
    dec = CountDecoder(3, 11, n_hidden=8, n_cov=2, likelihood=likelihood)
    z, cov = torch.randn(5, 3), one_hot(torch.tensor([0, 1, 0, 1, 1]), 2)
    loglib = torch.log(torch.tensor([10.0, 100.0, 1000.0, 5.0, 1.0]))
    p = dec(z, loglib, cov)
    torch.testing.assert_close(p.log_rho.exp().sum(-1), torch.ones(5))
    torch.testing.assert_close(p.log_mu.exp().sum(-1), loglib.exp())
    assert p.log_theta.shape == (11,)
    assert (p.zi_logits is None) == (likelihood == "nb")
    torch.testing.assert_close(dec.log_proportions(z, cov), p.log_rho)
    with pytest.raises(ValueError, match="likelihood"):
        CountDecoder(3, 11, likelihood="poisson")


def test_kl_helpers_match_torch() -> None:
    g = torch.Generator().manual_seed(0)
    m, v = torch.randn(7, 4, generator=g), torch.rand(7, 4, generator=g) + 0.1
    pm, pv = torch.randn(7, 4, generator=g), torch.rand(7, 4, generator=g) + 0.1
    ref0 = kl_divergence(Normal(m, v.sqrt()), Normal(0.0, 1.0)).sum(-1)
    ref = kl_divergence(Normal(m, v.sqrt()), Normal(pm, pv.sqrt())).sum(-1)
    torch.testing.assert_close(kl_standard_normal(m, v), ref0)
    torch.testing.assert_close(kl_normal(m, v, pm, pv), ref)
    torch.testing.assert_close(wasserstein_to_origin(m, v), (m**2 + v).sum(-1))


def test_reparameterize_statistics() -> None:
    torch.manual_seed(0)
    mean, var = torch.full((20000, 1), 2.0), torch.full((20000, 1), 0.25)
    z = reparameterize(mean, var)
    assert abs(float(z.mean()) - 2.0) < 0.02 and abs(float(z.var()) - 0.25) < 0.02


def test_first_layers_as_one_product_equal_each_mlp() -> None:
    torch.manual_seed(0)
    mlps = [MLP(12, n_hidden=h, n_layers=2, dropout=0.0, n_cov=2).eval() for h in (8, 5, 3)]
    x, cov = torch.randn(4, 12), one_hot(torch.tensor([0, 1, 1, 0]), 2)
    firsts = first_layers(mlps, x, cov)
    assert [f.shape for f in firsts] == [(4, 8), (4, 5), (4, 3)]
    for mlp, first in zip(mlps, firsts):
        torch.testing.assert_close(first, mlp.linears[0](torch.cat([x, cov], -1)))
        torch.testing.assert_close(mlp(x, cov, first), mlp(x, cov))
    with pytest.raises(ValueError, match="covariate width"):
        first_layers([MLP(12, n_cov=0), MLP(12, n_cov=2)], x, cov)
