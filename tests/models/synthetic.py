"""Synthetic count data with planted structure for the model tests (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


def nb_counts(rng: np.random.Generator, mu: np.ndarray, theta: float | np.ndarray) -> np.ndarray:
    """Negative binomial draws via the gamma-Poisson mixture."""
    lam = rng.gamma(theta, mu / theta)
    return rng.poisson(lam).astype(np.float32)


def random_counts(n_cells: int = 60, n_genes: int = 40, seed: int = 0, density_scale: float = 0.3) -> sp.csr_matrix:
    """Sparse NB counts with varying gene means (~70-90 % zeros)."""
    rng = np.random.default_rng(seed)
    gene_mean = np.exp(rng.normal(np.log(density_scale), 1.0, n_genes))
    lib = np.exp(rng.normal(0, 0.3, n_cells))
    return sp.csr_matrix(nb_counts(rng, lib[:, None] * gene_mean[None, :], 2.0))


@dataclass
class Screen:
    counts: sp.csr_matrix
    is_control: np.ndarray  # bool (n,)
    phase: np.ndarray  # int (n,) shared "cell-cycle-like" state 0..2
    program: np.ndarray  # int (n,) perturbation program 0..2 for targets, -1 for controls
    batch: np.ndarray  # int (n,) technical batch 0..1


def make_screen(
    n_controls: int = 800,
    n_per_program: int = 300,
    n_genes: int = 200,
    seed: int = 0,
) -> Screen:
    """Synthetic screen: a strong shared 3-state phase axis (controls and targets)
    plus 3 target-only perturbation programs on disjoint gene sets."""
    rng = np.random.default_rng(seed)
    n_targets = 3 * n_per_program
    n = n_controls + n_targets
    is_control = np.zeros(n, dtype=bool)
    is_control[:n_controls] = True
    program = np.full(n, -1)
    program[n_controls:] = np.repeat(np.arange(3), n_per_program)
    phase = rng.integers(0, 3, n)
    batch = rng.integers(0, 2, n)

    base = rng.normal(0.0, 1.0, n_genes) - 0.5  # log gene means
    log_mu = np.tile(base, (n, 1))
    # shared phase axis: strong, 3 states x 30 genes (genes 0..89)
    for k in range(3):
        log_mu[phase == k, k * 30 : (k + 1) * 30] += 2.5
    # perturbation programs: targets only, 3 x 20 genes (genes 90..149)
    for k in range(3):
        genes = slice(90 + k * 20, 90 + (k + 1) * 20)
        log_mu[program == k, genes] += 1.6
    lib = np.exp(rng.normal(0.0, 0.25, n))[:, None]
    mu = lib * np.exp(log_mu) / np.exp(log_mu).sum(1, keepdims=True) * n_genes * 1.0
    counts = nb_counts(rng, mu, 5.0)
    return Screen(sp.csr_matrix(counts), is_control, phase, program, batch)
