"""Guide calling for the data_processing pipeline: from guide UMI counts to labelled cells
(:mod:`perturbscope.guides` holds the mixture, the labels and the knockdown test; this module applies them to
a :class:`~perturbscope.blocks.BlockScreen` and accounts for the cells each step removes)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbscope import guides
from perturbscope.blocks import BlockScreen
from perturbscope.schema import PERTURBATION, ScreenSchema, ScreenValidationError

logger = logging.getLogger(__name__)

SECTION = "data_processing"

GUIDE_CALL_COLUMNS = [
    "guide",
    "target",
    "cells_called",
    "cells_assigned",
    "background_mean_umis",
    "signal_median_umis",
    "signal_log_sd",
    "signal_fraction",
]
GUIDE_STEP_COLUMNS = ["step", "cells_removed", "genes_removed", "cells_left"]


def call_guides(
    screen: BlockScreen,
    schema: ScreenSchema,
    max_per_cell: int = 1,
    probability: float = 0.5,
    min_umis: int = 2,
    drop_without_knockdown: bool = False,
) -> tuple[BlockScreen, pd.DataFrame, pd.DataFrame]:
    """Which guides each cell carries, from its guide UMI counts, and its label.

    For a screen with guide counts (a Cell Ranger ``.h5``, a MuData, or ``obsm["guide_counts"]``): a
    per-guide Poisson background / log-normal signal mixture calls the guides of each cell; the label
    (``schema.perturbation_key``) is the target, ``A+B`` for up to ``max_per_cell`` guides, the control label
    for non-targeting guides; cells with no guide or more than ``max_per_cell`` are dropped, and with
    ``drop_without_knockdown`` the cells of guides whose target shows no knockdown too. ``obs`` gains
    ``guide_identity`` and ``n_guides``; ``obsm["guide_counts"]`` stays. Returns the screen, one row per
    guide (cells called and assigned, the mixture's fit) and the cells each step removed. A screen whose
    cells already carry labels passes unchanged.
    """
    if not guides.has_guides(screen):  # an .h5ad whose cells carry their labels: nothing to call
        return screen, pd.DataFrame(columns=GUIDE_CALL_COLUMNS), pd.DataFrame(columns=GUIDE_STEP_COLUMNS)
    if int(max_per_cell) < 1 or not 0.0 < float(probability) < 1.0 or int(min_umis) < 1:
        raise ScreenValidationError(
            f"{SECTION}.guides: max_per_cell and min_umis must be >= 1 and probability in (0, 1); got "
            f"max_per_cell={max_per_cell}, min_umis={min_umis}, probability={probability}."
        )
    table = guides.guide_table(screen)
    guides.check_guides(table, schema.control_labels)
    counts = guides.guide_counts(screen)
    mixtures = guides.fit_guide_mixtures(counts, table["guide"])
    called = guides.call_guides(counts, mixtures, table["guide"], float(probability), int(min_umis))
    cells = guides.label_cells(called, table, schema.control_labels, int(max_per_cell), schema.double_separator)
    label = cells["label"].to_numpy()
    kept = ~np.isin(label, [guides.UNASSIGNED, guides.MULTIPLET])
    if not kept.any():
        raise ScreenValidationError(
            f"No cell got a guide: of {screen.n_obs:,} cells, {int((label == guides.UNASSIGNED).sum()):,} have no "
            f"guide above the background and {int((label == guides.MULTIPLET).sum()):,} have more than "
            f"data_processing.guides.max_per_cell={max_per_cell}. Check that the guide counts are this run's, or "
            "raise max_per_cell for a combinatorial design."
        )
    out = screen.copy()
    key = schema.perturbation_key or PERTURBATION
    out.obs[key] = pd.Categorical(label)
    out.obs["guide_identity"] = cells["guide_identity"].to_numpy()
    out.obs["n_guides"] = cells["n_guides"].to_numpy()
    steps = [
        {"step": "guides: none called (unassigned)", "cells_removed": int((label == guides.UNASSIGNED).sum())},
        {
            "step": f"guides: more than max_per_cell={max_per_cell} (multiplets)",
            "cells_removed": int((label == guides.MULTIPLET).sum()),
        },
    ]
    if drop_without_knockdown:
        failed = guides_without_knockdown(out, kept, table, schema)
        carries = np.asarray(called[:, np.flatnonzero(table["guide"].isin(failed).to_numpy())].sum(axis=1)).ravel()
        dropped = kept & (carries > 0)  # a cell with a guide that failed, whatever it carries beside it
        kept &= ~dropped
        steps.append({"step": f"guides without knockdown ({len(failed)})", "cells_removed": int(dropped.sum())})
    left = screen.n_obs
    for row in steps:
        left -= row["cells_removed"]
        row.update(genes_removed=0, cells_left=left)
    per_guide = called.sum(axis=0).A1.astype(np.int64)
    assigned = np.asarray(called[np.flatnonzero(kept)].sum(axis=0)).ravel().astype(np.int64)
    calls = pd.DataFrame(
        {
            "guide": table["guide"],
            "target": table["target"],
            "cells_called": per_guide,
            "cells_assigned": assigned,
            "background_mean_umis": [mixtures[g].background_mean for g in table["guide"]],
            "signal_median_umis": [float(np.expm1(mixtures[g].signal_mean)) for g in table["guide"]],
            "signal_log_sd": [mixtures[g].signal_sd for g in table["guide"]],
            "signal_fraction": [mixtures[g].signal_weight for g in table["guide"]],
        }
    )
    logger.info(
        "Guides called: %s of %s cells assigned (%s with no guide, %s multiplets).",
        f"{int(kept.sum()):,}",
        f"{screen.n_obs:,}",
        f"{steps[0]['cells_removed']:,}",
        f"{steps[1]['cells_removed']:,}",
    )
    return out.subset(cells=kept), calls, pd.DataFrame(steps, columns=GUIDE_STEP_COLUMNS)


def guides_without_knockdown(
    screen: BlockScreen, kept: np.ndarray, table: pd.DataFrame, schema: ScreenSchema
) -> list[str]:
    """Single guides whose measured target shows no knockdown (:func:`perturbscope.guides.knockdown_table`)."""
    targets = set(table["target"]) & set(map(str, screen.var_names))
    genes = np.isin(screen.var_names.astype(str), sorted(targets))
    counts = sp.vstack([chunk.counts for chunk in screen.subset(genes=genes).chunks()], format="csr")
    label = screen.obs[schema.perturbation_key or PERTURBATION].astype(str).to_numpy()
    controls = np.isin(np.char.lower(label.astype(str)), [c.lower() for c in schema.control_labels]) & kept
    target_of = dict(zip(table["guide"], table["target"], strict=True))
    identity = guides.targeting_guide(screen.obs["guide_identity"].astype(str), target_of, schema.control_labels)
    single = np.char.find(label.astype(str), schema.double_separator) < 0
    knockdown = guides.knockdown_table(
        screen.subset(genes=genes),
        counts,
        np.where(kept & single, identity, ""),
        target_of,
        controls,
        schema.modality,
    )
    failed = knockdown.loc[knockdown["call"].isin(["no knockdown", "no activation"]), "guide"].tolist()
    logger.info("Guides without knockdown of their target, their cells dropped: %s.", failed or "none")
    return failed
