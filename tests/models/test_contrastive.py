"""ContrastiveVAE: contract, checkpoints, and the science on a planted screen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from perturbscope.models import ParameterError, TrainConfig, fit, seeded
from perturbscope.models.contrastive import ContrastiveVAE
from perturbscope.models.data import CellData, PairedSampler
from perturbscope.models.io import from_checkpoint, load_model, save_model, to_checkpoint

from .synthetic import make_screen, random_counts

N_GENES = 30


@pytest.fixture(scope="module")
def data() -> CellData:
    counts = random_counts(80, N_GENES, seed=4)
    return CellData(counts, obs={"batch": np.arange(80) % 2})


def _sampler(data: CellData, batch_size: int = 20) -> PairedSampler:
    # 41 targets -> the last batch holds a single cell
    return PairedSampler(data, np.arange(0, 30), np.arange(30, 71), batch_size=batch_size)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_genes": 0}, "n_genes"),
        ({"n_background": 0}, "n_background"),
        ({"n_salient": 0}, "n_salient"),
        ({"n_salient": 2.5}, "n_salient"),
        ({"n_layers": 0}, "n_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"likelihood": "poisson"}, r"likelihood must be one of \['nb', 'zinb'\].*got 'poisson'"),
        ({"library": "fixed"}, "library must be 'observed'.*or 'learned', got 'fixed'"),
        ({"library": "learned"}, "library_log_mean"),
        ({"library": "learned", "library_log_mean": [1.0, 2.0], "library_log_var": [1.0, 1.0]}, "max\\(n_batch, 1\\)"),
        ({"wasserstein_penalty": -1.0}, "wasserstein_penalty"),
        ({"n_batch": -1}, "n_batch"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(kwargs: dict, match: str) -> None:
    params = {"n_genes": N_GENES, **kwargs}
    with pytest.raises(ParameterError, match=match):
        ContrastiveVAE(**params)


def test_hparams_rebuild_and_metadata() -> None:
    model = ContrastiveVAE(N_GENES, n_salient=4, likelihood="nb", n_batch=2)
    json.dumps(model.hparams)
    assert model.metadata == {}
    clone = type(model)(**model.hparams)
    assert clone.hparams == model.hparams
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert "ContrastiveVAE(n_genes=30" in repr(model)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"likelihood": "nb", "n_batch": 2, "n_layers": 2},
        {"library": "learned", "library_log_mean": [3.0], "library_log_var": [0.5]},
    ],
)
def test_trains_with_final_batch_of_one(data: CellData, kwargs: dict) -> None:
    if kwargs.get("library") == "learned":
        mean, var = data.library_prior(np.arange(71))
        kwargs = {**kwargs, "library_log_mean": mean, "library_log_var": var}
    with seeded(0):
        model = ContrastiveVAE(N_GENES, n_hidden=16, **kwargs)
    sampler = _sampler(data)
    assert [len(b["target"]["idx"]) for b in sampler][-1] == 1
    hist = fit(model, sampler, None, TrainConfig(max_epochs=3, lr=1e-2, progress=False))
    assert np.isfinite(hist.train_loss).all()
    assert hist.train_loss[-1] < hist.train_loss[0]
    if kwargs.get("library") == "learned":
        assert "kl_library" in hist.train_terms


def test_loss_terms(data: CellData) -> None:
    with seeded(0):
        model = ContrastiveVAE(N_GENES, n_hidden=16, wasserstein_penalty=0.0)
    batch = next(iter(_sampler(data)))
    torch.manual_seed(0)
    out = model.loss(batch, kl_weight=0.0)
    assert set(out) == {"loss", "reconstruction", "kl_background", "kl_salient", "wasserstein"}
    assert all(v.shape == () for v in out.values())
    # with kl_weight 0 and no penalty the loss is the mean reconstruction
    torch.testing.assert_close(out["loss"], out["reconstruction"])
    model.wasserstein_penalty = 2.0
    torch.manual_seed(0)
    out2 = model.loss(batch, kl_weight=0.0)
    torch.testing.assert_close(out2["loss"], out["reconstruction"] + 0.5 * 2.0 * out["wasserstein"])


def test_controls_decode_with_zero_salient(data: CellData) -> None:
    """Controls are decoded with s = 0: with no KL and no penalty, the salient encoder
    gets gradient only from the targets, whatever the control cells are."""
    with seeded(0):
        model = ContrastiveVAE(N_GENES, n_hidden=16, dropout=0.0, wasserstein_penalty=0.0)
    targets = data.batch(torch.arange(30, 40))

    def salient_grads(controls: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)
        model.loss({"background": data.batch(controls), "target": targets}, kl_weight=0.0)["loss"].backward()
        return [p.grad.clone() for p in model.salient_encoder.parameters()]

    g1, g2 = salient_grads(torch.arange(0, 10)), salient_grads(torch.arange(10, 20))
    assert any(g.abs().sum() > 0 for g in g1)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    # the background encoder, in contrast, learns from the controls too
    model.zero_grad()
    torch.manual_seed(1)
    model.loss({"background": data.batch(torch.arange(0, 10)), "target": targets}, 0.0)["loss"].backward()
    gz1 = model.background_encoder.mean.weight.grad.clone()
    model.zero_grad()
    torch.manual_seed(1)
    model.loss({"background": data.batch(torch.arange(10, 20)), "target": targets}, 0.0)["loss"].backward()
    assert not torch.allclose(gz1, model.background_encoder.mean.weight.grad)


def test_embed_salient_expression_and_checkpoint_round_trip(data: CellData, tmp_path: Path) -> None:
    with seeded(0):
        model = ContrastiveVAE(N_GENES, n_hidden=16, n_background=4, n_salient=3, n_batch=2)
    fit(model, _sampler(data), None, TrainConfig(max_epochs=2, progress=False))
    model.metadata = {"genes": [f"g{i}" for i in range(N_GENES)]}
    zb, zs = model.embed(data)
    assert zb.shape == (80, 4) and zs.shape == (80, 3) and zb.dtype == np.float32
    zb2, zs2 = model.embed(data, idx=np.arange(10, 20), batch_size=3)
    np.testing.assert_allclose(zb2, zb[10:20], rtol=1e-5, atol=1e-6)  # posterior means, no sampling
    np.testing.assert_allclose(zs2, zs[10:20], rtol=1e-5, atol=1e-6)
    with_s, without_s = model.salient_expression(data, idx=np.arange(30, 40))
    assert with_s.shape == without_s.shape == (10, N_GENES)
    np.testing.assert_allclose(with_s.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(without_s.sum(1), 1.0, rtol=1e-5)
    assert not np.allclose(with_s, without_s)

    path = tmp_path / "model.pt"
    save_model(model, path)
    loaded = load_model(path)
    assert type(loaded) is ContrastiveVAE and not loaded.training
    assert loaded.hparams == model.hparams and loaded.metadata == model.metadata
    lb, ls = loaded.embed(data)
    np.testing.assert_array_equal(lb, zb)
    np.testing.assert_array_equal(ls, zs)
    ckpt = to_checkpoint(model)
    assert ckpt["class"] == "perturbscope.models.contrastive.ContrastiveVAE"
    assert set(ckpt) == {"class", "hparams", "metadata", "state_dict"}
    np.testing.assert_array_equal(from_checkpoint(ckpt).salient_expression(data, np.arange(30, 40))[0], with_s)
    with pytest.raises(ValueError, match="missing keys"):
        from_checkpoint({"class": ckpt["class"]})
    with pytest.raises(ValueError, match="cannot be imported"):
        from_checkpoint({**ckpt, "class": "perturbscope.models.nope.Model"})
    model.metadata = {"bad": object()}
    with pytest.raises(ValueError, match="JSON"):
        to_checkpoint(model)


def test_missing_batch_covariate_is_clear() -> None:
    d = CellData(random_counts(20, N_GENES))
    model = ContrastiveVAE(N_GENES, n_batch=2)
    with pytest.raises(KeyError, match="batch"):
        model.embed(d)


def test_salient_space_isolates_perturbation_programs() -> None:
    """Planted screen: a strong 3-state "cell-cycle-like" axis shared by controls and
    targets, plus 3 target-only programs. After training, targets' salient embedding
    clusters by program, the shared axis is predictable from the background
    embedding but not from the salient one, and controls sit near salient 0.

    The joint decoder (the paper's). The default additive decoder's science is tested on
    simulated screens (tests/pipelines/contrastive_model/test_science.py); on this small
    toy (1,100 cells, ~200 UMIs per cell) it is unstable (KMeans ARI 0.2-0.99 over three
    toy seeds, against 0.99-1.0 for the joint decoder)."""
    screen = make_screen(n_controls=500, n_per_program=200, n_genes=200, seed=0)
    data = CellData(screen.counts)
    rng = np.random.default_rng(0)
    bg = np.flatnonzero(screen.is_control)
    tg = np.flatnonzero(~screen.is_control)
    val_bg, val_tg = rng.choice(bg, 50, replace=False), rng.choice(tg, 60, replace=False)
    train = PairedSampler(data, np.setdiff1d(bg, val_bg), np.setdiff1d(tg, val_tg), batch_size=128)
    val = PairedSampler(data, val_bg, val_tg, batch_size=128, shuffle=False)
    with seeded(0):
        model = ContrastiveVAE(200, n_background=5, n_salient=5, n_hidden=64, decoder="joint")
    hist = fit(
        model, train, val, TrainConfig(max_epochs=80, lr=1e-2, patience=20, seed=0, progress=False, num_threads=1)
    )
    assert hist.val_loss[-1] < hist.val_loss[0]

    zb, zs = model.embed(data)
    clusters = KMeans(3, n_init=10, random_state=0).fit_predict(zs[tg])
    ari = adjusted_rand_score(screen.program[tg], clusters)
    print(f"ARI {ari:.3f}")
    assert ari > 0.7, f"salient space does not separate the programs (ARI {ari:.2f})"

    def knn_accuracy(z: np.ndarray, y: np.ndarray) -> float:
        return float(cross_val_score(KNeighborsClassifier(15), z, y, cv=5).mean())

    chance = 1.0 / 3.0
    acc_salient = knn_accuracy(zs[tg], screen.phase[tg])
    acc_background = knn_accuracy(zb[tg], screen.phase[tg])
    print(f"phase kNN accuracy: salient {acc_salient:.3f}, background {acc_background:.3f}")
    assert acc_background > 0.9, f"background space lost the shared axis (kNN acc {acc_background:.2f})"
    assert acc_salient < chance + 0.15, f"shared axis leaks into the salient space (kNN acc {acc_salient:.2f})"

    norm = np.linalg.norm(zs, axis=1)
    assert norm[bg].mean() < 0.3 * norm[tg].mean(), "controls' salient embedding is not near 0"
