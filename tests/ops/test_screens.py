"""The screens registry (conf/<env>/screens.yml) and the checks a screen file passes before a run."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from kedro.config import OmegaConfigLoader

from perturbscope.ops.screens import (
    ScreenFileError,
    ScreenRegistryError,
    check_screen_file,
    fingerprint,
    validate_registry,
)
from perturbscope.schema import ScreenValidationError
from perturbscope.settings import CONFIG_LOADER_ARGS
from perturbscope.simulation import simulate_screen
from tests.conftest import PROJECT

SCHEMA = {"perturbation_key": "perturbation", "control_labels": ["control"], "program_key": "program"}


def loader(conf: Path, env: str = "base", **runtime_params) -> OmegaConfigLoader:
    """The project's config loader (settings.py arguments) on ``conf``."""
    args = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k not in ("base_env", "default_run_env")}
    return OmegaConfigLoader(
        str(conf), env=env, base_env="base", default_run_env=env, runtime_params=runtime_params, **args
    )


# ----------------------------------------------------------------------------- registry
def test_project_registries_are_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PERTURBSCOPE_TEST_ROOT", str(tmp_path))
    for env in ("base", "test"):
        registry = validate_registry(loader(PROJECT / "conf", env)["globals"]["screens"])
        assert registry
    assert "norman2019_subset" in validate_registry(loader(PROJECT / "conf")["globals"]["screens"])


@pytest.mark.parametrize(
    ("screens", "message"),
    [
        ({"a.b": {}}, "letters, digits"),
        ({"../x": {}}, "not a valid screen name"),
        ({"a": {"path": "x.h5ad"}}, r"unknown key\(s\) \['path'\]"),
        ({"a": {"schema": {"perturbation_column": "guide"}}}, r"schema has unknown key\(s\) \['perturbation_column'\]"),
        ({"a": {"file": None}}, "omit `file`"),
    ],
)
def test_registry_errors(screens, message) -> None:
    with pytest.raises(ScreenRegistryError, match=message):
        validate_registry(screens)


def test_registry_defaults() -> None:
    registry = validate_registry({"a": None, "b": {"retrain": False, "schema": {"counts_layer": "raw"}}})
    assert registry == {
        "a": {"schema": {}, "retrain": True},
        "b": {"schema": {"counts_layer": "raw"}, "retrain": False},
    }


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """The project's conf/base (globals, parameters, catalog) with a registry of two screens."""
    base = tmp_path / "conf" / "base"
    base.mkdir(parents=True)
    (tmp_path / "conf" / "local").mkdir()
    for name in ("globals.yml", "parameters.yml", "catalog_data_processing.yml"):
        shutil.copy(PROJECT / "conf" / "base" / name, base / name)
    registry = {
        "screens": {
            "remote": {
                "file": "s3://bucket/screens/remote.h5ad",
                "schema": {
                    "perturbation_key": "guide",
                    "control_labels": ["NTC"],
                    "program_key": "pathway",
                    "batch_key": None,
                },
            },
            "plain": {"schema": {}},
            "matrix": {"schema": {"perturbation_key": None}},
        }
    }
    (base / "screens.yml").write_text(yaml.safe_dump(registry))
    return tmp_path / "conf"


def test_registered_screen_brings_its_file_and_schema(conf: Path) -> None:
    config = loader(conf, screen="remote")
    schema = config["parameters"]["schema"]
    assert schema["perturbation_key"] == "guide" and schema["control_labels"] == ["NTC"]
    assert schema["program_key"] == "pathway" and schema["batch_key"] is None
    # an explicit null overrides a non-null default
    assert loader(conf, screen="matrix")["parameters"]["schema"]["perturbation_key"] is None
    assert schema["double_separator"] == "+" and schema["counts_layer"] is None  # defaults kept
    assert config["catalog"]["raw_screen"]["filepath"] == "s3://bucket/screens/remote.h5ad"
    # --params on top of the registry still work, key by key
    config = loader(conf, screen="remote", schema={"counts_layer": "raw"})
    assert config["parameters"]["schema"]["counts_layer"] == "raw"
    assert config["parameters"]["schema"]["perturbation_key"] == "guide"


def test_unregistered_screen_keeps_the_defaults(conf: Path) -> None:
    for screen in ("plain", "not_registered"):
        config = loader(conf, screen=screen)
        schema = config["parameters"]["schema"]
        assert schema["perturbation_key"] == "perturbation" and schema["program_key"] is None
        assert "NTC" in schema["control_labels"] and "non-targeting" in schema["control_labels"]
        assert config["catalog"]["raw_screen"]["filepath"] == f"data/01_raw/{screen}.h5ad"
    assert loader(conf)["catalog"]["raw_screen"]["filepath"] == "data/01_raw/norman2019_subset.h5ad"


# -------------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def screen_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("screens") / "sim.h5ad"
    simulate_screen(n_cells=400, n_genes=300, seed=0).write_h5ad(path)
    return path


def test_valid_file_passes_and_fingerprint_is_the_sha256(screen_file: Path) -> None:
    assert check_screen_file(str(screen_file), SCHEMA, "sim") == {"n_obs": 400, "n_vars": 300, "cells_checked": 400}
    assert check_screen_file(str(screen_file), SCHEMA, "sim", n_cells=50)["cells_checked"] == 50
    digest = fingerprint(str(screen_file))
    assert digest.sha256 == hashlib.sha256(screen_file.read_bytes()).hexdigest()
    assert digest.size == screen_file.stat().st_size


def test_truncated_unreadable_and_missing_files(screen_file: Path, tmp_path: Path) -> None:
    data = screen_file.read_bytes()
    half = tmp_path / "half.h5ad"
    half.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(ScreenFileError, match="half-copied"):
        check_screen_file(str(half), SCHEMA, "sim")
    text = tmp_path / "text.h5ad"
    text.write_text("cell,gene\n")
    with pytest.raises(ScreenFileError, match="not a readable .h5ad"):
        check_screen_file(str(text), SCHEMA, "sim")
    with pytest.raises(ScreenFileError, match="No screen file"):
        check_screen_file(str(tmp_path / "none.h5ad"), SCHEMA, "sim")
    empty = tmp_path / "empty.h5ad"
    empty.write_bytes(b"")
    with pytest.raises(ScreenFileError, match=r"is empty \(0 bytes\)"):
        check_screen_file(str(empty), SCHEMA, "sim")


def test_wrong_schema_is_caught_by_the_pipelines_own_validation(screen_file: Path) -> None:
    with pytest.raises(ScreenValidationError, match="no obs column 'guide'"):
        check_screen_file(str(screen_file), {**SCHEMA, "perturbation_key": "guide"}, "sim")
    with pytest.raises(ScreenValidationError, match="No cell matches the control labels"):
        check_screen_file(str(screen_file), {**SCHEMA, "control_labels": ["NTC"]}, "sim")


def test_counts_in_a_layer_and_bad_counts_in_the_sample(tmp_path: Path) -> None:
    adata = simulate_screen(n_cells=400, n_genes=300, seed=1)
    adata.layers["raw"] = adata.X.copy()
    adata.X = adata.X.copy()
    adata.X.data = np.log1p(adata.X.data)  # X normalised, raw counts in a layer
    path = tmp_path / "layer.h5ad"
    adata.write_h5ad(path)
    assert check_screen_file(str(path), {**SCHEMA, "counts_layer": "raw"}, "s", n_cells=20)["cells_checked"] == 20
    with pytest.raises(ScreenValidationError, match="non-integer"):
        check_screen_file(str(path), SCHEMA, "s", n_cells=20)
    with pytest.raises(ScreenValidationError, match=r"no layer 'counts' \(layers: \['raw'\]\)"):
        check_screen_file(str(path), {**SCHEMA, "counts_layer": "counts"}, "s")
    # a NaN in the last cell is among the sampled cells (first and last halves)
    adata = simulate_screen(n_cells=400, n_genes=300, seed=1).copy()
    adata.X = adata.X.toarray()
    adata.X[-1, 0] = np.nan
    adata.write_h5ad(path)
    with pytest.raises(ScreenValidationError, match="NaN"):
        check_screen_file(str(path), SCHEMA, "s", n_cells=20)
