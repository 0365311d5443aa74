"""The layering the README draws, checked on the source: what may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "perturbscope"


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against its package)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize("path", _files(SRC / "models"), ids=lambda p: str(p.relative_to(SRC)))
def test_models_import_no_kedro_and_no_anndata_outside_the_model_api(path: Path) -> None:
    imports = _imports(path)
    assert not {m for m in imports if m.split(".")[0] == "kedro" or m.startswith("perturbscope.pipelines")}
    if "model" not in path.relative_to(SRC / "models").parts[:-1]:
        assert not {m for m in imports if m.split(".")[0] in ("anndata", "scanpy")}, "AnnData belongs in models/model/"


@pytest.mark.parametrize(
    "path",
    [p for p in _files(SRC) if "pipelines" not in p.relative_to(SRC).parts],
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_nothing_outside_pipelines_imports_a_pipeline(path: Path) -> None:
    assert not {m for m in _imports(path) if m.startswith("perturbscope.pipelines.")}


@pytest.mark.parametrize("pipeline", sorted(p.name for p in (SRC / "pipelines").iterdir() if (p / "nodes.py").exists()))
def test_pipelines_are_thin_and_independent(pipeline: str) -> None:
    folder = SRC / "pipelines" / pipeline
    assert len((folder / "nodes.py").read_text().splitlines()) < 300
    for path in _files(folder):
        others = {m.split(".")[2] for m in _imports(path) if m.startswith("perturbscope.pipelines.")}
        assert others <= {pipeline}, f"{path.relative_to(SRC)} reaches into {sorted(others - {pipeline})}"
