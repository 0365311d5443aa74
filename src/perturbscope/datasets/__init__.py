"""Kedro datasets for perturbscope: AnnData ``.h5ad`` files, PyTorch models, versioned MLflow artifacts."""

from perturbscope.datasets.anndata_dataset import AnnDataDataset
from perturbscope.datasets.mlflow_artifact_dataset import MlflowArtifactDataset
from perturbscope.datasets.torch_model_dataset import TorchModelDataset

__all__ = ["AnnDataDataset", "MlflowArtifactDataset", "TorchModelDataset"]
