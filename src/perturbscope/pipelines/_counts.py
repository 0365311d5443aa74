"""The raw count matrix of a processed screen, checked, for the model pipelines."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp


def raw_counts(
    adata: ad.AnnData,
    counts_layer: str | None = None,
    error: type[ValueError] = ValueError,
    hint: str = "",
) -> sp.csr_matrix:
    """``layers[counts_layer]``, else ``layers["counts"]``, else ``X``, as float32 CSR.

    Raises ``error`` (with ``hint`` appended) when the layer is missing or the
    values are not raw UMI counts (negative, non-integer or non-finite).
    """
    if counts_layer is not None:
        if counts_layer not in adata.layers:
            raise error(
                f"The screen has no layer '{counts_layer}' (layers: {list(adata.layers)}). "
                "Pass the layer holding raw UMI counts, or None to use layers['counts'] / X."
            )
        matrix, where = adata.layers[counts_layer], f"layers['{counts_layer}']"
    elif "counts" in adata.layers:
        matrix, where = adata.layers["counts"], "layers['counts']"
    else:
        matrix, where = adata.X, "X"
    csr = sp.csr_matrix(matrix, dtype=np.float32)
    values = csr.data
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or np.any(values != np.round(values))):
        raise error(
            f"{where} does not hold raw UMI counts (negative, non-integer or non-finite values). {hint}".rstrip()
        )
    return csr
