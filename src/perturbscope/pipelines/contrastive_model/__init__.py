"""contrastive_model: contrastiveVI (salient / background latent spaces) on a processed screen, and the
escapers called from its salient space."""

from perturbscope.pipelines.contrastive_model.pipeline import create_pipeline

__all__ = ["create_pipeline"]
