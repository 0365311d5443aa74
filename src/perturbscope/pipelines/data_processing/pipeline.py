"""The data_processing pipeline: raw screen → processed screen + summary tables."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from perturbscope.pipelines.data_processing import nodes

# every node takes a screen read from disk in blocks (perturbscope.blocks.BlockScreen) as well
STREAMS = ["streams"]


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                nodes.call_guides,
                inputs=["raw_screen", "params:data_processing.guides", "params:schema"],
                outputs=["guided_screen", "guide_calls", "guide_steps"],
                name="call_guides",
                tags=STREAMS,
            ),
            Node(
                nodes.validate_screen,
                inputs=["guided_screen", "params:schema", "params:screen"],
                outputs="validated_screen",
                name="validate_screen",
                tags=STREAMS,
            ),
            Node(
                nodes.count_cells_per_perturbation,
                inputs="validated_screen",
                outputs="cells_per_perturbation_raw",
                name="count_cells_per_perturbation",
                tags=STREAMS,
            ),
            Node(
                nodes.quality_control,
                inputs=["validated_screen", "params:data_processing.qc"],
                outputs=["qc_screen", "qc_steps"],
                name="quality_control",
                tags=STREAMS,
            ),
            Node(
                nodes.normalise,
                inputs=["qc_screen", "params:data_processing.normalisation"],
                outputs="normalised_screen",
                name="normalise",
                tags=STREAMS,
            ),
            Node(
                nodes.score_cell_cycle,
                inputs=["normalised_screen", "params:data_processing.cell_cycle", "params:seed"],
                outputs="phased_screen",
                name="score_cell_cycle",
                tags=STREAMS,
            ),
            Node(
                nodes.select_highly_variable_genes,
                inputs=[
                    "phased_screen",
                    "params:data_processing.hvg",
                    "params:schema.batch_key",
                    "params:schema.double_separator",
                ],
                outputs="hvg_screen",
                name="select_highly_variable_genes",
                tags=STREAMS,
            ),
            Node(
                nodes.label_cells,
                inputs=["hvg_screen", "params:schema", "params:data_processing.split", "params:seed"],
                outputs="processed_screen",
                name="label_cells",
                tags=STREAMS,
            ),
            Node(
                nodes.summarise_screen,
                inputs=["cells_per_perturbation_raw", "processed_screen", "qc_steps", "guide_steps"],
                outputs=["screen_summary", "qc_summary"],
                name="summarise_screen",
                tags=STREAMS,
            ),
        ]
    )
