"""Training throughput of the three models on a GPU: seconds per epoch, cells per second, peak GPU memory.

Run by ``bench/gpu.sh`` (after the GPU tests). Needs torch, numpy and scipy only (the GPU machine has no
anndata, scanpy, Kedro or MLflow): the screens are synthetic NB counts made here, the models and the one
training loop come from :mod:`perturbscope.models`.

Modes::

    full   34,000 x 2,000 (Norman size) and 200,000 x 2,000 resident, 2,000,000 x 2,000 streamed;
           float32 and bfloat16; batch 128 (the default) and 1,024 / 4,096       (<= 8 minutes, one H200)
    quick  34,000 x 2,000 only, batch 128 and 1,024                            (<= 2 minutes)
    smoke  2,000 x 200 on whatever device there is (the CPU in `make test`)     (seconds)

Each row: one model, screen, precision, batch size and (optionally) torch.compile; epoch 1 warms up
(kernels, allocator, compilation) and the reported epoch is the median of the following ones. The
table goes to ``--output`` (``bench/results/gpu.md`` by default on a CUDA machine) with the targets of
issue 28 beside the rows they concern.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from perturbscope.models import (  # noqa: E402
    CellData,
    ConditionalVAE,
    ContrastiveVAE,
    LinearVAE,
    MinibatchSampler,
    PairedSampler,
    StreamingCellData,
    TrainConfig,
    fit,
)

BLOCK = 16_384


@dataclass(frozen=True)
class Case:
    model: str
    n_cells: int
    n_genes: int
    precision: str
    batch_size: int
    streamed: bool = False
    compile: bool = False
    epochs: int = 3


_GENERATOR_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synthetic_block(n_cells: int, n_genes: int, seed: int) -> sp.csr_matrix:
    """NB counts (gamma-Poisson) with log-normal gene means and library sizes: ~85 % zeros, like a
    2,000-gene highly-variable panel. Drawn with torch on the GPU when there is one (seconds, not minutes,
    for 200,000 cells)."""
    generator = torch.Generator(device=_GENERATOR_DEVICE).manual_seed(seed)
    gene_mean = torch.as_tensor(np.exp(np.random.default_rng(7).normal(-1.2, 1.3, n_genes)), dtype=torch.float32)
    gene_mean = gene_mean.to(_GENERATOR_DEVICE)
    library = torch.exp(0.4 * torch.randn(n_cells, 1, generator=generator, device=_GENERATOR_DEVICE))
    mu = library * gene_mean[None, :]
    rate = torch._standard_gamma(torch.full_like(mu, 2.0), generator=generator) * (mu / 2.0)
    counts = torch.poisson(rate, generator=generator).cpu().numpy()
    return sp.csr_matrix(counts)


_CACHE: dict[tuple[int, int], sp.csr_matrix] = {}


def synthetic(n_cells: int, n_genes: int) -> sp.csr_matrix:
    """A resident screen, made once per size."""
    if (n_cells, n_genes) not in _CACHE:
        _CACHE[(n_cells, n_genes)] = sp.vstack(
            [synthetic_block(min(BLOCK, n_cells - s), n_genes, seed=s // BLOCK) for s in range(0, n_cells, BLOCK)],
            format="csr",
        )
    return _CACHE[(n_cells, n_genes)]


class BlockPool:
    """``read_rows`` of a screen too large to make: 8 distinct blocks, repeated (a file cache's worth)."""

    _pools: dict[int, list[sp.csr_matrix]] = {}

    def __init__(self, n_genes: int, n_blocks: int = 8) -> None:
        if n_genes not in self._pools:
            self._pools[n_genes] = [synthetic_block(BLOCK, n_genes, seed=100 + b) for b in range(n_blocks)]
        self.blocks = self._pools[n_genes]

    def __call__(self, start: int, stop: int) -> sp.csr_matrix:
        block = self.blocks[(start // BLOCK) % len(self.blocks)]
        offset = start % BLOCK
        return block[offset : offset + (stop - start)]


def _model_and_samplers(case: Case, device: torch.device) -> tuple[torch.nn.Module, object]:
    n, g = case.n_cells, case.n_genes
    if case.streamed:
        data = StreamingCellData(BlockPool(g), n, g, device=device, block_size=BLOCK)
        obs = None
    else:
        counts = synthetic(n, g)
        obs = None
    if case.model == "cvae":
        model = ConditionalVAE(g, n_conditions=20)
        model.metadata["condition_genes"] = [f"G{i}" for i in range(20)]
        labels = [""] * (n // 2) + [f"G{i % 20}" for i in range(n - n // 2)]
        obs = {"condition": model.encode_conditions(labels)}
        if case.streamed:
            data = StreamingCellData(BlockPool(g), n, g, obs=obs, device=device, block_size=BLOCK)
    if not case.streamed:
        data = CellData(counts, obs=obs, device=device)
    if case.model == "contrastive":
        model = ContrastiveVAE(g)
        sampler = PairedSampler(data, np.arange(n // 2), np.arange(n // 2, n), batch_size=case.batch_size)
        cells_per_epoch = 2 * (n - n // 2)  # every target with a paired control
    else:
        model = LinearVAE(g) if case.model == "linear" else model
        sampler = MinibatchSampler(data, np.arange(n), batch_size=case.batch_size)
        cells_per_epoch = n
    return model, sampler, cells_per_epoch


def run_case(case: Case, device: torch.device) -> dict[str, object]:
    torch.manual_seed(0)
    model, sampler, cells = _model_and_samplers(case, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    config = TrainConfig(
        max_epochs=case.epochs,
        batch_size=case.batch_size,
        early_stopping=False,
        progress=False,
        seed=0,
        device=str(device),
        precision=case.precision,
        compile=case.compile,
        restore_best=False,
        reference_epoch_cells=None,  # seconds per epoch of every size: epochs stay epochs
    )
    started = time.perf_counter()
    history = fit(model, sampler, None, config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - started
    after_first = history.seconds[1:] or history.seconds
    epoch = float(np.median(after_first))
    return {
        **case.__dict__,
        "device": str(device),
        "first_epoch_s": round(history.seconds[0], 3),
        "epoch_s": round(epoch, 3),
        "cells_per_s": round(cells / epoch),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
        "precision_used": history.precision,
        "total_s": round(total, 1),
        "final_train_loss": round(history.train_loss[-1], 3),
    }


def cases(mode: str) -> Iterator[Case]:
    if mode == "smoke":
        for model in ("contrastive", "linear", "cvae"):
            yield Case(model, 2000, 200, "float32", 128, epochs=2)
        yield Case("contrastive", 3 * BLOCK // 4, 200, "float32", 256, streamed=True, epochs=2)
        return
    sizes = [34_000] if mode == "quick" else [34_000, 200_000]
    larger = [1024] if mode == "quick" else [1024, 4096]
    for n in sizes:
        for model in ("contrastive", "linear", "cvae"):
            for precision in ("float32", "bfloat16"):
                for batch in [128, *larger]:
                    if n > 34_000 and batch == 128 and model != "contrastive":
                        continue  # the small batch at 200k: contrastiveVI only (time)
                    yield Case(model, n, 2000, precision, batch)
    yield Case("contrastive", 34_000, 2000, "float32", 128, compile=True, epochs=4)
    if mode == "full":
        for precision in ("float32", "bfloat16"):
            yield Case("contrastive", 2_000_000, 2000, precision, 1024, streamed=True, epochs=2)


TARGETS = {
    ("contrastive", 34_000, "float32", 128, False, False): "target: epoch <= 0.15 s",
    ("contrastive", 2_000_000, "float32", 1024, True, False): "target: streamed epoch <= 60 s",
    ("contrastive", 2_000_000, "bfloat16", 1024, True, False): "target: streamed epoch <= 60 s",
}


def table(rows: list[dict[str, object]], header: str) -> str:
    lines = [
        header,
        "",
        "| model | cells × genes | resident / streamed | precision | batch | compile | first epoch (s) | "
        "epoch (s) | cells/s | peak GPU (GB) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {}
    for row in rows:
        key = (row["model"], row["n_cells"], row["precision"], row["batch_size"], row["streamed"], row["compile"])
        by_key[key] = row
        note = TARGETS.get(key, "")
        if row["precision"] == "bfloat16":
            full = by_key.get((row["model"], row["n_cells"], "float32", row["batch_size"], row["streamed"], False))
            if full is not None:
                note = (note + "; " if note else "") + f"{full['epoch_s'] / row['epoch_s']:.2f}× float32"
        lines.append(
            f"| {row['model']} | {row['n_cells']:,} × {row['n_genes']:,} | "
            f"{'streamed' if row['streamed'] else 'resident'} | {row['precision_used']} | {row['batch_size']} | "
            f"{'yes' if row['compile'] else 'no'} | {row['first_epoch_s']} | {row['epoch_s']} | "
            f"{row['cells_per_s']:,} | {row['peak_gpu_gb'] if row['peak_gpu_gb'] is not None else '—'} | {note} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["full", "quick", "smoke"], default="full")
    parser.add_argument("--output", type=Path, default=None, help="markdown table (default: bench/results/gpu.md)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.mode != "smoke" and not cuda:
        print("bench/gpu_bench.py: no CUDA device here; `--mode smoke` runs a CPU-sized check.", file=sys.stderr)
        return 2
    output = args.output or (ROOT / "bench" / "results" / "gpu.md")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "CPU"
    rows = []
    started = time.perf_counter()
    for case in cases(args.mode):
        try:
            row = run_case(case, device)
        except Exception as err:  # one failed case (e.g. compile without a compiler) must not lose the rest
            row = {**case.__dict__, "error": f"{type(err).__name__}: {err}"[:300]}
            print(json.dumps(row), flush=True)
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    header = (
        f"# Training throughput on {name} (`bench/gpu.sh`, mode {args.mode})\n\n"
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M')} UTC; torch {torch.__version__}; "
        f"{time.perf_counter() - started:.0f} s in all. Synthetic NB screens (~85 % zeros); contrastiveVI's "
        "cells per second count each target and its paired control; the epoch is the median after the first."
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table(rows, header))
    (output.with_suffix(".jsonl")).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {output}")
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
