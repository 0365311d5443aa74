"""The contrastive_model pipeline: processed screen → contrastiveVI model, embeddings, escapers, evaluation."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from perturbscope import tracking
from perturbscope.pipelines.contrastive_model import nodes

# nodes that take a screen read from disk in blocks (perturbscope.blocks.BlockScreen)
STREAMS = ["streams"]


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.train_contrastive_model,
                inputs=[
                    "processed_screen",
                    "params:contrastive_model.model",
                    "params:contrastive_model.training",
                    "params:training",
                    "params:schema",
                    "params:seed",
                ],
                outputs=["contrastive_model", "contrastive_training_history"],
                name="train_contrastive_model",
                tags=STREAMS,
            ),
            Node(
                tracking.artifact_copy,
                inputs="contrastive_model",
                outputs="contrastive_model_mlflow",
                name="log_contrastive_model",
            ),
            Node(
                tracking.training_history_metrics,
                inputs="contrastive_training_history",
                outputs="contrastive_training_metrics",
                name="log_contrastive_training_history",
            ),
            Node(
                nodes.embed_cells,
                inputs=["processed_screen", "contrastive_model", "params:contrastive_model.embedding", "params:seed"],
                outputs=["contrastive_embedded_screen", "contrastive_embeddings"],
                name="embed_cells",
                tags=STREAMS,
            ),
            # escapers: their own artifact, refitted without retraining (`--from-nodes fit_escape_mixture`)
            Node(
                nodes.fit_escape_mixture,
                inputs=["contrastive_embeddings", "params:contrastive_model.escape", "params:seed"],
                outputs="contrastive_escape_mixture",
                name="fit_escape_mixture",
                tags=STREAMS,
            ),
            Node(
                nodes.call_perturbed_cells,
                inputs=["contrastive_embeddings", "contrastive_escape_mixture", "params:contrastive_model.escape"],
                outputs="contrastive_cell_calls",
                name="call_perturbed_cells",
                tags=STREAMS,
            ),
            Node(
                nodes.escape_table,
                inputs=["contrastive_embeddings", "contrastive_cell_calls", "contrastive_escape_mixture"],
                outputs="contrastive_escape",
                name="tabulate_escape",
                tags=STREAMS,
            ),
            Node(
                nodes.evaluate_embeddings,
                inputs=[
                    "contrastive_embeddings",
                    "contrastive_cell_calls",
                    "params:contrastive_model.evaluation",
                    "params:schema",
                    "params:seed",
                ],
                outputs="contrastive_evaluation",
                name="evaluate_embeddings",
                tags=STREAMS,
            ),
            Node(
                nodes.evaluation_metrics,
                inputs="contrastive_evaluation",
                outputs="contrastive_evaluation_metrics",
                name="log_contrastive_evaluation",
            ),
            Node(
                nodes.rank_salient_genes,
                inputs=[
                    "processed_screen",
                    "contrastive_cell_calls",
                    "contrastive_model",
                    "params:contrastive_model.salient_expression",
                ],
                outputs="contrastive_salient_genes",
                name="rank_salient_genes",
                tags=STREAMS,
            ),
            Node(
                nodes.plot_embeddings,
                inputs=["contrastive_embeddings", "params:contrastive_model.evaluation", "params:schema"],
                outputs="contrastive_umaps",
                name="plot_contrastive_umaps",
                tags=STREAMS,
            ),
        ]
    )
