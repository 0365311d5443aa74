"""data_processing: validate a screen, QC, normalise, HVGs, cell-cycle phase, labels."""

from perturbscope.pipelines.data_processing.pipeline import create_pipeline

__all__ = ["create_pipeline"]
