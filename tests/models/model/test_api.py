"""The AnnData-facing model classes: their own defaults, their own argument names, save / load, wrapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from perturbscope.models import ContrastiveVAE, LinearVAE, ParameterError, TrainConfig, seeded
from perturbscope.models.model import CVAE, LDVAE, ContrastiveVI
from perturbscope.simulation import simulate_screen


def test_each_class_owns_its_training_defaults_over_train_config() -> None:
    base = TrainConfig()
    contrastive = ContrastiveVI.train_config()
    assert (contrastive.max_epochs, contrastive.kl_warmup_epochs, contrastive.lr_patience) == (300, 40, 5)
    assert (contrastive.lr, contrastive.patience, contrastive.batch_size) == (base.lr, base.patience, base.batch_size)
    assert contrastive.reference_epoch_cells == 50_000
    linear = LDVAE.train_config()
    assert (linear.max_epochs, linear.kl_warmup_epochs, linear.precision) == (400, 100, "float32")
    assert linear.num_threads == base.num_threads and base.reference_epoch_cells == 10_000
    cvae = CVAE.train_config()
    assert (cvae.lr, cvae.patience, cvae.grad_clip, cvae.validation_batch_size) == (1e-3, 30, 10.0, 512)
    # the caller's settings go over the class's, key by key; the seed unless the settings name their own
    config = ContrastiveVI.train_config({"max_epochs": 7, "lr": 1e-2}, seed=5)
    assert (config.max_epochs, config.lr, config.kl_warmup_epochs, config.seed) == (7, 1e-2, 40, 5)
    assert ContrastiveVI.train_config({"seed": 2}, seed=5).seed == 2
    assert ContrastiveVI.train_config(TrainConfig(max_epochs=3)).max_epochs == 3  # a config is used as it is


def test_bad_arguments_name_the_argument_and_its_group() -> None:
    screen = simulate_screen(n_cells=300, n_genes=200, seed=0)
    screen.obs["is_control"] = screen.obs["perturbation"].astype(str) == "control"
    with pytest.raises(ParameterError, match=r"^n_salient must be a positive integer") as caught:
        ContrastiveVI.fit(screen, {"n_salient": 0}, {"max_epochs": 1, "progress": False})
    assert (caught.value.name, caught.value.group) == ("n_salient", "model")
    with pytest.raises(ParameterError, match=r"^n_factors is not a LinearVAE argument") as caught:
        LDVAE.fit(screen, {"n_factors": 3}, {"max_epochs": 1, "progress": False})
    assert caught.value.group == "model"
    with pytest.raises(ParameterError, match=r"^epochs is not a training setting") as caught:
        ContrastiveVI.fit(screen, {}, {"epochs": 3})
    assert caught.value.group == "training"
    with pytest.raises(ParameterError, match=r"^lr must be a positive finite number") as caught:
        LDVAE.fit(screen, {}, {"lr": -1})
    assert (caught.value.name, caught.value.group) == ("lr", "training")
    with pytest.raises(ParameterError, match=r"^rotation must be one of"):
        LDVAE.fit(screen, {}, {"max_epochs": 1}, rotation="oblique")


def test_modules_default_to_the_benchmarked_settings() -> None:
    module = ContrastiveVAE(n_genes=20)
    assert (module.hparams["decoder"], module.hparams["salient_loadings"]) == ("additive", "shared")
    assert CVAE.from_vocabulary(["A"], [f"g{i}" for i in range(5)]).module.likelihood == "nb"


def test_wrap_save_and_load(tmp_path: Path) -> None:
    with seeded(0):
        module = ContrastiveVAE(n_genes=12, n_background=2, n_salient=2)
    module.metadata = {"genes": [f"g{i}" for i in range(12)]}
    api = ContrastiveVI(module)
    api.save(tmp_path / "m.pt")
    loaded = ContrastiveVI.load(tmp_path / "m.pt")
    assert isinstance(loaded.module, ContrastiveVAE) and loaded.metadata == module.metadata
    for name, value in module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[name], value)
    with pytest.raises(TypeError, match="LDVAE wraps a LinearVAE, got ContrastiveVAE"):
        LDVAE(module)
    assert isinstance(LDVAE(LinearVAE(n_genes=12, n_latent=2)).module, LinearVAE)
