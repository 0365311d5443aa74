"""The three models on a CUDA device (``pytest -m gpu``; skipped without one).

These run on the GPU machine as it is: Python with torch, numpy, scipy and pytest, no anndata, scanpy,
Kedro or MLflow, so they use :mod:`perturbscope.models` (plain PyTorch) and numpy data only.
``bench/gpu.sh`` runs them before its measurements.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from perturbscope.models import (
    CellData,
    ConditionalVAE,
    ContrastiveVAE,
    LinearVAE,
    MinibatchSampler,
    PairedSampler,
    StreamingCellData,
    TrainConfig,
    fit,
)
from perturbscope.models.data import device_bytes, resident_or_streamed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

N_GENES = 200
# float32 on a GPU sums in another order than on the CPU (atomics in the sparse likelihood, cuBLAS
# blocking): the epoch losses of 3 epochs agree to a few parts in 10^4; 2e-3 leaves room, and any real
# difference (a wrong device, a dropped term) is far larger
LOSS_RTOL = 2e-3


def _counts(n_cells: int, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """NB counts with a control half and a perturbed half that shifts 20 genes."""
    rng = np.random.default_rng(seed)
    base = np.exp(rng.normal(-0.5, 1.0, N_GENES))
    library = np.exp(rng.normal(0.0, 0.3, n_cells))[:, None]
    is_control = np.arange(n_cells) < n_cells // 2
    mu = library * base[None, :]
    mu[~is_control, :20] *= 3.0
    counts = rng.poisson(rng.gamma(2.0, mu / 2.0)).astype(np.float32)
    return sp.csr_matrix(counts), is_control


def _config(device: str, **changes: object) -> TrainConfig:
    base = {"max_epochs": 3, "progress": False, "seed": 0, "device": device, "precision": "float32"}
    return TrainConfig(**{**base, **changes})


def _train(name: str, device: str, data: CellData | StreamingCellData | None = None, **config: object):
    torch.manual_seed(0)
    counts, is_control = _counts(1200)
    if name == "contrastive":
        model = ContrastiveVAE(N_GENES, n_salient=4, n_background=6, n_hidden=64)
        data = data or CellData(counts, device=device)
        controls, targets = np.flatnonzero(is_control), np.flatnonzero(~is_control)
        train = PairedSampler(data, controls[:500], targets[:500], batch_size=128)
        val = PairedSampler(data, controls[500:], targets[500:], batch_size=256, shuffle=False)
    elif name == "linear":
        model = LinearVAE(N_GENES, n_latent=6, n_hidden=64)
        data = data or CellData(counts, device=device)
        train = MinibatchSampler(data, np.arange(1000), batch_size=128)
        val = MinibatchSampler(data, np.arange(1000, 1200), batch_size=256, shuffle=False)
    else:
        model = ConditionalVAE(N_GENES, n_conditions=2, n_hidden=64)
        model.metadata["condition_genes"] = ["A", "B"]
        labels = np.where(is_control, "", "A")
        data = data or CellData(counts, obs={"condition": model.encode_conditions(list(labels))}, device=device)
        train = MinibatchSampler(data, np.arange(1000), batch_size=128)
        val = MinibatchSampler(data, np.arange(1000, 1200), batch_size=256, shuffle=False)
    history = fit(model, train, val, _config(device, **config))
    return model, history


@pytest.mark.parametrize("name", ["contrastive", "linear", "cvae"])
def test_each_model_trains_on_cuda_as_on_the_cpu(name: str) -> None:
    model, on_gpu = _train(name, "cuda")
    assert next(model.parameters()).device.type == "cuda"
    _, on_cpu = _train(name, "cpu")
    np.testing.assert_allclose(on_gpu.train_loss, on_cpu.train_loss, rtol=LOSS_RTOL)
    np.testing.assert_allclose(on_gpu.val_loss, on_cpu.val_loss, rtol=LOSS_RTOL)


@pytest.mark.parametrize("name", ["contrastive", "linear", "cvae"])
def test_bfloat16_trains_close_to_float32(name: str) -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    _, full = _train(name, "cuda")
    _, half = _train(name, "cuda", precision="bfloat16")
    assert half.precision == "bfloat16" and full.precision == "float32"
    # bfloat16 inputs to the large products (8 mantissa bits): the same fit within a few per cent
    np.testing.assert_allclose(half.val_loss, full.val_loss, rtol=0.05)


def test_streamed_blocks_come_from_pinned_memory_and_train_like_resident_counts() -> None:
    counts, _ = _counts(1200)
    streamed = resident_or_streamed(counts, None, "cuda", memory_budget_gb=1e-6, block_size=256)
    assert isinstance(streamed, StreamingCellData)  # the budget is below the counts' device bytes
    assert device_bytes(counts) > 1e-6 * 1e9
    resident = resident_or_streamed(counts, None, "cuda", memory_budget_gb=None, block_size=256)
    assert isinstance(resident, CellData) and resident.values.device.type == "cuda"
    _, streamed_fit = _train("linear", "cuda", data=streamed)
    _, resident_fit = _train("linear", "cuda", data=resident)
    assert streamed.blocks_read > 0
    # the same cells and steps, shuffled block by block instead of globally: the same fit, not the same numbers
    assert abs(streamed_fit.val_loss[-1] - resident_fit.val_loss[-1]) < 0.02 * abs(resident_fit.val_loss[-1])
    block = streamed._block(0)
    assert block.values.device.type == "cuda" and block.indices.device.type == "cuda"


def test_the_distributed_path_runs_with_nccl_at_one_rank(tmp_path) -> None:
    """One NCCL rank through DistributedDataParallel: the same fit as without it."""
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        _, ranked = _train("contrastive", "cuda:0")
    finally:
        dist.destroy_process_group()
    _, alone = _train("contrastive", "cuda:0")
    np.testing.assert_allclose(ranked.val_loss, alone.val_loss, rtol=LOSS_RTOL)


def test_a_training_step_does_not_wait_for_the_gpu() -> None:
    """No host synchronisation per step: the steps of an epoch are queued faster than the GPU runs them."""
    counts, _ = _counts(4096)
    data = CellData(counts, device="cuda")
    model = LinearVAE(N_GENES, n_latent=6, n_hidden=64).cuda()
    sampler = MinibatchSampler(data, np.arange(4096), batch_size=128)
    from perturbscope.models.optim import Optimisation, run_epoch

    optimisation = Optimisation([p for p in model.parameters() if p.requires_grad], 1e-3)
    run_epoch(model.loss, sampler, torch.device("cuda"), 1.0, optimisation)  # warm up kernels and allocator
    torch.cuda.synchronize()
    syncs = []
    original = torch.Tensor.item

    def counted(self):  # any .item() inside the pass
        syncs.append(1)
        return original(self)

    torch.Tensor.item = counted
    try:
        run_epoch(model.loss, sampler, torch.device("cuda"), 1.0, optimisation)
    finally:
        torch.Tensor.item = original
    assert syncs == []
