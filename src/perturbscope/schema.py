"""The screen schema: where a screen keeps its labels, and how labels are parsed.

A screen is an ``.h5ad`` of raw UMI counts with one perturbation label per cell.
Control cells carry one of ``control_labels``; combinatorial perturbations are
written ``A+B`` (the separator is configurable), and a part that is itself a
control label is dropped, so Norman/GEARS-style ``KLF1+ctrl`` reads as ``KLF1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

CONTROL = "control"
"""The label every control cell carries after validation."""
UNPERTURBED = "unperturbed"
"""The label of every cell of a plain count matrix (``schema.perturbation_key: null``)."""
UNKNOWN_PHASE = "unknown"
"""``phase`` of every cell when the screen lacks the cell-cycle genes."""

# --- the processed-screen contract: what data_processing writes and every model pipeline reads
PERTURBATION = "perturbation"
"""``obs`` column: the perturbation label (controls rewritten as :data:`CONTROL`)."""
IS_CONTROL = "is_control"
"""``obs`` column: bool, a non-targeting control cell."""
CELL_GROUP = "cell_group"
"""``obs`` column: ``control`` / ``target``."""
PERTURBED_GENES = "perturbed_genes"
"""``obs`` column: the perturbed genes joined by the separator (``A+B``; ``""`` for controls)."""
N_PERTURBED_GENES = "n_perturbed_genes"
"""``obs`` column: number of perturbed genes (0 controls, 1 singles, 2 doubles)."""
SPLIT = "split"
"""``obs`` column: ``train`` / ``validation`` (early stopping of every model)."""
TRAIN, VALIDATION = "train", "validation"
"""Values of :data:`SPLIT`."""
PHASE = "phase"
"""``obs`` column: cell-cycle phase (``G1``, ``S``, ``G2M`` or :data:`UNKNOWN_PHASE`)."""
COUNTS_LAYER = "counts"
"""``layers`` key of the raw UMI counts (``X`` holds log-normalised expression)."""
PREDICTION_SPLITS = ("held_out_cells", "held_out_perturbations")
"""The perturbation_prediction evaluations (Kedro namespaces; ``evaluation`` column of its tables)."""


class ScreenValidationError(ValueError):
    """A screen does not fit the schema; the message says what is wrong and how to fix it."""


MODALITIES = ("CRISPRi", "CRISPRko", "CRISPRa")
"""The screen types ``schema.modality`` takes."""


@dataclass(frozen=True)
class ScreenSchema:
    """Column names and labels of one screen (``schema`` in ``conf/base/parameters.yml``).

    Attributes
    ----------
    perturbation_key
        ``obs`` column holding each cell's perturbation label; ``None`` for a plain
        count matrix without perturbations (every cell is labelled ``unperturbed``).
    control_labels
        Labels that mark non-targeting control cells (matched case-insensitively).
    counts_layer
        Layer holding raw UMI counts; ``None`` means ``X``.
    program_key
        Optional ``obs`` column with a known annotation of perturbations (a gene
        program); used for evaluation only.
    batch_key
        Optional ``obs`` column with a batch (replicate, lane) to correct for.
    double_separator
        Separator of combinatorial labels, ``+`` for ``A+B``.
    modality
        How the guides act on their target: ``CRISPRi`` (interference) and ``CRISPRko`` (knockout) lower
        its expression, ``CRISPRa`` (activation) raises it; the knockdown check reads the direction here.
    """

    perturbation_key: str | None = "perturbation"
    control_labels: tuple[str, ...] = ("control",)
    counts_layer: str | None = None
    program_key: str | None = None
    batch_key: str | None = None
    double_separator: str = "+"
    modality: str = "CRISPRi"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ScreenSchema:
        """Build from the ``schema`` parameters, with a clear error for unknown keys."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ScreenValidationError(f"Unknown schema parameter(s) {unknown}; the schema takes {sorted(known)}.")
        values = dict(params)
        labels = values.get("control_labels", cls.control_labels)
        if isinstance(labels, str):
            labels = [labels]
        values["control_labels"] = tuple(str(label) for label in labels)
        if not values["control_labels"]:
            raise ScreenValidationError(
                "schema.control_labels is empty: give the label(s) of the non-targeting "
                "control cells, for example [control, non-targeting]."
            )
        modality = str(values.get("modality", cls.modality))
        if modality not in MODALITIES:
            raise ScreenValidationError(
                f"schema.modality={modality!r} is not one of {list(MODALITIES)}: CRISPRi and CRISPRko guides lower "
                "their target's expression, CRISPRa guides raise it."
            )
        values["modality"] = modality
        return cls(**values)

    def is_control_label(self, label: str) -> bool:
        """Whether ``label`` (a whole label or one part of a combination) marks controls."""
        return str(label).strip().lower() in {c.lower() for c in self.control_labels}

    def parse(self, label: str) -> tuple[str, ...]:
        """The perturbed genes of a label: ``"A+B"`` → ``("A", "B")``, controls → ``()``."""
        return parse_perturbation(label, self.double_separator, self.control_labels)


def parse_perturbation(label: str, separator: str = "+", control_labels: Iterable[str] = (CONTROL,)) -> tuple[str, ...]:
    """Split a perturbation label into its perturbed genes, sorted and de-duplicated.

    >>> parse_perturbation("KLF1+ctrl", "+", ["ctrl"])
    ('KLF1',)
    >>> parse_perturbation("SET+CEBPE")
    ('CEBPE', 'SET')
    """
    controls = {c.lower() for c in control_labels} | {CONTROL}
    parts = (p.strip() for p in str(label).split(separator))
    return tuple(sorted({p for p in parts if p and p.lower() not in controls}))
