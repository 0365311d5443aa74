"""perturbscope's contrastiveVI vs scvi-tools' ContrastiveVI, one run side by side.

Both tools train on the same simulated screen (the same cells, the same
train/validation split, raw counts, latent sizes 10 + 10, hidden 128, one
layer, dropout 0.1, batch size 128, the same number of epochs and KL
warm-up, no early stopping, final weights), then both embeddings are scored
with the same code (``perturbscope.pipelines.contrastive_model.evaluation``):

* program ARI / NMI: Leiden clusters (resolution searched to give as many
  clusters as programs) vs the true program, over perturbed cells that
  responded to a perturbation with an effect; the median over ``--leiden-runs``
  Leiden seeds on the same kNN graph (5; the seed alone moves one
  embedding's ARI by up to ~0.06 here), and the first run alone
  (``program_ari_one_leiden_run``, what earlier tables reported);
* phase leakage: kNN accuracy of the true cell-cycle phase over all perturbed
  cells, in the salient space (lower = better; chance = majority share) and
  in the background space.

Epoch definition: every training target cell once, each paired with a control
cell. scvi-tools' ``ContrastiveDataLoader`` iterates the target loader once
and cycles the control loader, truncating a step to the smaller of the two
batches, so a few targets per pass over the controls are skipped; the table
therefore also reports target cells per second.

Timing: wall seconds per epoch (training + validation pass) and process CPU
seconds per epoch; the scoring done during our run (to find when it reaches
scvi-tools' final ARI) is excluded from our times.

Usage (the bench environment has scvi-tools; install perturbscope there with
``.venv-bench/bin/pip install -e . --no-deps``)::

    .venv-bench/bin/python bench/contrastive_vs_scvi.py            # writes bench/results/contrastive_vs_scvi.{md,csv}
    .venv-bench/bin/python bench/contrastive_vs_scvi.py --n-cells 3000 --n-genes 500 --epochs 20   # smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scanpy as sc
import torch
from sklearn.metrics import adjusted_rand_score

from perturbscope.models import CellData
from perturbscope.pipelines.contrastive_model import nodes
from perturbscope.pipelines.contrastive_model.evaluation import (
    chance_accuracy,
    knn_accuracy,
    leiden_clusters,
    program_scores,
)
from perturbscope.simulation import simulate_screen

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {"perturbation_key": "perturbation", "control_labels": ["control"], "program_key": "program"}


def load_average() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------- data
def pipeline_parameters() -> dict[str, Any]:
    """The contrastive_model parameters of ``conf/base`` (read as YAML: no Kedro in the bench env)."""
    import yaml

    conf = Path(__file__).resolve().parents[1] / "conf" / "base"
    params = yaml.safe_load((conf / "parameters_contrastive_model.yml").read_text())["contrastive_model"]
    shared = yaml.safe_load((conf / "parameters.yml").read_text())["training"]
    return {**params, "training": {**shared, **params["training"]}}  # the shared block, then the model's own


def make_screen(args: argparse.Namespace):
    raw = simulate_screen(
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        n_programs=args.n_programs,
        perturbations_per_program=args.perturbations_per_program,
        n_null_perturbations=2,
        cell_cycle_strength=args.cell_cycle_strength,
        high_expression_share=args.high_expression_share,
        seed=args.seed,
    )
    return raw, processed_like(raw)


def processed_like(raw):
    """What data_processing produces (that package needs Kedro, absent from the bench environment):
    raw counts in layers["counts"], log-normalised X, is_control, a split stratified by perturbation."""
    screen = raw.copy()
    screen.layers["counts"] = screen.X.copy()
    sc.pp.normalize_total(screen, target_sum=1e4)
    sc.pp.log1p(screen)
    labels = screen.obs["perturbation"].astype(str).to_numpy()
    screen.obs["is_control"] = labels == "control"
    screen.obs["phase_original"] = screen.obs["phase"]
    rng = np.random.default_rng(0)
    split = np.full(screen.n_obs, "train", dtype=object)
    for label in sorted(np.unique(labels)):
        members = np.flatnonzero(labels == label)
        n_val = min(int(round(0.1 * members.size)), members.size - 1)
        split[rng.choice(members, size=n_val, replace=False)] = "validation"
    screen.obs["split"] = pd.Categorical(split, categories=["train", "validation"])
    return screen


class Scorer:
    """The quality scores of a (salient, background) embedding of the screen."""

    def __init__(self, screen, seed: int = 0, leiden_runs: int = 5) -> None:
        obs = screen.obs
        self.leiden_runs = leiden_runs
        self.is_target = ~obs["is_control"].to_numpy().astype(bool)
        self.responders = (
            self.is_target & obs["responded"].to_numpy().astype(bool) & (obs["program"] != "none").to_numpy()
        )
        self.programs = obs["program"].astype(str).to_numpy()[self.responders]
        self.phase = obs["phase_original"].astype(str).to_numpy()[self.is_target]
        self.seed = seed

    def ari(self, salient: np.ndarray) -> float:
        return program_scores(salient[self.responders], self.programs, seed=self.seed, leiden_runs=self.leiden_runs)[
            "ari"
        ]

    def all(self, salient: np.ndarray, background: np.ndarray) -> dict[str, float]:
        scores = program_scores(salient[self.responders], self.programs, seed=self.seed, leiden_runs=self.leiden_runs)
        # the first Leiden run alone (what earlier tables reported), without re-running the kNN scores
        single = leiden_clusters(salient[self.responders], n_clusters=len(np.unique(self.programs)), seed=self.seed)
        return {
            "program_ari": scores["ari"],
            "program_ari_one_leiden_run": float(adjusted_rand_score(self.programs, single)),
            "program_nmi": scores["nmi"],
            "program_knn_accuracy": scores["knn_accuracy"],
            "phase_leakage_salient": knn_accuracy(salient[self.is_target], self.phase, seed=self.seed),
            "phase_leakage_background": knn_accuracy(background[self.is_target], self.phase, seed=self.seed),
            "phase_chance": chance_accuracy(self.phase),
        }


# ------------------------------------------------------------------------------- scvi
def run_scvi(screen, args: argparse.Namespace, wasserstein_penalty: float) -> dict[str, Any]:
    import lightning.pytorch as pl
    import scvi

    scvi.settings.seed = args.train_seed
    scvi.settings.verbosity = logging.WARNING
    adata = screen.copy()
    scvi.external.ContrastiveVI.setup_anndata(adata, layer="counts")
    model = scvi.external.ContrastiveVI(
        adata,
        n_hidden=128,
        n_background_latent=10,
        n_salient_latent=10,
        n_layers=1,
        dropout_rate=0.1,
        use_observed_lib_size=True,
        wasserstein_penalty=wasserstein_penalty,
    )
    obs = screen.obs
    is_control = obs["is_control"].to_numpy().astype(bool)
    is_val = (obs["split"] == "validation").to_numpy()
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._wall, self._cpu = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # after the validation pass
            self.wall.append(time.perf_counter() - self._wall)
            self.cpu.append(time.process_time() - self._cpu)

    timer = Timer()
    load_before = load_average()
    start = time.perf_counter()
    extra = {"precision": args.scvi_precision} if args.scvi_precision else {}
    model.train(
        background_indices=np.flatnonzero(is_control).tolist(),
        target_indices=np.flatnonzero(~is_control).tolist(),
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        accelerator="cpu",
        early_stopping=False,
        enable_progress_bar=False,
        check_val_every_n_epoch=1,
        callbacks=[timer],
        datasplitter_kwargs={"external_indexing": [train_idx, val_idx, np.array([], dtype=int)]},
        plan_kwargs={"lr": args.lr_scvi, "n_epochs_kl_warmup": args.kl_warmup},
        **extra,
    )
    total = time.perf_counter() - start
    salient = model.get_latent_representation(adata, representation_kind="salient")
    background = model.get_latent_representation(adata, representation_kind="background")
    history = model.history
    # scvi's validation loss is the mean over control/target *pairs* of both cells' -ELBO terms
    # (+ kl_weight * penalty * W2): half of it is the per-cell -ELBO when the penalty is 0.
    val = history["validation_loss"]["validation_loss"].to_numpy()
    val_elbo = (
        history["reconstruction_loss_validation"]["reconstruction_loss_validation"].to_numpy()
        + history["kl_local_validation"]["kl_local_validation"].to_numpy()
    ) / 2.0
    n_tg_train = int((~is_control & ~is_val).sum())
    n_bg_train = int((is_control & ~is_val).sum())
    return {
        "wall": np.asarray(timer.wall),
        "cpu": np.asarray(timer.cpu),
        "total": total,
        "salient": salient,
        "background": background,
        "val_loss_tool": float(val[-1]),
        "val_neg_elbo": float(val_elbo[-1]),
        "targets_per_epoch": scvi_targets_per_epoch(n_tg_train, n_bg_train, args.batch_size),
        "load": (load_before + load_average()) / 2,
    }


def scvi_targets_per_epoch(n_target: int, n_background: int, batch_size: int) -> int:
    """Targets scvi-tools processes per epoch: each step keeps min(target batch, cycled control batch)."""
    tg = [batch_size] * (n_target // batch_size) + ([n_target % batch_size] if n_target % batch_size else [])
    bg = [batch_size] * (n_background // batch_size) + (
        [n_background % batch_size] if n_background % batch_size else []
    )
    return int(sum(min(t, bg[i % len(bg)]) for i, t in enumerate(tg)))


# ------------------------------------------------------------------------------- ours
def run_ours(screen, args: argparse.Namespace, scorer: Scorer, target_ari: float | None) -> dict[str, Any]:
    # what `kedro run` uses (conf/base), with the knobs both tools share set to the same values
    defaults = pipeline_parameters()
    model_params = {
        **defaults["model"],
        "n_background": 10,
        "n_salient": 10,
        "n_hidden": 128,
        "n_layers": 1,
        "dropout": 0.1,
        "likelihood": "zinb",
        "library": "observed",
    }
    if args.wasserstein_penalty is not None:
        model_params["wasserstein_penalty"] = args.wasserstein_penalty
    if args.decoder is not None:
        model_params["decoder"] = args.decoder
    training = {
        "lr": defaults["training"]["lr"],
        "weight_decay": defaults["training"]["weight_decay"],
        "batch_size": args.batch_size,
        "max_epochs": args.epochs,
        "kl_warmup_epochs": args.kl_warmup,
        "early_stopping": False,
        "restore_best": False,
        "reference_epoch_cells": None,  # the same epochs as scvi-tools at any size
        "progress": False,
        "device": "cpu",
        "precision": args.precision or defaults["training"].get("precision", "float32"),
    }
    if args.lr is not None:
        training["lr"] = args.lr
    data = CellData(screen.layers["counts"])  # for scoring during training (built outside the timing)
    curve: list[dict[str, float]] = []
    cpu_marks: list[float] = []  # process CPU time at each epoch's end, scoring excluded
    eval_cpu = [0.0]

    def callback(epoch: int, history, model) -> None:
        cpu_marks.append(time.process_time() - eval_cpu[0])
        reached = bool(curve) and target_ari is not None and curve[-1]["ari"] >= target_ari
        if reached or ((epoch + 1) % args.eval_every and epoch + 1 != args.epochs):
            return None
        t0, c0 = time.perf_counter(), time.process_time()
        _, salient = model.embed(data)
        curve.append({"epoch": epoch + 1, "train_seconds": float(np.sum(history.seconds)), "ari": scorer.ari(salient)})
        print(
            f"  ours epoch {epoch + 1}: ARI {curve[-1]['ari']:.3f} after {curve[-1]['train_seconds']:.0f} s "
            f"(scoring {time.perf_counter() - t0:.0f} s, load {load_average():.1f})",
            flush=True,
        )
        eval_cpu[0] += time.process_time() - c0
        return None

    load_before = load_average()
    cpu0 = time.process_time()
    start = time.perf_counter()
    model, history = nodes.train_contrastive_model(
        screen, model_params, training, {}, SCHEMA, args.train_seed, callback=callback
    )
    total = time.perf_counter() - start
    cpu = np.diff(np.asarray([cpu0] + cpu_marks))
    background, salient = model.embed(data)
    last = history.iloc[-1]
    val_elbo = float(last["val_reconstruction"] + last["val_kl_background"] + 0.5 * last["val_kl_salient"])
    return {
        "wall": history["seconds"].to_numpy(),
        "cpu": cpu,
        "total": float(history["seconds"].sum()),
        "total_incl_setup_and_scoring": total,
        "salient": salient,
        "background": background,
        "val_loss_tool": float(last["val_loss"]),
        "val_neg_elbo": val_elbo,
        "targets_per_epoch": int((~screen.obs["is_control"] & (screen.obs["split"] == "train")).sum()),
        "curve": curve,
        "load": (load_before + load_average()) / 2,
        "hparams": model.hparams,
        "lr": float(model.metadata["train_config"]["lr"]),
        "precision": model.metadata["precision"],
    }


# ------------------------------------------------------------------------------ table
def summarise(name: str, run: dict[str, Any], scores: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    wall = np.asarray(run["wall"], dtype=float)
    cpu = np.asarray(run["cpu"], dtype=float)
    return {
        "tool": name,
        "epochs": len(wall),
        "s_per_epoch_median": float(np.median(wall)),
        "s_per_epoch_mean": float(np.mean(wall)),
        "cpu_s_per_epoch_median": float(np.median(cpu)) if cpu.size else float("nan"),
        "targets_per_epoch": run["targets_per_epoch"],
        "targets_per_s": run["targets_per_epoch"] / float(np.median(wall)),
        "train_seconds_total": float(run["total"]),
        "val_neg_elbo_per_cell": run["val_neg_elbo"],
        "val_loss_as_reported": run["val_loss_tool"],
        **scores,
        "mean_load_1min": run["load"],
    }


def markdown(table: pd.DataFrame, extra: dict[str, Any], args: argparse.Namespace) -> str:
    ours, scvi_row = table.iloc[0], table.iloc[1]
    fmt = {
        "s_per_epoch_median": "{:.2f}",
        "s_per_epoch_mean": "{:.2f}",
        "cpu_s_per_epoch_median": "{:.2f}",
        "targets_per_s": "{:.0f}",
        "train_seconds_total": "{:.0f}",
        "val_neg_elbo_per_cell": "{:.2f}",
        "val_loss_as_reported": "{:.2f}",
        "program_ari": "{:.3f}",
        "program_nmi": "{:.3f}",
        "program_knn_accuracy": "{:.3f}",
        "program_ari_one_leiden_run": "{:.3f}",
        "phase_leakage_salient": "{:.3f}",
        "phase_leakage_background": "{:.3f}",
        "phase_chance": "{:.3f}",
        "mean_load_1min": "{:.1f}",
        "time_to_scvi_final_ari_s": "{:.0f}",
        "time_to_99pct_scvi_final_ari_s": "{:.0f}",
    }
    lines = ["| | " + " | ".join(table["tool"]) + " |", "|---|" + "---|" * len(table)]
    for column in table.columns[1:]:
        cells = [
            fmt.get(column, "{}").format(v) if isinstance(v, (int, float, np.number)) else str(v) for v in table[column]
        ]
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    speed = scvi_row["s_per_epoch_median"] / ours["s_per_epoch_median"]
    throughput = ours["targets_per_s"] / scvi_row["targets_per_s"]
    cpu_speed = scvi_row["cpu_s_per_epoch_median"] / ours["cpu_s_per_epoch_median"]
    ttt = extra["time_to_scvi_ari"]
    frac = ttt / scvi_row["train_seconds_total"] if ttt is not None else None
    out = [
        f"# perturbscope contrastiveVI vs scvi-tools ContrastiveVI ({extra['date']})",
        "",
        f"Screen: simulated, {args.n_cells} cells x {args.n_genes} genes, {args.n_programs} programs x "
        f"{args.perturbations_per_program} perturbations + 2 null, cell-cycle strength {args.cell_cycle_strength} (log2), "  # noqa: E501
        f"{extra['n_target_train']} training targets / {extra['n_control_train']} training controls, "
        f"screen seed {args.seed}, training seed {args.train_seed} (both tools), "
        f"validation 10%. Both: latent 10 + 10, hidden 128, batch {args.batch_size}, {args.epochs} epochs, "
        f"KL warm-up {args.kl_warmup} epochs, no early stopping. Ours (conf/base settings otherwise): "
        f"lr {extra['ours_lr']:g}, decoder {extra['ours_decoder']}, "
        f"wasserstein_penalty {extra['ours_wasserstein']:g}, matrix products in {extra['ours_precision']} "
        f"(training precision `{extra['ours_precision_setting']}`); scvi-tools (its defaults otherwise): lr {args.lr_scvi:g}, "  # noqa: E501
        f"wasserstein_penalty {args.scvi_wasserstein:g}, Lightning precision {args.scvi_precision or '32-true (default)'}. CPU: {extra['cpu']}, torch threads {torch.get_num_threads()}; "  # noqa: E501
        f"1-minute load average {extra['load_start']:.1f} at the start, {extra['load_end']:.1f} at the end "
        + (
            "(other jobs shared the 2 cores)."
            if max(extra["load_start"], extra["load_end"]) > 2.5
            else "(quiet machine)."
        ),
        "",
        *lines,
        "",
        f"* **Per epoch: ours {speed:.2f}x faster** (median wall s/epoch), {cpu_speed:.2f}x less CPU time; "
        f"per target cell {throughput:.2f}x the throughput.",
        (
            f"* **Time for ours to reach scvi-tools' final program ARI ({scvi_row['program_ari']:.3f}): {ttt:.0f} s** "
            f"(epoch {extra['epoch_to_scvi_ari']}) = {frac:.2f} of scvi-tools' {scvi_row['train_seconds_total']:.0f} s."
            if ttt is not None
            else f"* Ours did not reach scvi-tools' final program ARI ({scvi_row['program_ari']:.3f}) within {args.epochs} epochs."  # noqa: E501
        ),
        (
            f"* Within 1% of it ({0.99 * scvi_row['program_ari']:.3f}): {extra['time_to_99pct_scvi_ari']:.0f} s "
            f"(epoch {extra['epoch_to_99pct_scvi_ari']}) = {extra['time_to_99pct_scvi_ari'] / scvi_row['train_seconds_total']:.2f} "  # noqa: E501
            "of scvi-tools' time."
            if extra["time_to_99pct_scvi_ari"] is not None
            else "* Ours did not come within 1% of scvi-tools' final program ARI."
        ),
        f"* Final program ARI (median of {args.leiden_runs} Leiden runs): ours {ours['program_ari']:.3f} vs "
        f"{scvi_row['program_ari']:.3f}; one Leiden run (seed {args.seed}): ours {ours['program_ari_one_leiden_run']:.3f} vs "  # noqa: E501
        f"{scvi_row['program_ari_one_leiden_run']:.3f}; phase leakage in the "
        f"salient space: ours {ours['phase_leakage_salient']:.3f} vs {scvi_row['phase_leakage_salient']:.3f} "
        f"(chance {ours['phase_chance']:.3f}).",
        "* `val_neg_elbo_per_cell`: reconstruction + KL per cell on the same validation cells (controls and targets "
        "weighted equally; without the Wasserstein term), comparable across tools. `val_loss_as_reported`: each "
        "tool's own validation loss (scvi-tools sums a control/target pair, i.e. ~2x per cell).",
        "* ARI curve of ours (epoch: ARI @ cumulative training s): "
        + ", ".join(f"{c['epoch']}: {c['ari']:.3f} @ {c['train_seconds']:.0f} s" for c in extra["curve"]),
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-cells", type=int, default=12000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--n-programs", type=int, default=5)
    parser.add_argument("--perturbations-per-program", type=int, default=3)
    parser.add_argument("--cell-cycle-strength", type=float, default=2.5)
    parser.add_argument("--high-expression-share", type=float, default=0.6)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--kl-warmup", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="ours; default: the pipeline's parameters")
    parser.add_argument("--lr-scvi", type=float, default=1e-3)
    parser.add_argument("--wasserstein-penalty", type=float, default=None, help="ours; default: conf/base's")
    parser.add_argument("--decoder", choices=["joint", "additive"], default=None, help="ours; default: conf/base's")
    parser.add_argument("--scvi-wasserstein", type=float, default=0.0, help="scvi-tools' default is 0")
    parser.add_argument(
        "--precision", choices=["auto", "float32", "bfloat16"], default=None, help="ours; default: conf/base's"
    )
    parser.add_argument(
        "--scvi-precision",
        default=None,
        help="Lightning precision for scvi-tools, e.g. bf16-mixed (default: its 32-true)",
    )
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--leiden-runs", type=int, default=5, help="ARI = median over this many Leiden seeds")
    parser.add_argument("--seed", type=int, default=0, help="simulated screen (and scoring) seed")
    parser.add_argument("--train-seed", type=int, default=None, help="both tools' training seed (default: --seed)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for both tools (default: torch's, i.e. the cores)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="contrastive_vs_scvi")
    args = parser.parse_args(argv)
    if args.train_seed is None:
        args.train_seed = args.seed
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("scvi").setLevel(logging.WARNING)

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = load_average()
    raw, screen = make_screen(args)
    scorer = Scorer(screen, args.seed, args.leiden_runs)
    obs = screen.obs
    print(
        f"screen {screen.shape}, zeros {1 - screen.layers['counts'].nnz / np.prod(screen.shape):.1%}, "
        f"load {load_start:.1f}",
        flush=True,
    )

    print("scvi-tools ContrastiveVI ...", flush=True)
    scvi_run = run_scvi(screen, args, args.scvi_wasserstein)
    scvi_scores = scorer.all(scvi_run["salient"], scvi_run["background"])
    print(
        f"  {np.median(scvi_run['wall']):.2f} s/epoch, {scvi_run['total']:.0f} s, {json.dumps(scvi_scores)}", flush=True
    )

    print("perturbscope ContrastiveVAE ...", flush=True)
    ours_run = run_ours(screen, args, scorer, scvi_scores["program_ari"])
    ours_scores = scorer.all(ours_run["salient"], ours_run["background"])
    print(
        f"  {np.median(ours_run['wall']):.2f} s/epoch, {ours_run['total']:.0f} s, {json.dumps(ours_scores)}", flush=True
    )

    reached = [c for c in ours_run["curve"] if c["ari"] >= scvi_scores["program_ari"]]
    # both tools end on the screen's separability ceiling, where the ARI moves by ~0.01 from one
    # epoch to the next: also report when ours first comes within 1% of scvi-tools' final ARI
    near = [c for c in ours_run["curve"] if c["ari"] >= 0.99 * scvi_scores["program_ari"]]
    table = pd.DataFrame(
        [
            summarise("perturbscope", ours_run, ours_scores, args),
            summarise("scvi-tools", scvi_run, scvi_scores, args),
        ]
    )
    extra = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "load_start": load_start,
        "load_end": load_average(),
        "time_to_scvi_ari": reached[0]["train_seconds"] if reached else None,
        "epoch_to_scvi_ari": reached[0]["epoch"] if reached else None,
        "time_to_99pct_scvi_ari": near[0]["train_seconds"] if near else None,
        "epoch_to_99pct_scvi_ari": near[0]["epoch"] if near else None,
        "curve": ours_run["curve"],
        "ours_lr": ours_run["lr"],
        "ours_wasserstein": ours_run["hparams"]["wasserstein_penalty"],
        "ours_decoder": ours_run["hparams"]["decoder"],
        "ours_precision": ours_run["precision"],
        "ours_precision_setting": args.precision or pipeline_parameters()["training"].get("precision", "float32"),
        "n_target_train": int((~obs["is_control"] & (obs["split"] == "train")).sum()),
        "n_control_train": int((obs["is_control"] & (obs["split"] == "train")).sum()),
    }
    table["time_to_scvi_final_ari_s"] = [extra["time_to_scvi_ari"], float("nan")]
    table["time_to_99pct_scvi_final_ari_s"] = [extra["time_to_99pct_scvi_ari"], float("nan")]
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / f"{args.name}.csv", index=False)
    text = markdown(table, extra, args)
    (args.out / f"{args.name}.md").write_text(text)
    pd.DataFrame(ours_run["curve"]).to_csv(args.out / f"{args.name}_ari_curve.csv", index=False)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
