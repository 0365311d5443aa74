"""kedro-mlflow's ``MlflowArtifactDataset`` for a versioned file dataset.

kedro-mlflow builds the wrapped dataset from its own ``dataset:`` block, without the
catalog's save version: a ``versioned: true`` inside that block gives the file a timestamp
of its own, which Kedro 1.x refuses ("All datasets in the catalog must have the same save
version"), and one outside is passed as a ``version`` argument kedro-mlflow does not take.
This adapter takes ``versioned: true`` at the top level, as any Kedro dataset does, and
hands the catalog's version to the wrapped dataset: the file lands in the run's version
folder and is logged to the MLflow run as before.

.. code-block:: yaml

    contrastive_evaluation:
      type: perturbscope.datasets.MlflowArtifactDataset
      versioned: true
      dataset:
        type: pandas.CSVDataset
        filepath: data/08_reporting/contrastive_evaluation.csv
      artifact_path: contrastive_model
"""

from __future__ import annotations

from typing import Any

from kedro.io.core import AbstractVersionedDataset, DatasetError, Version
from kedro_mlflow.io.artifacts import MlflowArtifactDataset as _KedroMlflowArtifactDataset


class MlflowArtifactDataset(_KedroMlflowArtifactDataset):
    """``kedro_mlflow.io.artifacts.MlflowArtifactDataset`` that also takes the catalog's ``version``."""

    def __new__(
        cls,
        dataset: str | dict[str, Any],
        run_id: str | None = None,
        artifact_path: str | None = None,
        credentials: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        version: Version | None = None,
    ) -> Any:
        instance = super().__new__(
            cls,
            dataset=dataset,
            run_id=run_id,
            artifact_path=artifact_path,
            credentials=credentials,
            metadata=metadata,
        )
        if version is not None:
            if not isinstance(instance, AbstractVersionedDataset):
                raise DatasetError(
                    f"versioned: true needs a file dataset that supports versioning; "
                    f"{type(instance).__name__} does not."
                )
            instance._version = version
            instance._clear_version_cache()
        return instance
