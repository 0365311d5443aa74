"""contrastive_model: contrastiveVI (salient / background latent spaces) on a processed screen.

Embed another screen with a trained model (the model layer, :mod:`perturbscope.models.model`)::

    from perturbscope.models.model import ContrastiveVI
    ContrastiveVI(catalog.load("contrastive_model")).embed(adata)   # obsm["X_salient"], ["X_background"]

``embed_screen`` and ``ContrastiveModelError`` are still importable from here.
"""

from perturbscope.models.model.contrastive import ContrastiveModelError, align_counts, embed_screen
from perturbscope.pipelines.contrastive_model.pipeline import create_pipeline

__all__ = ["ContrastiveModelError", "align_counts", "create_pipeline", "embed_screen"]
