"""Observation log-likelihoods: negative binomial, zero-inflated NB, Gaussian.

All count likelihoods are parametrised in log space:

``log_mu``
    log of the NB mean, shape ``(B, G)``. Decoders produce it directly as
    ``log_softmax(logits) + log_library``; it is never exponentiated and
    re-logged.
``log_theta``
    log of the inverse dispersion (``theta``, the NB "total count"), shape
    ``(G,)`` (per gene, the usual case) or broadcastable to ``(B, G)``.
``zi_logits``
    logits of the zero-inflation (dropout) probability ``pi``, ``(B, G)``.

With ``d = log_mu - log_theta`` the NB log-probability is::

    log NB(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
                - theta * softplus(d) - x * softplus(-d)

which follows from ``log(theta + mu) = log_theta + softplus(d)``. For
``x = 0`` only ``-theta * softplus(d)`` survives. Single-cell counts are
about 90 % zeros, so :func:`log_likelihood` evaluates that zero term densely
(cheap element-wise ops) and adds the lgamma corrections only at the
nonzeros, given in coordinate form. ``lgamma(theta)`` is evaluated on the G
per-gene values only, and ``lgamma(x + 1)`` (a constant of the data) can be
passed in precomputed (:class:`~perturbscope.models.data.CellData` does this
once per dataset).

No function here validates its arguments per call (no ``.item()``, no
``torch.distributions`` argument validation), so nothing forces a device
synchronisation inside a training step.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CountLikelihood",
    "COUNT_LIKELIHOODS",
    "nb_log_prob",
    "zinb_log_prob",
    "dense_log_likelihood",
    "log_likelihood",
    "batch_log_likelihood",
    "gaussian_log_likelihood",
    "check_likelihood",
]

CountLikelihood = Literal["nb", "zinb"]
COUNT_LIKELIHOODS: tuple[str, ...] = ("nb", "zinb")

_LOG_2PI = math.log(2.0 * math.pi)


def check_likelihood(kind: str, name: str = "likelihood") -> str:
    """Validate a count-likelihood name (for use in model constructors).

    Parameters
    ----------
    kind
        Candidate likelihood name.
    name
        Parameter name used in the error message.

    Returns
    -------
    str
        ``kind`` unchanged.

    Raises
    ------
    ValueError
        If ``kind`` is not one of ``"nb"``, ``"zinb"``.
    """
    if kind not in COUNT_LIKELIHOODS:
        raise ValueError(
            f"{name}={kind!r} is not a supported count likelihood; "
            f"use one of {list(COUNT_LIKELIHOODS)} ('zinb' = zero-inflated "
            "negative binomial, 'nb' = negative binomial)."
        )
    return kind


# --------------------------------------------------------------------------
# Dense reference implementations (element-wise, B x G)
# --------------------------------------------------------------------------
def nb_log_prob(x: Tensor, log_mu: Tensor, log_theta: Tensor) -> Tensor:
    """Element-wise negative binomial log-probability (dense reference).

    Parameters
    ----------
    x
        Counts, ``(B, G)`` (non-negative; need not be integers).
    log_mu
        Log mean, ``(B, G)``.
    log_theta
        Log inverse dispersion, ``(G,)`` or broadcastable to ``(B, G)``.

    Returns
    -------
    Tensor
        ``(B, G)`` log-probabilities.
    """
    theta = log_theta.exp()
    d = log_mu - log_theta
    return (
        torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
        - theta * F.softplus(d)
        - x * F.softplus(-d)
    )


def zinb_log_prob(x: Tensor, log_mu: Tensor, log_theta: Tensor, zi_logits: Tensor) -> Tensor:
    """Element-wise zero-inflated negative binomial log-probability (dense reference).

    ``p(x) = pi * [x == 0] + (1 - pi) * NB(x)`` with ``pi = sigmoid(zi_logits)``.

    Parameters
    ----------
    x, log_mu, log_theta
        As in :func:`nb_log_prob`.
    zi_logits
        Zero-inflation logits, ``(B, G)``.

    Returns
    -------
    Tensor
        ``(B, G)`` log-probabilities.
    """
    nb = nb_log_prob(x, log_mu, log_theta)
    # log(1 - pi) = -softplus(l);  log pi = l - softplus(l)
    log_one_minus_pi = -F.softplus(zi_logits)
    zero_case = torch.logaddexp(zi_logits, nb) + log_one_minus_pi
    return torch.where(x > 0, nb + log_one_minus_pi, zero_case)


def dense_log_likelihood(
    kind: CountLikelihood,
    x: Tensor,
    log_mu: Tensor,
    log_theta: Tensor,
    zi_logits: Tensor | None = None,
) -> Tensor:
    """Per-cell count log-likelihood from dense counts (reference implementation).

    Parameters
    ----------
    kind
        ``"nb"`` or ``"zinb"``.
    x
        Dense counts ``(B, G)``.
    log_mu, log_theta, zi_logits
        See the module docstring; ``zi_logits`` is required for ``"zinb"``.

    Returns
    -------
    Tensor
        ``(B,)`` log-likelihood of each cell (summed over genes).
    """
    if kind == "nb":
        return nb_log_prob(x, log_mu, log_theta).sum(-1)
    if kind == "zinb":
        if zi_logits is None:
            raise ValueError("kind='zinb' needs zi_logits")
        return zinb_log_prob(x, log_mu, log_theta, zi_logits).sum(-1)
    check_likelihood(kind, "kind")
    raise AssertionError  # pragma: no cover


# --------------------------------------------------------------------------
# Sparse-aware implementation (the one used in training)
# --------------------------------------------------------------------------
def _gather_theta(log_theta: Tensor, n_cells: int, n_genes: int, nz_flat: Tensor, nz_col: Tensor) -> Tensor:
    if log_theta.dim() <= 1:
        return log_theta.expand(n_genes).index_select(0, nz_col)
    return log_theta.expand(n_cells, n_genes).reshape(-1).index_select(0, nz_flat)


def log_likelihood(
    kind: CountLikelihood,
    log_mu: Tensor,
    log_theta: Tensor,
    nz_row: Tensor,
    nz_col: Tensor,
    nz_val: Tensor,
    zi_logits: Tensor | None = None,
    nz_lgamma: Tensor | None = None,
) -> Tensor:
    """Per-cell NB / ZINB log-likelihood using the counts' nonzeros only.

    The zero-count term is evaluated densely on the ``(B, G)`` parameters
    (no lgamma); lgamma corrections are evaluated only at the nonzeros.
    Equal to :func:`dense_log_likelihood` on the densified counts.

    Parameters
    ----------
    kind
        ``"nb"`` or ``"zinb"``.
    log_mu
        Log mean ``(B, G)``.
    log_theta
        Log inverse dispersion, ``(G,)`` (``lgamma(theta)`` is then computed
        for G values only) or broadcastable to ``(B, G)``.
    nz_row, nz_col
        ``(nnz,)`` int64 row (cell within the batch) and column (gene) of
        each nonzero count. Coordinates must be unique.
    nz_val
        ``(nnz,)`` nonzero count values (> 0).
    zi_logits
        Zero-inflation logits ``(B, G)``; required for ``"zinb"``.
    nz_lgamma
        Optional precomputed ``lgamma(nz_val + 1)``.

    Returns
    -------
    Tensor
        ``(B,)`` per-cell log-likelihood.
    """
    n_cells, n_genes = log_mu.shape
    theta_g = log_theta.exp()
    d = log_mu - log_theta
    nb_zero = -theta_g * F.softplus(d)  # (B, G): log NB(0)

    nz_flat = nz_row * n_genes + nz_col
    d_nz = log_mu.reshape(-1).index_select(0, nz_flat) - _gather_theta(
        log_theta, n_cells, n_genes, nz_flat, nz_col
    )
    if log_theta.dim() <= 1:
        lgamma_theta_nz = torch.lgamma(theta_g).expand(n_genes).index_select(0, nz_col)
        theta_nz = theta_g.expand(n_genes).index_select(0, nz_col)
    else:
        theta_nz = _gather_theta(log_theta, n_cells, n_genes, nz_flat, nz_col).exp()
        lgamma_theta_nz = torch.lgamma(theta_nz)
    if nz_lgamma is None:
        nz_lgamma = torch.lgamma(nz_val + 1.0)
    # log NB(x) - log NB(0) at the nonzeros
    nb_corr = torch.lgamma(nz_val + theta_nz) - lgamma_theta_nz - nz_lgamma - nz_val * F.softplus(-d_nz)

    if kind == "nb":
        return nb_zero.sum(-1).index_add(0, nz_row, nb_corr)
    if kind == "zinb":
        if zi_logits is None:
            raise ValueError("kind='zinb' needs zi_logits")
        # log p(0) = log(pi + (1 - pi) NB(0)) = softplus(nb0 - l) - softplus(-l)
        zero_case = F.softplus(nb_zero - zi_logits) - F.softplus(-zi_logits)  # (B, G)
        l_nz = zi_logits.reshape(-1).index_select(0, nz_flat)
        nb0_nz = -theta_nz * F.softplus(d_nz)
        # replace log p(0) by log(1 - pi) + log NB(x) = -softplus(l) + nb0 + nb_corr at the
        # nonzeros; the difference simplifies to nb_corr - softplus(l - nb0)
        z_corr = nb_corr - F.softplus(l_nz - nb0_nz)
        return zero_case.sum(-1).index_add(0, nz_row, z_corr)
    check_likelihood(kind, "kind")
    raise AssertionError  # pragma: no cover


def batch_log_likelihood(
    kind: CountLikelihood,
    batch: Mapping[str, Tensor],
    log_mu: Tensor,
    log_theta: Tensor,
    zi_logits: Tensor | None = None,
) -> Tensor:
    """:func:`log_likelihood` reading the nonzeros from a batch dict.

    Parameters
    ----------
    kind
        ``"nb"`` or ``"zinb"``.
    batch
        A batch from :meth:`CellData.batch <perturbscope.models.data.CellData.batch>`
        (keys ``nz_row``, ``nz_col``, ``nz_val``, optional ``nz_lgamma``).
    log_mu, log_theta, zi_logits
        Decoder outputs for the batch's cells.

    Returns
    -------
    Tensor
        ``(B,)`` per-cell log-likelihood.
    """
    return log_likelihood(
        kind,
        log_mu,
        log_theta,
        batch["nz_row"],
        batch["nz_col"],
        batch["nz_val"],
        zi_logits=zi_logits,
        nz_lgamma=batch.get("nz_lgamma"),
    )


# --------------------------------------------------------------------------
# Gaussian (log-normalised data)
# --------------------------------------------------------------------------
def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """Per-cell diagonal Gaussian log-likelihood (e.g. for log-normalised data).

    Parameters
    ----------
    x
        Observations ``(B, G)``.
    mean
        Means ``(B, G)``.
    log_var
        Log variances, ``(G,)`` (per gene) or broadcastable to ``(B, G)``.

    Returns
    -------
    Tensor
        ``(B,)`` log-likelihood summed over the G features.
    """
    log_var = log_var.expand_as(mean)
    return -0.5 * (_LOG_2PI + log_var + (x - mean).square() * torch.exp(-log_var)).sum(-1)
