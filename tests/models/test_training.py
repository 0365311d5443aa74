"""The shared training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from perturbscope.models import TrainingError, seeded
from perturbscope.models.contrastive import ContrastiveVAE
from perturbscope.models.data import CellData, PairedSampler
from perturbscope.models.modules import Linear, matmul_dtype
from perturbscope.models.runtime import resolve_precision
from perturbscope.models.training import History, TrainConfig, fit, kl_weight_at

from .synthetic import random_counts


class _Quadratic(nn.Module):
    """Toy model: loss = (w - target)^2; records the kl_weight it was called with."""

    def __init__(self, nan_at: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.calls = 0
        self.nan_at = nan_at  # (call number, term) -> make "penalty" NaN
        self.kl_weights: list[float] = []

    def loss(self, batch: dict[str, Tensor], kl_weight: float) -> dict[str, Tensor]:
        self.calls += 1
        if self.training:
            self.kl_weights.append(kl_weight)
        err = ((self.w - batch["t"]) ** 2).mean()
        penalty = torch.zeros(())
        if self.nan_at is not None and self.calls >= self.nan_at[0]:
            penalty = penalty + float("nan")
        return {"loss": err + penalty, "mse": err, "penalty": penalty}


class _ListSampler:
    def __init__(self, target: float, n_batches: int = 2, n: int = 4) -> None:
        self.batches = [{"x": torch.zeros(n, 1), "t": torch.full((n, 1), target)} for _ in range(n_batches)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _contrastive_setup(seed: int = 0):
    d = CellData(random_counts(90, 30, seed=2))
    train = PairedSampler(d, np.arange(0, 25), np.arange(30, 77), batch_size=16)  # last batch: 15
    val = PairedSampler(d, np.arange(25, 30), np.arange(77, 90), batch_size=16, shuffle=False)
    with seeded(seed):
        model = ContrastiveVAE(30, n_hidden=16, n_background=3, n_salient=2)
    return d, model, train, val


def test_fit_is_deterministic_and_history_format() -> None:
    cfg = TrainConfig(max_epochs=4, lr=1e-2, progress=False, seed=7, kl_warmup_epochs=2)
    states, hists = [], []
    for _ in range(2):
        _, model, train, val = _contrastive_setup()
        hists.append(fit(model, train, val, cfg))
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    h = hists[0]
    assert h.train_loss == hists[1].train_loss and h.val_loss == hists[1].val_loss
    assert h.epoch == [0, 1, 2, 3] and h.kl_weight == [0.5, 1.0, 1.0, 1.0]
    df = h.to_frame()
    for col in (
        "epoch",
        "train_loss",
        "val_loss",
        "seconds",
        "train_reconstruction",
        "val_kl_salient",
        "val_wasserstein",
    ):
        assert col in df.columns, col
    assert len(df) == 4 and np.isfinite(df.to_numpy(dtype=float)).all()
    assert h.train_loss[-1] < h.train_loss[0]
    # a different seed gives different weights
    _, model, train, val = _contrastive_setup()
    fit(model, train, val, TrainConfig(max_epochs=4, lr=1e-2, progress=False, seed=8, kl_warmup_epochs=2))
    assert any(not torch.equal(value, states[0][key]) for key, value in model.state_dict().items())


def test_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    _, model, train, val = _contrastive_setup()
    fit(model, train, val, TrainConfig(max_epochs=1, progress=True))
    assert "val=" in capsys.readouterr().err


def test_nan_raises_training_error_naming_epoch_and_term() -> None:
    model = _Quadratic(nan_at=(5, 1))  # 2 train batches per epoch -> call 5 is epoch 2 (with val calls counted)
    with pytest.raises(TrainingError) as err:
        fit(model, _ListSampler(1.0), None, TrainConfig(max_epochs=10, progress=False))
    msg = str(err.value)
    assert "epoch 2" in msg and "['penalty']" in msg and "learning rate" in msg
    assert isinstance(err.value, ValueError)


def test_divergent_learning_rate_raises_training_error() -> None:
    _, model, train, val = _contrastive_setup()
    with pytest.raises(TrainingError, match=r"epoch 0 .*reconstruction.*lower learning rate"):
        fit(model, train, val, TrainConfig(max_epochs=3, lr=1e6, progress=False))


def test_early_stopping_stops_and_restores_best() -> None:
    # training pulls w toward +1 while the validation target is -1:
    # validation loss only gets worse after the first epoch
    model = _Quadratic()
    hist = fit(
        model, _ListSampler(1.0), _ListSampler(-1.0), TrainConfig(max_epochs=50, lr=0.05, patience=3, progress=False)
    )
    assert hist.stopped_early
    assert len(hist) == 4 and hist.best_epoch == 0
    w = float(model.w.detach())
    assert w == pytest.approx(0.1, abs=1e-3)  # two Adam steps of ~lr from 0 (4 epochs would give ~0.4)
    assert hist.val_loss[0] == pytest.approx((w + 1) ** 2, rel=1e-6)
    assert hist.val_loss[3] > hist.val_loss[0] + 0.5
    assert not model.training
    # without early stopping it runs to max_epochs but still restores the best epoch
    model = _Quadratic()
    hist = fit(
        model,
        _ListSampler(1.0),
        _ListSampler(-1.0),
        TrainConfig(max_epochs=6, lr=0.05, early_stopping=False, progress=False),
    )
    assert len(hist) == 6 and not hist.stopped_early and float(model.w.detach()) == pytest.approx(0.1, abs=1e-3)


def test_min_delta_and_warmup_gate_early_stopping() -> None:
    # val improves every epoch but by less than min_delta -> stops after patience
    model = _Quadratic()
    hist = fit(
        model,
        _ListSampler(-1.0),
        _ListSampler(-1.0),
        TrainConfig(max_epochs=50, lr=1e-3, patience=2, min_delta=1.0, progress=False),
    )
    assert hist.stopped_early and len(hist) == 3
    # epochs inside the KL warm-up are not eligible for early stopping / best epoch
    model = _Quadratic()
    hist = fit(
        model,
        _ListSampler(1.0),
        _ListSampler(-1.0),
        TrainConfig(max_epochs=50, lr=0.05, patience=2, kl_warmup_epochs=4, progress=False),
    )
    assert hist.best_epoch == 3 and len(hist) == 6
    assert model.kl_weights[:8] == [0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0]


def test_learning_rate_decays_on_a_validation_plateau_after_the_warm_up() -> None:
    # validation only gets worse (train pulls w to +1, validation wants -1): every epoch after the
    # warm-up is a bad one, so with lr_patience=1 the rate halves after every 2nd bad epoch
    model = _Quadratic()
    cfg = TrainConfig(
        max_epochs=8,
        lr=0.08,
        lr_patience=1,
        lr_factor=0.5,
        lr_min=0.015,
        kl_warmup_epochs=2,
        early_stopping=False,
        progress=False,
    )
    hist = fit(model, _ListSampler(1.0), _ListSampler(-1.0), cfg)
    # epoch 1 ends the warm-up (first eligible, the best); 2 and 3 are bad -> decay for epoch 4, ...
    assert hist.lr == pytest.approx([0.08, 0.08, 0.08, 0.08, 0.04, 0.04, 0.02, 0.02])
    assert hist.to_frame()["lr"].tolist() == pytest.approx(hist.lr)
    assert hist.best_epoch == 1
    # the floor: lr_min holds the rate
    model = _Quadratic()
    hist = fit(model, _ListSampler(1.0), _ListSampler(-1.0), TrainConfig(**{**cfg.to_dict(), "max_epochs": 12}))
    assert hist.lr[-1] == pytest.approx(0.015) and min(hist.lr) == pytest.approx(0.015)
    # a constant rate by default, and the decay needs a validation sampler
    model = _Quadratic()
    hist = fit(
        model,
        _ListSampler(1.0),
        _ListSampler(-1.0),
        TrainConfig(max_epochs=5, lr=0.08, early_stopping=False, progress=False),
    )
    assert hist.lr == [0.08] * 5
    model = _Quadratic()
    assert fit(model, _ListSampler(1.0), None, cfg).lr == [0.08] * 8


def test_kl_weight_schedule() -> None:
    assert [kl_weight_at(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_weight_at(0, 0) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_epochs": 0}, "max_epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"patience": 0}, "patience"),
        ({"kl_warmup_epochs": -1}, "kl_warmup_epochs"),
        ({"lr_patience": -1}, "lr_patience"),
        ({"lr_factor": 1.0}, "lr_factor"),
        ({"lr_min": 1.0}, "lr_min"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"device": "tpu"}, "device"),
        ({"precision": "float16"}, "precision"),
    ],
)
def test_train_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_cuda_unavailable_is_clear() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA available")
    with pytest.raises(ValueError, match="CUDA is not available"):
        fit(_Quadratic(), _ListSampler(1.0), None, TrainConfig(device="cuda", progress=False))


def test_grad_clip_and_no_validation() -> None:
    _, model, train, _ = _contrastive_setup()
    hist = fit(model, train, None, TrainConfig(max_epochs=2, grad_clip=1.0, progress=False))
    assert isinstance(hist, History) and math.isnan(hist.val_loss[0]) and hist.best_epoch == 1
    assert hist.to_dict()["train_terms"]["loss"] == hist.train_loss


def test_num_threads_is_scoped() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []

    class _Spy(_Quadratic):
        def loss(self, batch, kl_weight):  # type: ignore[override]
            seen.append(torch.get_num_threads())
            return super().loss(batch, kl_weight)

    fit(_Spy(), _ListSampler(1.0), None, TrainConfig(max_epochs=1, progress=False, num_threads=2))
    assert set(seen) == {2} and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        TrainConfig(num_threads=0)


def test_precision_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) is None
    assert resolve_precision("bfloat16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("half", cpu)


class _LargeLayerSpy(nn.Module):
    """A model with one large Linear that records the dtype its product ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = Linear(300, 200)
        self.product_dtypes: list[torch.dtype] = []
        self.outputs: list[torch.dtype] = []

    def loss(self, batch: dict[str, Tensor], kl_weight: float) -> dict[str, Tensor]:
        from perturbscope.models import modules

        self.product_dtypes.append(modules._MATMUL_DTYPE.get() or torch.float32)
        out = self.layer(batch["x"])
        self.outputs.append(out.dtype)
        return {"loss": out.square().mean()}


def test_bfloat16_training_runs_products_in_bf16_and_everything_else_in_float32() -> None:
    from perturbscope.models import modules

    model = _LargeLayerSpy()
    batches = [{"x": torch.randn(8, 300)}] * 2
    in_callback: list[torch.dtype | None] = []

    def callback(epoch: int, history: History, m: nn.Module) -> None:
        in_callback.append(modules._MATMUL_DTYPE.get())

    config = TrainConfig(max_epochs=2, progress=False, precision="bfloat16", early_stopping=False)
    hist = fit(model, batches, batches, config, callback=callback)
    assert hist.precision == "bfloat16"
    assert set(model.product_dtypes) == {torch.bfloat16}
    assert set(model.outputs) == {torch.float32}  # activations stay float32
    assert model.layer.weight.dtype == torch.float32  # and so do the weights
    # the callback (e.g. scoring an embedding) and everything after fit run in float32
    assert in_callback == [None, None] and modules._MATMUL_DTYPE.get() is None
    assert fit(_LargeLayerSpy(), batches, None, TrainConfig(max_epochs=1, progress=False)).precision == "float32"


def test_bfloat16_fit_is_deterministic_and_close_to_float32() -> None:
    """Same seed, same weights in bfloat16 too; and it learns what float32 learns."""
    runs = {}
    for precision in ("bfloat16", "bfloat16", "float32"):
        d, model, train, val = _contrastive_setup()
        hist = fit(model, train, val, TrainConfig(max_epochs=6, lr=1e-2, progress=False, seed=3, precision=precision))
        runs.setdefault(precision, []).append((model.state_dict(), hist, model.embed(d)))
    (s1, h1, e1), (s2, h2, e2) = runs["bfloat16"]
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert h1.val_loss == h2.val_loss and np.array_equal(e1[1], e2[1])
    _, h32, _ = runs["float32"][0]
    assert h1.train_loss[-1] < h1.train_loss[0]
    # the validation loss per cell differs by well under 1 % from float32's
    assert abs(h1.val_loss[-1] - h32.val_loss[-1]) < 0.01 * abs(h32.val_loss[-1])


def test_matmul_dtype_context_restores() -> None:
    layer = Linear(300, 200)
    x = torch.randn(5, 300)
    exact = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with matmul_dtype(torch.bfloat16):
        low = layer(x)
        small = Linear(10, 20)
        xs = torch.randn(5, 10)
        # small layers are never cast
        assert torch.equal(small(xs), torch.nn.functional.linear(xs, small.weight, small.bias))
    assert low.dtype == torch.float32 and not torch.equal(low, exact)
    torch.testing.assert_close(low, exact, rtol=0.02, atol=0.05)
    assert torch.equal(layer(x), exact)


def test_training_error_names_the_python_arguments_to_change() -> None:
    """A diverging fit names the step, the term and the arguments worth changing, by their Python names
    (a pipeline names its conf keys instead: tests/test_parameters.py)."""
    with pytest.raises(TrainingError) as err:
        fit(_Quadratic(nan_at=(1, 1)), _ListSampler(1.0), None, TrainConfig(max_epochs=3, progress=False))
    message = str(err.value)
    assert "epoch 0" in message and "penalty" in message
    for name in ("(lr)", "(grad_clip)", "(likelihood)", "(kl_warmup_epochs)"):
        assert name in message, message
    renamed = err.value.renamed(lambda group, name: f"{group}.{name}")
    assert (
        isinstance(renamed, TrainingError) and "(training.lr)" in str(renamed) and "(model.likelihood)" in str(renamed)
    )


def test_epoch_counts_scale_to_the_reference_epoch() -> None:
    cfg = TrainConfig(max_epochs=300, kl_warmup_epochs=40, patience=20, lr_patience=5, reference_epoch_cells=10_000)
    assert cfg.scaled_to(10_000) is cfg and cfg.scaled_to(None) is cfg  # at or below the reference: unchanged
    assert cfg.replace(reference_epoch_cells=None).scaled_to(10**6).max_epochs == 300
    twice = cfg.scaled_to(20_000)  # twice the cells per epoch: half the epochs of every count
    assert (twice.max_epochs, twice.kl_warmup_epochs, twice.patience, twice.lr_patience) == (150, 20, 10, 3)
    assert cfg.epoch_scale(20_000) == 0.5
    huge = cfg.scaled_to(2_000_000)  # rounded up, at least 1; a disabled warm-up or decay stays off
    assert (huge.max_epochs, huge.kl_warmup_epochs, huge.patience, huge.lr_patience) == (2, 1, 1, 1)
    off = cfg.replace(kl_warmup_epochs=0, lr_patience=None).scaled_to(2_000_000)
    assert off.kl_warmup_epochs == 0 and off.lr_patience is None
    with pytest.raises(ValueError, match="reference_epoch_cells"):
        TrainConfig(reference_epoch_cells=0)


def test_a_larger_epoch_trains_fewer_epochs_with_a_stepwise_warmup() -> None:
    from perturbscope.models.data import MinibatchSampler

    data = CellData(random_counts(100, 20, seed=3))
    assert MinibatchSampler(data, np.arange(25), batch_size=10).cells_per_epoch == 25
    assert MinibatchSampler(data, np.arange(25), batch_size=10, drop_last=True).cells_per_epoch == 20
    cfg = TrainConfig(max_epochs=8, kl_warmup_epochs=4, lr=1e-2, progress=False, reference_epoch_cells=40)
    runs = {}
    for cells in (40, 80):  # at the reference, then twice its cells per epoch
        with seeded(0):
            model = ContrastiveVAE(20, n_hidden=8, n_background=2, n_salient=2)
        weights: list[float] = []
        loss = model.loss
        model.loss = lambda batch, kl_weight, loss=loss, weights=weights: (
            weights.append(kl_weight) or loss(batch, kl_weight)
        )
        train = PairedSampler(data, np.arange(80, 100), np.arange(cells), batch_size=10)
        runs[cells] = (fit(model, train, None, cfg), weights)
    same, same_weights = runs[40]
    assert len(same) == 8 and same.epoch_scale == 1.0
    assert same.kl_weight == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert same_weights[:4] == [0.25] * 4  # one weight per epoch at the reference
    scaled, scaled_weights = runs[80]
    assert len(scaled) == 4 and scaled.epoch_scale == 0.5  # the same cells trained: 4 epochs of 80 cells
    assert scaled.kl_weight == [0.5, 1.0, 1.0, 1.0]  # warm-up of 2 epochs; each epoch's end weight
    assert scaled_weights[:8] == pytest.approx([i / 16 for i in range(1, 9)])  # grows every step
    assert scaled_weights[8:16] == pytest.approx([0.5 + i / 16 for i in range(1, 9)])
