r"""Synthetic Perturb-seq screens with known ground truth.

:func:`simulate_screen` draws a CRISPR screen of raw UMI counts whose every
moving part is known, for tests and benchmarks: which perturbation each cell
carries, whether it responded, which gene program it hits, its cell-cycle phase
and its position on a continuous nuisance axis.

Generative model
----------------
For cell :math:`c` and gene :math:`g` the expected count is

.. math::

    \mu_{cg} = L_c \, p_g \, 2^{\ell_{cg}}, \qquad
    \ell_{cg} = r_c E_{k(c), g}
               + a \, [\phi_c = S] \, [g \in S]
               + a \, [\phi_c = G2M] \, [g \in G2M]
               + b \, h_c \, w_g

and the count is negative binomial (a gamma-Poisson mixture) with that mean and
variance :math:`\mu + \theta \mu^2` (``dispersion`` :math:`\theta`; Poisson when
it is 0). Here

* :math:`p_g` is the gene's relative abundance (``var["true_base_mean"]`` is
  :math:`p_g` times ``library_size_median``, the expected count of an
  unperturbed G1 cell at the median library size). A few "housekeeping" genes
  (``high_expression_fraction``) carry ``high_expression_share`` of the UMIs and
  the rest follow a wide log-normal (``base_mean_sigma``), which gives the heavy
  sparsity of real droplet data (about 86-90% zeros at 2,000 genes, with a median
  library of about 4,000 UMIs, with the defaults; fewer genes share the same
  UMIs, so a 500-gene screen is about 75% zeros).
* :math:`L_c` is the cell's library-size factor, log-normal around
  ``library_size_median`` with log-scale spread ``library_size_sigma``.
* :math:`E_{k,g}` is the true log2 fold change of perturbation :math:`k`
  (``varm["true_log2fc"]``) and :math:`r_c` is 1 for cells that responded
  (``obs["responded"]``, a fraction ``penetrance`` of perturbed cells) and 0
  otherwise, so non-responders look like controls.
* Each of ``n_programs`` programs owns ``genes_per_program`` genes, a fraction
  ``up_fraction`` of them up-regulated and the rest down-regulated, with log2 fold
  changes of magnitude uniform in ``[effect_size_min, effect_size_max]``. The
  ``perturbations_per_program`` perturbations of a program apply that effect
  times a strength uniform in ``[strength_min, strength_max]``, with a small
  multiplicative per-gene jitter (``perturbation_jitter``, log-normal sd), so
  they are similar but not identical. ``n_null_perturbations`` perturbations
  have no effect at all.
* Double perturbations ``A+B`` (``n_doubles``, distinct unordered pairs of single
  perturbations) have effect :math:`E_A + E_B + I`, where the interaction
  :math:`I` is normal with sd ``interaction_scale`` on every gene that A or B
  moves (0 by default: exactly additive in log space).
* :math:`\phi_c` is the phase (G1, S or G2M with probabilities
  ``1 - s_fraction - g2m_fraction``, ``s_fraction``, ``g2m_fraction``) and the
  S-phase and G2/M genes are the real Tirosh et al. (2016) gene names, raised by
  :math:`a` = ``cell_cycle_strength`` (log2) in S and G2M cells respectively.
* :math:`h_c \sim N(0, 1)` is a continuous heterogeneity axis shared by all
  cells, controls included; it acts on ``n_heterogeneity_genes`` genes of their
  own with weights :math:`w_g` of random sign and magnitude in ``[0.5, 1.5]``,
  scaled by :math:`b` = ``heterogeneity_strength`` (log2 per unit of :math:`h`).

Gene sets are disjoint. Program, heterogeneity and cell-cycle genes are drawn
from the more highly expressed non-housekeeping genes (the top twice as many as
needed), so their effects are detectable. When ``n_genes`` is too small for all
97 Tirosh genes, as many as fit are kept (the first ones of each list, S and G2/M
in proportion); program and heterogeneity genes always fit or a ``ValueError``
says so.

The output
----------
``X``
    Raw UMI counts, ``scipy.sparse.csr_matrix`` of ``float32`` integers.
``obs``
    ``perturbation`` (``control``, ``PERT01``, or ``PERT01+PERT07``; categorical),
    ``program`` (``program_1``…, ``control``, ``none`` for null perturbations;
    for doubles the programs of A and B joined by ``+``, or the one program when
    they agree), ``responded`` (bool; False for controls and for cells whose
    perturbation has no effect, i.e. null ones), ``phase`` (``G1``/``S``/``G2M``),
    ``heterogeneity`` (float), ``n_perturbed_genes`` (0, 1, 2) and
    ``library_size`` (total counts of the cell). Beware that
    ``scanpy.tl.score_genes_cell_cycle`` overwrites ``obs["phase"]`` with its
    own call: copy the truth first.
``var``
    ``program`` (a program name, ``cell_cycle_S``, ``cell_cycle_G2M``,
    ``heterogeneity`` or ``none``), ``true_base_mean`` and
    ``true_heterogeneity_weight`` (:math:`w_g`, 0 off the heterogeneity genes).
``varm["true_log2fc"]``
    Genes by perturbations (controls excluded) data frame of the true log2 fold
    change applied to responding cells.
``uns["simulation"]``
    The :class:`SimulationConfig` as a dict of plain ints and floats;
    ``SimulationConfig.from_dict(adata.uns["simulation"])`` rebuilds it, also
    after an ``.h5ad`` round trip.
``uns["perturbation_truth"]``
    One row per perturbation: ``program``, ``n_perturbed_genes``, ``strength``
    (NaN for doubles, 0 for null perturbations), ``has_effect`` and ``n_cells``.

Everything is drawn from ``numpy.random.Generator`` streams derived from
``seed``: the same configuration gives the same screen bit for bit.
Counts are generated in chunks of cells, so 200,000 cells by 2,000 genes need
well under 2 GB.

Command line
------------
``python -m perturbscope.simulation --out screen.h5ad --n-cells 200000 --seed 0``
writes the screen (creating parent folders) and prints a one-line summary; every
field of :class:`SimulationConfig` has a flag (``--n-genes``, ``--penetrance``…),
see ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbscope.schema import PERTURBATION

__all__ = [
    "CONTROL_LABEL",
    "DOUBLE_SEPARATOR",
    "NULL_PROGRAM_LABEL",
    "PHASES",
    "SimulationConfig",
    "load_cell_cycle_genes",
    "main",
    "simulate_screen",
    "write_cellranger_h5",
]

CONTROL_LABEL = "control"
"""Perturbation (and program) label of control cells; matches ``perturbscope.schema.CONTROL``."""

DOUBLE_SEPARATOR = "+"
"""Separator of double perturbations, ``A+B`` (the project's convention)."""

NULL_PROGRAM_LABEL = "none"

INTERACTION_CLASSES: tuple[str, ...] = ("additive", "synergy", "buffering", "epistasis", "neomorphic")
"""The genetic interactions ``interaction_classes`` plants, in the order the doubles take them."""
"""Program label of null perturbations and of genes outside every gene set."""

PHASES: tuple[str, str, str] = ("G1", "S", "G2M")
"""Cell-cycle phase labels, in the order of their codes."""

_CELL_CYCLE_RESOURCE = "cell_cycle_genes_tirosh2016.txt"
_N_S_GENES = 43  # lines 1-43 of the resource are S-phase genes, 44-97 G2/M genes
# Cells per chunk = _CHUNK_ENTRIES // n_genes: small buffers are reused, not faulted in again.
_CHUNK_ENTRIES = 2**19
_DIRECT_MEAN = 8.0  # above this mean, draw NB counts as gamma-Poisson rather than by inversion
_HOUSEKEEPING_SIGMA = 0.75  # log-scale spread of abundances among housekeeping genes
_MARKER_POOL_FACTOR = 2  # structured genes come from the top 2x as many ordinary genes


@dataclass(frozen=True)
class SimulationConfig:
    """Every knob of :func:`simulate_screen`; all fields are plain ints or floats.

    Log fold changes are log2. Values are coerced to the field's type (an int
    given for a float field becomes a float) and checked on construction; a bad
    value raises ``ValueError``.

    Attributes
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of genes.
    n_programs
        Number of gene programs (``program_1`` … ``program_<n>``).
    perturbations_per_program
        Single perturbations hitting each program.
    n_null_perturbations
        Single perturbations with no effect (program ``none``).
    n_doubles
        Double perturbations ``A+B``, distinct pairs of single perturbations.
    interaction_scale
        Sd of the log2 interaction term of doubles (0: exactly additive).
    control_fraction
        Fraction of cells that are controls; the rest is split evenly over the
        perturbations (singles and doubles alike).
    penetrance
        Fraction of perturbed cells that respond; the others look like controls.
    genes_per_program
        Genes in each program's gene set.
    up_fraction
        Fraction of a program's genes that go up (the rest go down).
    effect_size_min, effect_size_max
        Range of the magnitudes of program log2 fold changes.
    strength_min, strength_max
        Range of the per-perturbation strength multiplier.
    perturbation_jitter
        Log-normal sd of a per-gene, per-perturbation multiplicative jitter.
    cell_cycle_strength
        Log2 fold change of the S genes in S cells and of the G2/M genes in G2M cells.
    s_fraction, g2m_fraction
        Phase proportions of S and G2M cells (G1 gets the rest).
    n_heterogeneity_genes
        Genes moved by the continuous heterogeneity axis.
    heterogeneity_strength
        Log2 fold change per unit of the heterogeneity axis (times the gene weight).
    library_size_median
        Median library-size factor (about the median UMIs per cell).
    library_size_sigma
        Sd of the log library-size factor.
    dispersion
        Negative-binomial dispersion θ (variance ``mu + θ mu²``); 0 gives Poisson.
    base_mean_sigma
        Sd of log relative abundance among ordinary (non-housekeeping) genes.
    high_expression_fraction
        Fraction of genes that are highly expressed housekeeping genes.
    high_expression_share
        Fraction of the expected UMIs carried by the housekeeping genes.
    n_batches
        Batches (``obs["batch"]``, ``batch0`` ...) the cells are spread over uniformly;
        1 (default) writes no batch column.
    batch_strength
        Sd of each batch's log2 shift of every gene (a technical batch effect shared by
        controls and perturbed cells).
    interaction_classes
        1: the doubles are planted genetic interactions, in turn additive (``E_A + E_B``), synergy
        (``synergy_factor`` times that), buffering (``buffering_factor`` times), epistasis (A dominates:
        ``E_A + epistasis_factor E_B``) and neomorphic (``E_A + E_B`` plus a program neither single moves);
        A and B come from different programs (their effects must not be collinear to be told apart).
        ``uns["perturbation_truth"]["interaction"]`` holds each double's class. 0 (default): as above with
        ``interaction_scale``.
    synergy_factor, buffering_factor, epistasis_factor
        The scales of the planted synergy, buffering and epistasis doubles.
    guides_per_target
        Guides per perturbed gene; 0 (default) simulates no guides. With guides, every perturbed gene
        is also a gene of the panel (named like the perturbation), knocked down in the cells its guides
        reach, and the cells carry guide UMI counts (``obsm["guide_counts"]``, ``uns["guides"]``,
        :func:`write_cellranger_h5` writes them as Cell Ranger output).
    guides_per_cell
        Guides the design puts in a cell: 1, or 2 for a combinatorial screen (Norman et al.: a single carries
        its guide and a non-targeting one, a control two non-targeting ones, a double both guides).
    n_control_guides
        Non-targeting guides (target ``non-targeting``), carried by the control cells.
    failed_guide_fraction
        Fraction of the targeting guides that do nothing: no knockdown, no effect (their cells look like
        controls).
    knockdown_min, knockdown_max
        Range of the fraction of its target's expression a working guide removes (CRISPRi).
    guide_umis
        Median UMIs of a guide a cell expresses, at median capture and depth.
    guide_capture_sigma
        Log-scale sd of the guides' capture efficiencies (several-fold apart).
    guide_depth_sigma
        Log-scale sd of the cells' guide capture depth.
    guide_dispersion
        Negative-binomial dispersion of an expressed guide's UMIs.
    ambient_guide_umis
        Mean ambient guide UMIs per cell (at median depth), spread over the guides by their abundance in the
        pool.
    capture_failure_rate
        Fraction of cells whose guide is barely captured (3 % of its usual UMIs).
    multiplet_rate
        Fraction of cells that carry one more guide than the design (a second cell's, in one droplet).
    seed
        Seed of every random stream.
    """

    n_cells: int = 5000
    n_genes: int = 2000
    n_programs: int = 4
    perturbations_per_program: int = 3
    n_null_perturbations: int = 2
    n_doubles: int = 0
    interaction_scale: float = 0.0
    control_fraction: float = 0.2
    penetrance: float = 0.8
    genes_per_program: int = 30
    up_fraction: float = 0.5
    effect_size_min: float = 0.75
    effect_size_max: float = 2.0
    strength_min: float = 0.7
    strength_max: float = 1.3
    perturbation_jitter: float = 0.1
    cell_cycle_strength: float = 2.0
    s_fraction: float = 0.3
    g2m_fraction: float = 0.2
    n_heterogeneity_genes: int = 30
    heterogeneity_strength: float = 0.5
    library_size_median: float = 4000.0
    library_size_sigma: float = 0.4
    dispersion: float = 0.5
    base_mean_sigma: float = 2.25
    high_expression_fraction: float = 0.05
    high_expression_share: float = 0.92
    n_batches: int = 1
    batch_strength: float = 0.5
    interaction_classes: int = 0
    synergy_factor: float = 1.8
    buffering_factor: float = 0.4
    epistasis_factor: float = 0.1
    guides_per_target: int = 0
    guides_per_cell: int = 1
    n_control_guides: int = 4
    failed_guide_fraction: float = 0.15
    knockdown_min: float = 0.6
    knockdown_max: float = 0.95
    guide_umis: float = 60.0
    guide_capture_sigma: float = 0.7
    guide_depth_sigma: float = 0.6
    guide_dispersion: float = 0.5
    ambient_guide_umis: float = 4.0
    capture_failure_rate: float = 0.03
    multiplet_rate: float = 0.04
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _field_type(f)
            is_number = isinstance(value, (int, float, np.number))
            if isinstance(value, (bool, np.bool_)) or not is_number:
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            if kind is int:
                if not float(value).is_integer():
                    raise ValueError(f"{f.name} must be an integer, got {value!r}")
                value = int(value)
            else:
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"{f.name} must be finite, got {value!r}")
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.n_cells >= 1, "n_cells must be at least 1")
        check(self.n_genes >= 1, "n_genes must be at least 1")
        for name in (
            "n_programs",
            "perturbations_per_program",
            "n_null_perturbations",
            "n_doubles",
            "genes_per_program",
            "n_heterogeneity_genes",
        ):
            check(getattr(self, name) >= 0, f"{name} must be non-negative")
        n_singles = self.n_single_perturbations
        check(n_singles >= 1, "the screen needs at least one single perturbation")
        check(
            self.n_doubles <= n_singles * (n_singles - 1) // 2,
            f"n_doubles={self.n_doubles} exceeds the {n_singles * (n_singles - 1) // 2} "
            f"distinct pairs of the {n_singles} single perturbations",
        )
        for name in ("control_fraction", "high_expression_fraction", "high_expression_share"):
            check(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1)")
        for name in ("failed_guide_fraction", "capture_failure_rate", "multiplet_rate"):
            check(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1)")
        check(0.0 <= self.knockdown_min <= self.knockdown_max < 1.0, "need 0 <= knockdown_min <= knockdown_max < 1")
        for name in ("guides_per_target", "n_control_guides"):
            check(getattr(self, name) >= 0, f"{name} must be non-negative")
        check(self.guides_per_target == 0 or self.n_control_guides >= 1, "guides need n_control_guides >= 1")
        check(self.guides_per_cell in (1, 2), "guides_per_cell must be 1 or 2")
        for name in (
            "guide_umis",
            "guide_capture_sigma",
            "guide_depth_sigma",
            "guide_dispersion",
            "ambient_guide_umis",
        ):
            check(getattr(self, name) >= 0.0, f"{name} must be non-negative")
        for name in ("penetrance", "up_fraction", "s_fraction", "g2m_fraction"):
            check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]")
        check(self.s_fraction + self.g2m_fraction <= 1.0, "s_fraction + g2m_fraction must be <= 1")
        check(self.interaction_classes in (0, 1), "interaction_classes must be 0 or 1")
        for name in ("synergy_factor", "buffering_factor", "epistasis_factor"):
            check(getattr(self, name) >= 0.0, f"{name} must be non-negative")
        check(
            0.0 <= self.effect_size_min <= self.effect_size_max,
            "need 0 <= effect_size_min <= effect_size_max",
        )
        check(
            0.0 <= self.strength_min <= self.strength_max,
            "need 0 <= strength_min <= strength_max",
        )
        for name in (
            "interaction_scale",
            "perturbation_jitter",
            "heterogeneity_strength",
            "library_size_sigma",
            "dispersion",
            "base_mean_sigma",
        ):
            check(getattr(self, name) >= 0.0, f"{name} must be non-negative")
        check(self.library_size_median > 0.0, "library_size_median must be positive")
        check(self.seed >= 0, "seed must be non-negative")
        n_ordinary = self.n_genes - self.n_housekeeping_genes
        needed = self.n_programs * self.genes_per_program + self.n_heterogeneity_genes
        check(
            needed <= n_ordinary,
            f"n_genes={self.n_genes} is too small: the programs and the heterogeneity axis need "
            f"{needed} genes besides the {self.n_housekeeping_genes} housekeeping genes",
        )

    @property
    def n_single_perturbations(self) -> int:
        """Number of single perturbations, program-hitting and null."""
        return self.n_programs * self.perturbations_per_program + self.n_null_perturbations

    @property
    def n_perturbations(self) -> int:
        """Number of perturbation labels besides ``control`` (singles and doubles)."""
        return self.n_single_perturbations + self.n_doubles

    @property
    def n_housekeeping_genes(self) -> int:
        """Number of highly expressed housekeeping genes."""
        return round(self.high_expression_fraction * self.n_genes)

    def to_dict(self) -> dict[str, int | float]:
        """The configuration as a dict of plain Python ints and floats (JSON-able)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SimulationConfig:
        """Rebuild a configuration, e.g. from ``adata.uns["simulation"]`` after ``read_h5ad``.

        Parameters
        ----------
        values
            Field names to values; numpy scalars are accepted. Unknown keys raise.

        Returns
        -------
        SimulationConfig
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SimulationConfig field(s): {unknown}")
        return cls(**{k: (v.item() if isinstance(v, np.generic) else v) for k, v in values.items()})


def _field_type(f: dataclasses.Field[Any]) -> type:
    """``int`` or ``float``: the declared type of a :class:`SimulationConfig` field."""
    return int if f.type in (int, "int") else float


def load_cell_cycle_genes() -> tuple[list[str], list[str]]:
    """The Tirosh et al. (2016) cell-cycle genes shipped with the package.

    Returns
    -------
    s_genes, g2m_genes
        The 43 S-phase and 54 G2/M gene symbols, in the resource's order.
    """
    text = files("perturbscope.resources").joinpath(_CELL_CYCLE_RESOURCE).read_text()
    genes = [line.strip() for line in text.splitlines() if line.strip()]
    return genes[:_N_S_GENES], genes[_N_S_GENES:]


@dataclass
class _Design:
    """The screen's fixed structure, drawn before any cell."""

    var_names: list[str]
    gene_label: np.ndarray  # (n_genes,) object: var["program"]
    rel_abundance: np.ndarray  # (n_genes,) sums to 1
    structured: np.ndarray  # (n_struct,) gene indices that any effect can touch
    s_cols: np.ndarray  # positions within `structured`
    g2m_cols: np.ndarray
    het_weight: np.ndarray  # (n_struct,) heterogeneity weights, 0 off the axis
    struct_effects: np.ndarray  # (1 + n_perturbations, n_struct): row 0 (control) is zero
    perturbations: list[str]  # singles then doubles, controls excluded
    programs: list[str]  # per perturbation
    strengths: np.ndarray  # per perturbation; NaN for doubles
    n_genes_perturbed: np.ndarray  # 1 or 2
    effects: np.ndarray  # (n_perturbations, n_genes) true log2 fold changes
    interactions: list[str] = dataclasses.field(default_factory=list)  # planted class of each double ("" else)


def _design(config: SimulationConfig, rng: np.random.Generator) -> _Design:
    """Draw gene abundances and roles, program effects and the perturbation table."""
    n_genes = config.n_genes
    n_house = config.n_housekeeping_genes
    n_ordinary = n_genes - n_house
    gpp = config.genes_per_program
    n_prog_genes = config.n_programs * gpp
    n_het = config.n_heterogeneity_genes
    s_all, g2m_all = load_cell_cycle_genes()
    n_cc_total = len(s_all) + len(g2m_all)
    n_cc = min(n_cc_total, n_ordinary - n_prog_genes - n_het)
    n_s = min(len(s_all), round(n_cc * len(s_all) / n_cc_total))
    n_g2m = n_cc - n_s
    n_marker = n_prog_genes + n_het + n_cc

    # Abundances, in "role order": housekeeping genes first, then ordinary ones.
    ordinary = np.exp(rng.normal(0.0, config.base_mean_sigma, n_ordinary))
    house = np.exp(rng.normal(0.0, _HOUSEKEEPING_SIGMA, n_house))
    share = config.high_expression_share if n_house else 0.0
    if n_house:
        house *= share / house.sum()
    ordinary *= (1.0 - share) / ordinary.sum()
    abundance = np.concatenate([house, ordinary])

    # Roles: markers from the top of the ordinary genes, in random assignment.
    labels = np.full(n_genes, NULL_PROGRAM_LABEL, dtype=object)
    order = n_house + np.argsort(-ordinary, kind="stable")
    pool = order[: min(n_ordinary, max(n_marker, _MARKER_POOL_FACTOR * n_marker))]
    markers = rng.choice(pool, size=n_marker, replace=False)  # in random order
    program_names = [f"program_{k + 1}" for k in range(config.n_programs)]
    program_genes = [markers[k * gpp : (k + 1) * gpp] for k in range(config.n_programs)]
    for name, genes in zip(program_names, program_genes, strict=True):
        labels[genes] = name
    het_genes = markers[n_prog_genes : n_prog_genes + n_het]
    s_genes = markers[n_prog_genes + n_het : n_prog_genes + n_het + n_s]
    g2m_genes = markers[n_prog_genes + n_het + n_s :]
    labels[het_genes] = "heterogeneity"
    labels[s_genes] = "cell_cycle_S"
    labels[g2m_genes] = "cell_cycle_G2M"
    names = np.empty(n_genes, dtype=object)
    names[s_genes] = s_all[:n_s]
    names[g2m_genes] = g2m_all[:n_g2m]

    # Shuffle genes into their var order; `pos[i]` is where role-order gene i lands.
    perm = rng.permutation(n_genes)  # var position j holds role-order gene perm[j]
    pos = np.empty(n_genes, dtype=np.int64)
    pos[perm] = np.arange(n_genes)
    labels = labels[perm]
    names = names[perm]
    abundance = abundance[perm]
    width = max(5, len(str(n_genes)))
    var_names = [name if name is not None else f"SIM{j + 1:0{width}d}" for j, name in enumerate(names)]

    # Program effects (log2): signed magnitudes on each program's genes.
    program_effect = np.zeros((config.n_programs, n_genes))
    for k, genes in enumerate(program_genes):
        n_up = round(config.up_fraction * gpp)
        signs = rng.permutation(np.r_[np.ones(n_up), -np.ones(gpp - n_up)])
        magnitude = rng.uniform(config.effect_size_min, config.effect_size_max, gpp)
        program_effect[k, pos[genes]] = signs * magnitude

    # Single perturbations: names shuffled so that name order does not reveal programs.
    n_prog_perts = config.n_programs * config.perturbations_per_program
    n_singles = config.n_single_perturbations
    pwidth = max(2, len(str(n_singles)))
    single_names = [f"PERT{i + 1:0{pwidth}d}" for i in range(n_singles)]
    name_of = rng.permutation(n_singles)
    single_effects = np.zeros((n_singles, n_genes))
    single_programs = [NULL_PROGRAM_LABEL] * n_singles
    single_strengths = np.zeros(n_singles)
    for i in range(n_prog_perts):
        k = i // config.perturbations_per_program
        strength = rng.uniform(config.strength_min, config.strength_max)
        jitter = np.exp(rng.normal(0.0, config.perturbation_jitter, n_genes))
        slot = name_of[i]
        single_effects[slot] = strength * program_effect[k] * jitter
        single_programs[slot] = program_names[k]
        single_strengths[slot] = strength

    # Double perturbations: distinct unordered pairs, A < B by name.
    pairs = [(a, b) for a in range(n_singles) for b in range(a + 1, n_singles)]
    if config.interaction_classes:  # planted interactions: two programs, effects that are not collinear
        pairs = [
            (a, b)
            for a, b in pairs
            if NULL_PROGRAM_LABEL not in (single_programs[a], single_programs[b])
            and single_programs[a] != single_programs[b]
        ]
        if len(pairs) < config.n_doubles:
            raise ValueError(
                f"n_doubles={config.n_doubles} planted interactions need as many pairs of perturbations of two "
                f"different programs; there are {len(pairs)}"
            )
    chosen = rng.choice(len(pairs), size=config.n_doubles, replace=False)
    double_names, double_programs, double_effects, double_classes = [], [], [], []
    for order, idx in enumerate(sorted(int(i) for i in chosen)):
        a, b = pairs[idx]
        effect = single_effects[a] + single_effects[b]
        touched = (single_effects[a] != 0) | (single_effects[b] != 0)
        interaction = rng.normal(0.0, 1.0, n_genes) * config.interaction_scale
        effect = effect + np.where(touched, interaction, 0.0)
        kind = ""
        if config.interaction_classes:
            kind = INTERACTION_CLASSES[order % len(INTERACTION_CLASSES)]
            if kind == "synergy":
                effect = config.synergy_factor * (single_effects[a] + single_effects[b])
            elif kind == "buffering":
                effect = config.buffering_factor * (single_effects[a] + single_effects[b])
            elif kind == "epistasis":
                effect = single_effects[a] + config.epistasis_factor * single_effects[b]
            elif kind == "neomorphic":  # a program neither single moves
                others = [
                    k
                    for k in range(config.n_programs)
                    if program_names[k] not in (single_programs[a], single_programs[b])
                ]
                extra = program_effect[others[order % len(others)]] if others else 0.0
                effect = single_effects[a] + single_effects[b] + extra
            else:
                effect = single_effects[a] + single_effects[b]
        double_names.append(f"{single_names[a]}{DOUBLE_SEPARATOR}{single_names[b]}")
        pa, pb = single_programs[a], single_programs[b]
        double_programs.append(pa if pa == pb else f"{pa}{DOUBLE_SEPARATOR}{pb}")
        double_effects.append(effect)
        double_classes.append(kind)

    effects = np.vstack([single_effects, *double_effects]) if double_effects else single_effects
    structured = np.flatnonzero(labels != NULL_PROGRAM_LABEL)
    struct_labels = labels[structured]
    het_weight = np.zeros(structured.size)
    het_cols = np.flatnonzero(struct_labels == "heterogeneity")
    het_signs = rng.permutation(np.r_[np.ones(n_het // 2), -np.ones(n_het - n_het // 2)])
    het_weight[het_cols] = het_signs * rng.uniform(0.5, 1.5, n_het)
    return _Design(
        var_names=var_names,
        gene_label=labels,
        rel_abundance=abundance,
        structured=structured,
        s_cols=np.flatnonzero(struct_labels == "cell_cycle_S"),
        g2m_cols=np.flatnonzero(struct_labels == "cell_cycle_G2M"),
        het_weight=het_weight,
        struct_effects=np.vstack([np.zeros(structured.size), effects[:, structured]]),
        perturbations=single_names + double_names,
        programs=single_programs + double_programs,
        strengths=np.r_[single_strengths, np.full(len(double_names), np.nan)],
        n_genes_perturbed=np.r_[np.ones(n_singles, int), np.full(len(double_names), 2)],
        effects=effects,
        interactions=[""] * n_singles + double_classes,
    )


@dataclass
class _Cells:
    """Per-cell ground truth; perturbation code 0 is control, k >= 1 is perturbation k - 1."""

    code: np.ndarray
    phase: np.ndarray
    heterogeneity: np.ndarray
    responded: np.ndarray
    size_factor: np.ndarray
    effect: np.ndarray | None = None  # the perturbation whose effect a cell shows, where not its own (guides)


def _draw_cells(config: SimulationConfig, design: _Design, rng: np.random.Generator) -> _Cells:
    """Assign perturbations (balanced), phases, heterogeneity, response and library size."""
    n_cells = config.n_cells
    n_perts = len(design.perturbations)
    n_control = round(config.control_fraction * n_cells)
    per_pert = np.full(n_perts, (n_cells - n_control) // n_perts)
    per_pert[rng.permutation(n_perts)[: (n_cells - n_control) % n_perts]] += 1
    code = np.repeat(np.arange(n_perts + 1), np.r_[n_control, per_pert])
    code = rng.permutation(code)
    g1 = max(0.0, 1.0 - config.s_fraction - config.g2m_fraction)
    phase_p = np.array([g1, config.s_fraction, config.g2m_fraction])
    phase = rng.choice(3, size=n_cells, p=phase_p / phase_p.sum())
    heterogeneity = rng.standard_normal(n_cells)
    has_effect = np.r_[False, np.any(design.effects != 0, axis=1)]
    responded = (rng.random(n_cells) < config.penetrance) & has_effect[code]
    size_factor = config.library_size_median * np.exp(rng.normal(0.0, config.library_size_sigma, n_cells))
    return _Cells(code, phase, heterogeneity, responded, size_factor)


class _Workspace:
    """Buffers of one chunk, allocated once and reused (fresh multi-megabyte arrays
    for every chunk would cost a page fault per page)."""

    def __init__(self, n_entries: int) -> None:
        self.mu = np.empty(n_entries)
        self.u = np.empty(n_entries)
        self.p0 = np.empty(n_entries)
        self.counts = np.empty(n_entries, dtype=np.int32)
        self.nonzero = np.empty(n_entries, dtype=bool)
        self.direct = np.empty(n_entries, dtype=bool)


def _sample_negative_binomial(
    mu: np.ndarray,
    dispersion: float,
    rng: np.random.Generator,
    work: _Workspace | None = None,
) -> np.ndarray:
    """Negative-binomial counts with means ``mu`` and variance ``mu + dispersion·mu²``.

    Exact, and several times faster than numpy's gamma-then-Poisson on sparse
    data: an entry with mean at most ``_DIRECT_MEAN`` is drawn by inversion of
    its CDF with one uniform (most are zero, and the CDF is summed further only
    for the others); the rest are drawn as a gamma-Poisson mixture.

    Parameters
    ----------
    mu
        Non-negative, finite means (1-d).
    dispersion
        θ ≥ 0; 0 gives Poisson counts.
    rng
        Source of randomness.
    work
        Reusable buffers of at least ``mu.size`` entries (allocated if omitted).

    Returns
    -------
    numpy.ndarray
        ``int32`` counts, 1-d; a view of ``work.counts`` when ``work`` is given.
    """
    n = mu.size
    work = work if work is not None else _Workspace(n)
    u, p0, counts = work.u[:n], work.p0[:n], work.counts[:n]
    nonzero, direct = work.nonzero[:n], work.direct[:n]
    rng.random(out=u)
    counts.fill(0)
    np.greater(mu, _DIRECT_MEAN, out=direct)
    if dispersion > 0:
        r = 1.0 / dispersion
        np.multiply(mu, dispersion, out=p0)  # P(0) = (1 + θμ)^(-1/θ)
        np.log1p(p0, out=p0)
        p0 *= -r
    else:
        r = 0.0
        np.negative(mu, out=p0)  # P(0) = exp(-μ)
    np.exp(p0, out=p0)
    p0[direct] = 2.0  # never "nonzero by inversion": drawn directly below
    np.greater(u, p0, out=nonzero)
    idx = np.flatnonzero(nonzero)
    u_i, p_i, step = u[idx], p0[idx], mu[idx]
    cdf = p_i.copy()
    if dispersion > 0:
        step *= dispersion
        step /= 1.0 + step  # P(k+1) = P(k) · (k + r)/(k + 1) · θμ/(1 + θμ)
    k = 0
    while idx.size:
        # For Poisson, P(k+1) = P(k) · μ/(k + 1).
        p_i *= step * ((k + r) / (k + 1) if dispersion > 0 else 1.0 / (k + 1))
        cdf += p_i
        k += 1
        done = u_i <= cdf
        done |= p_i <= 1e-17 * cdf  # the remaining tail is below float resolution
        counts[idx[done]] = k
        keep = ~done
        idx, u_i, p_i, cdf, step = idx[keep], u_i[keep], p_i[keep], cdf[keep], step[keep]
    big = np.flatnonzero(direct)
    if big.size:
        lam = mu[big]
        if dispersion > 0:
            lam = rng.standard_gamma(r, size=big.size) * (lam * dispersion)
        counts[big] = rng.poisson(lam)
    return counts


@dataclass
class _BatchRows:
    """Per-cell batch and per-batch gene shifts; ``[rows]`` gives the chunk's (cells, genes) log2 shifts."""

    batch: np.ndarray
    shift: np.ndarray

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.shift[self.batch[rows]]


def _draw_batches(config: SimulationConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Each cell's batch (uniform) and each batch's log2 shift of every gene (N(0, batch_strength)).

    Drawn from a stream of its own, so a screen with one batch is the same as before batches existed.
    """
    if config.n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {config.n_batches}")
    if config.n_batches == 1:
        return np.zeros(config.n_cells, dtype=np.int64), None
    rng = np.random.default_rng([config.seed, 0xBA7C])
    batch = rng.integers(0, config.n_batches, size=config.n_cells)
    shift = rng.normal(0.0, config.batch_strength, size=(config.n_batches, config.n_genes))
    return batch, shift


def _count_chunk(
    config: SimulationConfig,
    design: _Design,
    cells: _Cells,
    start: int,
    stop: int,
    seed_seq: np.random.SeedSequence,
    work: _Workspace,
    batch_log2fc: np.ndarray | None = None,
    knockdown: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts of cells ``start:stop``: CSR pieces ``(data, indices, row_nnz)`` and row totals.

    ``knockdown``: ``(columns, log2 shifts)``, each ``(n_cells, 2)``: the target genes of each cell's guides
    (-1: none) and the log2 change of their expression."""
    rng = np.random.default_rng(seed_seq)
    rows = slice(start, stop)
    n_rows, n_genes = stop - start, config.n_genes
    # Log2 fold changes only where anything can move: the structured genes.
    lfc = design.struct_effects[(cells.code if cells.effect is None else cells.effect)[rows]]
    lfc *= cells.responded[rows, None]
    phase = cells.phase[rows]
    lfc[:, design.s_cols] += config.cell_cycle_strength * (phase == 1)[:, None]
    lfc[:, design.g2m_cols] += config.cell_cycle_strength * (phase == 2)[:, None]
    lfc += (config.heterogeneity_strength * cells.heterogeneity[rows])[:, None] * design.het_weight
    mu = work.mu[: n_rows * n_genes].reshape(n_rows, n_genes)
    np.multiply.outer(cells.size_factor[rows], design.rel_abundance, out=mu)
    mu[:, design.structured] *= np.exp2(lfc)
    if batch_log2fc is not None:  # (cells in the chunk, genes): every gene shifts by batch
        mu *= np.exp2(batch_log2fc[rows])
    if knockdown is not None:
        columns, shifts = knockdown[0][rows], knockdown[1][rows]
        for k in range(columns.shape[1]):
            hit = np.flatnonzero(columns[:, k] >= 0)
            mu[hit, columns[hit, k]] *= np.exp2(shifts[hit, k])
    counts = _sample_negative_binomial(mu.ravel(), config.dispersion, rng, work)
    nz = np.flatnonzero(counts)
    data = counts[nz].astype(np.float32)
    indices = (nz % n_genes).astype(np.int32)
    by_row = counts.reshape(n_rows, n_genes)
    row_nnz = np.count_nonzero(by_row, axis=1)
    row_total = by_row.sum(axis=1, dtype=np.int64)
    return data, indices, row_nnz, row_total


NON_TARGETING = "non-targeting"
"""Target of the simulated control guides."""


@dataclass
class _Guides:
    """The guides of a screen, which cells carry which, and the guide UMI counts."""

    names: list[str]
    targets: list[str]
    knockdown_fraction: np.ndarray  # per guide: share of its target's expression removed (0: failed / control)
    failed: np.ndarray  # per guide
    capture: np.ndarray  # per guide capture efficiency
    cell_guides: list[np.ndarray]  # per cell: guide indices (design guides, then a multiplet's extra)
    multiplet: np.ndarray  # per cell
    counts: sp.csr_matrix  # cells x guides UMIs
    knockdown: tuple[np.ndarray, np.ndarray]  # (n_cells, 2) target columns and log2 shifts

    def annotate(self, adata: ad.AnnData) -> None:
        names = np.asarray(self.names, dtype=object)
        adata.obsm["guide_counts"] = self.counts
        adata.uns["guides"] = {"guide": list(self.names), "target": list(self.targets)}
        adata.obs["true_guides"] = [";".join(sorted(names[g])) for g in self.cell_guides]
        adata.obs["true_multiplet"] = self.multiplet
        adata.uns["guide_truth"] = pd.DataFrame(
            {
                "target": self.targets,
                "knockdown_fraction": self.knockdown_fraction,
                "failed": self.failed,
                "capture_efficiency": self.capture,
            },
            index=pd.Index(self.names, name="guide"),
        )


def _draw_guides(config: SimulationConfig, design: _Design, cells: _Cells, rng: np.random.Generator) -> _Guides:
    """Guides per perturbed gene (each gene also put in the panel), their efficiencies, each cell's guides and
    UMI counts; cells whose guides failed stop responding."""
    n_singles = config.n_single_perturbations
    singles = design.perturbations[:n_singles]
    # every perturbed gene is measured: a moderately to highly expressed gene outside every program takes its name
    structured = set(design.structured.tolist())
    house = set(np.argsort(design.rel_abundance)[::-1][: config.n_housekeeping_genes].tolist())
    free = np.array([j for j in np.argsort(design.rel_abundance)[::-1] if j not in structured and j not in house])
    if free.size < n_singles:
        raise ValueError(f"n_genes={config.n_genes} leaves {free.size} genes for the {n_singles} perturbed genes")
    pool = free[: max(n_singles, free.size // 8)]  # targets worth a knockdown check: well expressed
    target_col = rng.choice(pool, size=n_singles, replace=False)
    for label, col in zip(singles, target_col, strict=True):
        design.var_names[col] = label
        design.gene_label[col] = "perturbed_gene"
    per = config.guides_per_target
    names = [f"{label}-{i + 1}" for label in singles for i in range(per)]
    names += [f"NTC-{i + 1}" for i in range(config.n_control_guides)]
    targets = [label for label in singles for _ in range(per)] + [NON_TARGETING] * config.n_control_guides
    n_target_guides = n_singles * per
    failed = np.r_[rng.random(n_target_guides) < config.failed_guide_fraction, np.zeros(config.n_control_guides, bool)]
    fraction = np.r_[
        rng.uniform(config.knockdown_min, config.knockdown_max, n_target_guides), np.zeros(config.n_control_guides)
    ]
    fraction[failed] = 0.0
    capture = np.exp(rng.normal(0.0, config.guide_capture_sigma, len(names)))
    index = {label: i for i, label in enumerate(singles)}
    components = [[index[g] for g in label.split(DOUBLE_SEPARATOR)] for label in design.perturbations]
    n = config.n_cells
    cell_guides: list[np.ndarray] = []
    columns = np.full((n, 2), -1, dtype=np.int64)
    shifts = np.zeros((n, 2))
    works = np.ones(n, dtype=bool)
    effect = cells.code.copy()
    pick = rng.integers(0, max(per, config.n_control_guides), size=(n, 2))
    for c in range(n):
        code = int(cells.code[c])
        ntc = [n_target_guides + int(pick[c, k] % config.n_control_guides) for k in range(2)]
        if code == 0:
            chosen = sorted(set(ntc)) if config.guides_per_cell == 2 else ntc[:1]
        else:
            chosen = [single * per + int(pick[c, k] % per) for k, single in enumerate(components[code - 1])]
            broken = failed[chosen]
            works[c] = not broken.all()
            if broken.any() and not broken.all():  # a double with one failed guide shows the other single's effect
                effect[c] = 1 + chosen[int(np.flatnonzero(~broken)[0])] // per
            for k, g in enumerate(chosen):
                columns[c, k] = target_col[g // per]
                shifts[c, k] = np.log2(1.0 - fraction[g])
            if config.guides_per_cell == 2 and len(chosen) == 1:
                chosen.append(ntc[0])
        cell_guides.append(np.asarray(chosen, dtype=np.int64))
    # the cells a working guide reached (escapers, a share 1 - penetrance, keep their target); for a perturbation
    # with no downstream effect the knockdown still happens
    has_effect = np.r_[False, np.any(design.effects != 0, axis=1)][cells.code]
    reached = np.where(has_effect, cells.responded, rng.random(n) < config.penetrance) & works & (cells.code > 0)
    cells.responded &= works  # a failed guide has no effect: its cells look like controls
    cells.effect = effect
    shifts *= reached[:, None]
    multiplet = rng.random(n) < config.multiplet_rate
    for c in np.flatnonzero(multiplet):
        others = np.setdiff1d(np.arange(len(names)), cell_guides[c])
        cell_guides[c] = np.r_[cell_guides[c], rng.choice(others)]
    # UMIs of the guides a cell carries: capture x the cell's depth, a few cells barely captured
    depth = np.exp(rng.normal(0.0, config.guide_depth_sigma, n))
    rows = np.repeat(np.arange(n), [g.size for g in cell_guides])
    cols = np.concatenate(cell_guides)
    mean = config.guide_umis * capture[cols] * depth[rows]
    mean *= np.where(rng.random(rows.size) < config.capture_failure_rate, 0.03, 1.0)
    if config.guide_dispersion > 0:
        mean = rng.gamma(1.0 / config.guide_dispersion, mean * config.guide_dispersion)
    umis = rng.poisson(mean)
    # ambient guide UMIs, spread by each guide's abundance in the pool
    abundance = np.bincount(cols, minlength=len(names)) * capture
    ambient = rng.poisson(config.ambient_guide_umis * depth)
    amb_rows = np.repeat(np.arange(n), ambient)
    amb_cols = rng.choice(len(names), size=amb_rows.size, p=abundance / abundance.sum())
    counts = sp.csr_matrix(
        (np.r_[umis, np.ones(amb_rows.size)].astype(np.float32), (np.r_[rows, amb_rows], np.r_[cols, amb_cols])),
        shape=(n, len(names)),
    )
    counts.sum_duplicates()
    counts.eliminate_zeros()
    return _Guides(names, targets, fraction, failed, capture, cell_guides, multiplet, counts, (columns, shifts))


def write_cellranger_h5(adata: ad.AnnData, path: str | Path, feature_reference: str | Path | None = None) -> Path:
    """Write a simulated screen with guides as Cell Ranger's ``filtered_feature_bc_matrix.h5``: gene features
    (``Gene Expression``) then guide features (``CRISPR Guide Capture``, with ``target_gene_name``), raw
    counts only, as ``scanpy.read_10x_h5(path, gex_only=False)`` reads it; optionally the
    ``feature_reference.csv`` (``id,name,read,pattern,sequence,feature_type,target_gene_id,target_gene_name``)."""
    import h5py

    if "guide_counts" not in adata.obsm:
        raise ValueError("the screen has no guide counts: simulate it with guides_per_target >= 1")
    guide_names = list(adata.uns["guides"]["guide"])
    guide_targets = list(adata.uns["guides"]["target"])
    matrix = sp.hstack([sp.csr_matrix(adata.X), sp.csr_matrix(adata.obsm["guide_counts"])], format="csr")
    genes = [str(g) for g in adata.var_names]
    ids = [f"ENSG{j:011d}" for j in range(len(genes))] + guide_names
    names = genes + guide_names
    types = ["Gene Expression"] * len(genes) + ["CRISPR Guide Capture"] * len(guide_names)
    target_names = [""] * len(genes) + guide_targets
    target_ids = [""] * len(genes) + [
        "Non-Targeting" if t == NON_TARGETING else ids[genes.index(t)] if t in genes else "" for t in guide_targets
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def strings(values: Sequence[str]) -> np.ndarray:
        return np.array([v.encode() for v in values], dtype=f"S{max(1, max(len(v) for v in values))}")

    with h5py.File(path, "w") as f:
        group = f.create_group("matrix")
        wells = (  # Cell Ranger aggr numbers the GEM wells (here: the batches) in the barcode's suffix
            pd.Categorical(adata.obs["batch"]).codes + 1 if "batch" in adata.obs else np.ones(adata.n_obs, dtype=int)
        )
        group.create_dataset(
            "barcodes", data=strings([f"{b}-{w}" for b, w in zip(adata.obs_names, wells, strict=True)])
        )
        group.create_dataset("data", data=matrix.data.astype(np.int32), compression="gzip")
        group.create_dataset("indices", data=matrix.indices.astype(np.int64), compression="gzip")
        group.create_dataset("indptr", data=matrix.indptr.astype(np.int64))
        group.create_dataset("shape", data=np.array([matrix.shape[1], matrix.shape[0]], dtype=np.int32))
        features = group.create_group("features")
        features.create_dataset("id", data=strings(ids))
        features.create_dataset("name", data=strings(names))
        features.create_dataset("feature_type", data=strings(types))
        features.create_dataset("genome", data=strings(["GRCh38"] * len(names)))
        features.create_dataset("target_gene_name", data=strings(target_names))
        features.create_dataset("target_gene_id", data=strings(target_ids))
        features.create_dataset("_all_tag_keys", data=strings(["genome", "target_gene_name", "target_gene_id"]))
    if feature_reference is not None:
        pd.DataFrame(
            {
                "id": guide_names,
                "name": guide_names,
                "read": "R2",
                "pattern": "(BC)",
                "sequence": ["".join("ACGT"[(i * 7 + k) % 4] for k in range(20)) for i in range(len(guide_names))],
                "feature_type": "CRISPR Guide Capture",
                "target_gene_id": target_ids[len(genes) :],
                "target_gene_name": guide_targets,
            }
        ).to_csv(feature_reference, index=False)
    return path


def simulate_screen(config: SimulationConfig | None = None, **overrides: Any) -> ad.AnnData:
    """Simulate a Perturb-seq screen with known ground truth.

    Parameters
    ----------
    config
        The simulation's knobs; ``None`` uses the defaults of :class:`SimulationConfig`.
    **overrides
        Fields of :class:`SimulationConfig` to replace, e.g. ``n_cells=2000, seed=1``.

    Returns
    -------
    anndata.AnnData
        Raw counts in ``X`` (CSR, ``float32`` integers) with the ground truth in
        ``obs``, ``var``, ``varm["true_log2fc"]``, ``uns["simulation"]`` and
        ``uns["perturbation_truth"]``; see the module docstring.

    Examples
    --------
    >>> adata = simulate_screen(n_cells=2000, n_genes=500, n_doubles=3, seed=1)
    >>> int((adata.obs["perturbation"] == "control").sum())
    400
    >>> sorted(adata.obs["n_perturbed_genes"].unique().tolist())
    [0, 1, 2]
    """
    config = config if config is not None else SimulationConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    root = np.random.SeedSequence(config.seed)
    design_seq, cells_seq, counts_seq = root.spawn(3)
    design = _design(config, np.random.default_rng(design_seq))
    cells = _draw_cells(config, design, np.random.default_rng(cells_seq))
    batch, batch_shift = _draw_batches(config)
    guides = None
    if config.guides_per_target:
        (guide_seq,) = root.spawn(1)
        guides = _draw_guides(config, design, cells, np.random.default_rng(guide_seq))

    # The chunking depends on the config only, so each chunk's random stream does too.
    chunk = max(1, _CHUNK_ENTRIES // config.n_genes)
    starts = range(0, config.n_cells, chunk)
    work = _Workspace(min(chunk, config.n_cells) * config.n_genes)
    pieces = [
        _count_chunk(
            config,
            design,
            cells,
            start,
            min(start + chunk, config.n_cells),
            seq,
            work,
            None if batch_shift is None else _BatchRows(batch, batch_shift),
            None if guides is None else guides.knockdown,
        )
        for start, seq in zip(starts, counts_seq.spawn(len(starts)), strict=True)
    ]

    row_nnz = np.concatenate([p[2] for p in pieces])
    nnz = int(row_nnz.sum())
    index_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    indptr = np.zeros(config.n_cells + 1, dtype=index_dtype)
    np.cumsum(row_nnz, out=indptr[1:])
    data = np.concatenate([p[0] for p in pieces])
    indices = np.concatenate([p[1] for p in pieces]).astype(index_dtype, copy=False)
    library_size = np.concatenate([p[3] for p in pieces])
    del pieces
    X = sp.csr_matrix((data, indices, indptr), shape=(config.n_cells, config.n_genes), copy=False)

    labels = [CONTROL_LABEL, *design.perturbations]
    programs = [CONTROL_LABEL, *design.programs]
    n_pert_genes = np.r_[0, design.n_genes_perturbed]
    cell_width = len(str(config.n_cells))
    obs = pd.DataFrame(
        {
            PERTURBATION: pd.Categorical.from_codes(cells.code, categories=labels),
            "program": pd.Categorical(np.asarray(programs, dtype=object)[cells.code]),
            "responded": cells.responded,
            "phase": pd.Categorical.from_codes(cells.phase, categories=list(PHASES)),
            "heterogeneity": cells.heterogeneity,
            "n_perturbed_genes": n_pert_genes[cells.code].astype(np.int64),
            "library_size": library_size,
        },
        index=pd.Index([f"cell{i:0{cell_width}d}" for i in range(config.n_cells)]),
    )
    if batch_shift is not None:
        obs["batch"] = pd.Categorical([f"batch{b}" for b in batch])
    het_weight = np.zeros(config.n_genes)
    het_weight[design.structured] = design.het_weight
    var = pd.DataFrame(
        {
            "program": pd.Categorical(design.gene_label.astype(str)),
            "true_base_mean": design.rel_abundance * config.library_size_median,
            "true_heterogeneity_weight": het_weight,
        },
        index=pd.Index(design.var_names),
    )
    n_cells_per = np.bincount(cells.code, minlength=len(labels))[1:]
    truth = pd.DataFrame(
        {
            "program": design.programs,
            "n_perturbed_genes": design.n_genes_perturbed.astype(np.int64),
            "strength": design.strengths,
            "has_effect": np.any(design.effects != 0, axis=1),
            "n_cells": n_cells_per.astype(np.int64),
            "interaction": design.interactions or [""] * len(design.perturbations),
        },
        index=pd.Index(design.perturbations, name=PERTURBATION),
    )
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.varm["true_log2fc"] = pd.DataFrame(design.effects.T, index=adata.var_names, columns=design.perturbations)
    adata.uns["simulation"] = config.to_dict()
    adata.uns["perturbation_truth"] = truth
    if guides is not None:
        guides.annotate(adata)
    return adata


def _build_parser() -> argparse.ArgumentParser:
    defaults = SimulationConfig()
    parser = argparse.ArgumentParser(
        prog="python -m perturbscope.simulation",
        description="Write a synthetic Perturb-seq screen with known ground truth as .h5ad.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .h5ad path")
    parser.add_argument("--compression", choices=["gzip", "lzf"], default=None, help="h5ad compression (none)")
    knobs = parser.add_argument_group("simulation knobs (SimulationConfig fields)")
    for f in dataclasses.fields(SimulationConfig):
        knobs.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_field_type(f),
            default=getattr(defaults, f.name),
            help=f"default: {getattr(defaults, f.name)}",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: simulate a screen and write it as ``.h5ad``.

    Parameters
    ----------
    argv
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status (0 on success).
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SimulationConfig)}
    try:
        config = SimulationConfig(**values)
    except ValueError as err:
        parser.error(str(err))
    t0 = time.perf_counter()
    adata = simulate_screen(config)
    t_sim = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(args.out, compression=args.compression)
    t_all = time.perf_counter() - t0
    X = adata.X
    sparsity = 1.0 - X.nnz / (X.shape[0] * X.shape[1])
    print(
        f"wrote {args.out}: {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{config.n_single_perturbations} single + {config.n_doubles} double perturbations, "
        f"{sparsity:.1%} zeros, median library {np.median(adata.obs['library_size']):.0f} UMIs, "
        f"seed {config.seed}; simulated in {t_sim:.1f}s, total {t_all:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
