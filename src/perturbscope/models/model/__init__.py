"""The AnnData-facing API of the models: one class per model around its torch module.

=====================  ==================================  ===================================================
class                  torch module                        what it adds
=====================  ==================================  ===================================================
:class:`ContrastiveVI` :class:`~perturbscope.models.ContrastiveVAE`   fit from a processed screen (controls =
                                                           background), ``embed`` (salient / background), the
                                                           salient log-fold changes; :func:`fit_escapers` and
                                                           :func:`call_escapers` on its embedding
:class:`LDVAE`         :class:`~perturbscope.models.LinearVAE`        fit (oriented factors), ``embed``, ``loadings``
:class:`CVAE`          :class:`~perturbscope.models.ConditionalVAE`   fit on cells with their perturbed genes, Mode A
                                                           / Mode B cells as AnnData
=====================  ==================================  ===================================================

Every class takes a trained module (``ContrastiveVI(catalog.load("contrastive_model"))``), has ``save`` /
``load``, ``cell_data(adata)`` (the screen read the way the module was trained: genes by name, batches by
category), ``train_config()`` (its training defaults) and, after ``fit``, ``history`` (one row per epoch).
Bad input raises :class:`ModelInputError`, a bad argument :class:`~perturbscope.models.ParameterError`.
"""

from .base import ModelAPI, training_summary
from .contrastive import ContrastiveVI, call_escapers, fit_escapers
from .cvae import CVAE, scale_factors
from .inputs import ModelInputError
from .linear import LDVAE, loadings_matrix

__all__ = [
    "CVAE",
    "LDVAE",
    "ContrastiveVI",
    "ModelAPI",
    "ModelInputError",
    "call_escapers",
    "fit_escapers",
    "loadings_matrix",
    "scale_factors",
    "training_summary",
]
