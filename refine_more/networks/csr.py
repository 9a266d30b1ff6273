"""The transpose of a large CSR matrix without torch's conversion peak (the hash encodings' Sᵀ).

torch's `S.t().to_sparse_csr()` (CSC → CSR) sorts all nnz entries at once with int64 temporaries:
~6× the result's bytes at its peak (measured: 1.1 GiB of temporaries for a 0.18 GiB matrix), which
at the paper's size (190 M entries per interpolation matrix) was the set-up's peak. Here: a
counting sort, the column counts first, then S's rows block by block, each block's entries placed
after what the earlier blocks put in their column: temporaries for one block only, and the same
matrix entry for entry (rows of Sᵀ ascending in each column, as the stable sort leaves them).
"""
from __future__ import annotations

import warnings

import torch


def transpose_csr(S: torch.Tensor, block_entries: int = 1 << 21) -> torch.Tensor:
    """Sᵀ as CSR (indices of S's dtype), equal to `S.t().to_sparse_csr()`."""
    crow, cols, vals = S.crow_indices(), S.col_indices(), S.values()
    n_rows, n_cols = S.shape
    idx, device = crow.dtype, crow.device
    counts = torch.bincount(cols, minlength=n_cols)
    crow_t = torch.zeros(n_cols + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=crow_t[1:])
    fill = crow_t[:-1].clone()                       # next free slot of each row of Sᵀ
    cols_t = torch.empty_like(cols)
    vals_t = torch.empty_like(vals)
    r0 = 0
    while r0 < n_rows:                               # blocks of whole rows, ~block_entries entries
        e0 = int(crow[r0])
        r1 = int(torch.searchsorted(crow, e0 + block_entries, right=True)) - 1
        r1 = min(n_rows, max(r1, r0 + 1))
        e1 = int(crow[r1])
        c = cols[e0:e1].long()
        order = torch.argsort(c, stable=True)
        cs = c[order]
        rank = torch.arange(e1 - e0, device=device) - torch.searchsorted(cs, cs)   # place among equal columns
        dest = fill[cs] + rank
        rows = torch.repeat_interleave(torch.arange(r0, r1, device=device), (crow[r0 + 1:r1 + 1] - crow[r0:r1]).long())
        cols_t[dest] = rows[order].to(idx)
        vals_t[dest] = vals[e0:e1][order]
        fill.index_add_(0, c, torch.ones_like(c))
        r0 = r1
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow_t.to(idx), cols_t, vals_t, (n_cols, n_rows), check_invariants=False)
