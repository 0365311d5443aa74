"""Repeated training seeds of our contrastiveVI on the escape benchmark's screens (one run per call).

The screens, the processing and the scores are those of ``bench/escape_vs_scvi.py`` (``make_screen``,
``score``); ours is trained as ``kedro run`` would (conf/base) with one torch thread, so two calls can
run side by side on 2 cores. ``--loadings free`` trains with unconstrained salient loadings (the default
before unit loadings). Prints one JSON line; ``bench/results/escape_seeds.md`` collects them.

Usage (bench environment)::

    .venv-bench/bin/python bench/escape_seeds.py --penetrance 0.8 --screen-seed 2 --train-seed 1 --loadings free
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import escape_vs_scvi as bench
import torch

from perturbscope.models.model import ContrastiveVI
from perturbscope.pipelines.contrastive_model import nodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--penetrance", type=float, required=True)
    parser.add_argument("--screen-seed", type=int, required=True, help="escape_vs_scvi: 0, 1, 2 for 0.6, 0.7, 0.8")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--loadings", choices=["unit", "shared", "free"], default="unit")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    raw, screen = bench.make_screen(
        args.penetrance, seed=args.screen_seed, n_cells=12000, library_size=8000.0, high_expression_share=0.4
    )
    params = bench._yaml("parameters_contrastive_model.yml")["contrastive_model"]
    training = {**params["training"], "progress": False, "num_threads": args.threads}
    model_params = {**params["model"], "salient_loadings": args.loadings}
    start = time.perf_counter()
    model, history = nodes.train_contrastive_model(
        screen, model_params, training, bench._yaml("parameters.yml")["training"], bench.SCHEMA, args.train_seed
    )
    seconds = time.perf_counter() - start
    embedded = ContrastiveVI(model).embed(screen)
    mixture = nodes.fit_escape_mixture(embedded, params["escape"], args.train_seed)
    calls = nodes.call_perturbed_cells(embedded, mixture, params["escape"])
    run = {
        "salient": embedded.obsm["X_salient"],
        "probability": calls["perturbed_probability"].reindex(embedded.obs_names).to_numpy(),
        "epochs": len(history),
        "seconds": seconds,
    }
    row = {
        "penetrance": args.penetrance,
        "screen_seed": args.screen_seed,
        "train_seed": args.train_seed,
        "loadings": args.loadings,
        "threads": args.threads,
        **bench.score(raw, screen, run),
    }
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
