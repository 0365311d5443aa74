"""The AnnData-facing model classes: one parameter path, save / load, wrapping stored modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from perturbscope.models import ConditionalVAE, ContrastiveVAE, LinearVAE, seeded
from perturbscope.models.model import CVAE, LDVAE, ContrastiveModelError, ContrastiveVI, LinearModelError
from perturbscope.models.model.inputs import train_config
from perturbscope.simulation import simulate_screen


def test_shared_training_block_is_overridden_key_by_key() -> None:
    shared = {"lr": 3e-3, "patience": 20, "batch_size": 128, "device": "cpu"}
    config, batch_size, val_batch_size = train_config(
        {"lr": 1e-3, "max_epochs": 7}, 5, "x.training", ValueError, shared
    )
    assert (config.lr, config.patience, config.max_epochs, config.device) == (1e-3, 20, 7, "cpu")
    assert (batch_size, val_batch_size, config.seed) == (128, 1024, 5)  # the one seed unless the block names one
    with pytest.raises(ValueError, match=r"Unknown x\.training parameter\(s\) \['epochs'\]"):
        train_config({"epochs": 3}, 0, "x.training", ValueError, shared)


def test_bad_hyperparameters_name_the_kedro_parameter() -> None:
    screen = simulate_screen(n_cells=300, n_genes=200, seed=0)
    screen.obs["is_control"] = screen.obs["perturbation"].astype(str) == "control"
    with pytest.raises(ContrastiveModelError, match=r"contrastive_model\.model\.n_salient must be a positive integer"):
        ContrastiveVI.fit(screen, {"n_salient": 0}, {"max_epochs": 1, "progress": False})
    with pytest.raises(LinearModelError, match=r"Unknown linear_model\.model parameter\(s\) \['n_factors'\]"):
        LDVAE.fit(screen, {"n_factors": 3}, {"max_epochs": 1, "progress": False})


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


def test_cvae_checkpoints_from_before_the_shared_decoder_load() -> None:
    """A cVAE saved with the old decoder_net / decoder_out names loads into the CountDecoder."""
    with seeded(0):
        model = CVAE.from_vocabulary(["A", "B"], [f"g{i}" for i in range(10)], likelihood="nb").module
    old = {
        k.replace("decoder.net.", "decoder_net.").replace("decoder.expression.", "decoder_out."): v
        for k, v in model.state_dict().items()
    }
    assert any(k.startswith("decoder_out.") for k in old)
    with seeded(1):
        fresh = ConditionalVAE(n_genes=10, n_conditions=2, likelihood="nb")
    fresh.load_state_dict(old)
    z, c = torch.zeros(3, model.n_latent), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_array_equal(
        fresh.decode_logits(z, c).detach().numpy(), model.decode_logits(z, c).detach().numpy()
    )
