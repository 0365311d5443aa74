"""perturbation_effects: did each perturbation do anything (energy-distance test), and to which genes
(pseudobulk PyDESeq2 and Wilcoxon differential expression), next to the contrastive model's salient genes."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
