"""Shared neural building blocks for the perturbscope VAEs.

Blocks take already-transformed inputs (e.g. ``torch.log1p(counts)``,
computed once per step by the model and shared by all its encoders) and an
optional float covariate tensor ``cov`` of shape ``(B, n_cov)`` (e.g. a
one-hot batch from :func:`one_hot`, a condition multi-hot, or their
concatenation) that is concatenated to the input of every hidden layer.

Normalisation is LayerNorm in encoders and none in decoders (never
BatchNorm), so a minibatch of a single cell works in training mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .likelihoods import check_likelihood

__all__ = [
    "Linear",
    "linear",
    "matmul_dtype",
    "MLP",
    "first_layers",
    "GaussianEncoder",
    "LibraryEncoder",
    "CountDecoder",
    "CountParams",
    "one_hot",
    "reparameterize",
    "kl_standard_normal",
    "kl_normal",
    "wasserstein_to_origin",
]


_MATMUL_DTYPE: ContextVar[torch.dtype | None] = ContextVar("perturbscope_matmul_dtype", default=None)
LOW_PRECISION_MIN_WEIGHTS = 32_768
"""Layers with fewer weights than this always multiply in float32 (casting costs more than it saves)."""


@contextlib.contextmanager
def matmul_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Run the large matrix products of :func:`linear` in ``dtype`` (e.g. ``torch.bfloat16``).

    Only the product itself is low precision (the CPU/GPU kernels accumulate
    in float32); its result is cast back to the input's dtype before the bias
    is added, so activations, likelihoods, KL terms, master weights and the
    optimiser state all stay float32. The decoders' logits are thus rounded to
    bfloat16 (relative error below 0.4 %) during training only. ``None`` = everything float32 (the
    default; :func:`~perturbscope.models.training.fit` sets it from
    ``TrainConfig.precision``).
    """
    token = _MATMUL_DTYPE.set(dtype)
    try:
        yield
    finally:
        _MATMUL_DTYPE.reset(token)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` whose product runs in the :func:`matmul_dtype` of the context for large layers."""
    dtype = _MATMUL_DTYPE.get()
    if dtype is None or dtype == x.dtype or weight.numel() < LOW_PRECISION_MIN_WEIGHTS:
        return F.linear(x, weight, bias)
    out = F.linear(x.to(dtype), weight.to(dtype)).to(x.dtype)
    return out if bias is None else out + bias


class Linear(nn.Linear):
    """``nn.Linear`` that follows :func:`matmul_dtype` (same parameters and state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def one_hot(codes: Tensor, n: int) -> Tensor:
    """Float one-hot encoding of integer codes ``(B,)`` -> ``(B, n)``.

    Unlike ``F.one_hot`` this does not validate the codes' range on the host
    (which would synchronise a CUDA device every step).
    """
    out = torch.zeros(codes.shape[0], n, device=codes.device, dtype=torch.get_default_dtype())
    return out.scatter_(1, codes.long().unsqueeze(1), 1.0)


def reparameterize(mean: Tensor, var: Tensor) -> Tensor:
    """Sample ``mean + sqrt(var) * eps`` with ``eps ~ N(0, I)`` (uses the global torch RNG)."""
    return mean + var.sqrt() * torch.randn_like(mean)


def kl_standard_normal(mean: Tensor, var: Tensor) -> Tensor:
    """``KL(N(mean, diag var) || N(0, I))`` summed over the last dimension -> ``(B,)``."""
    return 0.5 * (var + mean.square() - 1.0 - var.log()).sum(-1)


def kl_normal(mean: Tensor, var: Tensor, prior_mean: Tensor, prior_var: Tensor) -> Tensor:
    """``KL(N(mean, var) || N(prior_mean, prior_var))`` summed over the last dimension -> ``(B,)``."""
    return 0.5 * ((var + (mean - prior_mean).square()) / prior_var - 1.0 + prior_var.log() - var.log()).sum(-1)


def wasserstein_to_origin(mean: Tensor, var: Tensor) -> Tensor:
    """Squared 2-Wasserstein distance of ``N(mean, diag var)`` to a point mass at 0.

    Equals ``||mean||^2 + ||sqrt(var)||^2 = sum(mean^2 + var)`` over the last
    dimension -> ``(B,)``.
    """
    return (mean.square() + var).sum(-1)


class MLP(nn.Module):
    """Stack of ``Linear -> LayerNorm -> ReLU -> Dropout`` layers with covariate injection.

    Parameters
    ----------
    n_in
        Input features.
    n_hidden
        Width of every hidden layer (= output width).
    n_layers
        Number of hidden layers (>= 1).
    dropout
        Dropout rate after each layer.
    n_cov
        Width of the covariate tensor concatenated to each layer's input
        (0 = no covariates).
    layer_norm
        Apply LayerNorm after each Linear.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        n_cov: int = 0,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_cov = int(n_cov)
        self.n_out = int(n_hidden)
        self.linears = nn.ModuleList(
            Linear((n_in if i == 0 else n_hidden) + self.n_cov, n_hidden) for i in range(n_layers)
        )
        self.norms = nn.ModuleList((nn.LayerNorm(n_hidden) if layer_norm else nn.Identity()) for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, cov: Tensor | None = None, first: Tensor | None = None) -> Tensor:
        """Map ``(B, n_in)`` (+ ``(B, n_cov)`` covariates) to ``(B, n_hidden)``.

        ``first``: the first layer's ``Linear`` output, when already computed
        (see :func:`first_layers`); ``x`` is then not read.
        """
        h = x
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            if i == 0 and first is not None:
                h = first
            else:
                if self.n_cov:
                    h = torch.cat([h, cov], dim=-1)
                h = linear(h)
            h = self.dropout(F.relu(norm(h)))
        return h


def first_layers(mlps: Sequence[MLP], x: Tensor, cov: Tensor | None = None) -> list[Tensor]:
    """The first ``Linear`` of several MLPs with the same input, as one GEMM.

    Encoders of one model read the same ``(B, G)`` input; one ``(B, G) x (G,
    sum of widths)`` product is markedly faster on a CPU than one per encoder
    (and its backward, the weight gradients, likewise). Pass each result as
    ``first=`` to the matching MLP.
    """
    if len({m.n_cov for m in mlps}) != 1:
        raise ValueError("first_layers needs MLPs with the same covariate width")
    linears = [m.linears[0] for m in mlps]
    inp = x if not mlps[0].n_cov else torch.cat([x, cov], dim=-1)
    weight = torch.cat([lin.weight for lin in linears], dim=0)
    bias = torch.cat([lin.bias for lin in linears], dim=0)
    return list(linear(inp, weight, bias).split([lin.out_features for lin in linears], dim=-1))


class GaussianEncoder(nn.Module):
    """Diagonal-Gaussian posterior ``q(z | x)``: MLP -> (mean, variance).

    Parameters
    ----------
    n_in
        Input features (pass transformed data, e.g. ``log1p(counts)``).
    n_latent
        Latent dimension.
    n_hidden, n_layers, dropout, n_cov
        See :class:`MLP`.
    var_eps
        Floor added to the variance (``var = softplus(raw) + var_eps``).
    layer_norm
        LayerNorm in the hidden layers (default True).
    """

    def __init__(
        self,
        n_in: int,
        n_latent: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        n_cov: int = 0,
        var_eps: float = 1e-4,
        layer_norm: bool = True,
    ) -> None:
        super().__init__()
        self.net = MLP(n_in, n_hidden, n_layers, dropout, n_cov, layer_norm=layer_norm)
        self.mean = nn.Linear(n_hidden, n_latent)
        self.raw_var = nn.Linear(n_hidden, n_latent)
        self.var_eps = var_eps

    def forward(self, x: Tensor, cov: Tensor | None = None, first: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return posterior ``(mean, var)``, each ``(B, n_latent)`` (``first``: see :class:`MLP`)."""
        h = self.net(x, cov, first)
        return self.mean(h), F.softplus(self.raw_var(h)) + self.var_eps

    def sample(self, x: Tensor, cov: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(mean, var, z)`` with ``z`` a reparameterised sample."""
        mean, var = self(x, cov)
        return mean, var, reparameterize(mean, var)


class LibraryEncoder(GaussianEncoder):
    """Posterior over the log library size, ``q(log l | x)``: a 1-D :class:`GaussianEncoder`.

    ``forward`` returns ``(mean, var)`` of shape ``(B,)``. Pair with
    :func:`kl_normal` against an empirical prior (see
    :meth:`CellData.library_prior <perturbscope.models.data.CellData.library_prior>`).
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        n_cov: int = 0,
        var_eps: float = 1e-4,
        layer_norm: bool = True,
    ) -> None:
        super().__init__(n_in, 1, n_hidden, n_layers, dropout, n_cov, var_eps, layer_norm)

    def forward(self, x: Tensor, cov: Tensor | None = None, first: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mean, var = super().forward(x, cov, first)
        return mean.squeeze(-1), var.squeeze(-1)


class CountParams(NamedTuple):
    """Decoder output for a count likelihood (all log-space, see :mod:`.likelihoods`)."""

    log_rho: Tensor
    """``(B, G)`` log normalised expression (log-softmax proportions)."""
    log_mu: Tensor
    """``(B, G)`` log NB mean = ``log_rho + log_library``."""
    log_theta: Tensor
    """``(G,)`` log inverse dispersion."""
    zi_logits: Tensor | None
    """``(B, G)`` zero-inflation logits, or None for ``"nb"``."""


class CountDecoder(nn.Module):
    """Latent (+ covariates) -> NB/ZINB parameters.

    ``MLP -> Linear -> log_softmax`` gives log proportions ``log_rho``;
    ``log_mu = log_rho + log_library``. A per-gene inverse dispersion
    ``log_theta`` parameter and, for ``"zinb"``, a zero-inflation head on
    the same hidden layer.

    Parameters
    ----------
    n_in
        Latent input dimension.
    n_genes
        Output genes.
    n_hidden, n_layers, dropout, n_cov
        See :class:`MLP` (decoder dropout defaults to 0).
    likelihood
        ``"zinb"`` (adds the ZI head) or ``"nb"``.
    dispersion
        Own the per-gene ``log_theta`` parameter (False: a model that keeps its
        dispersion elsewhere, e.g. the cVAE's per-gene scale shared with its
        Gaussian likelihood, and only uses :meth:`logits`).
    layer_norm
        LayerNorm in the hidden layers. Off by default: LayerNorm normalises
        all hidden units jointly, which couples the contributions of
        different latent blocks (e.g. contrastiveVI's background ``z`` and
        salient ``s``: with it, the salient code had to compensate for the
        background and leaked shared variation).
    """

    def __init__(
        self,
        n_in: int,
        n_genes: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.0,
        n_cov: int = 0,
        likelihood: str = "zinb",
        layer_norm: bool = False,
        dispersion: bool = True,
    ) -> None:
        super().__init__()
        self.likelihood = check_likelihood(likelihood)
        self.net = MLP(n_in, n_hidden, n_layers, dropout, n_cov, layer_norm=layer_norm)
        self.expression = Linear(n_hidden, n_genes)
        self.zi = Linear(n_hidden, n_genes) if likelihood == "zinb" else None
        self.log_theta = nn.Parameter(torch.zeros(n_genes)) if dispersion else None

    def logits(self, z: Tensor, cov: Tensor | None = None) -> Tensor:
        """Unnormalised decoder output ``(B, G)`` (before the softmax)."""
        return self.expression(self.net(z, cov))

    def log_proportions(self, z: Tensor, cov: Tensor | None = None) -> Tensor:
        """Log normalised expression ``(B, G)`` (rows of ``exp`` sum to 1)."""
        return F.log_softmax(self.logits(z, cov), dim=-1)

    def forward(self, z: Tensor, log_library: Tensor, cov: Tensor | None = None) -> CountParams:
        """Decode ``z`` ``(B, n_in)`` with log library ``(B,)`` into :class:`CountParams`."""
        h = self.net(z, cov)
        log_rho = F.log_softmax(self.expression(h), dim=-1)
        log_mu = log_rho + log_library.unsqueeze(-1)
        zi = self.zi(h) if self.zi is not None else None
        return CountParams(log_rho, log_mu, self.log_theta, zi)
