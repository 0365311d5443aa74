"""perturbation_prediction: a conditional VAE predicts perturbed cells, scored against baselines."""

from perturbscope.pipelines.perturbation_prediction.pipeline import create_pipeline

__all__ = ["create_pipeline"]
