"""The AnnData-facing API of the models: one class per model around its torch module.

=====================  ===============================  =========================================
class                  torch module                     what it adds
=====================  ===============================  =========================================
:class:`ContrastiveVI` :class:`~perturbscope.models.ContrastiveVAE`   fit from a processed screen
                                                        (controls = background), ``embed`` (salient /
                                                        background), the salient log-fold changes
:class:`LDVAE`         :class:`~perturbscope.models.LinearVAE`        fit (oriented factors), ``embed``,
                                                        ``loadings``
:class:`CVAE`          :class:`~perturbscope.models.ConditionalVAE`   fit on cells with their perturbed
                                                        genes, Mode A / Mode B cells as AnnData
=====================  ===============================  =========================================

Every class takes a trained module (``ContrastiveVI(catalog.load("contrastive_model"))``), has
``save`` / ``load``, ``cell_data(adata)`` (the screen read the way the module was trained: genes
by name, batches by category) and, after ``fit``, ``history`` (one row per epoch). The helpers
they share (raw counts, gene alignment, batch codes, the one parameter path to a
:class:`~perturbscope.models.TrainConfig`) are in :mod:`.inputs`. ``models/`` outside this
package never sees an AnnData.
"""

from .base import ModelAPI, training_summary
from .contrastive import ContrastiveModelError, ContrastiveVI
from .contrastive import embed_screen as embed_contrastive
from .cvae import CVAE, scale_factors
from .linear import LDVAE, LinearModelError, loadings_matrix
from .linear import embed_screen as embed_linear

__all__ = [
    "CVAE",
    "ContrastiveModelError",
    "ContrastiveVI",
    "LDVAE",
    "LinearModelError",
    "ModelAPI",
    "embed_contrastive",
    "embed_linear",
    "loadings_matrix",
    "scale_factors",
    "training_summary",
]
