"""The plain-PyTorch core of perturbscope: no Kedro, no AnnData (those start at :mod:`.model`).

======================  ==============================================================================
module                  what it holds
======================  ==============================================================================
:mod:`.likelihoods`     NB / ZINB count log-likelihoods (sparse-aware, closed-form gradients), Gaussian
:mod:`.modules`         blocks: :class:`MLP`, :class:`GaussianEncoder`, :class:`CountDecoder`, KL terms
:mod:`.data`            :class:`CellData` (counts on the device), :class:`StreamingCellData` and samplers
:mod:`.base`            :class:`BaseModel`: ``inference`` / ``generative`` / ``loss``
:mod:`.contrastive`     :class:`ContrastiveVAE` (contrastiveVI)
:mod:`.linear`          :class:`LinearVAE` (LDVAE)
:mod:`.cvae`            :class:`ConditionalVAE` (perturbation prediction)
:mod:`.escape`          :class:`EscapeMixture`: which target cells a perturbation reached
:mod:`.runtime`         device, precision, threads, seeds
:mod:`.optim`           the optimisation step and one pass over a sampler
:mod:`.distributed`     data-parallel ranks (torch.distributed)
:mod:`.training`        :func:`fit`, the one training loop, :class:`TrainConfig`, :class:`History`
:mod:`.io`              checkpoints
:mod:`.model`           the AnnData-facing classes: ``ContrastiveVI``, ``LDVAE``, ``CVAE``
======================  ==============================================================================

The docstrings are the manual; the README has the overview.
"""

from ._checks import ParameterError
from .base import BaseModel, BatchLibraryModel
from .contrastive import ContrastiveVAE
from .cvae import ConditionalVAE, UnknownPerturbationError
from .data import CellData, MinibatchSampler, PairedSampler, StreamingCellData, concat_batches
from .escape import EscapeMixture, fit_escape_mixture
from .io import from_checkpoint, load_model, save_model, to_checkpoint
from .likelihoods import batch_log_likelihood, dense_log_likelihood, gaussian_log_likelihood, log_likelihood
from .linear import LinearVAE
from .modules import MLP, CountDecoder, CountParams, GaussianEncoder, LibraryEncoder
from .optim import TrainingError
from .runtime import resolve_device, seeded, torch_threads
from .training import History, TrainConfig, fit

__all__ = [
    "MLP",
    "BaseModel",
    "BatchLibraryModel",
    "CellData",
    "ConditionalVAE",
    "ContrastiveVAE",
    "CountDecoder",
    "CountParams",
    "EscapeMixture",
    "GaussianEncoder",
    "History",
    "LibraryEncoder",
    "LinearVAE",
    "MinibatchSampler",
    "PairedSampler",
    "ParameterError",
    "StreamingCellData",
    "TrainConfig",
    "TrainingError",
    "UnknownPerturbationError",
    "batch_log_likelihood",
    "concat_batches",
    "dense_log_likelihood",
    "fit",
    "fit_escape_mixture",
    "from_checkpoint",
    "gaussian_log_likelihood",
    "load_model",
    "log_likelihood",
    "resolve_device",
    "save_model",
    "seeded",
    "to_checkpoint",
    "torch_threads",
]
