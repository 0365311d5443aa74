"""Guide calling on simulated Cell Ranger output: ours next to crispat, pertpy, the max-guide rule and the best
global UMI threshold, on the same files; and the knockdown check's separation of working and failed guides.

For each seed a screen is simulated with guides (:func:`perturbscope.simulation.simulate_screen`,
``guides_per_target=2``: capture efficiencies several-fold apart, cell depths that differ, ambient UMIs spread
over the guides by their abundance in the pool, 3 % capture failures, 4 % multiplets, 15 % failed guides) and
written as a Cell Ranger ``filtered_feature_bc_matrix.h5`` plus ``feature_reference.csv``. Every method reads
the guide counts of that file. Scores, against the simulated truth:

* precision: cells whose called guide set is exactly their true set, among the cells a method assigns (one
  guide, the design's number);
* recall: cells whose called guide set is exactly their true set (multiplets: both guides), among all cells;
* multiplets caught: true multiplets called with more guides than the design;
* seconds per 100,000 cells (guide calling only, one process, 2 cores).

The knockdown check runs our data_processing + perturbation_effects nodes on the same screen and reports the
AUROC of the remaining target expression for working (simulated knockdown) versus failed guides.

crispat 0.9.11 (``ga_poisson_gauss``, Replogle's mixture) and pertpy 1.0.3 (``GuideAssignment.assign_mixture_model``)
run in ``.venv-bench`` (``python -m venv .venv-bench && .venv-bench/bin/pip install -r requirements.lock
crispat==0.9.11 pertpy==1.0.3 statsmodels==0.14.6``): they bring Pyro / NumPyro, which the project's lock does
not carry, and pertpy 1.0.3 imports ``statsmodels.sandbox.stats.multicomp.multipletests``, gone in statsmodels
0.15. Without that environment their rows say so.

Usage::

    .venv/bin/python bench/guide_calling.py --seeds 0 1 2 --n-cells 20000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"

sys.path.insert(0, str(ROOT / "src"))

from _tables import markdown  # noqa: E402

from perturbscope import guides  # noqa: E402
from perturbscope.simulation import simulate_screen, write_cellranger_h5  # noqa: E402

CONTROL = "non-targeting"
KNOCKDOWN = "knockdown check (AUROC working vs failed guides)"


def _sets_from_called(called: sp.csr_matrix, names: np.ndarray) -> list[frozenset[str]]:
    called = sp.csr_matrix(called)
    return [frozenset(names[called.indices[called.indptr[i] : called.indptr[i + 1]]]) for i in range(called.shape[0])]


def score(called_sets: list[frozenset[str]], truth: list[frozenset[str]], multiplet: np.ndarray, design: int = 1):
    sizes = np.array([len(s) for s in called_sets])
    right = np.array([c == t for c, t in zip(called_sets, truth, strict=True)])
    assigned = (sizes >= 1) & (sizes <= design)
    return {
        "precision": float(right[assigned].mean()) if assigned.any() else float("nan"),
        "recall": float(right.mean()),
        "assigned": float(assigned.mean()),
        "multiplets_caught": float((sizes[multiplet] > design).mean()) if multiplet.any() else float("nan"),
    }


def ours(counts: sp.csr_matrix, names: np.ndarray) -> list[frozenset[str]]:
    mixtures = guides.fit_guide_mixtures(counts, names)
    return _sets_from_called(guides.call_guides(counts, mixtures, names), names)


def max_guide(counts: sp.csr_matrix, names: np.ndarray) -> list[frozenset[str]]:
    dense_max = np.asarray(counts.argmax(axis=1)).ravel()
    has = np.diff(counts.indptr) > 0
    return [frozenset([names[j]]) if h else frozenset() for j, h in zip(dense_max, has, strict=True)]


def threshold(counts: sp.csr_matrix, names: np.ndarray, t: int) -> list[frozenset[str]]:
    return _sets_from_called(counts >= t, names)


def best_threshold(counts, names, truth, multiplet) -> tuple[int, list[frozenset[str]]]:
    """The single global UMI threshold with the best accuracy (cells whose called set is exactly right) —
    chosen with the truth, an upper bound of what a hand-picked threshold does."""
    best = (None, -1.0, None)
    for t in range(1, 61):
        sets = threshold(counts, names, t)
        accuracy = score(sets, truth, multiplet)["recall"]
        if accuracy > best[1]:
            best = (t, accuracy, sets)
    return best[0], best[2]


PEER_SCRIPT = r"""
import json, sys, time, tempfile, os
import anndata as ad, numpy as np, pandas as pd, scipy.sparse as sp
method, h5ad, out = sys.argv[1], sys.argv[2], sys.argv[3]
adata = ad.read_h5ad(h5ad)
start = time.perf_counter()
if method == "crispat":
    import crispat
    folder = tempfile.mkdtemp() + "/"
    adata.obs["batch"] = 1
    adata.write_h5ad(folder + "grna.h5ad")
    crispat.ga_poisson_gauss(folder + "grna.h5ad", folder + "pg/")
    table = pd.read_csv(folder + "pg/assignments.csv")
    pairs = list(zip(table["cell"].astype(str), table["gRNA"].astype(str)))
else:
    import pertpy as pt
    ga = pt.pp.GuideAssignment()
    ga.assign_mixture_model(adata)
    assigned = adata.obs["assigned_guide"].astype(str)  # "negative": none; "multiple": more than 5 guides
    pairs = []
    for cell, value in assigned.items():
        if value == "multiple":
            pairs += [(cell, f"multiple-{i}") for i in range(6)]
        elif value not in ("negative", "nan", "None", ""):
            pairs += [(cell, g) for g in value.split("+")]
json.dump({"seconds": time.perf_counter() - start, "pairs": pairs}, open(out, "w"))
"""


def peer(method: str, counts: sp.csr_matrix, names: np.ndarray, cells: np.ndarray, folder: Path):
    if not BENCH_PYTHON.exists():
        return None, None, f"needs {BENCH_PYTHON.relative_to(ROOT)} (see the module docstring)"
    import anndata as ad

    h5ad = folder / "guides.h5ad"
    ad.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=names)).write_h5ad(h5ad)
    script = folder / "peer.py"
    script.write_text(PEER_SCRIPT)
    out = folder / f"{method}.json"
    done = subprocess.run(
        [str(BENCH_PYTHON), str(script), method, str(h5ad), str(out)], capture_output=True, text=True, timeout=7200
    )
    if done.returncode != 0:
        return None, None, f"failed: {(done.stderr or done.stdout)[-300:]}"
    result = json.loads(out.read_text())
    by_cell: dict[str, set[str]] = {}
    for cell, guide in result["pairs"]:
        by_cell.setdefault(cell, set()).add(guide)
    return [frozenset(by_cell.get(c, ())) for c in cells], result["seconds"], ""


def knockdown_auroc(adata, screen_guides: pd.DataFrame) -> float:
    """AUROC of 1 - remaining expression (working guides high) over the measurable targeting guides, with the
    guides called by our method (the pipeline's nodes)."""
    from sklearn.metrics import roc_auc_score

    from perturbscope.pipelines.data_processing import nodes as dp
    from perturbscope.pipelines.perturbation_effects import nodes as pe

    schema = {"control_labels": [CONTROL], "modality": "CRISPRi"}
    guided, _, _ = dp.call_guides(adata, {}, schema)
    validated = dp.validate_screen(guided, schema, "bench")
    qc_screen, _ = dp.quality_control(validated, {})
    normalised = dp.normalise(qc_screen, {})
    phased = dp.score_cell_cycle(normalised, {}, 0)
    hvg = dp.select_highly_variable_genes(phased, {}, None, "+")
    processed = dp.label_cells(hvg, schema, {}, 0).to_memory()
    table = pe.check_knockdown(processed, {}, schema)
    truth = screen_guides.set_index("guide")
    table = table[table["remaining"].notna() & table["guide"].isin(truth.index)]
    failed = truth.loc[table["guide"], "failed"].to_numpy()
    if failed.all() or not failed.any():
        return float("nan")
    return float(roc_auc_score(~failed, 1.0 - table["remaining"].to_numpy()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--peers", nargs="*", default=["crispat", "pertpy"])
    parser.add_argument("--no-knockdown", action="store_true", help="skip the knockdown check (peers-only runs)")
    parser.add_argument("--tag", default="", help="suffix of the result files (guide_calling<tag>.md / .csv)")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        adata = simulate_screen(
            n_cells=args.n_cells, n_genes=args.n_genes, n_programs=5, perturbations_per_program=4,
            guides_per_target=2, seed=seed,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            reference = folder / "feature_reference.csv"
            path = write_cellranger_h5(adata, folder / "filtered_feature_bc_matrix.h5", reference)
            screen = guides.read_screen(path, folder / "feature_reference.csv")
            counts, names = guides.guide_counts(screen), np.asarray(screen.uns["guides"]["guide"], dtype=object)
            truth = [frozenset(s.split(";")) if s else frozenset() for s in adata.obs["true_guides"]]
            multiplet = adata.obs["true_multiplet"].to_numpy()
            scale = 1e5 / counts.shape[0]
            start = time.perf_counter()
            sets = ours(counts, names)
            rows.append({"seed": seed, "method": "perturbscope (ours)", **score(sets, truth, multiplet),
                         "s_per_100k_cells": (time.perf_counter() - start) * scale})  # fmt: skip
            start = time.perf_counter()
            rows.append({"seed": seed, "method": "max guide", **score(max_guide(counts, names), truth, multiplet),
                         "s_per_100k_cells": (time.perf_counter() - start) * scale})  # fmt: skip
            t, sets = best_threshold(counts, names, truth, multiplet)
            rows.append({"seed": seed, "method": f"best global threshold (>= {t} UMIs)",
                         **score(sets, truth, multiplet), "s_per_100k_cells": float("nan")})  # fmt: skip
            for method in args.peers:
                sets, seconds, note = peer(method, counts, names, adata.obs_names.to_numpy(), folder)
                row = {"seed": seed, "method": f"{method} mixture"}
                if sets is None:
                    rows.append({**row, "note": note})
                else:
                    rows.append({**row, **score(sets, truth, multiplet), "s_per_100k_cells": seconds * scale})
            if not args.no_knockdown:
                auroc = knockdown_auroc(screen.copy(), adata.uns["guide_truth"].reset_index())
                rows.append({"seed": seed, "method": KNOCKDOWN, "auroc": auroc})
        print(pd.DataFrame([r for r in rows if r["seed"] == seed]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / f"guide_calling{args.tag}.csv", index=False)
    calls = table[table["method"] != KNOCKDOWN]
    summary = calls.groupby("method", sort=False).agg(
        precision=("precision", "mean"),
        recall=("recall", "mean"),
        multiplets_caught=("multiplets_caught", "mean"),
        s_per_100k_cells=("s_per_100k_cells", "mean"),
        seeds=("seed", "nunique"),
    )
    auroc = table.loc[table["method"] == KNOCKDOWN, "auroc"] if "auroc" in table else pd.Series(dtype=float)
    lines = [
        "# Guide calling on simulated Cell Ranger output (`bench/guide_calling.py`)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {args.n_cells:,} cells x {args.n_genes:,} genes, 20 targets x 2 "
        "guides + 4 non-targeting, seeds " + ", ".join(map(str, args.seeds)) + "; 2-core CPU. Means over seeds "
        f"(per seed: guide_calling{args.tag}.csv). The best global threshold is chosen with the truth (an upper "
        "bound). Peers at their defaults.",
        "",
        markdown(summary, index=True),
    ]
    if len(auroc):
        lines += [
            "",
            "Knockdown check: AUROC of the remaining target expression, working vs failed guides: "
            + ", ".join(f"{v:.3f}" for v in auroc)
            + f" (seeds {', '.join(map(str, args.seeds))}).",
        ]
    notes = table.dropna(subset=["note"]) if "note" in table else pd.DataFrame()
    if len(notes):
        first = notes.drop_duplicates("method").itertuples()
        lines += ["", "Not run: " + "; ".join(f"{r.method}: {r.note}" for r in first)]
    (RESULTS / f"guide_calling{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
