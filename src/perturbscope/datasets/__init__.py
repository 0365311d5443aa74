"""Kedro datasets for perturbscope: AnnData ``.h5ad`` files, PyTorch models, figures that load
back as PNG, versioned MLflow artifacts, and the run record of the report."""

from perturbscope.datasets.anndata_dataset import AnnDataDataset
from perturbscope.datasets.figure_dataset import FigureDataset
from perturbscope.datasets.mlflow_artifact_dataset import MlflowArtifactDataset
from perturbscope.datasets.run_info_dataset import RunInfoDataset
from perturbscope.datasets.torch_model_dataset import TorchModelDataset

__all__ = ["AnnDataDataset", "FigureDataset", "MlflowArtifactDataset", "RunInfoDataset", "TorchModelDataset"]
