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
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import ParameterError

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
    "nb_expected_log1p",
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
    ParameterError
        If ``kind`` is not one of ``"nb"``, ``"zinb"``.
    """
    if kind not in COUNT_LIKELIHOODS:
        raise ParameterError(
            name,
            f"must be one of {list(COUNT_LIKELIHOODS)} ('zinb' = zero-inflated negative binomial, "
            f"'nb' = negative binomial), got {kind!r}",
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
class _SparseCountLogLik(torch.autograd.Function):
    """Per-cell NB / ZINB log-likelihood with closed-form gradients.

    Autograd through the element-wise formula keeps ~15 ``(B, G)``
    intermediates and differentiates three softplus terms with extra
    exponentials. Here the forward keeps the ``(B, G)`` sigmoids the
    gradients need and the backward is a handful of multiplications
    (derivation in :func:`log_likelihood`); lgamma and digamma of ``theta``
    run on the G genes only.
    """

    @staticmethod
    def forward(ctx, zinb, log_mu, log_theta, zi_logits, nz_row, nz_col, nz_val, nz_lgamma):
        n_cells, n_genes = log_mu.shape
        per_gene = log_theta.dim() <= 1
        theta = log_theta.exp()
        d = log_mu - log_theta  # log(mu / theta)
        nz_flat = nz_row * n_genes + nz_col
        d_nz = d.reshape(-1).index_select(0, nz_flat)
        sig_d = torch.sigmoid(d)
        nb0 = F.softplus(d).mul_(-theta)  # (B, G): log NB(0) = -theta * log(1 + mu / theta)
        if per_gene:  # lgamma / digamma of theta on the G genes only
            theta = theta.expand(n_genes)
            theta_nz = theta.index_select(0, nz_col)
            lgamma_theta_nz = torch.lgamma(theta).index_select(0, nz_col)
        else:
            theta_nz = theta.expand(n_cells, n_genes).reshape(-1).index_select(0, nz_flat)
            lgamma_theta_nz = torch.lgamma(theta_nz)
        # log NB(x) - log NB(0) at the nonzeros
        corr = torch.lgamma(nz_val + theta_nz) - lgamma_theta_nz - nz_lgamma - nz_val * F.softplus(-d_nz)
        if zinb:
            a = nb0 - zi_logits
            # log p(0) = log(pi + (1 - pi) NB(0)) = softplus(nb0 - l) - softplus(-l)
            dense = F.softplus(a)
            # at a nonzero log p(x) = log(1 - pi) + log NB(x) = -softplus(l) + nb0 + corr; the
            # dense term holds softplus(a) - softplus(-l) there: add the difference
            corr += nb0.reshape(-1).index_select(0, nz_flat)
            corr -= dense.reshape(-1).index_select(0, nz_flat)
            corr -= zi_logits.reshape(-1).index_select(0, nz_flat)
            dense -= F.softplus(-zi_logits)
            sig_a = torch.sigmoid(a, out=a)
        else:
            dense = nb0.clone()
            sig_a = None
        # per-cell sums; adding into the (B, G) term first is faster than index_add_ into (B,)
        ll = dense.view(-1).index_add_(0, nz_flat, corr).view(n_cells, n_genes).sum(-1)
        ctx.save_for_backward(theta, sig_d, nb0, sig_a, zi_logits, nz_flat, nz_row, nz_col, nz_val, theta_nz, d_nz)
        ctx.zinb, ctx.per_gene, ctx.theta_shape = zinb, per_gene, log_theta.shape
        return ll

    @staticmethod
    def backward(ctx, grad):
        theta, sig_d, nb0, sig_a, zi_logits, nz_flat, nz_row, nz_col, nz_val, theta_nz, d_nz = ctx.saved_tensors
        need_mu, need_theta, need_zi = ctx.needs_input_grad[1:4]
        g = grad.unsqueeze(-1)
        g_nz = grad.index_select(0, nz_row)
        grad_zi = None
        # h = d ll / d nb0 per element, times its cell's incoming gradient
        if ctx.zinb:
            if need_zi:
                # zeros: d/dl = sigmoid(-l) - sigmoid(nb0 - l); nonzeros: -sigmoid(l) = sigmoid(-l) - 1
                sig_ml = torch.sigmoid(-zi_logits)
                grad_zi = sig_ml - sig_a
                grad_zi.view(-1).index_copy_(0, nz_flat, sig_ml.view(-1).index_select(0, nz_flat).sub_(1.0))
                grad_zi.mul_(g)
            h = sig_a.mul(g)
            h.view(-1).index_copy_(0, nz_flat, g_nz)  # nonzeros: d/dnb0 = 1
        else:
            h = g.expand_as(nb0)
        # x sigmoid(-d) at the nonzeros: d(-x softplus(-d)) / d log_mu
        q = nz_val * torch.sigmoid(-d_nz) * g_nz
        neg_theta_sig_d = sig_d.mul(-theta)  # d nb0 / d log_mu = -theta sigmoid(d)
        grad_mu = grad_theta = None
        if need_mu:
            grad_mu = h * neg_theta_sig_d
            grad_mu.view(-1).index_add_(0, nz_flat, q)
        if need_theta:
            # d nb0 / d log_theta = nb0 + theta sigmoid(d); the lgamma terms add
            # theta (digamma(x + theta) - digamma(theta)) at the nonzeros
            per_elem = nb0.sub(neg_theta_sig_d).mul_(h)
            if ctx.per_gene:
                digamma_theta_nz = torch.digamma(theta).index_select(0, nz_col)
            else:
                digamma_theta_nz = torch.digamma(theta_nz)
            extra = (torch.digamma(nz_val + theta_nz) - digamma_theta_nz).mul_(theta_nz).mul_(g_nz).sub_(q)
            per_elem.view(-1).index_add_(0, nz_flat, extra)
            grad_theta = per_elem.sum_to_size(ctx.theta_shape)
        return None, grad_mu, grad_theta, grad_zi, None, None, None, None


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
    Equal to :func:`dense_log_likelihood` on the densified counts, and so are
    its gradients, which are computed in closed form rather than by autograd
    through the formula. With ``d = log_mu -
    log_theta``, ``nb0 = -theta softplus(d)`` and, for the ZINB, ``a = nb0 -
    l``: at a zero, ``d/d nb0 = sigmoid(a)`` and ``d/dl = sigmoid(-l) -
    sigmoid(a)``; at a nonzero, ``d/d nb0 = 1`` and ``d/dl = -sigmoid(l)``;
    ``d nb0 / d log_mu = -theta sigmoid(d)``, ``d nb0 / d log_theta = nb0 +
    theta sigmoid(d)``, and the nonzeros add ``x sigmoid(-d)`` to ``d/d
    log_mu`` and ``theta (digamma(x + theta) - digamma(theta)) - x
    sigmoid(-d)`` to ``d/d log_theta``.

    Parameters
    ----------
    kind
        ``"nb"`` or ``"zinb"``.
    log_mu
        Log mean ``(B, G)``.
    log_theta
        Log inverse dispersion, ``(G,)`` (the usual case) or broadcastable
        to ``(B, G)``.
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
    check_likelihood(kind, "kind")
    if kind == "zinb" and zi_logits is None:
        raise ValueError("kind='zinb' needs zi_logits")
    if nz_lgamma is None:
        nz_lgamma = torch.lgamma(nz_val + 1.0)
    zinb = kind == "zinb"
    return _SparseCountLogLik.apply(
        zinb, log_mu, log_theta, zi_logits if zinb else None, nz_row, nz_col, nz_val, nz_lgamma
    )


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


def nb_expected_log1p(
    mu: np.ndarray,
    theta: np.ndarray,
    scale: np.ndarray,
    head: int = 24,
    k_max: int = 128,
    tol: float = 1e-7,
    tail_points: int = 96,
) -> np.ndarray:
    """``E[log1p(scale * x)]`` for ``x ~ NB(mu, theta)``, element-wise: the expectation of a count on the
    log-normalised scale, which has no closed form.

    ``mu``: ``(n, G)`` means; ``theta``: ``(G,)`` inverse dispersions; ``scale``: ``(n,)`` per-cell
    normalisation factors (``target_sum / library size``). The NB probabilities are summed exactly (by
    their recursion ``P(k) = P(k-1) (k - 1 + theta) / k * mu / (mu + theta)``) over the first ``head``
    counts for every entry and up to ``k_max`` for the few entries with more than ``tol`` of their mass
    left; past ``k_max``, where ``P`` is smooth in ``k``, the sum becomes an integral of the NB's
    log-probability (``lgamma`` form) over ``tail_points`` log-spaced counts. Deterministic and within
    about 1e-5 of a brute-force sum (tests/models/test_likelihoods.py), where 16 Monte-Carlo draws per
    cell scatter by 0.05-0.7.
    """
    from scipy.special import gammaln

    mu = np.asarray(mu, dtype=np.float64)
    shape = mu.shape
    if mu.ndim != 2:
        mu = mu.reshape(-1, 1)
    gene_theta = np.asarray(theta, dtype=np.float64).reshape(1, -1)  # (1, G): per-gene factors stay small
    theta = np.broadcast_to(gene_theta, mu.shape)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1, 1), (mu.shape[0], 1))
    ratio = mu / (mu + gene_theta)
    p = np.exp(gene_theta * (np.log(gene_theta) - np.log(mu + gene_theta)))  # P(0)
    total = np.zeros_like(mu)  # sum of log1p(scale * k) P(k); k = 0 adds nothing
    mass = p.copy()
    for k in range(1, int(head) + 1):
        p *= (k - 1 + gene_theta) / k
        p *= ratio
        total += np.log1p(scale * k) * p
        mass += p
    rows, cols = np.nonzero((1.0 - mass) > tol)
    if rows.size:  # the entries with mass left: summed again from 0 up to k_max, then the tail integral
        m, th, sc = mu[rows, cols], theta[rows, cols], scale[rows, 0]
        r = m / (m + th)
        q = np.exp(th * (np.log(th) - np.log(m + th)))
        t_sum, t_mass = np.zeros_like(m), q.copy()
        for k in range(1, int(k_max) + 1):
            q = q * ((k - 1 + th) / k) * r
            t_sum += np.log1p(sc * k) * q
            t_mass += q
        left = (1.0 - t_mass) > tol
        if left.any():
            m, th, sc = m[left], th[left], sc[left]
            # the counts that hold the mass: 12 sd below the mean, 15 sd above it or as far as a geometric
            # tail (theta small) takes to fall below tol
            sd = np.sqrt(m + m * m / th)
            low = np.log(np.maximum(k_max + 0.5, m - 12.0 * sd))
            high = np.log(
                np.maximum(np.maximum(m + 15.0 * sd, (np.log(1.0 / tol) + 10.0) * (m + th) / th), k_max + 2.0)
            )
            u = low[:, None] + (high - low)[:, None] * np.linspace(0.0, 1.0, tail_points)
            k = np.exp(u)
            log_p = (
                gammaln(k + th[:, None])
                - gammaln(k + 1.0)
                + (th * (np.log(th) - np.log(m + th)) - gammaln(th))[:, None]
                + k * np.log(m / (m + th))[:, None]
            )
            integrand = np.exp(log_p) * np.log1p(sc[:, None] * k) * k  # dk = k du
            t_sum[left] += np.trapezoid(integrand, u, axis=1)
        total[rows, cols] = t_sum
    return total.reshape(shape)
