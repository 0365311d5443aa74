"""LDVAE: a VAE with a linear decoder whose loadings are gene modules.

Implements the idea of Svensson, Gayoso, Yosef & Pachter, "Interpretable factor
models of single-cell RNA-seq via variational autoencoders", Bioinformatics
(2020), in plain PyTorch on the shared perturbscope blocks: the encoder is the
shared :class:`~perturbscope.models.modules.GaussianEncoder` on ``log1p``
counts, the likelihood the shared NB/ZINB of
:mod:`~perturbscope.models.likelihoods`, training the one
:func:`~perturbscope.models.training.fit` loop with a
:class:`~perturbscope.models.data.MinibatchSampler`.

Generative model (one cell, ``K`` factors, ``G`` genes)::

    z ~ N(0, I_K)
    h = W_c z                                  # W_c: G x K weights, centred over genes
    eta_g = gamma_g (h_g - m_g) / sqrt(v_g + eps) + b_g (+ c_batch,g)
    rho = softmax(eta)                         # normalised expression
    x_g ~ NB(library * rho_g, theta_g)         # or ZINB

``m``, ``v`` are each gene's mean and variance of ``h_g`` over the minibatch
(BatchNorm; running statistics in eval mode and for a training minibatch of a
single cell), ``gamma_g > 0`` a learned per-gene scale and ``b_g`` a per-gene
intercept (``gene_norm="none"`` drops the BatchNorm: ``eta = W_c z + b``).

Design notes (measured on simulated screens, see tests and the pipeline):

* The BatchNorm keeps a learned per-gene scale. Without it (a BatchNorm with no
  affine scale) every gene's factor-driven log-expression is forced to unit
  variance and a gene's weights are scale-invariant, so genes without signal
  cannot switch off: on a simulated screen every gene, in a program or not,
  ended with a loading norm of 0.62-0.66, so a factor's top genes were no
  longer its module. What makes loadings comparable across
  genes is folding the normalisation into the weights (:meth:`LinearVAE.loadings`),
  which puts every gene on the same natural-log scale.
* The softmax ignores a shift shared by all genes, so loadings are identified
  only up to a per-factor constant; the weights are centred over genes.
* ``loading_penalty`` (a Gaussian prior on the folded loadings) keeps genes
  with a handful of counts from topping every factor with noise.
* :meth:`LinearVAE.orient` re-expresses the factors (whitening, varimax and
  promax rotation, unit SD over cells, sign, order) without changing the
  model, so each factor reads as one gene module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_float, check_int
from .base import BatchLibraryModel, check_library_prior
from .data import CellData, as_index
from .likelihoods import batch_log_likelihood, check_likelihood
from .modules import (
    CountParams,
    GaussianEncoder,
    kl_standard_normal,
    reparameterize,
)

__all__ = ["LinearVAE", "LinearDecoder", "GENE_NORMS", "ROTATIONS", "varimax", "promax_target"]

GENE_NORMS: tuple[str, ...] = ("batch", "none")
"""Per-gene normalisation of the linear decoder: ``"batch"`` (BatchNorm, as LDVAE) or ``"none"``."""
INIT_SCALE = 0.3
"""Initial per-gene BatchNorm scale: the decoder starts close to the average profile (the
intercepts) and factors grow from there; 1.0 (torch's default) needed ~1.6x more epochs
to converge, to the same likelihood and program recovery, on simulated screens."""
ROTATIONS: tuple[str, ...] = ("promax", "varimax", "none")
"""Factor orientations of :meth:`LinearVAE.orient`."""


class LinearDecoder(nn.Module):
    """Linear latent -> gene decoder (LDVAE) producing :class:`CountParams`.

    ``eta = norm(W_c z) + b (+ batch offset)``, ``log_rho = log_softmax(eta)``,
    ``log_mu = log_rho + log_library``, with ``W_c`` the gene-centred weights
    (see :meth:`centred_weight`).

    Parameters
    ----------
    n_latent
        Factors ``K``.
    n_genes
        Genes ``G``.
    n_batch
        Batch categories (0 = none): a per-batch, per-gene log offset.
    likelihood
        ``"nb"`` or ``"zinb"`` (adds a linear zero-inflation head on ``z``).
    gene_norm
        ``"batch"``: BatchNorm of each gene's ``(W_c z)_g`` with a learned
        positive per-gene scale (batch statistics in training, running
        statistics in eval mode and for a one-cell training minibatch).
        ``"none"``: ``eta = W_c z + b``.
    momentum, eps
        Running-statistics momentum and variance floor of the BatchNorm.
    """

    def __init__(
        self,
        n_latent: int,
        n_genes: int,
        n_batch: int = 0,
        likelihood: str = "nb",
        gene_norm: str = "batch",
        momentum: float = 0.1,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.likelihood = check_likelihood(likelihood)
        check_choice("gene_norm", gene_norm, GENE_NORMS)
        self.gene_norm = gene_norm
        self.n_batch = int(n_batch)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(n_genes, n_latent))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        self.bias = nn.Parameter(torch.zeros(n_genes))
        if gene_norm == "batch":
            # scale_g = softplus(raw_scale_g), INIT_SCALE at initialisation
            self.raw_scale = nn.Parameter(torch.full((n_genes,), math.log(math.expm1(INIT_SCALE))))
            self.register_buffer("running_mean", torch.zeros(n_genes))
            self.register_buffer("running_var", torch.ones(n_genes))
        self.batch_offset = nn.Parameter(torch.zeros(self.n_batch, n_genes)) if self.n_batch else None
        self.zi = nn.Linear(n_latent + self.n_batch, n_genes) if likelihood == "zinb" else None
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def centred_weight(self) -> Tensor:
        """``W`` minus its mean over genes, per factor.

        The softmax over genes ignores a shift shared by every gene, so only
        differences between genes' loadings are identified; centring fixes
        that gauge without changing the likelihood, so a gene a factor leaves
        alone ends up with a loading near 0 instead of an arbitrary offset.
        """
        return self.weight - self.weight.mean(0, keepdim=True)

    def logits(self, z: Tensor, cov: Tensor | None = None) -> Tensor:
        """Unnormalised log expression ``eta`` ``(B, G)``."""
        h = z @ self.centred_weight().T
        if self.gene_norm == "batch":
            h = F.batch_norm(
                h,
                self.running_mean,
                self.running_var,
                weight=F.softplus(self.raw_scale),
                bias=None,
                # BatchNorm needs two cells: a one-cell training minibatch uses the running statistics
                training=self.training and h.shape[0] > 1,
                momentum=self.momentum,
                eps=self.eps,
            )
        h = h + self.bias
        if self.batch_offset is not None and cov is not None:
            h = h + cov @ self.batch_offset
        return h

    def log_proportions(self, z: Tensor, cov: Tensor | None = None) -> Tensor:
        """Log normalised expression ``(B, G)`` (rows of ``exp`` sum to 1)."""
        return F.log_softmax(self.logits(z, cov), dim=-1)

    def forward(self, z: Tensor, log_library: Tensor, cov: Tensor | None = None) -> CountParams:
        """Decode ``z`` ``(B, K)`` with log library ``(B,)`` into :class:`CountParams`."""
        log_rho = self.log_proportions(z, cov)
        log_mu = log_rho + log_library.unsqueeze(-1)
        zi = None
        if self.zi is not None:
            zi = self.zi(torch.cat([z, cov], dim=-1) if self.n_batch else z)
        return CountParams(log_rho, log_mu, self.log_theta, zi)

    def folded_weight(self) -> Tensor:
        """``(G, K)`` weights with the BatchNorm folded in (running statistics), differentiable.

        ``eta`` changes by ``folded_weight() @ dz`` for a change ``dz`` of the
        latent (eval-mode semantics): natural-log expression per unit of each
        factor, before the softmax's shift shared by all genes.
        """
        w = self.centred_weight()
        if self.gene_norm == "batch":
            factor = F.softplus(self.raw_scale) / torch.sqrt(self.running_var + self.eps)
            w = w * factor.unsqueeze(-1)
        return w

    def folded_bias(self) -> Tensor:
        """``(G,)`` ``eta`` at ``z = 0`` without batch offset (eval-mode semantics)."""
        b = self.bias
        if self.gene_norm == "batch":
            b = b - F.softplus(self.raw_scale) * self.running_mean / torch.sqrt(self.running_var + self.eps)
        return b


class LinearVAE(BatchLibraryModel):
    """Linearly decoded VAE (LDVAE): factors whose loadings are gene modules.

    Parameters
    ----------
    n_genes
        Number of genes (columns of the count matrix).
    n_latent
        Number of factors ``K``.
    n_hidden, n_layers, dropout
        Encoder MLP (the shared :class:`GaussianEncoder` on ``log1p`` counts).
    likelihood
        ``"nb"`` (default) or ``"zinb"``.
    n_batch
        Number of batch categories; 0 = no batch covariate. If > 0 the
        batch dicts must carry integer codes under ``batch_key``; they are
        one-hot encoded into the encoder and give a per-batch gene offset in
        the decoder (the loadings are shared by all batches).
    batch_key
        Name of the batch-code entry (``CellData.obs`` key).
    library
        ``"observed"`` (log total counts, default) or ``"learned"`` (library
        encoder with a log-normal prior; needs ``library_log_mean`` /
        ``library_log_var``, e.g. from :meth:`CellData.library_prior`).
    library_log_mean, library_log_var
        Prior of the log library per batch category (``max(n_batch, 1)``
        entries).
    gene_norm
        ``"batch"`` (default; BatchNorm after the linear map, as the LDVAE
        reference) or ``"none"``. See :class:`LinearDecoder`.
    norm_momentum, norm_eps
        Running-statistics momentum and variance floor of the BatchNorm.
    loading_penalty
        Weight ``lambda`` of ``lambda / 2 * ||L||^2`` (``L`` the folded
        loadings) added to the per-cell loss: a Gaussian prior on the
        loadings. It pulls the loadings of genes the data say little about
        (roughly, genes with fewer than ``lambda`` counts per cell) to 0, so
        rare genes do not crowd the top of every factor. 0 disables it.

    Notes
    -----
    ``loss`` takes :class:`~perturbscope.models.data.MinibatchSampler`
    batches. Typical use::

        data = CellData(counts)
        with seeded(0):
            model = LinearVAE(data.n_genes, n_latent=10)
        model.init_intercepts(data, train_idx)
        fit(model, MinibatchSampler(data, train_idx), MinibatchSampler(data, val_idx, shuffle=False),
            TrainConfig(kl_warmup_epochs=100))
        model.orient(data)                      # whiten + varimax + promax, factors ordered by variance
        scores = model.embed(data)              # (n_cells, K)
        table = model.loadings(gene_names)      # genes x factors, log-expression per unit factor

    :meth:`orient` only re-expresses the factors (an invertible linear map
    ``T`` of the latent, with the inverse applied to the loadings), so the
    decoded expression, the likelihood and the checkpoint's training weights
    are unchanged; ``T`` is a buffer saved with the model.
    """

    def __init__(
        self,
        n_genes: int,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        likelihood: str = "nb",
        n_batch: int = 0,
        batch_key: str = "batch",
        library: str = "observed",
        library_log_mean: list[float] | None = None,
        library_log_var: list[float] | None = None,
        gene_norm: str = "batch",
        norm_momentum: float = 0.1,
        norm_eps: float = 1e-3,
        loading_penalty: float = 0.03,
    ) -> None:
        super().__init__()
        n_genes = check_int("n_genes", n_genes, 1, "pass the number of genes of the count matrix")
        n_latent = check_int("n_latent", n_latent, 1, "the model needs at least one factor (e.g. 10)")
        n_hidden = check_int("n_hidden", n_hidden, 1, "use e.g. 128")
        n_layers = check_int("n_layers", n_layers, 1, "use e.g. 1 or 2")
        n_batch = check_int("n_batch", n_batch, 0, "use 0 for no batch covariate")
        dropout = check_float("dropout", dropout, 0.0, 1.0, "use e.g. 0.1")
        norm_momentum = check_float("norm_momentum", norm_momentum, 1e-6, 1.0 + 1e-9, "use e.g. 0.1")
        norm_eps = check_float("norm_eps", norm_eps, 1e-12, math.inf, "use e.g. 1e-3")
        loading_penalty = check_float(
            "loading_penalty", loading_penalty, 0.0, math.inf, "use e.g. 0.03, or 0 to disable it"
        )
        check_likelihood(likelihood)
        check_choice("gene_norm", gene_norm, GENE_NORMS, "'batch': BatchNorm after the linear decoder, as LDVAE")
        library_log_mean, library_log_var = check_library_prior(library, library_log_mean, library_log_var, n_batch)
        self._set_hparams(
            n_genes=n_genes,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=dropout,
            likelihood=likelihood,
            n_batch=n_batch,
            batch_key=batch_key,
            library=library,
            library_log_mean=library_log_mean,
            library_log_var=library_log_var,
            gene_norm=gene_norm,
            norm_momentum=norm_momentum,
            norm_eps=norm_eps,
            loading_penalty=loading_penalty,
        )
        self.n_genes = n_genes
        self.n_latent = n_latent
        self.likelihood = likelihood
        self.loading_penalty = loading_penalty

        enc = dict(n_hidden=n_hidden, n_layers=n_layers, dropout=dropout, n_cov=n_batch)
        self.encoder = GaussianEncoder(n_genes, n_latent, **enc)
        self._init_batch_library(n_genes, n_batch, batch_key, library, library_log_mean, library_log_var, **enc)
        self.decoder = LinearDecoder(
            n_latent,
            n_genes,
            n_batch=n_batch,
            likelihood=likelihood,
            gene_norm=gene_norm,
            momentum=norm_momentum,
            eps=norm_eps,
        )
        # reported factors = latent @ factor_transform (see orient); identity = raw latent
        self.register_buffer("factor_transform", torch.eye(n_latent))

    # ------------------------------------------------------------------ inference / generative / loss
    def inference(self, batch: dict[str, Tensor], sample: bool = True, library: bool = True) -> dict[str, Any]:
        """The posterior ``q(z | x)`` of a batch: ``z_mean``, ``z_var``, ``z`` (a draw, or the mean with
        ``sample=False``), ``cov`` and, with ``library``, ``log_library`` and ``kl_library`` (None for an
        observed library)."""
        h = torch.log1p(batch["x"])
        cov = self._cov(batch)
        z_mean, z_var = self.encoder(h, cov)
        out: dict[str, Any] = {"z_mean": z_mean, "z_var": z_var, "cov": cov}
        out["z"] = reparameterize(z_mean, z_var) if sample else z_mean
        if library:
            out["log_library"], out["kl_library"] = self._library(batch, h, cov, sample=sample)
        return out

    def generative(self, z: Tensor, log_library: Tensor, cov: Tensor | None = None) -> CountParams:
        """The count likelihood's parameters of factors ``z`` (raw latent) with log library ``(B,)``."""
        return self.decoder(z, log_library, cov)

    def loss(self, batch: dict[str, Any], kl_weight: float = 1.0) -> dict[str, Tensor]:
        """Negative ELBO of a minibatch, plus the loading penalty.

        Returns
        -------
        dict[str, Tensor]
            ``loss`` = mean over cells of ``recon + kl_weight * kl`` plus
            ``loading_penalty / 2 * ||L||^2``; ``reconstruction`` (mean
            negative log-likelihood), ``kl_latent``, ``kl_library`` (learned
            library only) and ``loading_penalty`` (when > 0).
        """
        q = self.inference(batch)
        p = self.generative(q["z"], q["log_library"], q["cov"])
        recon = -batch_log_likelihood(self.likelihood, batch, p.log_mu, p.log_theta, p.zi_logits)
        kl_z = kl_standard_normal(q["z_mean"], q["z_var"])
        kl_lib = q["kl_library"]
        kl = kl_z if kl_lib is None else kl_z + kl_lib
        loss = (recon + kl_weight * kl).mean()
        out = {"loss": loss, "reconstruction": recon.mean(), "kl_latent": kl_z.mean()}
        if kl_lib is not None:
            out["kl_library"] = kl_lib.mean()
        if self.loading_penalty > 0:
            penalty = 0.5 * self.loading_penalty * self.decoder.folded_weight().square().sum()
            out["loss"] = loss + penalty
            out["loading_penalty"] = penalty
        return out

    # ------------------------------------------------------------------
    @torch.no_grad()
    def init_intercepts(self, data: CellData, idx: Any = None, pseudocount: float = 0.5) -> LinearVAE:
        """Start each gene's intercept at its log share of the counts; returns ``self``.

        ``b_g = log((sum_c x_cg + pseudocount) / sum_c l_c)`` over cells
        ``idx`` (default all), centred. Call before
        :func:`~perturbscope.models.training.fit`: the decoder then starts at
        the average expression profile instead of a flat one, which saves
        thousands of optimiser steps.
        """
        pos = as_index(idx, data.n_cells)
        if pos.numel() == 0:
            raise ValueError("init_intercepts: no cells selected")
        totals = torch.zeros(self.n_genes, dtype=torch.float64)
        for b in self.iter_batches(data, pos, 4096):
            totals.index_add_(0, b["nz_col"].cpu(), b["nz_val"].cpu().double())
        library = float(np.asarray(data.library)[pos.numpy()].sum())
        if library <= 0:
            raise ValueError("init_intercepts: the selected cells hold no counts")
        log_share = torch.log((totals + pseudocount) / library)
        self.decoder.bias.copy_((log_share - log_share.mean()).to(self.decoder.bias))
        return self

    @torch.no_grad()
    def _raw_embed(self, data: CellData, idx: Any = None, batch_size: int = 1024) -> Tensor:
        was_training = self.training
        self.eval()
        out = [self.inference(b, sample=False, library=False)["z"] for b in self.iter_batches(data, idx, batch_size)]
        self.train(was_training)
        if not out:
            return torch.zeros(0, self.n_latent, device=self.device)
        return torch.cat(out)

    @torch.no_grad()
    def embed(self, data: CellData, idx: Any = None, batch_size: int = 1024) -> np.ndarray:
        """Factor scores of the cells, ``(n, n_latent)`` float32 (deterministic).

        Posterior means of the latent, re-expressed by :meth:`orient` (the
        raw posterior means until it is called).
        """
        z = self._raw_embed(data, idx, batch_size)
        return (z @ self.factor_transform).cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def reconstruction_log_likelihood(self, data: CellData, idx: Any = None, batch_size: int = 1024) -> np.ndarray:
        """Per-cell count log-likelihood ``log p(x | z = E[z | x])``, ``(n,)`` float64.

        Deterministic: the posterior mean of ``z`` and the observed log
        library (or, for a learned library, its posterior mean). Includes every
        constant (``-lgamma(x + 1)``), so it is a proper log-probability of the
        counts.
        """
        was_training = self.training
        self.eval()
        out = []
        for b in self.iter_batches(data, idx, batch_size):
            q = self.inference(b, sample=False)
            p = self.generative(q["z"], q["log_library"], q["cov"])
            out.append(batch_log_likelihood(self.likelihood, b, p.log_mu, p.log_theta, p.zi_logits).double())
        self.train(was_training)
        return torch.cat(out).cpu().numpy() if out else np.zeros(0)

    # ------------------------------------------------------------------
    @torch.no_grad()
    def orient(self, data: CellData, idx: Any = None, rotation: str = "promax", batch_size: int = 1024) -> LinearVAE:
        """Re-express the factors for reading; returns ``self``.

        With an isotropic prior the latent of a linear decoder is identified
        only up to a rotation, so its raw axes need not align with gene
        modules. This sets ``factor_transform`` (the reported scores are
        ``raw posterior means @ factor_transform``; the loadings get the
        inverse, so the decoded expression and the likelihood are unchanged):

        ``rotation="promax"`` (default)
            Whiten the cells' posterior means over ``idx`` (default all cells),
            rotate the loadings by varimax (Kaiser 1958), then relax the
            rotation obliquely by promax (Hendrickson & White 1964, power 4).
            Each factor's loadings concentrate on few genes -- one module --
            and factors may correlate, as programs that exclude each other do.
            On simulated screens this recovered the planted programs as well
            as or better than varimax.
        ``"varimax"``
            Whitening and varimax only (uncorrelated factors).
        ``"none"``
            The raw latent axes, each scaled to unit SD.

        In every case the factor scores have unit SD over the cells (so a
        loading is the log-expression change per SD of the cells, and effects
        are in SDs), each factor is signed so that its larger tail of
        loadings is positive (its main genes go up with it), and factors are
        ordered by decreasing sum of squared loadings. Calling it again
        recomputes from the raw latent.
        """
        check_choice("rotation", rotation, ROTATIONS)
        z = self._raw_embed(data, idx, batch_size).double().cpu()
        if z.shape[0] < 2:
            raise ValueError("orient needs the posterior means of at least 2 cells")
        weight = self.decoder.folded_weight().detach().double().cpu()
        if rotation == "none":
            sd = z.std(0).clamp_min(1e-8)
            transform, loadings = torch.diag(1.0 / sd), weight * sd
        else:
            cov = torch.cov(z.T).reshape(self.n_latent, self.n_latent)
            evals, evecs = torch.linalg.eigh(cov)
            evals = evals.clamp_min(max(float(evals.max()), 1e-12) * 1e-8)
            half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
            inv_half = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
            whitened = weight @ half  # loadings per unit of the whitened scores
            rot = varimax(whitened)
            oblique = promax_target(whitened @ rot) if rotation == "promax" else torch.eye(self.n_latent).double()
            transform = inv_half @ rot @ torch.linalg.inv(oblique).T
            loadings = whitened @ rot @ oblique
        # sign: the larger tail (sum of cubes) positive; order: decreasing sum of squares
        signs = torch.where((loadings**3).sum(0) < 0, -1.0, 1.0).double()
        order = torch.argsort((loadings**2).sum(0), descending=True)
        transform = (transform @ torch.diag(signs))[:, order]
        self.factor_transform.copy_(transform.to(self.factor_transform))
        return self

    @torch.no_grad()
    def folded_loadings(self) -> Tensor:
        """``(G, K)`` tensor of the reported loadings (see :meth:`loadings`)."""
        w = self.decoder.folded_weight().detach().double()
        inv_t = torch.linalg.inv(self.factor_transform.double())
        return w @ inv_t.T

    @torch.no_grad()
    def loadings(self, gene_names: Sequence[str] | None = None, factor_names: Sequence[str] | None = None):
        """Genes x factors loadings on the natural-log expression scale (pandas DataFrame).

        ``L[g, k]`` is the change of gene ``g``'s log expression per unit of
        factor ``k`` as reported by :meth:`embed` (the BatchNorm folded into
        the weights with its running statistics, the :meth:`orient` transform
        applied). Only differences between genes are identified (the softmax
        removes a shift shared by all genes); loadings are centred over genes.
        Genes are named from ``gene_names``, else ``metadata["genes"]``, else
        ``gene_0, ...``; factors ``factor_1, ...``.
        """
        import pandas as pd

        w = self.folded_loadings().cpu().numpy()
        genes = list(gene_names) if gene_names is not None else self.metadata.get("genes")
        if genes is None:
            genes = [f"gene_{i}" for i in range(self.n_genes)]
        if len(genes) != self.n_genes:
            raise ValueError(f"got {len(genes)} gene names for a model of {self.n_genes} genes")
        factors = list(factor_names) if factor_names is not None else self.factor_names
        if len(factors) != self.n_latent:
            raise ValueError(f"got {len(factors)} factor names for a model of {self.n_latent} factors")
        return pd.DataFrame(w, index=pd.Index([str(g) for g in genes], name="gene"), columns=factors)

    @property
    def factor_names(self) -> list[str]:
        """``["factor_1", ..., "factor_K"]``."""
        return [f"factor_{k + 1}" for k in range(self.n_latent)]


def promax_target(loadings: Tensor, power: float = 4.0) -> Tensor:
    """Oblique promax step ``U`` (``K x K``) for varimax-rotated ``loadings`` (``G x K``).

    ``loadings @ U`` best fits (least squares) the target
    ``loadings * |loadings| ** (power - 1)``, which sharpens each factor's
    large loadings and shrinks its small ones; ``U``'s columns are scaled so
    that factor scores ``s @ inv(U).T`` of unit-variance, uncorrelated ``s``
    keep unit variance.
    """
    lam = loadings.double()
    target = lam * lam.abs() ** (power - 1.0)
    u = torch.linalg.lstsq(lam, target).solution
    scale = torch.diag(torch.linalg.inv(u.T @ u)).clamp_min(1e-12).sqrt()
    return u * scale


def varimax(loadings: Tensor, max_iter: int = 500, tol: float = 1e-10) -> Tensor:
    """Orthogonal varimax rotation ``R`` (``K x K``) of a ``G x K`` loading matrix.

    ``loadings @ R`` maximises the variance of the squared loadings within
    each factor (Kaiser 1958), i.e. pushes every gene towards loading on few
    factors. Deterministic (starts from the identity).
    """
    lam = loadings.double()
    n, k = lam.shape
    rot = torch.eye(k, dtype=lam.dtype, device=lam.device)
    if k < 2:
        return rot
    objective = 0.0
    for _ in range(max_iter):
        rotated = lam @ rot
        target = rotated**3 - rotated * (rotated**2).sum(0, keepdim=True) / n
        u, s, vh = torch.linalg.svd(lam.T @ target)
        rot = u @ vh
        new_objective = float(s.sum())
        if new_objective <= objective * (1.0 + tol):
            break
        objective = new_objective
    return rot
