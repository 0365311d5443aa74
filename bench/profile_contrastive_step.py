"""Seconds per epoch of ContrastiveVAE on a synthetic 10k-target + 2k-control x 2000-gene screen.

Usage: python bench/profile_contrastive_step.py [--epochs 3] [--batch-size 256] [--likelihood zinb]
       [--threads N] [--device cpu] [--precision float32|bfloat16|auto] [--profile]

Reports wall seconds per epoch and the process CPU seconds per epoch (the latter is
robust to other processes competing for the cores when --threads 1).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch

from perturbscope.models import TrainConfig, fit, seeded
from perturbscope.models.contrastive import ContrastiveVAE
from perturbscope.models.data import CellData, PairedSampler


def make_counts(n_cells: int, n_genes: int, seed: int = 0) -> sp.csr_matrix:
    """NB counts with ~90 % zeros (log-normal gene means, per-cell library)."""
    rng = np.random.default_rng(seed)
    gene_mean = np.exp(rng.normal(-2.6, 1.3, n_genes))
    lib = np.exp(rng.normal(0.0, 0.3, n_cells))
    mu = lib[:, None] * gene_mean[None, :]
    theta = 2.0
    lam = rng.gamma(theta, mu / theta)
    return sp.csr_matrix(rng.poisson(lam).astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=int, default=10_000)
    ap.add_argument("--controls", type=int, default=2_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--likelihood", default="zinb")
    ap.add_argument("--decoder", default="additive", choices=["joint", "additive"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    X = make_counts(args.targets + args.controls, args.genes)
    print(f"counts {X.shape}, zeros {1 - X.nnz / np.prod(X.shape):.1%}, threads {torch.get_num_threads()}")
    data = CellData(X, device=args.device)
    bg = np.arange(args.controls)
    tg = np.arange(args.controls, args.controls + args.targets)
    sampler = PairedSampler(data, bg, tg, batch_size=args.batch_size)
    with seeded(0):
        model = ContrastiveVAE(args.genes, likelihood=args.likelihood, decoder=args.decoder)
    cfg = TrainConfig(
        max_epochs=args.epochs,
        progress=False,
        early_stopping=False,
        device=args.device,
        precision=args.precision,
        reference_epoch_cells=None,
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fit(
                model,
                sampler,
                None,
                TrainConfig(max_epochs=1, progress=False, device=args.device, precision=args.precision),
            )
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        return
    t0 = time.perf_counter()
    n = 0
    for b in sampler:
        n += b["target"]["nz_val"].numel()
    print(f"sampler only: {time.perf_counter() - t0:.2f} s/epoch ({len(sampler)} steps)")
    cpu0 = time.process_time()
    hist = fit(model, sampler, None, cfg)
    cpu = (time.process_time() - cpu0) / args.epochs
    print(
        f"precision {hist.precision}; seconds/epoch (wall):",
        [round(s, 2) for s in hist.seconds],
        f"min {min(hist.seconds):.2f}",
    )
    print(f"CPU seconds/epoch (all threads): {cpu:.2f}")


if __name__ == "__main__":
    main()
