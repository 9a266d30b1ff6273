"""Explicit priors on the parameter maps for the refinement objective (neither physics nor learned).

The data term of the refinement, ||A S(Q) − d||², is ill-posed at AF 4: an unregularised descent
first removes the INR's errors, then fits noise and aliasing (on 6×32×32, T1F/f/kF 4.6/5.6/7.2 %
after 32 steps, 6.7/9.3/9.8 % after 512), so its result depended on where it started and when it
stopped, and the adapted runs, which start from a worse INR, ended worse. With a quadratic
smoothness prior the objective has a minimum the descent converges to from either start.

`MapSmoothness`: R(Q) = Σ_c λ_c Σ_{i~j} (q_c,i − q_c,j)² over pairs of face-neighbouring tissue
voxels, on the normalised map channels (physics.scaling.MapScaling), which the refinement starts sign-canonical
(`MapScaling.canonical`; steps may make a channel negative again, where the prior then smooths
across the sign: harmless once the maps are near their minimum). All axes weigh the same, whatever
the voxel size (with thick slices the prior smooths across slices as much as in-plane).
The weights are given relative to the data term's curvature, λ_c = ρ_c · mean over tissue of the Gauss–Newton diagonal H_cc at a neutral
map, so ρ does not depend on the data's scale, the coils or the sampling.
"""
from __future__ import annotations

import math

import torch


class MapSmoothness:
    def __init__(self, tissue: torch.Tensor, weights, edge_scale=None):
        """`tissue` (Z, Y, X) bool; `weights` λ_c per channel (C,), ≥ 0; `edge_scale` δ_c per
        channel (C,), ≥ 0, or None: with δ_c > 0 the penalty of a difference d is the pseudo-Huber
        2δ²(√(1 + (d/δ)²) − 1) instead of d² (the same for |d| ≪ δ, linear like total variation
        for |d| ≫ δ, so edges between tissues are kept); δ_c = 0 keeps d²."""
        self.weights = torch.as_tensor(weights, dtype=torch.float32, device=tissue.device)
        if self.weights.dim() != 1 or not bool(torch.isfinite(self.weights).all()) or bool((self.weights < 0).any()):
            raise ValueError(f"map smoothness weights must be finite and ≥ 0, got {weights!r}")
        edge = torch.zeros_like(self.weights) if edge_scale is None else torch.as_tensor(
            [float(e) for e in edge_scale], dtype=torch.float32, device=tissue.device)
        if edge.shape != self.weights.shape or not bool(torch.isfinite(edge).all()) or bool((edge < 0).any()):
            raise ValueError(f"map edge scales must be {self.weights.numel()} finite values ≥ 0, got {edge_scale!r}")
        self.edge_scale = edge
        tissue = tissue.bool()
        # (axis, pairs (i, i + e_axis) with both voxels in tissue) for each spatial axis
        self.pairs = [(d, (tissue.narrow(d, 1, n - 1) & tissue.narrow(d, 0, n - 1)).float())
                      for d, n in enumerate(tissue.shape) if n > 1]
        degree = torch.zeros(tissue.shape, device=tissue.device)
        for d, pair in self.pairs:
            n = tissue.shape[d]
            degree.narrow(d, 0, n - 1).add_(pair)
            degree.narrow(d, 1, n - 1).add_(pair)
        self.degree = degree

    @property
    def active(self) -> bool:
        return bool((self.weights > 0).any())

    def value(self, q: torch.Tensor) -> torch.Tensor:
        """R(q) for q (C, Z, Y, X)."""
        total = q.new_zeros(())
        huber = bool((self.edge_scale > 0).any())
        delta = self.edge_scale.clamp_min(1e-12).view(-1, *([1] * (q.dim() - 1)))
        for d, pair in self.pairs:
            diff = torch.diff(q, dim=d + 1)
            penalty = diff.pow(2)
            if huber:
                smooth = 2 * delta.pow(2) * (torch.sqrt(1 + (diff / delta).pow(2)) - 1)
                penalty = torch.where(self.edge_scale.view_as(delta) > 0, smooth, penalty)
            total = total + (penalty * pair).sum(dim=tuple(range(1, q.dim()))).mul(self.weights).sum()
        return total

    def hessian_diagonal(self) -> torch.Tensor:
        """∂²R/∂q_c,i² = 2 λ_c · (number of tissue neighbours of i): (Z, Y, X, C) (for pseudo-Huber
        channels, its value where neighbours agree, its largest). The diagonal
        (Jacobi) part of R's Hessian, not a bound on it (that is up to twice as large for
        checkerboard patterns): the descent's backtracking takes care of the rest."""
        return 2.0 * self.degree[..., None] * self.weights

    @classmethod
    def relative_to(cls, data_curvature: torch.Tensor, tissue: torch.Tensor, rho, edge_scale=None) -> "MapSmoothness":
        """λ_c = ρ_c · mean_tissue(H_cc): `data_curvature` is the data term's Gauss–Newton diagonal
        (Z, Y, X, C)."""
        rho = [float(r) for r in rho]
        if len(rho) != data_curvature.shape[-1] or not all(math.isfinite(r) and r >= 0 for r in rho):
            raise ValueError(f"unroll.map_smoothness must be {data_curvature.shape[-1]} finite weights ≥ 0, got {rho!r}")
        scale = data_curvature[tissue.bool()].mean(0)
        dead = [c for c, r in enumerate(rho) if r > 0 and not float(scale[c]) > 0]
        if dead:
            raise ValueError(f"unroll.map_smoothness: channel(s) {dead} have ρ > 0 but the data term does not "
                             "depend on them (k held fixed by a zero-width k_band?): set their ρ to 0")
        return cls(tissue, torch.tensor(rho, device=scale.device) * scale, edge_scale)
