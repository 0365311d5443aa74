"""contrastiveVI: background / salient latent spaces for perturbation screens.

Implements the model of Weinberger, Lin & Lee, "Isolating salient variations
of interest in single-cell data with contrastiveVI", Nature Methods (2023),
in plain PyTorch on the shared perturbscope blocks.

Every cell has a background latent ``z`` (variation shared by controls and
perturbed cells, e.g. cell cycle); perturbed (target) cells also have a
salient latent ``s`` (perturbation-specific variation), which is fixed at 0
for control (background) cells. One decoder maps ``[z, s]`` to NB/ZINB
parameters for both groups. To keep ``s`` free of shared variation, the
control cells' salient posterior is additionally pulled to a point mass at 0
with a 2-Wasserstein penalty.

Escapers (target cells a perturbation did not reach) are called after training from
the salient code: :mod:`perturbscope.models.escape`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_float, check_int
from .base import BatchLibraryModel, check_library_prior
from .data import CellData, concat_batches
from .likelihoods import batch_log_likelihood, check_likelihood
from .modules import (
    CountDecoder,
    CountParams,
    GaussianEncoder,
    first_layers,
    kl_standard_normal,
    linear,
    reparameterize,
    wasserstein_to_origin,
)

__all__ = ["ContrastiveVAE", "AdditiveSalientDecoder", "DECODERS"]

DECODERS = ("joint", "additive")
"""``ContrastiveVAE(decoder=...)`` choices."""

SALIENT_LOADINGS = ("unit", "shared", "free")
"""``ContrastiveVAE(salient_loadings=...)`` choices."""


class AdditiveSalientDecoder(nn.Module):
    """Decoder whose salient code acts additively on log expression.

    ``logits = expression(MLP(z)) + W s`` (``W``: ``n_salient -> n_genes``,
    no bias), then ``log_softmax`` as in :class:`CountDecoder`; dispersion
    and zero-inflation come from the background part alone. The salient
    code thus moves genes by the same log-fold change (up to the softmax
    renormalisation) whatever the cell's background state, so it cannot
    profit from encoding shared variation such as the cell-cycle phase.
    Drop-in for :class:`CountDecoder` with input ``[z, s]``.

    With ``unit_loadings`` each column of ``W`` (a salient dimension's gene
    loadings) is scaled to unit L2 norm, so a salient code's length is the
    length of the log-fold change it decodes to: perturbations with effects
    of similar size sit at similar distances from the controls, and a cell
    near 0 is a cell with little effect. With free loadings the model may
    put a whole program near 0 behind large loadings, next to the escapers
    and the weak responders of every other program.
    """

    def __init__(
        self,
        n_background: int,
        n_salient: int,
        n_genes: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        n_cov: int = 0,
        likelihood: str = "zinb",
        unit_loadings: bool = False,
        shared_scale: bool = False,
    ) -> None:
        super().__init__()
        self.n_background = n_background
        self.unit_loadings = bool(unit_loadings or shared_scale)
        # one learned length shared by every salient dimension's loadings (log scale)
        self.log_scale = nn.Parameter(torch.zeros(())) if shared_scale else None
        self.background = CountDecoder(
            n_background, n_genes, n_hidden=n_hidden, n_layers=n_layers, n_cov=n_cov, likelihood=likelihood
        )
        self.salient = nn.Linear(n_salient, n_genes, bias=False)

    def _hidden_logits(self, zs: Tensor, cov: Tensor | None) -> tuple[Tensor, Tensor]:
        h = self.background.net(zs[:, : self.n_background], cov)
        # expression(h) + salient(s) as one GEMM over [h, s] (a skinny s-GEMM plus an add,
        # forward and backward, cost about as much as the expression head itself on a CPU)
        expression = self.background.expression
        loadings = F.normalize(self.salient.weight, dim=0) if self.unit_loadings else self.salient.weight
        if self.log_scale is not None:
            loadings = loadings * self.log_scale.exp()
        weight = torch.cat([expression.weight, loadings], dim=1)
        return h, linear(torch.cat([h, zs[:, self.n_background :]], dim=-1), weight, expression.bias)

    def log_proportions(self, zs: Tensor, cov: Tensor | None = None) -> Tensor:
        """Log normalised expression ``(B, G)`` of ``[z, s]``."""
        return F.log_softmax(self._hidden_logits(zs, cov)[1], dim=-1)

    def forward(self, zs: Tensor, log_library: Tensor, cov: Tensor | None = None) -> CountParams:
        h, logits = self._hidden_logits(zs, cov)
        log_rho = F.log_softmax(logits, dim=-1)
        zi = self.background.zi(h) if self.background.zi is not None else None
        return CountParams(log_rho, log_rho + log_library.unsqueeze(-1), self.background.log_theta, zi)


class ContrastiveVAE(BatchLibraryModel):
    """contrastiveVI with a shared decoder over background and salient latents.

    Parameters
    ----------
    n_genes
        Number of genes (columns of the count matrix).
    n_background
        Dimension of the background latent ``z``.
    n_salient
        Dimension of the salient latent ``s``.
    n_hidden
        Width of the hidden layers of encoders and decoder.
    n_layers
        Hidden layers per encoder / decoder.
    dropout
        Dropout rate in the encoders.
    likelihood
        ``"zinb"`` (default) or ``"nb"``.
    n_batch
        Number of batch categories; 0 = no batch covariate. If > 0 the
        batches must carry ``batch_key`` integer codes, one-hot encoded into
        encoders and decoder.
    batch_key
        Name of the batch-code entry in the batch dicts (``CellData.obs``).
    library
        ``"observed"`` (log total counts, default) or ``"learned"`` (a
        library encoder with a log-normal prior; needs
        ``library_log_mean`` / ``library_log_var``).
    library_log_mean, library_log_var
        Prior mean / variance of the log library per batch category (length
        ``max(n_batch, 1)``), e.g. from :meth:`CellData.library_prior`.
    wasserstein_penalty
        Weight of the squared 2-Wasserstein distance between the control
        cells' salient posterior and a point mass at 0. 0 disables it.
    decoder
        ``"additive"`` (default): an MLP decodes ``z`` and ``s`` adds a linear
        log-expression effect (:class:`AdditiveSalientDecoder`); on simulated
        screens this keeps the cell-cycle phase out of the salient space at the
        same program separation (bench/contrastive_vs_scvi.py). ``"joint"`` (the
        paper's): one MLP decodes ``[z, s]``.
    salient_loadings
        Additive decoder only. ``"shared"`` (default): each salient dimension's
        gene loadings have unit L2 norm, times one learned length shared by every
        dimension, so a code's length is proportional to the length of its
        log-fold change: programs of similar effect sit at similar distances
        from the controls, and a cell near 0 is a cell with little effect.
        Simulated screens with penetrance 0.6-0.8: KMeans ARI on the responders
        0.96-0.99 over 8 runs (bench/results/escape_seeds.md). ``"unit"``: length
        1 (the prior then charges for the size of the effects; worse on the demo
        screen). ``"free"``: unconstrained loadings (a program can hide near 0
        behind large loadings: ARI 0.74-0.88 at penetrance 0.8).

    Notes
    -----
    ``loss`` expects a paired batch ``{"background": ..., "target": ...}``
    as yielded by :class:`~perturbscope.models.data.PairedSampler`.
    """

    def __init__(
        self,
        n_genes: int,
        n_background: int = 10,
        n_salient: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        likelihood: str = "zinb",
        n_batch: int = 0,
        batch_key: str = "batch",
        library: str = "observed",
        library_log_mean: list[float] | None = None,
        library_log_var: list[float] | None = None,
        wasserstein_penalty: float = 1.0,
        decoder: str = "additive",
        salient_loadings: str = "shared",
    ) -> None:
        super().__init__()
        n_genes = check_int("n_genes", n_genes, 1, "pass the number of genes of the count matrix")
        n_background = check_int("n_background", n_background, 1, "the background latent needs at least one dimension")
        n_salient = check_int("n_salient", n_salient, 1, "the salient latent needs at least one dimension")
        n_hidden = check_int("n_hidden", n_hidden, 1, "use e.g. 128")
        n_layers = check_int("n_layers", n_layers, 1, "use e.g. 1 or 2")
        n_batch = check_int("n_batch", n_batch, 0, "use 0 for no batch covariate")
        dropout = check_float("dropout", dropout, 0.0, 1.0, "use e.g. 0.1")
        check_likelihood(likelihood)
        wasserstein_penalty = check_float("wasserstein_penalty", wasserstein_penalty, 0.0, math.inf, "0 disables it")
        check_choice("decoder", decoder, DECODERS)
        check_choice("salient_loadings", salient_loadings, SALIENT_LOADINGS)
        library_log_mean, library_log_var = check_library_prior(library, library_log_mean, library_log_var, n_batch)
        self._set_hparams(
            n_genes=n_genes,
            n_background=n_background,
            n_salient=n_salient,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=float(dropout),
            likelihood=likelihood,
            n_batch=n_batch,
            batch_key=batch_key,
            library=library,
            library_log_mean=library_log_mean,
            library_log_var=library_log_var,
            wasserstein_penalty=float(wasserstein_penalty),
            decoder=decoder,
            salient_loadings=salient_loadings,
        )
        self.n_genes = n_genes
        self.n_background = n_background
        self.n_salient = n_salient
        self.likelihood = likelihood
        self.wasserstein_penalty = float(wasserstein_penalty)

        enc = dict(n_hidden=n_hidden, n_layers=n_layers, dropout=dropout, n_cov=n_batch)
        self.background_encoder = GaussianEncoder(n_genes, n_background, **enc)
        self.salient_encoder = GaussianEncoder(n_genes, n_salient, **enc)
        self._init_batch_library(n_genes, n_batch, batch_key, library, library_log_mean, library_log_var, **enc)
        self.decoder: nn.Module
        if decoder == "additive":
            self.decoder = AdditiveSalientDecoder(
                n_background,
                n_salient,
                n_genes,
                n_hidden=n_hidden,
                n_layers=n_layers,
                n_cov=n_batch,
                likelihood=likelihood,
                unit_loadings=salient_loadings == "unit",
                shared_scale=salient_loadings == "shared",
            )
        else:
            self.decoder = CountDecoder(
                n_background + n_salient,
                n_genes,
                n_hidden=n_hidden,
                n_layers=n_layers,
                n_cov=n_batch,
                likelihood=likelihood,
            )

    # ------------------------------------------------------------------ inference / generative / loss
    def inference(self, batch: dict[str, Tensor], sample: bool = True, library: bool = True) -> dict[str, Any]:
        """The posteriors of a batch of cells: background ``q(z | x)`` and salient ``q(s | x)``.

        Returns ``z_mean, z_var, s_mean, s_var``, the latents ``z`` and ``s`` (reparameterised draws, or
        the means with ``sample=False``), ``cov`` (the one-hot batch, or None) and, with ``library``,
        ``log_library`` (observed, or drawn from a learned library's posterior) and ``kl_library``
        (None for an observed library). The salient code is returned for every cell; the loss sets it to
        0 for control cells. The encoders' first layers run as one product (:func:`first_layers`).
        """
        h = torch.log1p(batch["x"])
        cov = self._cov(batch)
        encoders = [self.background_encoder, self.salient_encoder]
        learned = library and self.library_encoder is not None
        if learned:
            encoders.append(self.library_encoder)
        first = first_layers([e.net for e in encoders], h, cov)
        z_mean, z_var = self.background_encoder(h, cov, first[0])
        s_mean, s_var = self.salient_encoder(h, cov, first[1])
        out: dict[str, Any] = {"z_mean": z_mean, "z_var": z_var, "s_mean": s_mean, "s_var": s_var, "cov": cov}
        out["z"] = reparameterize(z_mean, z_var) if sample else z_mean
        out["s"] = reparameterize(s_mean, s_var) if sample else s_mean
        if library:
            out["log_library"], out["kl_library"] = self._library(
                batch, h, cov, sample=sample, first=first[2] if learned else None
            )
        return out

    def generative(self, z: Tensor, s: Tensor, log_library: Tensor, cov: Tensor | None = None) -> CountParams:
        """The count likelihood's parameters of latents ``z`` and ``s`` with log library ``(B,)``."""
        return self.decoder(torch.cat([z, s], dim=-1), log_library, cov)

    def expression(self, z: Tensor, s: Tensor, cov: Tensor | None = None) -> Tensor:
        """The generative model's log normalised expression ``(B, G)`` of latents ``z`` and ``s`` (no library)."""
        return self.decoder.log_proportions(torch.cat([z, s], dim=-1), cov)

    def loss(self, batch: dict[str, Any], kl_weight: float = 1.0) -> dict[str, Tensor]:
        """Negative ELBO (+ Wasserstein penalty) of a paired batch.

        Parameters
        ----------
        batch
            ``{"background": CellData.batch, "target": CellData.batch}``.
        kl_weight
            Weight of the KL terms (warm-up). The Wasserstein penalty is not warmed up.

        Returns
        -------
        dict[str, Tensor]
            ``loss`` = ``(mean_bg[recon + kl_weight*kl_z + penalty*w2] + mean_tg[recon +
            kl_weight*(kl_z + kl_s)]) / 2`` (equals the mean over cells, as batches are paired);
            ``reconstruction`` (mean negative log-likelihood over all cells), ``kl_background`` (mean over
            all cells), ``kl_salient`` (mean over targets), ``wasserstein`` (mean over controls,
            unweighted) and, for a learned library, ``kl_library``.
        """
        n_bg = batch["background"]["x"].shape[0]
        both = concat_batches([batch["background"], batch["target"]])
        q = self.inference(both)
        # the salient code is 0 for background (control) cells
        s = torch.cat([torch.zeros_like(q["s"][:n_bg]), q["s"][n_bg:]])
        p = self.generative(q["z"], s, q["log_library"], q["cov"])
        recon = -batch_log_likelihood(self.likelihood, both, p.log_mu, p.log_theta, p.zi_logits)
        kl_z = kl_standard_normal(q["z_mean"], q["z_var"])
        kl_s = kl_standard_normal(q["s_mean"][n_bg:], q["s_var"][n_bg:])
        w2 = wasserstein_to_origin(q["s_mean"][:n_bg], q["s_var"][:n_bg])

        kl_lib = q["kl_library"]
        kl_all = kl_z if kl_lib is None else kl_z + kl_lib
        per_cell = recon + kl_weight * kl_all
        bg_term = per_cell[:n_bg].mean() + self.wasserstein_penalty * w2.mean()
        tg_term = per_cell[n_bg:].mean() + kl_weight * kl_s.mean()
        out = {
            "loss": 0.5 * (bg_term + tg_term),
            "reconstruction": recon.mean(),
            "kl_background": kl_z.mean(),
            "kl_salient": kl_s.mean(),
            "wasserstein": w2.mean(),
        }
        if kl_lib is not None:
            out["kl_library"] = kl_lib.mean()
        return out

    # ------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, data: CellData, idx: Any = None, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Posterior means of the background and salient latents.

        No sampling (deterministic). The salient mean is returned for every
        cell, controls included (it is *not* forced to 0; a trained model
        places controls near 0).

        Parameters
        ----------
        data
            Cells to embed (same genes as training).
        idx
            Cell positions or boolean mask (default all).
        batch_size
            Cells per forward pass.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            ``(n, n_background)`` and ``(n, n_salient)`` float32 arrays.
        """

        def means(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            q = self.inference(batch, sample=False, library=False)
            return q["z"], q["s"]

        background, salient = self._collect(data, idx, batch_size, means, (self.n_background, self.n_salient))
        return background, salient

    @torch.no_grad()
    def salient_expression(
        self, data: CellData, idx: Any = None, batch_size: int = 1024
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised expression decoded with and without each cell's salient code.

        Both use the posterior means; ``with_salient`` decodes ``[z, s]``,
        ``without_salient`` decodes ``[z, 0]`` (same ``z``, same batch). The
        difference (e.g. of log values, averaged over the cells of one
        perturbation) shows which genes the perturbation moves.

        Parameters
        ----------
        data, idx, batch_size
            As in :meth:`embed`.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            ``(n, n_genes)`` decoder proportions (rows sum to 1).
        """

        def decoded(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            q = self.inference(batch, sample=False, library=False)
            with_s = self.expression(q["z"], q["s"], q["cov"]).exp()
            return with_s, self.expression(q["z"], torch.zeros_like(q["s"]), q["cov"]).exp()

        with_salient, without_salient = self._collect(data, idx, batch_size, decoded, (self.n_genes, self.n_genes))
        return with_salient, without_salient
