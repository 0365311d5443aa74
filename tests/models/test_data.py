"""CellData gathering and the samplers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.special import gammaln

from perturbscope.models.data import CellData, MinibatchSampler, PairedSampler, batch_size_of, concat_batches


def test_celldata_keeps_csr(small_counts: sp.csr_matrix) -> None:
    d = CellData(small_counts)
    assert d.values.numel() == small_counts.nnz == d.nnz
    assert d.indptr.numel() == small_counts.shape[0] + 1
    assert (d.n_cells, d.n_genes) == small_counts.shape
    assert d.values.dtype == torch.float32 and d.indices.dtype == torch.int32


def test_celldata_shares_a_canonical_float32_csr_and_copies_anything_else(small_counts: sp.csr_matrix) -> None:
    """An AnnData's float32 counts are not held twice on the CPU; a matrix that needs cleaning is copied,
    never changed."""
    csr = sp.csr_matrix(small_counts, dtype=np.float32)
    d = CellData(csr)
    assert np.shares_memory(d.values.numpy(), csr.data) and np.shares_memory(d.indices.numpy(), csr.indices)
    messy = csr.copy()
    messy.data[:3] = 0  # explicit zeros
    before = messy.data.copy()
    m = CellData(messy)
    assert not np.shares_memory(m.values.numpy(), messy.data)
    np.testing.assert_array_equal(messy.data, before)
    assert m.nnz == csr.nnz - 3 and (m.values > 0).all()
    np.testing.assert_array_equal(m.batch(np.arange(5))["x"].numpy(), messy[:5].toarray())
    wide = sp.csr_matrix(small_counts, dtype=np.float64)
    w = CellData(wide)
    assert w.values.dtype == torch.float32 and not np.shares_memory(w.values.numpy(), wide.data)


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "dense"])
def test_batch_equals_dense_rows(small_counts: sp.csr_matrix, fmt: str) -> None:
    codes = np.arange(small_counts.shape[0]) % 3
    multihot = (np.arange(small_counts.shape[0])[:, None] % np.array([2, 3]) == 0).astype(np.float32)
    dense = small_counts.toarray()
    dense[5] = 0  # make one empty row visible through idx below
    d = CellData(
        dense if fmt == "dense" else sp.csr_matrix(dense).asformat(fmt), obs={"batch": codes, "cond": multihot}
    )
    idx = torch.tensor([5, 0, 17, 3, 3, 59, 42])  # includes an empty row and a duplicate
    b = d.batch(idx)
    np.testing.assert_array_equal(b["x"].numpy(), dense[idx.numpy()])
    # coordinate form reproduces x exactly, and only nonzeros are listed
    rebuilt = np.zeros_like(dense[idx.numpy()])
    rebuilt[b["nz_row"].numpy(), b["nz_col"].numpy()] = b["nz_val"].numpy()
    np.testing.assert_array_equal(rebuilt, dense[idx.numpy()])
    assert b["nz_val"].numel() == int((dense[idx.numpy()] != 0).sum())
    assert (b["nz_val"] > 0).all()
    np.testing.assert_allclose(b["nz_lgamma"].numpy(), gammaln(b["nz_val"].numpy() + 1.0), rtol=1e-5)
    lib = dense[idx.numpy()].sum(1)
    np.testing.assert_allclose(b["log_library"].numpy(), np.log(np.maximum(lib, 1.0)), rtol=1e-5)
    np.testing.assert_array_equal(b["batch"].numpy(), codes[idx.numpy()])
    assert b["batch"].dtype == torch.int64
    np.testing.assert_array_equal(b["cond"].numpy(), multihot[idx.numpy()])
    np.testing.assert_array_equal(b["idx"].numpy(), idx.numpy())


def test_batch_accepts_numpy_and_single_cell(small_counts: sp.csr_matrix) -> None:
    d = CellData(small_counts)
    b = d.batch(np.array([7]))
    assert b["x"].shape == (1, small_counts.shape[1])
    np.testing.assert_array_equal(b["x"].numpy()[0], small_counts[7].toarray()[0])
    assert batch_size_of(b) == 1


def test_celldata_validation(small_counts: sp.csr_matrix) -> None:
    bad = small_counts.toarray()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        CellData(bad)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        CellData(bad)
    with pytest.raises(ValueError, match="reserved"):
        CellData(small_counts, obs={"x": np.zeros(small_counts.shape[0])})
    with pytest.raises(ValueError, match="integer codes"):
        CellData(small_counts, obs={"b": np.array(["a"] * small_counts.shape[0])})
    with pytest.raises(ValueError, match="n_cells"):
        CellData(small_counts, obs={"b": np.zeros(3, dtype=int)})


def test_concat_batches_offsets_rows(small_counts: sp.csr_matrix) -> None:
    d = CellData(small_counts)
    a, b = d.batch(torch.tensor([1, 2])), d.batch(torch.tensor([3, 4, 5]))
    both = concat_batches([a, b])
    ref = d.batch(torch.tensor([1, 2, 3, 4, 5]))
    for k in ("x", "nz_row", "nz_col", "nz_val", "log_library", "idx"):
        torch.testing.assert_close(both[k], ref[k])


def test_library_prior(small_counts: sp.csr_matrix) -> None:
    codes = np.arange(small_counts.shape[0]) % 2
    d = CellData(small_counts, obs={"batch": codes})
    loglib = np.log(np.maximum(np.asarray(small_counts.sum(1)).ravel(), 1))
    means, vars_ = d.library_prior(batch_key="batch", n_batch=2)
    assert len(means) == 2
    np.testing.assert_allclose(means[1], loglib[codes == 1].mean(), rtol=1e-6)
    np.testing.assert_allclose(vars_[0], loglib[codes == 0].var(), rtol=1e-6)


def test_minibatch_sampler_covers_index_set_once(small_counts: sp.csr_matrix) -> None:
    d = CellData(small_counts)
    idx = np.arange(0, 60, 3)  # 20 cells
    s = MinibatchSampler(d, idx, batch_size=7, seed=1)
    assert len(s) == 3
    seen = torch.cat([b["idx"] for b in s]).numpy()
    assert sorted(seen.tolist()) == idx.tolist()
    sizes = [batch_size_of(b) for b in s]
    assert sizes == [7, 7, 6]
    ordered = torch.cat([b["idx"] for b in MinibatchSampler(d, idx, batch_size=7, shuffle=False)]).numpy()
    np.testing.assert_array_equal(ordered, idx)
    mask = np.zeros(60, dtype=bool)
    mask[idx] = True
    assert len(MinibatchSampler(d, mask, batch_size=7, drop_last=True)) == 2


def _paired_epoch(s: PairedSampler) -> tuple[list[int], list[int], list[int]]:
    tg, bg, sizes = [], [], []
    for b in s:
        assert set(b) == {"background", "target"}
        nt, nb = batch_size_of(b["target"]), batch_size_of(b["background"])
        assert nt == nb
        sizes.append(nt)
        tg += b["target"]["idx"].tolist()
        bg += b["background"]["idx"].tolist()
    return tg, bg, sizes


def test_paired_sampler_epoch_definition(small_counts: sp.csr_matrix) -> None:
    d = CellData(small_counts)
    controls = np.arange(0, 9)  # 9 controls
    targets = np.arange(9, 60)  # 51 targets = 5 * 10 + 1
    s = PairedSampler(d, controls, targets, batch_size=10, seed=3)
    assert len(s) == 6
    tg1, bg1, sizes = _paired_epoch(s)
    assert sizes == [10, 10, 10, 10, 10, 1]  # final batch of one cell
    assert sorted(tg1) == targets.tolist()  # every target exactly once
    assert set(bg1) <= set(controls.tolist())
    # controls are drawn by cycling through permutations: usage differs by at most 1
    use = Counter(bg1)
    assert set(use) == set(controls.tolist())
    assert max(use.values()) - min(use.values()) <= 1
    tg2, bg2, _ = _paired_epoch(s)
    assert sorted(tg2) == targets.tolist()
    assert tg2 != tg1  # reshuffled every epoch
    # reproducible from the seed
    s.manual_seed(3)
    assert _paired_epoch(s)[:2] == (tg1, bg1)


def test_paired_sampler_more_controls_than_targets(small_counts: sp.csr_matrix) -> None:
    d = CellData(small_counts)
    s = PairedSampler(d, np.arange(0, 50), np.arange(50, 60), batch_size=4, seed=0)
    bgs = []
    for _ in range(5):  # 5 epochs x 10 targets = 50 control draws = one full cycle
        bgs += _paired_epoch(s)[1]
    assert sorted(bgs) == list(range(50))


def test_paired_sampler_validation_is_fixed(small_counts: sp.csr_matrix) -> None:
    d = CellData(small_counts)
    s = PairedSampler(d, np.arange(5), np.arange(5, 18), batch_size=4, shuffle=False)
    e1, e2 = _paired_epoch(s), _paired_epoch(s)
    assert e1 == e2
    assert e1[0] == list(range(5, 18))
    with pytest.raises(ValueError, match="background"):
        PairedSampler(d, [], np.arange(5))
