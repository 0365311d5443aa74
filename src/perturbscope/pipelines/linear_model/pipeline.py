"""The linear_model pipeline: processed screen → LDVAE, loadings, top genes, factor × perturbation effects."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from perturbscope import tracking
from perturbscope.pipelines.linear_model import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.train_linear_model,
                inputs=[
                    "processed_screen",
                    "params:linear_model.model",
                    "params:linear_model.training",
                    "params:training",
                    "params:linear_model.factors.rotation",
                    "params:schema",
                    "params:seed",
                ],
                outputs=["linear_model", "linear_training_history"],
                name="train_linear_model",
            ),
            Node(
                tracking.artifact_copy,
                inputs="linear_model",
                outputs="linear_model_mlflow",
                name="log_linear_model",
            ),
            Node(
                tracking.training_history_metrics,
                inputs="linear_training_history",
                outputs="linear_training_metrics",
                name="log_linear_training_history",
            ),
            Node(
                nodes.embed_cells,
                inputs=["processed_screen", "linear_model", "params:linear_model.embedding"],
                outputs="linear_embedded_screen",
                name="linear_embed_cells",
            ),
            Node(
                nodes.factor_loadings,
                inputs="linear_model",
                outputs="linear_loadings",
                name="linear_factor_loadings",
            ),
            Node(
                tracking.artifact_copy,
                inputs="linear_loadings",
                outputs="linear_loadings_mlflow",
                name="log_linear_loadings",
            ),
            Node(
                nodes.top_genes_per_factor,
                inputs=["linear_loadings", "params:linear_model.factors.n_top_genes"],
                outputs="linear_factor_top_genes",
                name="linear_top_genes_per_factor",
            ),
            Node(
                nodes.factor_perturbation_effects,
                inputs=[
                    "linear_embedded_screen",
                    "linear_factor_top_genes",
                    "params:linear_model.effects",
                    "params:schema",
                ],
                outputs="linear_factor_effects",
                name="linear_factor_perturbation_effects",
            ),
            Node(
                nodes.linear_model_metrics,
                inputs=["linear_model", "linear_factor_effects"],
                outputs="linear_model_metrics",
                name="log_linear_model_metrics",
            ),
            Node(
                nodes.plot_factor_effects,
                inputs=["linear_factor_effects", "params:linear_model.figure.max_perturbations_plotted"],
                outputs="linear_factor_effects_heatmap",
                name="plot_linear_factor_effects",
            ),
        ]
    )
