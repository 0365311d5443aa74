"""ContrastiveVAE(escape_gate=True): a per-cell probability that a target cell was perturbed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbscope.models.contrastive import ContrastiveVAE
from perturbscope.models.data import CellData
from perturbscope.models.io import from_checkpoint, to_checkpoint
from perturbscope.models.training import seeded

from .synthetic import random_counts


def test_gate_contract_and_old_checkpoints() -> None:
    model = ContrastiveVAE(30, escape_gate=True, gate_hidden=16)
    assert model.hparams["escape_gate"] is True and model.hparams["gate_hidden"] == 16
    model.escaper_odds.fill_(0.25)
    clone = from_checkpoint(to_checkpoint(model))
    assert clone.gate is not None and float(clone.escaper_odds) == 0.25
    # checkpoints written before the gate existed rebuild a model without it
    ckpt = to_checkpoint(ContrastiveVAE(30))
    for key in ("escape_gate", "gate_hidden"):
        del ckpt["hparams"][key]
    old = from_checkpoint(ckpt)
    assert old.gate is None
    assert old.perturbed_probability(CellData(random_counts(5, 30))) is None
    with pytest.raises(ValueError, match="gate_hidden must be"):
        ContrastiveVAE(30, escape_gate=True, gate_hidden=0)
    with pytest.raises(ValueError, match="escape_gate must be true or false"):
        ContrastiveVAE(30, escape_gate="yes")


def test_the_gate_term_trains_the_gate_alone() -> None:
    data = CellData(random_counts(40, 30, seed=1))
    batch = {"background": data.batch(np.arange(0, 20)), "target": data.batch(np.arange(20, 40))}
    with seeded(0):
        model = ContrastiveVAE(30, n_salient=3, escape_gate=True, decoder="additive", dropout=0.0)
    with seeded(1):
        out = model.loss(batch)
    assert {"gate_cross_entropy", "gate_accuracy"} <= set(out)
    # the gate learns from the salient space and leaves it as it is: the rest of the model sees
    # exactly the gradient of the ungated model
    out["loss"].backward()
    gated = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith("gate") for n in gated)
    model.zero_grad()
    plain = ContrastiveVAE(30, n_salient=3, decoder="additive", dropout=0.0)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("gate", "escaper"))})
    with seeded(1):
        plain.loss(batch)["loss"].backward()
    for name, param in plain.named_parameters():
        torch.testing.assert_close(gated[name], param.grad, rtol=1e-4, atol=1e-5)


def test_probability_is_one_minus_the_escaper_odds_over_the_cells_odds(monkeypatch: pytest.MonkeyPatch) -> None:
    """P(perturbed) = 1 - (1 - pi) / odds: 0 where targets are as common as escapers make them, 1 far off."""
    model = ContrastiveVAE(30, escape_gate=True)
    data = CellData(random_counts(6, 30))
    odds = np.array([0.05, 0.2, 0.3, 0.4, 2.0, 100.0])
    monkeypatch.setattr(model, "_gate_odds", lambda data, idx, batch_size: odds if idx is None else odds[idx])
    assert model.calibrate_gate(data, np.array([0, 1, 2, 3])) == pytest.approx(0.25)  # the controls' median
    np.testing.assert_allclose(model.perturbed_probability(data), [0, 0, 1 - 0.25 / 0.3, 1 - 0.25 / 0.4,
                                                                   1 - 0.25 / 2.0, 1 - 0.25 / 100.0], rtol=1e-6)
    with pytest.raises(ValueError, match="escape_gate=True"):
        ContrastiveVAE(30).calibrate_gate(data, np.arange(3))
