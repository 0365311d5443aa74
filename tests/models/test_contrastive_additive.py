"""ContrastiveVAE(decoder="additive"): the salient code adds a linear log-expression effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbscope.models import ParameterError, TrainConfig, fit, seeded
from perturbscope.models.contrastive import AdditiveSalientDecoder, ContrastiveVAE
from perturbscope.models.data import CellData, PairedSampler
from perturbscope.models.io import from_checkpoint, to_checkpoint

from .synthetic import random_counts


def test_additive_decoder_contract() -> None:
    model = ContrastiveVAE(30, n_salient=4, decoder="additive", n_batch=2)
    assert isinstance(model.decoder, AdditiveSalientDecoder)
    assert model.hparams["decoder"] == "additive"
    clone = from_checkpoint(to_checkpoint(model))
    assert isinstance(clone.decoder, AdditiveSalientDecoder)
    assert ContrastiveVAE(30).hparams["decoder"] == "additive"  # the default
    with pytest.raises(ParameterError, match=r"decoder must be one of \['joint', 'additive'\], got 'linear'"):
        ContrastiveVAE(30, decoder="linear")


def test_salient_effect_is_the_same_log_fold_change_in_every_cell() -> None:
    with seeded(0):
        decoder = AdditiveSalientDecoder(3, 2, 25, n_hidden=8, likelihood="nb")
    z = torch.randn(6, 3)
    s = torch.randn(1, 2).expand(6, 2)
    with_s = decoder.log_proportions(torch.cat([z, s], 1))
    without = decoder.log_proportions(torch.cat([z, torch.zeros_like(s)], 1))
    shift = with_s - without
    # up to the softmax normalisation (a per-cell constant) the shift is W s for every cell
    centred = shift - shift.mean(1, keepdim=True)
    assert torch.allclose(centred, centred[0].expand_as(centred), atol=1e-5)
    params = decoder(torch.cat([z, s], 1), torch.full((6,), 5.0))
    assert torch.allclose(params.log_mu, params.log_rho + 5.0)
    # the logits come from one product over [h, s]: the same as the two layers apart
    h = decoder.background.net(z, None)
    expected = torch.log_softmax(decoder.background.expression(h) + decoder.salient(s), -1)
    torch.testing.assert_close(with_s, expected, rtol=1e-5, atol=1e-6)


def test_additive_model_trains_and_embeds() -> None:
    data = CellData(random_counts(80, 30, seed=3))
    sampler = PairedSampler(data, np.arange(0, 30), np.arange(30, 71), batch_size=20)  # last batch: 1 cell
    with seeded(0):
        model = ContrastiveVAE(30, n_salient=3, decoder="additive", likelihood="zinb")
    history = fit(model, sampler, None, TrainConfig(max_epochs=3, progress=False, device="cpu"))
    assert np.isfinite(history.train_loss).all()
    background, salient = model.embed(data)
    assert background.shape == (80, 10) and salient.shape == (80, 3)
    with_s, without_s = model.salient_expression(data, np.arange(5))
    np.testing.assert_allclose(with_s.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(without_s.sum(1), 1.0, rtol=1e-5)


def test_unit_salient_loadings_make_a_code_as_long_as_its_log_fold_change() -> None:
    with seeded(0):
        model = ContrastiveVAE(
            25, n_background=3, n_salient=2, decoder="additive", likelihood="nb", salient_loadings="unit"
        )
    assert model.hparams["salient_loadings"] == "unit" and model.decoder.unit_loadings
    assert ContrastiveVAE(25, decoder="additive").hparams["salient_loadings"] == "shared"  # the default
    with torch.no_grad():
        model.decoder.salient.weight.mul_(7.0)  # the raw weights' scale does not matter
    z = torch.randn(4, 3)
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.6, 0.8]])
    _, with_s = model.decoder._hidden_logits(torch.cat([z, codes], 1), None)
    _, without = model.decoder._hidden_logits(torch.cat([z, torch.zeros_like(codes)], 1), None)
    lengths = torch.linalg.vector_norm(with_s - without, dim=1)
    # unit columns: one unit along a dimension moves the logits by exactly 1; 2 units by 2
    torch.testing.assert_close(lengths[:3], torch.tensor([1.0, 1.0, 2.0]), rtol=1e-5, atol=1e-5)

    with seeded(0):
        free = ContrastiveVAE(25, n_background=3, n_salient=2, decoder="additive", salient_loadings="free")
    with torch.no_grad():
        free.decoder.salient.weight.mul_(7.0)
    _, raw = free.decoder._hidden_logits(torch.cat([z, codes], 1), None)
    _, raw0 = free.decoder._hidden_logits(torch.cat([z, torch.zeros_like(codes)], 1), None)
    assert torch.linalg.vector_norm(raw - raw0, dim=1)[0] > 2.0
    with pytest.raises(ParameterError, match="salient_loadings must be one of .*, got 'scaled'"):
        ContrastiveVAE(25, decoder="additive", salient_loadings="scaled")


def test_shared_salient_loadings_have_one_learned_length() -> None:
    with seeded(0):
        model = ContrastiveVAE(
            25, n_background=3, n_salient=2, decoder="additive", likelihood="nb", salient_loadings="shared"
        )
    assert model.decoder.log_scale is not None and model.decoder.log_scale.requires_grad
    with torch.no_grad():
        model.decoder.log_scale.fill_(np.log(3.0))
        model.decoder.salient.weight[:, 1].mul_(10.0)  # one column's raw size does not matter
    z = torch.randn(2, 3)
    codes = torch.eye(2)
    _, with_s = model.decoder._hidden_logits(torch.cat([z, codes], 1), None)
    _, without = model.decoder._hidden_logits(torch.cat([z, torch.zeros_like(codes)], 1), None)
    # every dimension moves the logits by the one shared length, exp(log_scale) = 3
    torch.testing.assert_close(torch.linalg.vector_norm(with_s - without, dim=1), torch.tensor([3.0, 3.0]))
