"""contrastive_model: contrastiveVI (salient / background latent spaces) on a processed screen.

Embed another screen with a trained model::

    from perturbscope.pipelines.contrastive_model import embed_screen
    model = catalog.load("contrastive_model")
    embedded = embed_screen(model, adata)   # obsm["X_salient"], obsm["X_background"]

``create_pipeline`` is imported lazily, so the nodes and ``embed_screen`` work
without Kedro installed (e.g. in the benchmark environment).
"""

from typing import Any

from perturbscope.pipelines.contrastive_model.nodes import ContrastiveModelError, align_counts, embed_screen

__all__ = ["ContrastiveModelError", "align_counts", "create_pipeline", "embed_screen"]


def __getattr__(name: str) -> Any:
    if name == "create_pipeline":
        from perturbscope.pipelines.contrastive_model.pipeline import create_pipeline

        return create_pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
