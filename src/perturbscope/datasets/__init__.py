"""Kedro datasets for perturbscope: AnnData ``.h5ad`` files and PyTorch models."""

from perturbscope.datasets.anndata_dataset import AnnDataDataset
from perturbscope.datasets.torch_model_dataset import TorchModelDataset

__all__ = ["AnnDataDataset", "TorchModelDataset"]
