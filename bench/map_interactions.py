"""The perturbation map and the genetic-interaction calls against planted truth, over several simulated screens.

For each seed a screen is simulated (:func:`perturbscope.simulation.simulate_screen`): ``--programs`` programs
of ``--per-program`` perturbations each, 2 null perturbations and ``--doubles`` doubles with planted
interactions (``interaction_classes=1``: additive, synergy, buffering, epistasis, neomorphic in turn; A and B
from different programs). The data_processing nodes and the perturbation_effects nodes run on it as in
``kedro run`` (the pseudobulk profile only: the salient and factor profiles need the trained models, which
``tests/test_end_to_end.py`` covers). Scores:

* ``ari``: the map summary's ``ari_vs_program``, the adjusted Rand index of the clusters of the perturbations
  the effect test found an effect for against their planted programs;
* ``nulls_apart``: null perturbations in no program's cluster;
* ``interactions_right``: doubles called with their planted class, and per class;
* ``synergy>additive>buffering``: every synergy double's fitted magnitude above every additive one's, and
  every additive one's above every buffering one's.

Usage::

    .venv/bin/python bench/map_interactions.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "src"))

from _tables import markdown  # noqa: E402

from perturbscope.pipelines.data_processing import nodes as dp  # noqa: E402
from perturbscope.pipelines.perturbation_effects import nodes as pe  # noqa: E402
from perturbscope.pipelines.perturbation_effects import profiles  # noqa: E402
from perturbscope.simulation import simulate_screen  # noqa: E402

SCHEMA = {"program_key": "program"}


def run(seed: int, args: argparse.Namespace) -> dict:
    raw = simulate_screen(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_programs=args.programs,
        perturbations_per_program=args.per_program,
        n_doubles=args.doubles,
        interaction_classes=1,
        seed=seed,
    )
    screen = dp.validate_screen(raw, SCHEMA, "bench")
    screen, _ = dp.quality_control(screen, {})
    screen = dp.normalise(screen, {})
    screen = dp.score_cell_cycle(screen, {}, 0)
    screen = dp.select_highly_variable_genes(screen, {}, None, "+")
    screen = dp.label_cells(screen, SCHEMA, {}, 0).to_memory()
    start = time.perf_counter()
    tests = pe.run_effect_tests(screen, {}, 0)
    found, n_cells = pe.compute_profiles(screen, None, None, None, {})
    clusters, summary = pe.cluster_perturbations(found, n_cells, tests, screen, {}, SCHEMA)
    map_seconds = time.perf_counter() - start
    start = time.perf_counter()
    table = pe.call_interactions(screen, {}, {}, seed).set_index("double")
    gi_seconds = time.perf_counter() - start

    truth = raw.uns["perturbation_truth"]
    pseudobulk = clusters[clusters["profile"] == "pseudobulk"].set_index("perturbation")
    nulls = [p for p in pseudobulk.index if str(truth.loc[p, "program"]) == "none"]
    planted = truth["interaction"][truth["interaction"] != ""]
    called = table["interaction"].reindex(planted.index)
    row = {
        "seed": seed,
        "ari": float(summary.loc[summary["profile"] == "pseudobulk", "ari_vs_program"].iloc[0]),
        "n_clusters": int(summary.loc[summary["profile"] == "pseudobulk", "n_clusters"].iloc[0]),
        "nulls_apart": f"{sum(pseudobulk.loc[n, 'cluster'] == profiles.NO_EFFECT for n in nulls)}/{len(nulls)}",
        "interactions_right": f"{int((called == planted).sum())}/{len(planted)}",
        "map_s": map_seconds,
        "interactions_s": gi_seconds,
    }
    for kind in sorted(set(planted)):
        members = planted[planted == kind].index
        row[kind] = f"{int((called[members] == kind).sum())}/{len(members)}"
    magnitude = table["magnitude"].reindex(planted.index)
    by_class = {kind: magnitude[planted == kind] for kind in ("synergy", "additive", "buffering")}
    row["magnitudes"] = ", ".join(f"{k} {v.min():.2f}-{v.max():.2f}" for k, v in by_class.items() if len(v))
    synergy, additive, buffering = by_class["synergy"], by_class["additive"], by_class["buffering"]
    row["synergy>additive>buffering"] = bool(synergy.min() > additive.max() and additive.min() > buffering.max())
    wrong = planted[called != planted]
    row["misses"] = "; ".join(f"{d}: {planted[d]} called {called[d]}" for d in wrong.index)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-cells", type=int, default=12_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--programs", type=int, default=5)
    parser.add_argument("--per-program", type=int, default=4)
    parser.add_argument("--doubles", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        rows.append(run(seed, args))
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / "map_interactions.csv", index=False)
    lines = [
        "# The perturbation map and genetic interactions vs planted truth (`bench/map_interactions.py`)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {args.n_cells:,} cells x {args.n_genes:,} genes, "
        f"{args.programs} programs x {args.per_program} perturbations + 2 null ones, {args.doubles} planted doubles "
        "(additive, synergy, buffering, epistasis, neomorphic in turn); conf/base defaults; pseudobulk profiles; "
        "one screen per seed; 2-core CPU.",
        "",
        markdown(table),
    ]
    (RESULTS / "map_interactions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if np.isnan(table["ari"]).any():
        raise SystemExit("an ARI is missing")


if __name__ == "__main__":
    main()
