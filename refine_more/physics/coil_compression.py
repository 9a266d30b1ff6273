"""Coil compression by SVD (Huang et al., MRM 2008, "SCC"; BART's ``cc -S``): a few virtual coils
that keep a chosen fraction of the acquired k-space energy.

The virtual coils are fixed linear combinations of the acquired ones, d' = Vᴴd over the coil axis,
with V the leading eigenvectors of the coil covariance Σ dᴴd over every acquired sample. Because
A = U·F·C is linear in the coil maps, the same combination of the maps, S' = VᴴS, gives the exact
operator of the virtual coils: A'x = Vᴴ(Ax). So ‖A'x − d'‖² is ‖Ax − d‖² with the residual
projected onto the kept coil subspace, and every A and Aᴴ costs n/C of the acquired coils'.
The discarded subspace holds (1 − energy) of the data, almost all of it noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CoilCompression:
    """The virtual coils of one subject: V (C, n) with orthonormal columns, and what they keep."""
    matrix: np.ndarray
    energy_kept: float               # fraction of Σ|d|² in the virtual coils
    singular_values: np.ndarray      # √eigenvalues of the coil covariance, descending (C,)

    @property
    def n_virtual(self) -> int:
        return int(self.matrix.shape[1])

    def kspace(self, kspace: np.ndarray) -> np.ndarray:
        """(T, C, Z, Y, X) → (T, n, Z, Y, X), one image at a time (memory: no C-sized copy of it all)."""
        import torch

        T, C = kspace.shape[:2]
        Vh = torch.from_numpy(np.ascontiguousarray(self.matrix.conj().T.astype(np.complex64)))
        out = np.empty((T, self.n_virtual) + kspace.shape[2:], dtype=np.complex64)
        for t in range(T):
            k = torch.from_numpy(np.ascontiguousarray(kspace[t])).reshape(C, -1)
            out[t] = (Vh @ k).reshape((self.n_virtual,) + kspace.shape[2:]).numpy()
        return out

    def coil_maps(self, coils: np.ndarray) -> np.ndarray:
        """(C, Z, Y, X) → (n, Z, Y, X): the sensitivities of the virtual coils."""
        C = coils.shape[0]
        Vh = self.matrix.conj().T.astype(np.complex64)
        return (Vh @ coils.reshape(C, -1)).reshape((self.n_virtual,) + coils.shape[1:])


def coil_covariance(kspace: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Σ over images and samples of d dᴴ, (C, C) complex128, one image at a time; with the
    sampling `mask` (T, Z, Y), over the sampled lines alone (the rest is zero: AF× less work)."""
    import torch

    C = kspace.shape[1]
    cov = torch.zeros((C, C), dtype=torch.complex128)
    for t in range(kspace.shape[0]):
        k = torch.from_numpy(np.ascontiguousarray(kspace[t]))
        k = k[:, torch.from_numpy(np.asarray(mask[t], dtype=bool))] if mask is not None else k
        k = k.reshape(C, -1)
        cov += (k @ k.conj().T).to(torch.complex128)
    return cov.numpy()


def svd_compression(kspace: np.ndarray, energy: float, *, mask: np.ndarray | None = None,
                    max_coils: int | None = None) -> CoilCompression:
    """The fewest virtual coils that keep ≥ `energy` of the k-space energy (0 < energy ≤ 1), at most
    `max_coils`. Unsampled k-space is zero and adds nothing to the covariance (`mask` skips it)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"coil compression: energy must be in (0, 1], got {energy!r}")
    cov = coil_covariance(kspace, mask)
    eigenvalues, vectors = np.linalg.eigh(cov)                   # ascending
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order].real, 0.0, None)
    vectors = vectors[:, order]
    total = float(eigenvalues.sum())
    if total <= 0:
        raise ValueError("coil compression: the k-space holds no energy")
    cumulative = np.cumsum(eigenvalues) / total
    n = int(np.searchsorted(cumulative, energy - 1e-12) + 1)
    n = min(n, len(eigenvalues), max_coils or len(eigenvalues))
    return CoilCompression(matrix=vectors[:, :n], energy_kept=float(cumulative[n - 1]),
                           singular_values=np.sqrt(eigenvalues))
