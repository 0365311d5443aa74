from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from kedro.io import DataCatalog
from kedro.io.core import DatasetError, Version

from perturbscope.datasets import AnnDataDataset


def _adata(seed: int = 0, n_obs: int = 20) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(1.0, size=(n_obs, 8)).astype(np.float32)),
        obs=pd.DataFrame(
            {"perturbation": rng.choice(["control", "A", "A+B"], n_obs)},
            index=[f"cell{i}" for i in range(n_obs)],
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(8)]),
    )
    adata.obsm["X_test"] = rng.normal(size=(n_obs, 2))
    adata.uns["note"] = {"seed": seed}
    return adata


def test_round_trip_keeps_matrix_obs_obsm_uns(tmp_path: Path) -> None:
    data = _adata()
    dataset = AnnDataDataset(filepath=str(tmp_path / "screen.h5ad"))
    dataset.save(data)
    loaded = dataset.load()
    assert (loaded.X != data.X).nnz == 0
    pd.testing.assert_frame_equal(loaded.obs, data.obs)
    np.testing.assert_array_equal(loaded.obsm["X_test"], data.obsm["X_test"])
    assert loaded.uns["note"]["seed"] == 0
    assert dataset.exists()


def test_versioned_saves_are_kept_and_loadable(tmp_path: Path) -> None:
    path = str(tmp_path / "screen.h5ad")
    AnnDataDataset(filepath=path, version=Version(None, "v1")).save(_adata(seed=1))
    AnnDataDataset(filepath=path, version=Version(None, "v2")).save(_adata(seed=2, n_obs=30))
    assert sorted(p.name for p in Path(path).iterdir()) == ["v1", "v2"]
    assert AnnDataDataset(filepath=path, version=Version("v1", None)).load().n_obs == 20
    latest = AnnDataDataset(filepath=path, version=Version(None, None)).load()
    assert latest.n_obs == 30


def test_catalog_versioned_entry(tmp_path: Path) -> None:
    catalog = DataCatalog.from_config(
        {
            "screen": {
                "type": "perturbscope.datasets.AnnDataDataset",
                "filepath": str(tmp_path / "s.h5ad"),
                "versioned": True,
            }
        }
    )
    catalog.save("screen", _adata())
    assert catalog.load("screen").n_obs == 20


def test_failed_save_leaves_no_file(tmp_path: Path) -> None:
    data = _adata()
    data.uns["bad"] = object()  # h5py cannot write this
    dataset = AnnDataDataset(filepath=str(tmp_path / "screen.h5ad"))
    with pytest.raises(Exception):  # noqa: B017 - whatever h5py raises
        dataset.save(data)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "half_copied.h5ad"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(DatasetError, match="not a readable .h5ad"):
        AnnDataDataset(filepath=str(path)).load()


def test_an_empty_file_is_called_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.h5ad"
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"is empty \(0 bytes\)"):
        AnnDataDataset(filepath=str(path)).load()


def test_missing_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="--params screen="):
        AnnDataDataset(filepath=str(tmp_path / "nope.h5ad")).load()


def test_preview_is_obs_head(tmp_path: Path) -> None:
    dataset = AnnDataDataset(filepath=str(tmp_path / "screen.h5ad"))
    dataset.save(_adata())
    preview = dataset.preview(nrows=5)
    assert preview["columns"] == ["cell", "perturbation"]
    assert len(preview["data"]) == 5
    assert preview["data"][0][0] == "cell0"


def test_a_processed_screen_loads_with_its_non_zero_positions_held_once(tmp_path: Path) -> None:
    """X (log-normalised by data_processing) and layers["counts"] have the same non-zeros: loaded, they share the
    positions and keep their values; a screen whose X has other positions loads as written."""
    from perturbscope.pipelines.data_processing import nodes as dp

    rng = np.random.default_rng(0)
    counts = sp.random(300, 40, density=0.3, format="csr", random_state=1, dtype=np.float32)
    counts.data = rng.integers(1, 20, counts.nnz).astype(np.float32)
    processed = dp.normalise(ad.AnnData(counts), {"target_sum": 1e4}).to_memory()
    dataset = AnnDataDataset(filepath=str(tmp_path / "processed.h5ad"))
    dataset.save(processed)
    loaded = dataset.load()
    assert np.shares_memory(loaded.X.indices, loaded.layers["counts"].indices)
    np.testing.assert_allclose(loaded.X.toarray(), processed.X.toarray(), rtol=1e-6)
    np.testing.assert_array_equal(loaded.layers["counts"].toarray(), counts.toarray())
    np.testing.assert_allclose(loaded.X.toarray(), np.log1p(counts.toarray() / counts.sum(1).A * 1e4), rtol=1e-5)
    more = sp.csr_matrix(counts.toarray() + (rng.random((300, 40)) < 0.1))
    other = ad.AnnData(counts.copy(), layers={"counts": more})
    dataset = AnnDataDataset(filepath=str(tmp_path / "other.h5ad"))
    dataset.save(other)
    reloaded = dataset.load()
    assert not np.shares_memory(reloaded.X.indices, reloaded.layers["counts"].indices)
    np.testing.assert_array_equal(reloaded.X.toarray(), counts.toarray())
