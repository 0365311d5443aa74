"""Report section of ``data_processing``: the screen, QC, cells per perturbation, phases."""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from kedro.pipeline import Node, Pipeline
from matplotlib.patches import Patch
from matplotlib.ticker import ScalarFormatter

from perturbscope.pipelines.reporting.figures import GREY, new_figure
from perturbscope.pipelines.reporting.report import FigureSpec, ReportTable, make_section
from perturbscope.pipelines.reporting.sections.base import Section, section_result
from perturbscope.schema import (
    CELL_GROUP,
    IS_CONTROL,
    N_PERTURBED_GENES,
    PERTURBATION,
    PHASE,
    SPLIT,
    UNPERTURBED,
    ScreenSchema,
)

PIPELINE = "data_processing"
FIGURES = ("cells_per_perturbation", "library_size", "phase_counts")
PHASE_ORDER = ["G1", "S", "G2M", "unknown"]
PHASE_COLOURS = {"G1": "#4c78a8", "S": "#f58518", "G2M": "#54a24b", "unknown": GREY}
KIND_COLOURS = {"control": "#7f7f7f", "single": "#2f6db5", "double": "#d1495b", UNPERTURBED: "#7f7f7f"}


def _kind(row: pd.Series) -> str:
    if bool(row.get(IS_CONTROL, False)):
        return "control"
    n = row.get(N_PERTURBED_GENES)
    if pd.isna(n) or int(n) == 0:
        return UNPERTURBED
    return "single" if int(n) == 1 else "double"


def _counts(adata: ad.AnnData) -> Any:
    return adata.layers.get("counts", adata.X)


def cells_per_perturbation_figure(summary: pd.DataFrame, max_shown: int, dpi: int) -> FigureSpec:
    """Horizontal bars: cells kept per perturbation (light: before QC), coloured by kind."""
    table = summary.copy()
    table["kind"] = table.apply(_kind, axis=1)
    table = table.sort_values("cells_kept", ascending=True)
    if len(table) > max_shown:
        table = table.tail(max_shown)
        shown = f"the {max_shown} largest of {len(summary)} perturbations"
    else:
        shown = f"all {len(summary)} perturbation labels"
    fig = new_figure(7.5, 1.2 + 0.19 * len(table), dpi)
    ax = fig.subplots()
    y = np.arange(len(table))
    ax.barh(y, table["cells_raw"], color="#e3e6eb", label="before QC")
    ax.barh(y, table["cells_kept"], color=[KIND_COLOURS[k] for k in table["kind"]])
    ax.set_yticks(y)
    ax.set_yticklabels(table[PERTURBATION].astype(str), fontsize=7)
    kept = table["cells_kept"].to_numpy(dtype=float)
    smallest = kept[kept > 0].min() if (kept > 0).any() else 1.0
    log_scale = kept.max() > 30 * max(smallest, 1.0)
    if log_scale:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("cells (log scale)" if log_scale else "cells")
    ax.set_ylim(-0.6, len(table) - 0.4)
    handles = [
        Patch(color=KIND_COLOURS[k], label=k) for k in ("control", "single", "double") if k in set(table["kind"])
    ]
    ax.legend(
        handles=[*handles, Patch(color="#e3e6eb", label="before QC")],
        fontsize=8,
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.grid(axis="x", alpha=0.25)
    return FigureSpec(
        fig,
        "Cells per perturbation",
        f"Cells kept after QC for {shown} (bars), and before QC (light grey).",
    )


def library_size_figure(adata: ad.AnnData, dpi: int) -> FigureSpec:
    """Histograms of UMIs and detected genes per cell, controls vs targeted cells."""
    counts = _counts(adata)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    detected = np.asarray((counts > 0).sum(axis=1)).ravel()
    group = adata.obs[CELL_GROUP].astype(str).to_numpy() if CELL_GROUP in adata.obs else np.full(adata.n_obs, "all")
    fig = new_figure(9.0, 3.2, dpi)
    axes = fig.subplots(1, 2)
    panels = (
        (axes[0], totals, "UMIs per cell (HVGs)", np.geomspace(max(totals.min(), 1), max(totals.max(), 2), 40)),
        (
            axes[1],
            detected,
            "detected genes per cell",
            np.histogram_bin_edges(detected, bins=min(40, int(np.ptp(detected)) + 1)),
        ),
    )
    for ax, values, label, bins in panels:
        for name, colour in (("target", "#2f6db5"), ("control", "#555555"), ("all", "#2f6db5")):
            mask = group == name
            if mask.any():
                ax.hist(
                    values[mask],
                    bins=bins,
                    color=colour,
                    density=True,
                    histtype="step",
                    lw=1.6,
                    label=f"{name} ({mask.sum():,} cells)",
                )
        ax.set_xlabel(label)
        ax.set_ylabel("density")
        ax.axvline(np.median(values), color="black", lw=1, ls=":")
        ax.legend(fontsize=8, frameon=False)
    axes[0].set_xscale("log")
    axes[0].xaxis.set_major_formatter(ScalarFormatter())
    return FigureSpec(
        fig,
        "Library size and detected genes",
        "Per-cell UMIs (log scale) and detected genes over the highly variable genes, controls "
        "vs targeted cells (dotted line: median of all cells).",
    )


def phase_table(adata: ad.AnnData) -> pd.DataFrame:
    """Cells per cell-cycle phase and cell group (control/target)."""
    obs = adata.obs
    phase = obs[PHASE].astype(str) if PHASE in obs else pd.Series("unknown", index=obs.index)
    group = obs[CELL_GROUP].astype(str) if CELL_GROUP in obs else pd.Series("all", index=obs.index)
    table = pd.crosstab(phase, group).rename_axis(index=PHASE, columns=None)
    order = [p for p in PHASE_ORDER if p in table.index] + sorted(set(table.index) - set(PHASE_ORDER))
    table = table.loc[order]
    table["total"] = table.sum(axis=1)
    table["fraction"] = (table["total"] / table["total"].sum()).round(3)
    return table.reset_index()


def phase_counts_figure(adata: ad.AnnData, max_shown: int, dpi: int) -> FigureSpec:
    """Stacked bars: share of each phase per perturbation (largest ``max_shown``), controls first."""
    obs = adata.obs
    phase = obs[PHASE].astype(str) if PHASE in obs else pd.Series("unknown", index=obs.index)
    perturbation = obs[PERTURBATION].astype(str)
    counts = pd.crosstab(perturbation, phase)
    sizes = counts.sum(axis=1).sort_values(ascending=False)
    order = [p for p in ("control",) if p in sizes.index] + [p for p in sizes.index if p != "control"][:max_shown]
    shares = counts.loc[order].div(counts.loc[order].sum(axis=1), axis=0)
    phases = [p for p in PHASE_ORDER if p in shares.columns] + sorted(set(shares.columns) - set(PHASE_ORDER))
    fig = new_figure(max(6.0, 1.5 + 0.22 * len(order)), 3.6, dpi)
    ax = fig.subplots()
    bottom = np.zeros(len(order))
    x = np.arange(len(order))
    for p in phases:
        ax.bar(x, shares[p].to_numpy(), bottom=bottom, color=PHASE_COLOURS.get(p, "#bbbbbb"), label=p, width=0.85)
        bottom += shares[p].to_numpy()
    ax.set_xticks(x)
    ax.set_xticklabels(order, rotation=90, fontsize=7)
    ax.set_ylabel("share of cells")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    caption = "Cell-cycle phase (Tirosh 2016 scores) per perturbation, controls first."
    if set(phases) == {"unknown"}:
        caption += " The screen lacks the Tirosh genes, so every phase is 'unknown'."
    return FigureSpec(fig, "Cell-cycle phase per perturbation", caption)


def screen_facts(adata: ad.AnnData, summary: pd.DataFrame, screen: str, program_key: str | None) -> dict[str, Any]:
    """The screen summary: sizes, perturbations, controls, split, phase and program annotation."""
    obs = adata.obs
    counts = _counts(adata)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    kinds = summary.apply(_kind, axis=1)
    facts: dict[str, Any] = {
        "screen": screen,
        "cells after QC": adata.n_obs,
        "cells before QC": int(summary["cells_raw"].sum()),
        "genes (highly variable, modelled)": adata.n_vars,
        "perturbations": int((kinds.isin(["single", "double"])).sum()),
        "single perturbations": int((kinds == "single").sum()),
        "double perturbations (A+B)": int((kinds == "double").sum()),
        "control cells": int(obs[IS_CONTROL].sum()) if IS_CONTROL in obs else 0,
        "median UMIs per cell (HVGs)": float(np.median(totals)),
        "median cells per perturbation": float(summary.loc[~summary[IS_CONTROL], "cells_kept"].median())
        if (~summary[IS_CONTROL]).any()
        else float("nan"),
    }
    if "note" in summary:
        dropped = summary.loc[summary["note"].fillna("").astype(str).str.startswith("dropped"), PERTURBATION]
        if len(dropped):
            facts["perturbations dropped (too few cells after QC)"] = (
                f"{len(dropped)}: " + ", ".join(map(str, dropped[:20])) + (" ..." if len(dropped) > 20 else "")
            )
    if SPLIT in obs:
        split = obs[SPLIT].astype(str).value_counts()
        facts["train / validation cells"] = f"{int(split.get('train', 0)):,} / {int(split.get('validation', 0)):,}"
    if PHASE in obs:
        phases = obs[PHASE].astype(str).value_counts()
        facts["cell-cycle phases"] = ", ".join(f"{p}: {n:,}" for p, n in phases.items())
    if program_key and program_key in obs:
        programs = obs.loc[~obs.get(IS_CONTROL, False), program_key].astype(str)
        annotated = obs.loc[programs.index[~programs.str.lower().isin({"unassigned", "nan", "none"})], PERTURBATION]
        facts[f"annotated programs ({program_key})"] = (
            f"{programs[~programs.str.lower().isin({'unassigned', 'nan', 'none'})].nunique()} programs over "
            f"{annotated.nunique()} perturbations"
        )
    return facts


def guide_facts(guide_calls: pd.DataFrame, qc_summary: pd.DataFrame) -> dict[str, Any]:
    """What guide calling did, for a screen that came with guide counts (nothing otherwise)."""
    if guide_calls is None or guide_calls.empty:
        return {}
    steps = qc_summary[qc_summary["step"].astype(str).str.startswith("guides")]
    removed = {str(r.step): int(r.cells_removed) for r in steps.itertuples(index=False)}
    facts = {
        "guides": f"{len(guide_calls)} targeting {guide_calls['target'].nunique()} genes (controls included)",
        "guide calling": "per-guide mixture: Poisson background, log-normal signal (perturbscope.guides)",
    }
    for step, n in removed.items():
        facts[step.replace("guides: ", "cells dropped: ")] = f"{n:,}"
    return facts


def report_data_processing(
    processed: ad.AnnData,
    screen_summary: pd.DataFrame,
    qc_summary: pd.DataFrame,
    guide_calls: pd.DataFrame,
    params: dict[str, Any],
    schema: dict[str, Any],
    screen: str,
) -> dict[str, Any]:
    """The data_processing section: guide calling (screens with guide counts), screen summary, QC table,
    cells per perturbation, phases."""
    dpi = int(params["figure_dpi"])
    max_shown = int(params["data_processing"]["max_perturbations_shown"])
    figures = {
        "cells_per_perturbation": cells_per_perturbation_figure(screen_summary, max_shown, dpi),
        "library_size": library_size_figure(processed, dpi),
        "phase_counts": phase_counts_figure(processed, max_shown, dpi),
    }
    tables = [
        ReportTable(
            "qc_steps", "Quality control", qc_summary, "Cells and genes removed by each QC step and what was left."
        ),
        ReportTable("phase_table", "Cells per cell-cycle phase", phase_table(processed)),
        ReportTable(
            "cells_per_perturbation",
            "Cells per perturbation",
            screen_summary,
            "Before QC (cells_raw), after QC (cells_kept) and per split.",
        ),
    ]
    if guide_calls is not None and not guide_calls.empty:
        tables.insert(
            0,
            ReportTable(
                "guide_calls",
                "Guide calling",
                guide_calls.round(3),
                "Per guide: its target, the cells it was called in and the cells labelled by it alone (others "
                "held it with another guide), and its mixture: the background's mean UMIs per cell and the "
                "signal's median UMIs. Cells with no guide above the background and multiplets are dropped "
                "(the first rows of the QC table).",
            ),
        )
    section = make_section(
        PIPELINE,
        "Screen and data processing",
        intro=(
            "The screen after validation, quality control, normalisation (raw counts kept in "
            "layers['counts'], log-normalised X), highly variable genes and cell-cycle scoring."
        ),
        facts={
            **guide_facts(guide_calls, qc_summary),
            **screen_facts(processed, screen_summary, screen, ScreenSchema.from_params(schema).program_key),
        },
        tables=tables,
        figures=figures,
    )
    return section_result(section, figures)


def create_pipeline() -> Pipeline:
    return Pipeline(
        [
            Node(
                report_data_processing,
                inputs=[
                    "processed_screen",
                    "screen_summary",
                    "qc_summary",
                    "guide_calls",
                    "params:reporting",
                    "params:schema",
                    "params:screen",
                ],
                outputs=SECTION.node_outputs(),
                name="report_data_processing",
            )
        ]
    )


SECTION = Section(pipeline=PIPELINE, figures=FIGURES, create_pipeline=create_pipeline)
