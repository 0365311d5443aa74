"""The linear_model pipeline: an LDVAE whose factors are gene modules, and what perturbations do to them."""

from perturbscope.pipelines.linear_model.pipeline import create_pipeline

__all__ = ["create_pipeline"]
