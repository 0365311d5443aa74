"""The perturbation_effects pipeline: processed screen → effect tests, differential expression,
and their agreement with the contrastive model's salient gene table."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from perturbscope.pipelines.perturbation_effects import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.run_effect_tests,
                inputs=["processed_screen", "params:perturbation_effects.effect_test", "params:seed"],
                outputs="perturbation_effect_tests",
                name="run_effect_tests",
            ),
            Node(
                nodes.effect_test_metrics,
                inputs="perturbation_effect_tests",
                outputs="perturbation_effect_test_metrics",
                name="log_effect_tests",
            ),
            Node(
                nodes.plot_effect_tests,
                inputs=["perturbation_effect_tests", "params:perturbation_effects.figure"],
                outputs="perturbation_effect_tests_figure",
                name="plot_effect_tests",
            ),
            Node(
                nodes.differential_expression,
                inputs=[
                    "processed_screen",
                    "params:perturbation_effects.differential_expression",
                    "params:schema",
                    "params:seed",
                ],
                outputs="differential_expression",
                name="differential_expression",
            ),
            Node(
                nodes.compare_with_salient_genes,
                inputs=[
                    "differential_expression",
                    "contrastive_salient_genes",
                    "params:perturbation_effects.salient_agreement.alpha",
                ],
                outputs="salient_de_agreement",
                name="compare_with_salient_genes",
            ),
        ]
    )
