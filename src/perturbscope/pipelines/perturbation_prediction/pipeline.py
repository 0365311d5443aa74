"""The perturbation_prediction pipeline.

One template (split → train cVAE → predict → baselines → evaluate → figures)
is instantiated per split under a Kedro namespace (``held_out_cells``,
``held_out_perturbations``); the shared PCA space and the merged tables,
summary figure and MLflow metrics live outside the namespaces.
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from perturbscope import tracking
from perturbscope.pipelines.perturbation_prediction import nodes
from perturbscope.schema import PREDICTION_SPLITS

SPLITS = PREDICTION_SPLITS
_P = "params:perturbation_prediction"
_SHARED_PARAMS = {
    f"{_P}.model",
    f"{_P}.training",
    f"{_P}.generation",
    f"{_P}.evaluation",
    f"{_P}.figures",
    "params:schema",
    "params:seed",
    "params:training",
}


def _split_template() -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.make_prediction_split,
                inputs=["processed_screen", "params:split", "params:schema", "params:seed"],
                outputs="prediction_split",
                name="make_prediction_split",
            ),
            Node(
                nodes.train_cvae,
                inputs=[
                    "processed_screen",
                    "prediction_split",
                    f"{_P}.model",
                    f"{_P}.training",
                    "params:training",
                    "params:schema",
                    "params:seed",
                ],
                outputs=["cvae_model", "cvae_training_history"],
                name="train_cvae",
            ),
            Node(
                tracking.training_history_metrics,
                inputs="cvae_training_history",
                outputs="cvae_training_metrics",
                name="log_cvae_training_history",
            ),
            Node(
                nodes.predict_cvae,
                inputs=["cvae_model", "processed_screen", "prediction_split", f"{_P}.generation", "params:seed"],
                outputs="cvae_predictions",
                name="predict_cvae",
            ),
            Node(
                nodes.predict_baselines,
                inputs=["processed_screen", "prediction_split", f"{_P}.generation", "params:schema", "params:seed"],
                outputs="baseline_predictions",
                name="predict_baselines",
            ),
            Node(
                nodes.evaluate_predictions,
                inputs=[
                    "processed_screen",
                    "prediction_split",
                    "cvae_predictions",
                    "baseline_predictions",
                    "expression_pca",
                    f"{_P}.evaluation",
                    "params:seed",
                ],
                outputs="prediction_metrics",
                name="evaluate_predictions",
            ),
            Node(
                nodes.plot_perturbations,
                inputs=[
                    "processed_screen",
                    "prediction_split",
                    "cvae_predictions",
                    "baseline_predictions",
                    "prediction_metrics",
                    "expression_pca",
                    f"{_P}.figures",
                    "params:seed",
                ],
                outputs=["prediction_figures", "prediction_figure_index"],
                name="plot_perturbations",
            ),
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    shared = Pipeline(
        [
            Node(
                nodes.fit_expression_pca,
                inputs=["processed_screen", f"{_P}.expression_pca.n_pcs", "params:seed"],
                outputs="expression_pca",
                name="fit_expression_pca",
            )
        ]
    )
    per_split = [
        Pipeline(
            _split_template(),
            namespace=split,
            inputs={"processed_screen", "expression_pca"},
            outputs={"prediction_metrics": f"{split}_prediction_metrics"},
            parameters={"params:split": f"{_P}.splits.{split}", **{p: p for p in _SHARED_PARAMS}},
        )
        for split in SPLITS
    ]
    merge = Pipeline(
        [
            Node(
                nodes.summarise_metrics,
                inputs={split: f"{split}_prediction_metrics" for split in SPLITS},
                outputs=["prediction_metrics", "prediction_summary", "prediction_mlflow_metrics"],
                name="summarise_prediction_metrics",
            ),
            Node(
                nodes.plot_summary,
                inputs=["prediction_summary", "prediction_metrics", f"{_P}.summary_figure.summary_scores"],
                outputs="prediction_summary_figure",
                name="plot_prediction_summary",
            ),
        ]
    )
    return shared + sum(per_split, Pipeline([])) + merge
