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

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_int
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
        ``"joint"`` (default, as in the paper): one MLP decodes ``[z, s]``.
        ``"additive"``: an MLP decodes ``z`` and ``s`` adds a linear
        log-expression effect (:class:`AdditiveSalientDecoder`); on
        simulated screens this keeps the cell-cycle phase out of the
        salient space at the same program separation.
    salient_loadings
        Additive decoder only. ``"free"`` (default): unconstrained loadings.
        ``"unit"``: each salient dimension's gene loadings have unit L2 norm,
        so the length of a salient code is the length of its log-fold change
        (programs of similar effect sit at similar distances from the
        controls; see :class:`AdditiveSalientDecoder`). It separates programs
        better on simulated screens with 80 % penetrance but worse on the
        demo screen, where the KL cost of long codes stops training early.
        ``"shared"``: unit columns times one learned length shared by every
        dimension (the geometry of ``"unit"`` without charging the prior for
        the size of the effects); in between the two on the demo and on the
        simulated screens (bench/results/escape_seeds.md).

    Notes
    -----
    ``loss`` expects a paired batch ``{"background": ..., "target": ...}``
    as yielded by :class:`~perturbscope.models.data.PairedSampler`.
    """

    retired_hparams = ("escape_gate", "gate_hidden")
    """Constructor arguments of earlier versions, ignored when a checkpoint is loaded."""
    retired_state = ("gate.", "escaper_odds")
    """State-dict prefixes of earlier versions (the escape gate), dropped when a checkpoint is loaded."""
    legacy_hparams = {"salient_loadings": "free"}
    """What a checkpoint saved before an argument existed was trained with (free salient loadings,
    whatever the default becomes)."""

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
        decoder: str = "joint",
        salient_loadings: str = "free",
    ) -> None:
        super().__init__()
        n_genes = check_int("n_genes", n_genes, 1, "pass the number of genes of the count matrix")
        n_background = check_int("n_background", n_background, 1, "the background latent needs at least one dimension")
        n_salient = check_int("n_salient", n_salient, 1, "the salient latent needs at least one dimension")
        n_hidden = check_int("n_hidden", n_hidden, 1, "use e.g. 128")
        n_layers = check_int("n_layers", n_layers, 1, "use e.g. 1 or 2")
        n_batch = check_int("n_batch", n_batch, 0, "use 0 for no batch covariate")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        check_likelihood(likelihood)
        if not (isinstance(wasserstein_penalty, (int, float)) and wasserstein_penalty >= 0):
            raise ValueError(f"wasserstein_penalty must be a number >= 0 (0 disables it), got {wasserstein_penalty!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder={decoder!r} is not supported; use one of {list(DECODERS)}")
        if salient_loadings not in SALIENT_LOADINGS:
            raise ValueError(
                f"salient_loadings={salient_loadings!r} is not supported; use one of {list(SALIENT_LOADINGS)}"
            )
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

    # ------------------------------------------------------------------
    def _encode(
        self, h: Tensor, cov: Tensor | None, library: bool = False
    ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor | None]:
        """Background and salient posteriors ``(mean, var)`` of ``h = log1p(x)``; with ``library``
        also the library encoder's first-layer output (None for an observed library).

        The encoders' first layers run as one GEMM (:func:`first_layers`).
        """
        encoders = [self.background_encoder, self.salient_encoder]
        if library and self.library_encoder is not None:
            encoders.append(self.library_encoder)
        first = first_layers([e.net for e in encoders], h, cov)
        z = self.background_encoder(h, cov, first[0])
        s = self.salient_encoder(h, cov, first[1])
        return z, s, (first[2] if len(first) > 2 else None)

    def loss(self, batch: dict[str, Any], kl_weight: float = 1.0) -> dict[str, Tensor]:
        """Negative ELBO (+ Wasserstein penalty) of a paired batch.

        Parameters
        ----------
        batch
            ``{"background": CellData.batch, "target": CellData.batch}``.
        kl_weight
            Weight of the KL terms (warm-up). The Wasserstein penalty is not
            warmed up.

        Returns
        -------
        dict[str, Tensor]
            ``loss`` = ``(mean_bg[recon + kl_weight*kl_z + penalty*w2] +
            mean_tg[recon + kl_weight*(kl_z + kl_s)]) / 2`` (equals the mean
            over cells, as batches are paired); ``reconstruction`` (mean
            negative log-likelihood over all cells), ``kl_background`` (mean
            over all cells), ``kl_salient`` (mean over targets),
            ``wasserstein`` (mean over controls, unweighted) and, for a
            learned library, ``kl_library``.
        """
        bg, tg = batch["background"], batch["target"]
        n_bg = bg["x"].shape[0]
        both = concat_batches([bg, tg])
        h = torch.log1p(both["x"])
        cov = self._cov(both)

        (z_mean, z_var), (s_mean, s_var), lib_first = self._encode(h, cov, library=True)
        z = reparameterize(z_mean, z_var)
        s = reparameterize(s_mean, s_var)
        # salient code is 0 for background (control) cells
        s = torch.cat([torch.zeros_like(s[:n_bg]), s[n_bg:]])

        log_library, kl_lib = self._library(both, h, cov, sample=True, first=lib_first)

        p = self.decoder(torch.cat([z, s], dim=-1), log_library, cov)
        recon = -batch_log_likelihood(self.likelihood, both, p.log_mu, p.log_theta, p.zi_logits)
        kl_z = kl_standard_normal(z_mean, z_var)
        kl_s = kl_standard_normal(s_mean[n_bg:], s_var[n_bg:])
        w2 = wasserstein_to_origin(s_mean[:n_bg], s_var[:n_bg])

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
        was_training = self.training
        self.eval()
        zs, ss = [], []
        for b in self.iter_batches(data, idx, batch_size):
            (z, _), (s, _), _ = self._encode(torch.log1p(b["x"]), self._cov(b))
            zs.append(z)
            ss.append(s)
        self.train(was_training)
        return self._to_numpy(zs, self.n_background), self._to_numpy(ss, self.n_salient)

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
        was_training = self.training
        self.eval()
        with_s, without_s = [], []
        for b in self.iter_batches(data, idx, batch_size):
            cov = self._cov(b)
            (z, _), (s, _), _ = self._encode(torch.log1p(b["x"]), cov)
            with_s.append(self.decoder.log_proportions(torch.cat([z, s], -1), cov).exp())
            without_s.append(self.decoder.log_proportions(torch.cat([z, torch.zeros_like(s)], -1), cov).exp())
        self.train(was_training)
        return self._to_numpy(with_s, self.n_genes), self._to_numpy(without_s, self.n_genes)
