"""reporting: figures, tables and one self-contained HTML report per screen.

Each pipeline contributes a section (``sections/<pipeline>.py``); ``build_report``
assembles them with the dataset versions and the MLflow run id.
"""

from perturbscope.pipelines.reporting.pipeline import create_pipeline

__all__ = ["create_pipeline"]
