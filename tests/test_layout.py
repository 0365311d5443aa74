"""The layering the README draws, checked on the source: what may import what."""

from __future__ import annotations

import ast
import re
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


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles() -> None:
    """The package's modules import each other one way (function-level imports count too)."""
    modules = {_module_name(p): p for p in _files(SRC)}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(path):
            # `from a.b import c` names a.b and a.b.c: the longest that is a module of the package
            candidates = [m for m in (imported, imported.rsplit(".", 1)[0]) if m in modules and m != name]
            targets |= set(candidates[:1])
        graph[name] = targets
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(f"{node}.") or node.startswith(f"{nxt}."):
                continue  # a package and its own submodules (its __init__ re-exports them)
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_model_core_imports_with_torch_numpy_and_scipy_alone() -> None:
    """models/ (the AnnData API in models/model/ aside) imports without anndata, scanpy, pandas, Kedro or MLflow,
    so the GPU machine runs it from the working tree (bench/gpu.sh)."""
    import subprocess
    import sys

    blocked = ["anndata", "scanpy", "pandas", "kedro", "mlflow", "sklearn"]
    code = (
        "import importlib, pkgutil, sys\n"
        f"blocked = {blocked!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in blocked:\n"
        "            raise ImportError(f'{name} must not be imported by perturbscope.models')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import perturbscope.models as m\n"
        "for info in pkgutil.iter_modules(m.__path__):\n"
        "    if info.name != 'model':\n"
        "        importlib.import_module(f'perturbscope.models.{info.name}')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_no_alias_modules_and_no_parameter_fallbacks_in_nodes() -> None:
    for path in _files(SRC):
        text = path.read_text()
        assert "sys.modules[__name__]" not in text, f"{path.relative_to(SRC)} is an alias module"
    for path in sorted((SRC / "pipelines").glob("*/nodes.py")):
        text = path.read_text()
        assert not re.search(r"params\w*\.get\(|\(params or \{\}\)", text), (
            f"{path.relative_to(SRC)} reads a parameter with a fallback: the function it goes to owns the default"
        )
