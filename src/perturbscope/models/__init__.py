"""Plain-PyTorch model core of perturbscope (no Kedro, no AnnData; usable on its own).

Modules
-------
``likelihoods``
    NB / ZINB count log-likelihoods in log space (sparse-aware) and a
    Gaussian log-likelihood.
``data``
    :class:`CellData` (device-resident CSR counts + per-cell extras) and the
    samplers :class:`MinibatchSampler` and :class:`PairedSampler`.
``modules``
    Building blocks: :class:`MLP`, :class:`GaussianEncoder`,
    :class:`LibraryEncoder`, :class:`CountDecoder`, KL / Wasserstein helpers.
``base``
    :class:`BaseModel`, the model contract.
``training``
    :func:`fit`, the one training loop, with :class:`TrainConfig`,
    :class:`History`, :class:`TrainingError`.
``contrastive``
    :class:`ContrastiveVAE` (contrastiveVI).
``cvae``
    :class:`ConditionalVAE`: perturbation prediction conditioned on a
    multi-hot over perturbed genes (Gaussian or NB likelihood); Mode A
    (``generate_prior``) and Mode B (``generate_from_controls``) generation
    as arrays.
``linear``
    :class:`LinearVAE` (LDVAE): linear decoder with BatchNorm folded into
    genes x factors ``loadings()``; ``init_intercepts``, ``orient``
    (promax / varimax factors), ``embed``, ``reconstruction_log_likelihood``.
``io``
    Checkpoints: :func:`to_checkpoint`, :func:`from_checkpoint`,
    :func:`save_model`, :func:`load_model`.
``model`` (:mod:`perturbscope.models.model`)
    The AnnData-facing API: one class per model (``ContrastiveVI``, ``LDVAE``,
    ``CVAE``) that fits from a screen, embeds / samples and saves / loads.
    Nothing else in this package imports AnnData or Kedro.

Quick start
-----------
::

    from perturbscope.models import (CellData, PairedSampler, ContrastiveVAE,
                                     TrainConfig, fit, seeded, save_model)

    data = CellData(adata.layers["counts"], obs={"batch": batch_codes}, device="cpu")
    train = PairedSampler(data, control_train_idx, target_train_idx, batch_size=256, seed=0)
    val = PairedSampler(data, control_val_idx, target_val_idx, batch_size=256, shuffle=False)
    with seeded(0):                                   # reproducible initialisation
        model = ContrastiveVAE(n_genes=data.n_genes, n_batch=2)
    history = fit(model, train, val, TrainConfig(max_epochs=200, seed=0))
    background, salient = model.embed(data)           # numpy, posterior means
    history.to_frame()                                # pandas, one row per epoch
    save_model(model, "model.pt")

Batch dicts
-----------
:meth:`CellData.batch(idx) <CellData.batch>` returns ``dict[str, Tensor]``:

==============  =============  ==============================================
key             shape          meaning
==============  =============  ==============================================
``x``           (B, G) float   dense counts of the minibatch
``nz_row``      (nnz,) int64   row in the batch of each nonzero count
``nz_col``      (nnz,) int64   gene of each nonzero count
``nz_val``      (nnz,) float   the nonzero counts
``nz_lgamma``   (nnz,) float   ``lgamma(nz_val + 1)`` (precomputed once)
``log_library`` (B,) float     log total counts (clamped at >= log 1)
``idx``         (B,) int64     positions of the cells in the CellData
*obs keys*      (B, ...)       every ``CellData(obs=...)`` array (int codes ->
                               int64, floats/bools -> float)
==============  =============  ==============================================

:class:`MinibatchSampler` yields such dicts; :class:`PairedSampler` yields
``{"background": batch, "target": batch}`` (equal sizes; one epoch = every
target once, each paired with a control drawn by cycling through shuffled
permutations). :func:`concat_batches` stacks batches (offsetting
``nz_row``), e.g. to run one forward pass over both groups. Samplers own a
CPU ``torch.Generator``; ``fit`` re-seeds them from ``TrainConfig.seed``
through ``manual_seed(seed)``. A final minibatch of one cell is fine (all
blocks use LayerNorm).

Likelihood API
--------------
* ``log_likelihood(kind, log_mu, log_theta, nz_row, nz_col, nz_val,
  zi_logits=None, nz_lgamma=None) -> (B,)`` -- ``kind`` in ``"nb", "zinb"``;
  the zero term is computed densely without lgamma, lgamma corrections only
  at the nonzeros; ``log_theta`` per gene ``(G,)`` (or ``(B, G)``). Its
  gradients are closed-form (a custom autograd function), not autograd
  through the formula, which on a CPU cost more than the forward pass.
* ``batch_log_likelihood(kind, batch, log_mu, log_theta, zi_logits=None)``
  -- the same, reading the nonzeros from a batch dict (what models call).
* ``dense_log_likelihood(kind, x, log_mu, log_theta, zi_logits=None)``,
  ``nb_log_prob``, ``zinb_log_prob`` -- dense references.
* ``gaussian_log_likelihood(x, mean, log_var) -> (B,)`` -- for
  log-normalised data.
* ``check_likelihood(kind)`` -- constructor validation with a clear error.

Building blocks (``modules``)
-----------------------------
Blocks take already-transformed input (compute ``h = torch.log1p(x)`` once
per step and feed it to every encoder) and an optional float covariate
tensor ``cov`` ``(B, n_cov)`` concatenated to every hidden layer's input
(``one_hot(codes, n)`` for a batch; concatenate a condition multi-hot for a
conditional VAE). No block uses BatchNorm, so single-cell minibatches work.

* ``MLP(n_in, n_hidden=128, n_layers=1, dropout=0.1, n_cov=0, layer_norm=True)``
  ``(x, cov, first=None) -> (B, n_hidden)``; ``first_layers(mlps, x, cov)``
  runs the first layers of several MLPs reading the same input as one
  product (pass each result as ``first=``).
* ``Linear`` / ``linear(x, weight, bias)`` -- ``nn.Linear`` / ``F.linear``
  whose product runs in bfloat16 for large layers inside
  ``matmul_dtype(torch.bfloat16)`` (what ``fit`` sets for
  ``TrainConfig(precision="bfloat16")``, or ``"auto"`` on hardware with
  native bfloat16); outputs, weights, likelihoods and KL terms stay float32.
* ``GaussianEncoder(n_in, n_latent, n_hidden, n_layers, dropout, n_cov, var_eps=1e-4, layer_norm=True)``
  ``(x, cov) -> (mean, var)``; ``.sample(x, cov) -> (mean, var, z)``.
* ``LibraryEncoder(n_in, n_hidden, n_layers, dropout, n_cov, layer_norm=True)``
  ``(x, cov) -> (mean, var)`` of shape ``(B,)`` (log library); prior from
  :meth:`CellData.library_prior`, KL via ``kl_normal``.
* ``CountDecoder(n_in, n_genes, n_hidden, n_layers, dropout=0.0, n_cov, likelihood, layer_norm=False)``
  ``(z, log_library, cov) -> CountParams(log_rho, log_mu, log_theta, zi_logits)``;
  ``.log_proportions(z, cov)``. Decoders default to no LayerNorm: it
  normalises hidden units jointly and so couples latent blocks (in
  contrastiveVI it made the salient code leak shared variation). A linear decoder (LDVAE) only has to
  produce the same :class:`CountParams` (``log_rho = log_softmax(W z)``,
  ``log_mu = log_rho + log_library``, a per-gene ``log_theta`` parameter) to
  reuse the likelihood and ``fit``.
* ``reparameterize(mean, var)``, ``kl_standard_normal(mean, var) -> (B,)``,
  ``kl_normal(mean, var, prior_mean, prior_var) -> (B,)``,
  ``wasserstein_to_origin(mean, var) -> (B,)``, ``one_hot(codes, n)``.

Model contract
--------------
Every model subclasses :class:`BaseModel` and

* calls ``self._set_hparams(**constructor_kwargs)`` so ``self.hparams`` is
  a JSON-serialisable dict and ``type(model)(**model.hparams)`` rebuilds it;
  ``self.metadata`` is a free JSON-serialisable dict (gene names, category
  labels...; default ``{}``), saved in checkpoints;
* validates hyperparameters in ``__init__`` with ``ValueError`` messages
  naming the parameter and the fix;
* implements ``loss(batch, kl_weight: float) -> dict[str, Tensor]`` with key
  ``"loss"`` (scalar mean over cells, back-propagated) plus scalar component
  terms (e.g. ``reconstruction``, ``kl``...), all logged per epoch;
* may use ``self.iter_batches(data, idx, batch_size)`` for inference
  helpers (``embed`` etc.) returning numpy arrays.

Training
--------
``fit(model, train_sampler, val_sampler=None, config=TrainConfig()) -> History``
(Adam; validation each epoch in eval mode with ``kl_weight=1`` and a fixed
RNG seed; restores the best-validation weights; leaves the model in eval
mode on the training device). Loss terms are accumulated on the device and
synchronised once per epoch.

``TrainConfig`` fields: ``max_epochs=100, lr=1e-3, weight_decay=0.0,
early_stopping=True, patience=10, min_delta=0.0, lr_patience=None,
lr_factor=0.5, lr_min=0.0, kl_warmup_epochs=0, grad_clip=None, seed=0, device="auto",
progress=True, restore_best=True, num_threads=None`` (and precision, distributed and
streaming settings). ``lr_patience`` decays the learning rate by ``lr_factor`` after that
many epochs past the warm-up without a validation improvement (torch's ``ReduceLROnPlateau``).
KL weight in epoch ``e`` (0-based) is ``min(1, (e + 1) / kl_warmup_epochs)``;
epochs inside the warm-up are not eligible for best-epoch / early stopping.

``History`` fields (lists, one entry per epoch): ``epoch, train_loss,
val_loss, kl_weight, lr, seconds``; ``train_terms`` / ``val_terms``:
``dict[term, list[float]]``; plus ``best_epoch`` and ``stopped_early``.
``to_frame()`` -> DataFrame with columns ``epoch, train_loss, val_loss,
kl_weight, lr, seconds, train_<term>..., val_<term>...``; ``to_dict()`` -> JSON.

CPU threads: on a machine shared with other busy processes, torch's
multi-threaded kernels can slow down by an order of magnitude (threads wait
on each other); ``TrainConfig(num_threads=1)`` is then much faster.

A NaN/inf loss term raises :class:`TrainingError` (a ``ValueError``) naming
the epoch, step and term, with remedies. ``seeded(seed)`` is a context
manager for reproducible model construction; fits are bit-identical on the
CPU for equal seeds.

Checkpoints
-----------
``to_checkpoint(model) -> {"class": "module.QualName", "hparams", "metadata",
"state_dict"}``; ``from_checkpoint(ckpt, map_location="cpu")`` (eval mode);
``save_model(model, path)`` / ``load_model(path, map_location="cpu")``
(``torch.load(weights_only=True)``).
"""

from .base import BaseModel, BatchLibraryModel
from .contrastive import ContrastiveVAE
from .cvae import ConditionalVAE, UnknownPerturbationError
from .data import CellData, MinibatchSampler, PairedSampler, batch_size_of, batch_to, concat_batches
from .io import from_checkpoint, load_model, save_model, to_checkpoint
from .likelihoods import (
    batch_log_likelihood,
    check_likelihood,
    dense_log_likelihood,
    gaussian_log_likelihood,
    log_likelihood,
    nb_log_prob,
    zinb_log_prob,
)
from .linear import LinearVAE
from .modules import (
    MLP,
    CountDecoder,
    CountParams,
    GaussianEncoder,
    LibraryEncoder,
    kl_normal,
    kl_standard_normal,
    one_hot,
    reparameterize,
    wasserstein_to_origin,
)
from .training import History, TrainConfig, TrainingError, fit, resolve_device, seeded, torch_threads

__all__ = [
    "BaseModel",
    "BatchLibraryModel",
    "CellData",
    "ConditionalVAE",
    "ContrastiveVAE",
    "CountDecoder",
    "CountParams",
    "GaussianEncoder",
    "History",
    "LibraryEncoder",
    "LinearVAE",
    "MLP",
    "MinibatchSampler",
    "PairedSampler",
    "TrainConfig",
    "TrainingError",
    "UnknownPerturbationError",
    "batch_log_likelihood",
    "batch_size_of",
    "batch_to",
    "check_likelihood",
    "concat_batches",
    "dense_log_likelihood",
    "fit",
    "from_checkpoint",
    "gaussian_log_likelihood",
    "kl_normal",
    "kl_standard_normal",
    "load_model",
    "log_likelihood",
    "nb_log_prob",
    "one_hot",
    "reparameterize",
    "resolve_device",
    "save_model",
    "seeded",
    "torch_threads",
    "to_checkpoint",
    "wasserstein_to_origin",
    "zinb_log_prob",
]
