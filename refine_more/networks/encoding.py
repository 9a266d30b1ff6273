"""Multiresolution hash encoding (Müller et al. 2022) matching tiny-cuda-nn's ``Grid``/``Hash`` encoding.

One module, two backends that compute the same function on the same parameters:

* ``torch`` -- pure PyTorch (CPU and GPU), written here.
* ``tcnn``  -- ``tinycudann.Encoding`` (imported lazily; CUDA only).

``backend="auto"`` (default) uses tcnn when it is importable and the input is on CUDA, otherwise the
torch backend (with a one-time warning when that happens on CUDA, since it is much slower there).

The parameters are one flat float32 ``nn.Parameter`` (``HashEncoding.params``) in tcnn's layout:
level tables one after another, each ``(table_size_l, F)`` row-major. A state_dict therefore means
the same thing in both backends.

What tcnn computes (``include/tiny-cuda-nn/encodings/grid.h``), reproduced by the torch backend:

* level ``l``: ``scale_l = N_min * 2^(l * log2 b) - 1`` (float32), ``res_l = ceil(scale_l) + 1``;
* ``pos = x * scale_l + 0.5``, cell ``floor(pos)`` (as uint32), weights from ``frac(pos)``;
* table size ``min(next_multiple_of_8(res_l^d), 2^T)``; a level is indexed densely
  (``i0 + i1*res + i2*res^2 ...``, uint32) when ``res_l^d <= table size``, otherwise with the
  "CoherentPrime" hash (XOR of ``i_k * pi_k`` in uint32); either index is taken mod the table size;
* d-linear interpolation over the ``2^d`` cell corners; output level-major ``L*F`` features.

Fixed-grid fast path: when the coordinates never change (e.g. the voxel grid of a scan), the whole
encoding is a linear map of the parameters, ``features = S @ params.view(-1, F)`` with one sparse
CSR matrix ``S`` of shape ``(N*L, total_params/F)``. :meth:`HashEncoding.precompute` builds it once
(:class:`FixedPoints`), :meth:`HashEncoding.forward_fixed` (or ``enc(fixed_points)``) applies it,
with a custom autograd function whose backward is ``S^T @ grad`` (``S^T`` also precomputed).
Gradients flow to the parameters only (the points are constants).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from refine_more.config.hash_grid import HashEncodingConfig
from refine_more.networks.csr import transpose_csr

__all__ = [
    "HashEncodingConfig",
    "LevelInfo",
    "level_layout",
    "FixedPoints",
    "HashEncoding",
    "tcnn_available",
]

# tcnn's fast_hash primes ("CoherentPrime"); the first is 1 for memory coherence.
_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
_U32 = 0xFFFFFFFF
_BACKENDS = ("auto", "torch", "tcnn")

_warned_cuda_fallback = False


class LevelInfo(NamedTuple):
    scale: float  # pos = x * scale + 0.5
    resolution: int  # grid vertices per dimension
    table_size: int  # rows (entries of F features) of this level's table
    offset: int  # first row of this level in params.view(-1, F)
    hashed: bool  # False: dense indexing


def level_layout(config: HashEncodingConfig, n_dims: int) -> list[LevelInfo]:
    """Per-level geometry exactly as tcnn computes it (float32 scale)."""
    if not 1 <= n_dims <= len(_PRIMES):
        raise ValueError(f"n_dims must be in [1, {len(_PRIMES)}], got {n_dims}")
    f32 = np.float32
    log2b = f32(np.log2(f32(config.per_level_scale)))
    cap = 1 << int(config.log2_hashmap_size)
    out = []
    offset = 0
    for level in range(int(config.n_levels)):
        scale = f32(np.exp2(f32(level) * log2b)) * f32(config.base_resolution) - f32(1.0)
        scale = f32(scale)
        res = int(math.ceil(float(scale))) + 1
        dense = res**n_dims
        size = min(((min(dense, 2**31 - 1) + 7) // 8) * 8, cap)
        out.append(LevelInfo(float(scale), res, size, offset, dense > size))
        offset += size
    return out


def tcnn_available() -> bool:
    try:
        _import_tcnn()
        return True
    except ImportError:
        return False


def _import_tcnn():
    try:
        import tinycudann  # noqa: F401
    except Exception as e:  # ImportError, or CUDA/driver errors raised at import time
        raise ImportError(
            "HashEncoding backend 'tcnn' needs the tinycudann package (tiny-cuda-nn PyTorch "
            "bindings, built against CUDA: pip install "
            "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch); "
            f"importing it failed: {e!r}. Use backend='torch' (or 'auto') instead."
        ) from e
    return tinycudann


# --------------------------------------------------------------------------------------------------
# fixed-grid fast path
# --------------------------------------------------------------------------------------------------


class FixedPoints:
    """Precomputed interpolation matrix for a fixed set of points (see module docstring)."""

    def __init__(self, S: torch.Tensor, St: torch.Tensor, n_points: int, n_levels: int,
                 n_features: int, signature: tuple):
        self.S = S  # CSR (N*L, R)
        self.St = St  # CSR (R, N*L), used in backward
        self.n_points = n_points
        self.n_levels = n_levels
        self.n_features = n_features
        self.signature = signature

    @property
    def device(self) -> torch.device:
        return self.S.device

    def to(self, device) -> "FixedPoints":
        return FixedPoints(self.S.to(device), self.St.to(device), self.n_points, self.n_levels,
                           self.n_features, self.signature)

    def __len__(self) -> int:
        return self.n_points


class _SparseApply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, S, St):
        ctx.St = St
        return S @ P

    @staticmethod
    def backward(ctx, g):
        gP = ctx.St @ g.contiguous() if ctx.needs_input_grad[0] else None
        return gP, None, None


# --------------------------------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------------------------------


class HashEncoding(nn.Module):
    def __init__(self, n_input_dims: int, config: Optional[HashEncodingConfig] = None,
                 backend: str = "auto", seed: int = 0):
        super().__init__()
        config = HashEncodingConfig() if config is None else config
        config.validate()
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if backend == "tcnn":
            _import_tcnn()  # fail early and clearly when explicitly requested
        self.n_input_dims = int(n_input_dims)
        self.config = config
        self.backend = backend
        self.layout = level_layout(config, self.n_input_dims)
        L, F, d = config.n_levels, config.n_features_per_level, self.n_input_dims
        self.n_levels = L
        self.n_features_per_level = F
        self.n_output_dims = L * F
        self.n_rows = sum(li.table_size for li in self.layout)
        self.n_params = self.n_rows * F

        g = torch.Generator().manual_seed(int(seed))
        init = (torch.rand(self.n_params, generator=g, dtype=torch.float32) * 2 - 1) * 1e-4
        self.params = nn.Parameter(init)

        # constants as (non-persistent) buffers: they follow .to() and never enter the state_dict
        lay = self.layout
        self.register_buffer("_scales", torch.tensor([li.scale for li in lay], dtype=torch.float32),
                             persistent=False)
        self.register_buffer("_sizes", torch.tensor([li.table_size for li in lay]), persistent=False)
        self.register_buffer("_offsets", torch.tensor([li.offset for li in lay]), persistent=False)
        self.register_buffer("_hashed", torch.tensor([li.hashed for li in lay]), persistent=False)
        # dense strides res^k (mod 2^32, as tcnn's uint32 arithmetic), shape (L, d)
        strides = [[pow(li.resolution, k, 1 << 32) for k in range(d)] for li in lay]
        self.register_buffer("_strides", torch.tensor(strides, dtype=torch.int64), persistent=False)
        self.register_buffer("_primes", torch.tensor(_PRIMES[:d], dtype=torch.int64),
                             persistent=False)
        self.register_buffer("_bits", torch.tensor(
            [[(c >> k) & 1 for k in range(d)] for c in range(1 << d)], dtype=torch.int64),
            persistent=False)
        # created lazily; kept out of _modules so it never enters the state_dict / .to()
        self.__dict__["_tcnn_mod"] = None

    def extra_repr(self) -> str:
        return (f"n_input_dims={self.n_input_dims}, n_output_dims={self.n_output_dims}, "
                f"n_params={self.n_params}, backend={self.backend!r}, config={self.config}")

    # ---------------------------------------------------------------------------- torch backend --

    def _indices_weights(self, x: torch.Tensor):
        """Rows into params.view(-1, F) and weights for every (point, level, corner).

        Returns rows (N, L, 2^d) int64 and weights (N, L, 2^d) (differentiable wrt x)."""
        x = x.to(torch.float32)
        pos = x[:, None, :] * self._scales[None, :, None] + 0.5  # (N, L, d)
        fl = torch.floor(pos)
        frac = pos - fl  # d frac / dx = scale, as tcnn's dy_dx
        cell = fl.to(torch.int64) & _U32  # tcnn: (uint32_t)(int)floor(pos)
        # corners: (N, L, C, d)
        corner = (cell[:, :, None, :] + self._bits[None, None]) & _U32
        dense = ((corner * self._strides[None, :, None, :]) & _U32).sum(-1) & _U32
        hashed = torch.zeros_like(dense)
        for k in range(self.n_input_dims):
            hashed = hashed ^ ((corner[..., k] * self._primes[k]) & _U32)
        idx = torch.where(self._hashed[None, :, None], hashed, dense)
        rows = idx % self._sizes[None, :, None] + self._offsets[None, :, None]
        bits = self._bits.to(frac.dtype)  # (C, d)
        w = frac[:, :, None, :] * bits + (1 - frac[:, :, None, :]) * (1 - bits)
        weights = w.prod(-1)
        return rows, weights

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[0]
        rows, weights = self._indices_weights(x)
        table = self.params.view(-1, self.n_features_per_level)
        out = None
        for c in range(rows.shape[-1]):  # loop over the 2^d corners: gather + weighted sum
            v = table[rows[:, :, c]] * weights[:, :, c, None]  # (N, L, F)
            out = v if out is None else out + v
        return out.reshape(N, self.n_output_dims)

    # ----------------------------------------------------------------------------- fixed points --

    def _signature(self) -> tuple:
        return (self.n_input_dims, tuple(self.layout), self.n_features_per_level)

    @torch.no_grad()
    def precompute(self, x: torch.Tensor, block_points: int = 1 << 16) -> FixedPoints:
        """Build the sparse interpolation matrix for fixed points ``x`` (N, d) in [0, 1].

        Built in blocks of `block_points` points (rows of S), so the per-corner index tensors
        (N·L·2^d int64 several times over) exist for one block at a time: at the paper's size
        they, not the matrices, set the peak memory of the set-up. Sᵀ by `csr.transpose_csr`."""
        x = self._check_x(x)
        N, L, R = x.shape[0], self.n_levels, self.n_rows
        # int32 indices when they fit (CSR takes either): the indices are 2/3 of S's bytes in int64
        bound = N * L * 2**self.n_input_dims
        idx = torch.int32 if max(bound, R) < 2**31 else torch.int64
        # filled in place (a list of blocks and a cat held S twice); the entries coalesce merges
        # (hash collisions among a point's corners) leave an unused tail
        crow = torch.zeros(N * L + 1, dtype=idx, device=x.device)
        cols = torch.empty(bound, dtype=idx, device=x.device)
        vals = torch.empty(bound, dtype=torch.float32, device=x.device)
        nnz = 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            for p0 in range(0, N, block_points):
                xb = x[p0:p0 + block_points]
                n = xb.shape[0]
                rows, weights = self._indices_weights(xb)
                r = torch.arange(n * L, device=x.device).repeat_interleave(rows.shape[-1])
                block = torch.sparse_coo_tensor(
                    torch.stack([r, rows.reshape(-1)]), weights.reshape(-1).to(torch.float32),
                    (n * L, R), check_invariants=False).coalesce().to_sparse_csr()  # sums duplicates
                del rows, weights, r
                m = block.values().numel()
                crow[p0 * L + 1:(p0 + n) * L + 1] = block.crow_indices()[1:] + nnz
                cols[nnz:nnz + m] = block.col_indices()
                vals[nnz:nnz + m] = block.values()
                nnz += m
            S = torch.sparse_csr_tensor(crow, cols[:nnz], vals[:nnz], (N * L, R), check_invariants=False)
        St = transpose_csr(S)    # torch's CSC → CSR conversion peaked at ~6× Sᵀ (csr.py)
        return FixedPoints(S, St, N, L, self.n_features_per_level, self._signature())

    def accepts(self, fp: FixedPoints) -> bool:
        """Whether `fp` (precomputed by any encoding) is this encoding's matrix for its points: equal
        layouts give equal matrices, so encodings with one config can share one (memory)."""
        return fp.signature == self._signature()

    def forward_fixed(self, fp: FixedPoints) -> torch.Tensor:
        if not self.accepts(fp):
            raise ValueError("FixedPoints were precomputed for a different encoding layout")
        if fp.device != self.params.device:
            raise ValueError(f"FixedPoints on {fp.device} but params on {self.params.device}; "
                             "use fp.to(device)")
        P = self.params.view(-1, self.n_features_per_level)
        out = _SparseApply.apply(P, fp.S, fp.St)
        return out.reshape(fp.n_points, self.n_output_dims)

    # ------------------------------------------------------------------------------ tcnn backend --

    def _get_tcnn(self):
        if self._tcnn_mod is None:
            tcnn = _import_tcnn()
            with torch.no_grad():
                try:
                    mod = tcnn.Encoding(self.n_input_dims, self.config.to_tcnn(), dtype=torch.float32)
                except TypeError:  # older bindings without the dtype argument
                    mod = tcnn.Encoding(self.n_input_dims, self.config.to_tcnn())
            n = mod.params.numel()
            if n != self.n_params:
                raise RuntimeError(f"tcnn grid has {n} params, layout predicts {self.n_params}")
            if mod.params.dtype != torch.float32:
                raise RuntimeError("tcnn encoding must use float32 params")
            self.__dict__["_tcnn_mod"] = mod
        # our `params` is the single source of truth: tcnn reads it directly
        self._tcnn_mod.params = self.params
        return self._tcnn_mod

    def _forward_tcnn(self, x: torch.Tensor) -> torch.Tensor:
        mod = self._get_tcnn()
        return mod(x.to(torch.float32).contiguous()).to(torch.float32)

    # ---------------------------------------------------------------------------------- forward --

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.n_input_dims:
            raise ValueError(f"expected x of shape (N, {self.n_input_dims}), got {tuple(x.shape)}")
        if x.device != self.params.device:
            raise ValueError(f"x on {x.device} but params on {self.params.device}")
        return x

    def resolve_backend(self, x: torch.Tensor) -> str:
        global _warned_cuda_fallback
        if self.backend == "torch":
            return "torch"
        if self.backend == "tcnn":
            if not x.is_cuda:
                raise ValueError("backend='tcnn' needs CUDA inputs; use backend='torch' on CPU")
            return "tcnn"
        if x.is_cuda:
            if tcnn_available():
                return "tcnn"
            if not _warned_cuda_fallback:
                _warned_cuda_fallback = True
                warnings.warn("HashEncoding: tinycudann not available, using the (much slower) "
                              "pure-torch backend on CUDA", RuntimeWarning, stacklevel=3)
        return "torch"

    def forward(self, x: Union[torch.Tensor, FixedPoints]) -> torch.Tensor:
        if isinstance(x, FixedPoints):
            return self.forward_fixed(x)
        x = self._check_x(x)
        if self.resolve_backend(x) == "tcnn":
            return self._forward_tcnn(x)
        return self._forward_torch(x)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tcnn_mod"] = None  # native module is not picklable; rebuilt lazily
        return state
