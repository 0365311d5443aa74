"""Conditional VAE for perturbation prediction.

:class:`ConditionalVAE` models a cell's expression ``x`` given its
perturbation condition ``c``: a multi-hot vector over the *perturbed genes*
(a double ``A+B`` switches on A and B; control cells have ``c = 0``).

* Encoder ``q(z | x, c)``: :class:`~perturbscope.models.modules.GaussianEncoder`
  with the multi-hot as covariate.
* Prior ``p(z) = N(0, I)``.
* Decoder ``p(x | z, c)``. The condition enters *additively over genes* in two
  ways, so that a combination of perturbed genes seen separately in training
  can be predicted:

  - a **linear shift**: ``shift = c @ S`` (``S``: one vector of G values per
    perturbed gene), added to the decoder output (the Gaussian mean, or the
    NB logits before the softmax). For a double this is exactly
    ``S_A + S_B``, the model's version of the additive baseline;
  - a **summed embedding**: ``e = c @ E`` (one ``n_condition_embedding``-dim
    vector per perturbed gene, summed over the perturbed genes) fed, with
    ``z``, to every hidden layer of the decoder MLP, so effects can depend on
    the cell state and combine non-linearly.

* Likelihood (``likelihood``):

  - ``"gaussian"``: data = log-normalised expression (the processed screen's
    ``X``); diagonal Gaussian with a per-gene variance,
    :func:`~perturbscope.models.likelihoods.gaussian_log_likelihood`;
  - ``"nb"``: data = raw counts; negative binomial with mean
    ``softmax(logits) * library`` (observed library size) and a per-gene
    inverse dispersion, :func:`~perturbscope.models.likelihoods.batch_log_likelihood`.

Training uses the shared loop :func:`~perturbscope.models.training.fit`
(β warm-up via ``TrainConfig.kl_warmup_epochs``) on
:class:`~perturbscope.models.data.MinibatchSampler` batches of a
:class:`~perturbscope.models.data.CellData` whose ``obs[condition_key]`` is the
multi-hot of :meth:`ConditionalVAE.encode_conditions`.

Generation returns :class:`Generated` arrays of predicted cells on the
log-normalised scale of the processed screen's ``X`` (the AnnData-facing
:class:`perturbscope.models.model.CVAE` wraps them into AnnData):

* **Mode A** (:meth:`ConditionalVAE.generate_prior`): ``z ~ N(0, I)`` decoded
  under the perturbation;
* **Mode B** (:meth:`ConditionalVAE.generate_from_controls`): real control cells
  encoded under ``c = 0`` and decoded under the perturbation.

For the NB likelihood, predicted cells are count draws (gamma-Poisson) with a
library size taken from a real cell, normalised with that cell's scale factor
(``target_sum / total counts``) and ``log1p``-transformed, exactly like the
processed screen, so their means are comparable to real cells' means.

Example
-------
::

    model = ConditionalVAE.from_vocabulary(["KLF1", "MAP2K6"], var_names, likelihood="gaussian")
    data = CellData(x, obs={"condition": model.encode_conditions(labels)})   # labels: "A+B", "" ...
    fit(model, MinibatchSampler(data, train_idx), MinibatchSampler(data, val_idx, shuffle=False),
        TrainConfig(max_epochs=200, kl_warmup_epochs=20))
    pred_a = model.generate_prior(["KLF1+MAP2K6"], n_cells=200)             # Generated arrays
    pred_b = model.generate_from_controls(data, control_idx, ["KLF1+MAP2K6"], n_cells=200)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perturbscope.schema import CONTROL, parse_perturbation

from ._checks import ParameterError, check_choice, check_float, check_int
from .base import BaseModel
from .data import CellData, as_index
from .likelihoods import batch_log_likelihood, gaussian_log_likelihood, nb_expected_log1p
from .modules import MLP, CountDecoder, CountParams, GaussianEncoder, kl_standard_normal, reparameterize

__all__ = ["CVAE_LIKELIHOODS", "ConditionalVAE", "GaussianParams", "Generated", "UnknownPerturbationError"]

CVAE_LIKELIHOODS: tuple[str, ...] = ("gaussian", "nb")


class UnknownPerturbationError(ValueError):
    """A perturbation names a gene that is not in the model's condition vocabulary."""


class Generated(NamedTuple):
    """Predicted cells of :meth:`ConditionalVAE.generate_prior` / :meth:`~ConditionalVAE.generate_from_controls`."""

    x: np.ndarray
    """``(n, G)`` float32 log-normalised cells (draws, or the expectation with ``sample=False``)."""
    expected: np.ndarray
    """``(n, G)`` float32 each cell's ``E[x | z, c]`` (log-normalised)."""
    labels: list[str]
    """The perturbation of each cell."""
    source: np.ndarray | None
    """Mode B: position in the data of the control cell each cell comes from; None for Mode A."""


class GaussianParams(NamedTuple):
    """The Gaussian likelihood's parameters (log-normalised data)."""

    mean: Tensor
    """``(B, G)`` means."""
    log_var: Tensor
    """``(G,)`` per-gene log variances."""


class _GradientReversal(torch.autograd.Function):
    """Identity forward; gradient multiplied by ``-1`` backward (adversarial training in one loss)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


class ConditionalVAE(BaseModel):
    """Conditional VAE ``q(z|x,c)``, ``p(x|z,c)``, ``p(z) = N(0, I)`` over multi-hot gene conditions.

    Parameters
    ----------
    n_genes
        Number of genes (columns of the expression matrix).
    n_conditions
        Size of the condition vocabulary (number of distinct perturbed genes).
        Build with :meth:`from_vocabulary` to store the gene names in
        ``metadata["condition_genes"]``.
    n_latent
        Dimension of ``z``.
    n_hidden
        Width of the hidden layers of encoder and decoder.
    n_layers
        Hidden layers of encoder and decoder.
    dropout
        Dropout rate of the encoder.
    likelihood
        ``"nb"`` (default: raw counts, the library size of each cell) or ``"gaussian"`` (log-normalised
        data).
    n_condition_embedding
        Dimension of the per-gene embedding summed over the perturbed genes
        and fed to the decoder MLP; 0 = the decoder MLP sees only ``z``.
    condition_shift
        Add the linear per-gene shift ``c @ S`` to the decoder output.
    condition_key
        Name of the multi-hot entry in the batch dicts (``CellData.obs``).
    var_eps
        Variance floor of the Gaussian likelihood (in log-normalised units²).
    adversary_weight
        Weight of an adversarial classifier that predicts the condition
        multi-hot from ``z`` through a gradient-reversal layer (as in CPA):
        the classifier learns to read the perturbation from ``z``, the encoder
        learns to hide it, so ``z`` keeps cell state only and Mode A / Mode B
        see the same latent distribution for every perturbation. 0 disables
        it. The term is added to the training loss only (validation loss =
        negative ELBO).

    Raises
    ------
    ValueError
        For a bad hyperparameter (the message names it and the fix).
    """

    def __init__(
        self,
        n_genes: int,
        n_conditions: int,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 2,
        dropout: float = 0.1,
        likelihood: str = "nb",
        n_condition_embedding: int = 16,
        condition_shift: bool = True,
        condition_key: str = "condition",
        var_eps: float = 1e-3,
        adversary_weight: float = 0.0,
    ) -> None:
        super().__init__()
        n_genes = check_int("n_genes", n_genes, 1, "pass the number of genes of the expression matrix")
        n_conditions = check_int("n_conditions", n_conditions, 1, "the vocabulary needs at least one perturbed gene")
        n_latent = check_int("n_latent", n_latent, 1, "use e.g. 10")
        n_hidden = check_int("n_hidden", n_hidden, 1, "use e.g. 128")
        n_layers = check_int("n_layers", n_layers, 1, "use e.g. 1 or 2")
        n_condition_embedding = check_int(
            "n_condition_embedding", n_condition_embedding, 0, "use 0 to feed no embedding to the decoder MLP"
        )
        dropout = check_float("dropout", dropout, 0.0, 1.0, "use e.g. 0.1")
        check_choice(
            "likelihood",
            likelihood,
            CVAE_LIKELIHOODS,
            "'nb': raw counts with library size, 'gaussian': log-normalised X",
        )
        if not isinstance(condition_shift, bool):
            raise ParameterError("condition_shift", f"must be true or false, got {condition_shift!r}")
        if not condition_shift and n_condition_embedding == 0:
            raise ParameterError(
                "condition_shift",
                "False with n_condition_embedding=0 leaves the decoder blind to the perturbation; enable the "
                "shift or give the embedding a dimension",
            )
        var_eps = check_float("var_eps", var_eps, 1e-300, math.inf, "use e.g. 1e-3")
        adversary_weight = check_float("adversary_weight", adversary_weight, 0.0, math.inf, "0 disables it")
        self._set_hparams(
            n_genes=n_genes,
            n_conditions=n_conditions,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=float(dropout),
            likelihood=likelihood,
            n_condition_embedding=n_condition_embedding,
            condition_shift=condition_shift,
            condition_key=condition_key,
            var_eps=float(var_eps),
            adversary_weight=float(adversary_weight),
        )
        self.n_genes = n_genes
        self.n_conditions = n_conditions
        self.n_latent = n_latent
        self.likelihood = likelihood
        self.condition_key = condition_key
        self.var_eps = float(var_eps)
        self.adversary_weight = float(adversary_weight)

        self.encoder = GaussianEncoder(
            n_genes, n_latent, n_hidden=n_hidden, n_layers=n_layers, dropout=dropout, n_cov=n_conditions
        )
        self.embedding = nn.Linear(n_conditions, n_condition_embedding, bias=False) if n_condition_embedding else None
        # MLP (with LayerNorm) and expression head; the per-gene scale below is the NB dispersion
        self.decoder = CountDecoder(
            n_latent,
            n_genes,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=0.0,
            n_cov=n_condition_embedding,
            likelihood="nb",
            layer_norm=True,
            dispersion=False,
        )
        # per-gene linear shift of each perturbed gene (zero at initialisation)
        self.shift = nn.Parameter(torch.zeros(n_conditions, n_genes)) if condition_shift else None
        # per-gene log variance (Gaussian) or log inverse dispersion (NB)
        self.log_scale = nn.Parameter(torch.zeros(n_genes))
        self.adversary = (
            nn.Sequential(MLP(n_latent, n_hidden, 1, dropout=0.0), nn.Linear(n_hidden, n_conditions))
            if adversary_weight > 0
            else None
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_vocabulary(
        cls,
        condition_genes: Sequence[str],
        var_names: Sequence[str],
        double_separator: str = "+",
        **kwargs: Any,
    ) -> ConditionalVAE:
        """Build a model whose conditions are ``condition_genes`` (stored in ``metadata``).

        Parameters
        ----------
        condition_genes
            The perturbed genes seen in training (the multi-hot vocabulary).
        var_names
            Names of the expression features (genes), in matrix column order.
        double_separator
            Separator of combinatorial labels (``A+B``).
        **kwargs
            Other constructor arguments.
        """
        genes = sorted({str(g) for g in condition_genes})
        if not genes:
            raise ValueError("condition_genes is empty: the training cells carry no perturbed gene")
        model = cls(n_genes=len(var_names), n_conditions=len(genes), **kwargs)
        model.metadata.update(
            condition_genes=genes,
            var_names=[str(v) for v in var_names],
            double_separator=str(double_separator),
        )
        return model

    @property
    def condition_genes(self) -> list[str]:
        """The condition vocabulary (``metadata["condition_genes"]``)."""
        genes = self.metadata.get("condition_genes")
        if genes is None:
            return [f"condition_{i}" for i in range(self.n_conditions)]
        return list(genes)

    def perturbed_genes(self, label: str) -> tuple[str, ...]:
        """The genes perturbed by ``label`` (``"A+B"`` → ``("A", "B")``; control → ``()``)."""
        sep = self.metadata.get("double_separator", "+")
        return parse_perturbation(str(label), sep, (CONTROL,))

    def can_predict(self, label: str) -> bool:
        """Whether every gene of ``label`` is in the condition vocabulary."""
        vocab = set(self.condition_genes)
        return all(g in vocab for g in self.perturbed_genes(label))

    def encode_conditions(self, labels: Sequence[str]) -> np.ndarray:
        """Multi-hot condition matrix ``(n, n_conditions)`` float32 for perturbation labels.

        ``"control"`` and ``""`` give the all-zero vector; ``"A+B"`` switches on A and B.

        Raises
        ------
        UnknownPerturbationError
            If a label names a gene outside the vocabulary.
        """
        index = {g: i for i, g in enumerate(self.condition_genes)}
        labels = [str(label) for label in labels]
        out = np.zeros((len(labels), self.n_conditions), dtype=np.float32)
        cache: dict[str, tuple[str, ...]] = {}
        unknown: dict[str, list[str]] = {}
        for row, label in enumerate(labels):
            genes = cache.get(label)
            if genes is None:
                genes = cache[label] = self.perturbed_genes(label)
            for gene in genes:
                col = index.get(gene)
                if col is None:
                    unknown.setdefault(label, []).append(gene)
                else:
                    out[row, col] = 1.0
        if unknown:
            shown = "; ".join(f"{lab!r}: {genes}" for lab, genes in list(unknown.items())[:5])
            raise UnknownPerturbationError(
                f"{len(unknown)} perturbation(s) name genes the model never saw perturbed ({shown}). "
                f"The model knows {self.n_conditions} perturbed genes (metadata['condition_genes']); "
                "a combination can only be predicted when each of its genes was perturbed in training."
            )
        return out

    # ------------------------------------------------------------------ the model
    def _condition(self, batch: dict[str, Tensor]) -> Tensor:
        if self.condition_key not in batch:
            raise KeyError(
                f"the batch has no {self.condition_key!r} entry; build the data with "
                "perturbscope.models.model.CVAE(model).cell_data(adata) "
                "(or CellData(obs={condition_key: model.encode_conditions(labels)}))"
            )
        return batch[self.condition_key].to(self.log_scale.dtype)

    def _encoder_input(self, x: Tensor) -> Tensor:
        return x if self.likelihood == "gaussian" else torch.log1p(x)

    def decode_logits(self, z: Tensor, c: Tensor) -> Tensor:
        """Decoder output before the likelihood: the Gaussian mean, or the NB logits ``(B, G)``."""
        emb = self.embedding(c) if self.embedding is not None else None
        out = self.decoder.logits(z, emb)
        if self.shift is not None:
            out = out + c @ self.shift
        return out

    def gaussian_log_var(self) -> Tensor:
        """Per-gene log variance of the Gaussian likelihood ``(G,)``, floored at ``var_eps``."""
        return torch.log(F.softplus(self.log_scale) + self.var_eps)

    def count_params(self, z: Tensor, c: Tensor, log_library: Tensor) -> CountParams:
        """NB parameters (log space) for latent ``z``, condition ``c`` and log library ``(B,)``."""
        log_rho = F.log_softmax(self.decode_logits(z, c), dim=-1)
        return CountParams(log_rho, log_rho + log_library.unsqueeze(-1), self.log_scale, None)

    def inference(self, batch: dict[str, Tensor], sample: bool = True) -> dict[str, Tensor]:
        """The posterior ``q(z | x, c)`` of a batch under each cell's own condition: ``mean``, ``var``,
        ``z`` (a draw, or the mean with ``sample=False``) and the condition multi-hot ``c``."""
        c = self._condition(batch)
        mean, var = self.encoder(self._encoder_input(batch["x"]), c)
        z = reparameterize(mean, var) if sample else mean
        return {"mean": mean, "var": var, "z": z, "c": c}

    def generative(self, z: Tensor, c: Tensor, log_library: Tensor | None = None) -> CountParams | GaussianParams:
        """The likelihood's parameters of latent ``z`` under condition ``c``: :class:`CountParams` (NB,
        needs the log library ``(B,)``) or :class:`GaussianParams` (log-normalised data)."""
        if self.likelihood == "gaussian":
            return GaussianParams(self.decode_logits(z, c), self.gaussian_log_var())
        if log_library is None:
            raise ValueError("the NB likelihood needs each cell's log library")
        return self.count_params(z, c, log_library)

    def loss(self, batch: dict[str, Any], kl_weight: float = 1.0) -> dict[str, Tensor]:
        """Negative ELBO of a minibatch.

        Returns
        -------
        dict[str, Tensor]
            ``loss`` = mean over cells of ``reconstruction + kl_weight * kl``
            (plus, in training mode, ``adversary_weight * adversary``);
            ``reconstruction`` (mean negative log-likelihood, summed over
            genes), ``kl`` (mean ``KL(q(z|x,c) || N(0, I))``) and, with an
            adversary, ``adversary`` (mean binary cross-entropy of the
            condition read from ``z``, summed over the conditions).
        """
        q = self.inference(batch)
        z, c = q["z"], q["c"]
        p = self.generative(z, c, batch["log_library"])
        if isinstance(p, GaussianParams):
            recon = -gaussian_log_likelihood(batch["x"], p.mean, p.log_var)
        else:
            recon = -batch_log_likelihood("nb", batch, p.log_mu, p.log_theta)
        kl = kl_standard_normal(q["mean"], q["var"])
        out = {"loss": (recon + kl_weight * kl).mean(), "reconstruction": recon.mean(), "kl": kl.mean()}
        if self.adversary is not None:
            logits = self.adversary(_GradientReversal.apply(z))
            adversary = F.binary_cross_entropy_with_logits(logits, c, reduction="none").sum(-1).mean()
            out["adversary"] = adversary
            if self.training:
                out["loss"] = out["loss"] + self.adversary_weight * adversary
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def embed(self, data: CellData, idx: Any = None, batch_size: int = 1024) -> np.ndarray:
        """Posterior means ``E[z | x, c]`` under each cell's own condition, ``(n, n_latent)``."""
        (latent,) = self._collect(
            data, idx, batch_size, lambda batch: (self.inference(batch, sample=False)["z"],), (self.n_latent,)
        )
        return latent

    def _check_pools(
        self, n: int, library: np.ndarray | None, scale: np.ndarray | None, what: str
    ) -> tuple[np.ndarray, np.ndarray]:
        if library is None:
            raise ValueError(
                f"likelihood='nb' needs library sizes for {what} (total counts of real cells) to draw "
                "counts; pass library=... (and scale=target_sum/total counts to match the processed X)"
            )
        library = np.asarray(library, dtype=np.float64).reshape(-1)
        if library.size != n:
            raise ValueError(f"library has {library.size} entries, expected {n}")
        if scale is None:
            scale = 1e4 / np.maximum(library, 1.0)
        scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        if scale.size != n:
            raise ValueError(f"scale has {scale.size} entries, expected {n}")
        if not (np.isfinite(library).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("library and scale must be finite, with scale > 0")
        return np.maximum(library, 1.0), scale

    @torch.no_grad()
    def _decode_cells(
        self,
        z: np.ndarray,
        c: np.ndarray,
        rng: np.random.Generator,
        sample: bool,
        library: np.ndarray | None,
        scale: np.ndarray | None,
        batch_size: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode ``z`` under ``c``: log-normalised cells and their expectation, each ``(n, G)`` float32.

        The expectation is ``E[x | z, c]`` on the log-normalised scale: the
        decoded mean (Gaussian), or ``E[log1p(counts * scale)]`` under the NB
        (NB; computed by :func:`~perturbscope.models.likelihoods.nb_expected_log1p`,
        as the log of a count has no closed-form mean). The cells are one draw
        (``sample``) or the expectation itself.
        """
        device = self.device
        cells = np.empty((z.shape[0], self.n_genes), dtype=np.float32)
        expected = np.empty_like(cells)
        if self.likelihood == "gaussian":
            sd = torch.exp(0.5 * self.gaussian_log_var()).cpu().numpy()
        else:
            theta = torch.exp(self.log_scale).double().cpu().numpy()
        for start in range(0, z.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            zt = torch.as_tensor(z[sl], device=device, dtype=self.log_scale.dtype)
            ct = torch.as_tensor(c[sl], device=device, dtype=self.log_scale.dtype)
            if self.likelihood == "gaussian":
                mean = self.decode_logits(zt, ct).cpu().numpy()
                expected[sl] = mean
                cells[sl] = mean + sd * rng.standard_normal(mean.shape) if sample else mean
            else:
                rho = torch.softmax(self.decode_logits(zt, ct), dim=-1).double().cpu().numpy()
                mu = rho * library[sl, None]
                expected[sl] = nb_expected_log1p(mu, theta, scale[sl])
                if sample:
                    cells[sl] = np.log1p(rng.poisson(rng.gamma(theta, mu / theta)) * scale[sl, None])
                else:
                    cells[sl] = expected[sl]
        return cells, expected

    def _prepare_labels(self, perturbations: Sequence[str]) -> list[str]:
        if isinstance(perturbations, str):
            perturbations = [perturbations]
        labels = [str(p) for p in perturbations]
        if not labels:
            raise ValueError("no perturbations given to predict")
        self.encode_conditions(labels)  # validates the genes
        return labels

    def generate_prior(
        self,
        perturbations: Sequence[str],
        n_cells: int = 200,
        *,
        library: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        sample: bool = True,
        seed: int = 0,
        batch_size: int = 1024,
    ) -> Generated:
        """Mode A: draw ``z ~ N(0, I)`` and decode under each perturbation.

        Parameters
        ----------
        perturbations
            Labels (``"A"``, ``"A+B"``); every gene must be in the vocabulary.
        n_cells
            Predicted cells per perturbation.
        library, scale
            NB only: pools of real cells' total counts and normalisation
            scale factors (``target_sum / total counts``), aligned; each
            predicted cell takes the pair of a randomly drawn pool entry.
        sample
            Draw observation noise (Gaussian noise / NB counts) into ``X``;
            False puts the expectation in ``X`` too.
        seed
            Seed of the numpy generator used for every draw.
        batch_size
            Cells per decoder pass.

        Returns
        -------
        Generated
            ``len(perturbations) * n_cells`` cells: log-normalised ``x``;
            ``expected``: each cell's ``E[x | z, c]`` (log-normalised; average it
            for a noise-free predicted mean); ``labels``; ``source`` None.
        """
        labels = self._prepare_labels(perturbations)
        n_cells = check_int("n_cells", n_cells, 1, "ask for at least one cell per perturbation")
        rng = np.random.default_rng(seed)
        cell_labels = [label for label in labels for _ in range(n_cells)]
        c = np.repeat(self.encode_conditions(labels), n_cells, axis=0)
        z = rng.standard_normal((len(cell_labels), self.n_latent)).astype(np.float32)
        lib = sc = None
        if self.likelihood == "nb":
            pool_lib, pool_scale = self._check_pools(
                len(library) if library is not None else 0, library, scale, "Mode A"
            )
            pick = rng.integers(0, pool_lib.size, len(cell_labels))
            lib, sc = pool_lib[pick], pool_scale[pick]
        was_training = self.training
        self.eval()
        x, expected = self._decode_cells(z, c, rng, sample, lib, sc, batch_size)
        self.train(was_training)
        return Generated(x, expected, cell_labels, None)

    def generate_from_controls(
        self,
        data: CellData,
        control_idx: Any,
        perturbations: Sequence[str],
        n_cells: int | None = None,
        *,
        scale: np.ndarray | None = None,
        sample: bool = True,
        seed: int = 0,
        batch_size: int = 1024,
    ) -> Generated:
        """Mode B: encode control cells under ``c = 0``, decode them under each perturbation.

        Each control cell's latent is a draw from ``q(z | x, c = 0)``; with
        ``n_cells`` larger than the number of controls the controls are cycled
        (in a random order) with fresh draws.

        Parameters
        ----------
        data
            Cells with the training genes (``perturbscope.models.model.CVAE.cell_data``).
        control_idx
            Positions (or boolean mask) of the control cells in ``data``.
        perturbations
            Labels to predict.
        n_cells
            Predicted cells per perturbation (default: one per control cell).
        scale
            NB only: normalisation scale factor of each control cell
            (aligned with ``control_idx``; default ``1e4 / total counts``).
            The library size is the control cell's own.
        sample, seed, batch_size
            As in :meth:`generate_prior`.

        Returns
        -------
        Generated
            As :meth:`generate_prior`; ``source``: position of each cell's control cell in ``data``.
        """
        labels = self._prepare_labels(perturbations)
        ctrl = as_index(control_idx, data.n_cells, "control_idx").numpy()
        if ctrl.size == 0:
            raise ValueError("Mode B needs at least one control cell")
        if data.n_genes != self.n_genes:
            raise ValueError(f"data has {data.n_genes} genes, the model {self.n_genes}")
        n_cells = ctrl.size if n_cells is None else check_int("n_cells", n_cells, 1, "or None for one per control")
        rng = np.random.default_rng(seed)

        def posterior(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            zero = torch.zeros(batch["x"].shape[0], self.n_conditions, device=self.device)
            return self.encoder(self._encoder_input(batch["x"]), zero)

        mean, variance = self._collect(data, ctrl, batch_size, posterior, (self.n_latent, self.n_latent))
        sd = np.sqrt(variance)
        was_training = self.training
        self.eval()
        lib_all = sc_all = None
        if self.likelihood == "nb":
            lib_all, sc_all = self._check_pools(ctrl.size, data.library[ctrl], scale, "Mode B")
        xs, exps, cell_labels, sources = [], [], [], []
        for label, cond in zip(labels, self.encode_conditions(labels)):
            order = np.resize(rng.permutation(ctrl.size), n_cells)
            z = (mean[order] + sd[order] * rng.standard_normal((n_cells, self.n_latent))).astype(np.float32)
            c = np.repeat(cond[None, :], n_cells, axis=0)
            lib = lib_all[order] if lib_all is not None else None
            sc = sc_all[order] if sc_all is not None else None
            x, expected = self._decode_cells(z, c, rng, sample, lib, sc, batch_size)
            xs.append(x)
            exps.append(expected)
            cell_labels.extend([label] * n_cells)
            sources.append(ctrl[order])
        self.train(was_training)
        return Generated(np.concatenate(xs), np.concatenate(exps), cell_labels, np.concatenate(sources))
