"""Shared by the benches: a GitHub markdown table without pandas' optional tabulate dependency."""

from __future__ import annotations

import pandas as pd


def markdown(frame: pd.DataFrame, index: bool = False) -> str:
    """A GitHub markdown table of ``frame`` (floats with 3 decimals)."""
    if index:
        frame = frame.reset_index()
    cells = [[str(c) for c in frame.columns]] + [
        [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in frame.columns) + "|")
    return "\n".join(lines)
