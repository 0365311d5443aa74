"""fit's optional per-epoch callback (used by the benchmark to time the way to a score)."""

from __future__ import annotations

import numpy as np
import torch

from perturbscope.models import TrainConfig, fit, seeded
from perturbscope.models.contrastive import ContrastiveVAE
from perturbscope.models.data import CellData, PairedSampler

from .synthetic import random_counts


def _fit(callback=None, max_epochs: int = 4):
    data = CellData(random_counts(60, 20, seed=2))
    train = PairedSampler(data, np.arange(0, 20), np.arange(20, 50), batch_size=8)
    val = PairedSampler(data, np.arange(50, 55), np.arange(55, 60), batch_size=8, shuffle=False)
    with seeded(0):
        model = ContrastiveVAE(20, n_background=2, n_salient=2, n_hidden=8)
    history = fit(
        model, train, val, TrainConfig(max_epochs=max_epochs, progress=False, device="cpu", seed=1), callback=callback
    )
    return model, history


def test_callback_sees_every_epoch_and_changes_nothing() -> None:
    seen = []

    def callback(epoch, history, model):
        seen.append((epoch, len(history), model.training))
        torch.randn(1000)  # consuming the RNG must not change the fit
        return None

    plain, plain_history = _fit()
    with_cb, cb_history = _fit(callback)
    assert seen == [(0, 1, False), (1, 2, False), (2, 3, False), (3, 4, False)]
    assert plain_history.train_loss == cb_history.train_loss
    for a, b in zip(plain.state_dict().values(), with_cb.state_dict().values()):
        assert torch.equal(a, b)


def test_callback_can_stop_training() -> None:
    _, history = _fit(lambda epoch, history, model: epoch == 1, max_epochs=10)
    assert len(history) == 2 and not history.stopped_early
