"""Data-parallel training (torch.distributed, gloo on the CPU): two processes reach the quality of one
with the same global batch; samplers shard cells; a rank's failure reaches the caller."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from torch import nn

from perturbscope.models import ContrastiveVAE, TrainConfig, TrainingError, fit, seeded
from perturbscope.models.data import CellData, MinibatchSampler, PairedSampler
from perturbscope.models.distributed import world_size_for

from .synthetic import make_screen, random_counts

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def test_world_size_parsing() -> None:
    assert [world_size_for(v) for v in (False, None, 0, 1, 2, 4)] == [1, 1, 1, 1, 2, 4]
    assert world_size_for("auto") == (torch.cuda.device_count() if torch.cuda.device_count() >= 2 else 1)
    with pytest.raises(ValueError, match="distributed 'two' is not understood"):
        TrainConfig(distributed="two")


def test_shards_split_the_cells_between_ranks() -> None:
    data = CellData(random_counts(101, 10))
    sampler = MinibatchSampler(data, np.arange(101), batch_size=32)
    shards = [sampler.shard(rank, 2) for rank in range(2)]
    assert [s.batch_size for s in shards] == [16, 16]
    assert [s.idx.numel() for s in shards] == [50, 50]  # equal: every rank takes as many steps
    assert len(shards[0]) == len(shards[1])
    assert not set(shards[0].idx.tolist()) & set(shards[1].idx.tolist())
    val = [sampler.shard(rank, 2, equal=False) for rank in range(2)]  # validation: every cell once
    assert sorted(val[0].idx.tolist() + val[1].idx.tolist()) == list(range(101))

    paired = PairedSampler(data, np.arange(0, 31), np.arange(31, 101), batch_size=20)
    parts = [paired.shard(rank, 2) for rank in range(2)]
    assert [p.batch_size for p in parts] == [10, 10]
    assert [p.target_idx.numel() for p in parts] == [35, 35]
    assert sorted(parts[0].background_idx.tolist() + parts[1].background_idx.tolist()) == list(range(31))


def _planted(seed: int = 0):
    screen = make_screen(n_controls=400, n_per_program=160, n_genes=200, seed=seed)
    data = CellData(screen.counts)
    rng = np.random.default_rng(0)
    bg, tg = np.flatnonzero(screen.is_control), np.flatnonzero(~screen.is_control)
    val_bg, val_tg = rng.choice(bg, 60, replace=False), rng.choice(tg, 80, replace=False)
    train = PairedSampler(data, np.setdiff1d(bg, val_bg), np.setdiff1d(tg, val_tg), batch_size=64)
    val = PairedSampler(data, val_bg, val_tg, batch_size=256, shuffle=False)
    return screen, data, train, val, tg


def _train(distributed: int) -> tuple[float, float]:
    screen, data, train, val, tg = _planted()
    with seeded(0):
        model = ContrastiveVAE(200, n_background=5, n_salient=5, n_hidden=64, decoder="joint")
    config = TrainConfig(
        max_epochs=40,
        lr=1e-2,
        kl_warmup_epochs=5,
        patience=40,
        seed=0,
        progress=False,
        num_threads=1,
        distributed=distributed,
    )
    history = fit(model, train, val, config)
    assert len(history) == 40 and history.best_epoch is not None
    assert next(model.parameters()).device.type == "cpu" and not model.training
    _, salient = model.embed(data)
    ari = adjusted_rand_score(screen.program[tg], KMeans(3, n_init=10, random_state=0).fit_predict(salient[tg]))
    return min(history.val_loss), ari


def test_two_gloo_processes_train_as_well_as_one_with_the_same_global_batch() -> None:
    """2 ranks x 32 cells per step against 1 process x 64: the best validation loss (over every
    validation cell, summed over ranks) within 2 % and the programs separated alike."""
    loss_one, ari_one = _train(distributed=1)
    loss_two, ari_two = _train(distributed=2)
    print(f"one process: val loss {loss_one:.2f}, ARI {ari_one:.3f}; two: {loss_two:.2f}, ARI {ari_two:.3f}")
    assert abs(loss_two - loss_one) / abs(loss_one) < 0.02
    assert ari_one > 0.9 and ari_two > 0.9


class Diverges(nn.Module):
    """A module whose loss is NaN: the rank's TrainingError must reach the calling process."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def loss(self, batch, kl_weight: float) -> dict[str, torch.Tensor]:
        value = (self.weight * batch["x"].sum()) / 0.0 * 0.0
        return {"loss": value, "reconstruction": value}


def test_a_diverging_rank_raises_training_error_in_the_caller() -> None:
    data = CellData(random_counts(40, 5))
    sampler = MinibatchSampler(data, batch_size=8)
    with pytest.raises(TrainingError, match="non-finite in epoch 0"):
        fit(
            Diverges(),
            sampler,
            None,
            TrainConfig(max_epochs=2, progress=False, distributed=2),
        )
