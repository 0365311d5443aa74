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
                nodes.check_knockdown,
                inputs=["processed_screen", "params:perturbation_effects.knockdown", "params:schema"],
                outputs="knockdown",
                name="check_knockdown",
            ),
            Node(nodes.knockdown_metrics, inputs="knockdown", outputs="knockdown_metrics", name="log_knockdown"),
            Node(
                nodes.plot_knockdown,
                inputs=["knockdown", "params:perturbation_effects.knockdown_figure"],
                outputs="knockdown_figure",
                name="plot_knockdown",
            ),
            Node(
                nodes.compute_profiles,
                inputs=[
                    "processed_screen",
                    "contrastive_embeddings",
                    "contrastive_cell_calls",
                    "linear_embedded_screen",
                    "params:perturbation_effects.map.profiles",
                ],
                outputs=["perturbation_profiles", "perturbation_profile_cells"],
                name="compute_perturbation_profiles",
            ),
            Node(
                nodes.compare_perturbations,
                inputs=[
                    "perturbation_profiles",
                    "processed_screen",
                    "params:perturbation_effects.map.similarity",
                    "params:seed",
                ],
                outputs="perturbation_similarity",
                name="compare_perturbations",
            ),
            Node(
                nodes.cluster_perturbations,
                inputs=[
                    "perturbation_profiles",
                    "perturbation_profile_cells",
                    "perturbation_effect_tests",
                    "processed_screen",
                    "params:perturbation_effects.map.clusters",
                    "params:schema",
                ],
                outputs=["perturbation_clusters", "perturbation_map_summary"],
                name="cluster_perturbations",
            ),
            Node(
                nodes.map_metrics, inputs="perturbation_map_summary", outputs="perturbation_map_metrics", name="log_map"
            ),
            Node(
                nodes.describe_clusters,
                inputs=["perturbation_clusters", "perturbation_profiles", "params:perturbation_effects.map.programs"],
                outputs=["perturbation_cluster_genes", "perturbation_cluster_factors"],
                name="describe_perturbation_clusters",
            ),
            Node(
                nodes.enrich_clusters,
                inputs=["perturbation_cluster_genes", "processed_screen", "params:perturbation_effects.map.enrichment"],
                outputs="perturbation_cluster_enrichment",
                name="enrich_perturbation_clusters",
            ),
            Node(
                nodes.plot_perturbation_map,
                inputs=[
                    "perturbation_profiles",
                    "perturbation_clusters",
                    "params:perturbation_effects.map.figure",
                    "params:perturbation_effects.map.programs.profile",
                ],
                outputs=["perturbation_map_heatmap", "perturbation_map_figure"],
                name="plot_perturbation_map",
            ),
            Node(
                nodes.call_interactions,
                inputs=[
                    "processed_screen",
                    "params:perturbation_effects.genetic_interactions",
                    "params:schema",
                    "params:seed",
                ],
                outputs="genetic_interactions",
                name="call_genetic_interactions",
            ),
            Node(
                nodes.interaction_metrics,
                inputs="genetic_interactions",
                outputs="genetic_interaction_metrics",
                name="log_genetic_interactions",
            ),
            Node(
                nodes.plot_interactions,
                inputs=["genetic_interactions", "params:perturbation_effects.genetic_interactions"],
                outputs="genetic_interactions_figure",
                name="plot_genetic_interactions",
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
