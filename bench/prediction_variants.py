"""cVAE variants vs the baselines on the demo screen's held-out doubles (and cells).

Runs the perturbation_prediction nodes directly (same code as the pipeline) on the
latest processed screen for a few model / training variants and seeds, and writes
``bench/results/prediction_variants.csv`` (one row per variant, seed, split, method)
and ``bench/results/prediction_variants.md`` (mean ± sd over seeds; a seed moves the split,
the reference controls, the initialisation and the generation draws).

    .venv/bin/kedro run --pipelines data_processing        # once, for processed_screen
    .venv/bin/python bench/prediction_variants.py [--seeds 0 1 2] [--splits held_out_perturbations]
        [--variants "default (NB)" Gaussian] [--name prediction_variants]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import anndata as ad
import pandas as pd
import torch
import yaml
from _tables import markdown  # bench/ is on sys.path when a bench runs as a script

from perturbscope.pipelines.perturbation_prediction import nodes

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "conf/base/parameters_perturbation_prediction.yml").read_text())[
    "perturbation_prediction"
]
SHARED_TRAINING = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())["training"]

VARIANTS: dict[str, dict] = {
    "default (NB)": {},
    "Gaussian": {"model": {"likelihood": "gaussian"}},
    "NB, shared reference": {"split": {"reference_control_fraction": 0.0}},
    "Gaussian, shared reference": {"model": {"likelihood": "gaussian"}, "split": {"reference_control_fraction": 0.0}},
    "NB, no warm-up": {"training": {"kl_warmup_epochs": 0}},
    "NB, linear shift only": {"model": {"n_condition_embedding": 0}},
    "NB, embedding only": {"model": {"condition_shift": False}},
    "NB, adversary 1": {"model": {"adversary_weight": 1.0}},
}
SCORES = [
    "pearson_delta",
    "pearson_delta_top_de",
    "pearson_delta_vs_perturbed_mean",
    "jaccard_top50",
    "mse",
    "direction_accuracy_top_de",
    "energy_distance",
]


def latest_processed(screen: str) -> ad.AnnData:
    folder = ROOT / "data" / "03_primary" / screen / "processed_screen.h5ad"
    version = sorted(folder.iterdir())[-1]
    return ad.read_h5ad(version / "processed_screen.h5ad")


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screen", default="norman2019_subset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--splits", nargs="+", default=["held_out_perturbations"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="prediction_variants", help="output name in bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    screen = latest_processed(args.screen)
    pca = nodes.fit_expression_pca(screen, PARAMS["expression_pca"]["n_pcs"])
    rows = []
    for name in args.variants:
        for seed in args.seeds:
            for split_name in args.splits:
                params = merge(PARAMS, VARIANTS[name])
                split_params = merge(PARAMS["splits"][split_name], VARIANTS[name].get("split", {}))
                training = {**params["training"], "progress": False}
                start = time.perf_counter()
                # the one seed moves the split (held-out cells, reference controls), the model and the draws
                split = nodes.make_prediction_split(screen, split_params, {"double_separator": "+"}, seed)
                model, history = nodes.train_cvae(
                    screen, split, params["model"], training, SHARED_TRAINING, {"double_separator": "+"}, seed
                )
                cvae = nodes.predict_cvae(model, screen, split, params["generation"], seed)
                base = nodes.predict_baselines(screen, split, params["generation"], {"double_separator": "+"})
                table = nodes.evaluate_predictions(screen, split, cvae, base, pca, params["evaluation"], seed)
                seconds = time.perf_counter() - start
                means = table.groupby("method")[SCORES].mean()
                for method, values in means.iterrows():
                    rows.append(
                        {
                            "variant": name,
                            "seed": seed,
                            "split": split_name,
                            "method": method,
                            "epochs": len(history),
                            "seconds": round(seconds, 1),
                            **values.to_dict(),
                        }
                    )
                print(json.dumps({"variant": name, "seed": seed, "split": split_name, "seconds": round(seconds)}))
                print(means[["pearson_delta", "mse", "energy_distance"]].round(3).to_string(), flush=True)
    out = pd.DataFrame(rows)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out.to_csv(results / f"{args.name}.csv", index=False)
    grouped = out.groupby(["split", "variant", "method"], sort=False)[SCORES]
    mean, sd = grouped.mean(), grouped.std()
    summary = mean.copy().astype(object)
    for col in SCORES:
        summary[col] = [f"{m:.3f} ± {s:.3f}" if pd.notna(s) else f"{m:.3f}" for m, s in zip(mean[col], sd[col])]
    (results / f"{args.name}.md").write_text(
        f"# cVAE variants on {args.screen}: mean ± sd over seeds {args.seeds} "
        "(of the per-run means over test perturbations)\n\n" + markdown(summary.reset_index()) + "\n"
    )


if __name__ == "__main__":
    main()
