"""The objective the refinement minimises (loss 3): the data term g(Q, φ) of `physics.ScanPhysics`
plus an optional explicit prior on the maps (priors.py), with the direction, whitening and
nuisance (phase) steps the unrolled and classical solvers (unrolled.py) ask of it.
"""
from __future__ import annotations

import math

import torch

from refine_more.reconstruction.losses import physics_consistency_chunked
from refine_more.physics.scan import ScanPhysics


class RefinementObjective:
    """The refinement's objective (unrolled.DataTerm) for one scan: g(Q, φ₀) plus, when
    `unroll.map_smoothness` has a nonzero weight, the explicit prior R(Q) (priors.MapSmoothness),
    with the images' background phase φ₀ as the nuisance variable, a Gauss–Newton (plus the
    prior's Hessian diagonal) or plain map direction, and an optional Gauss–Newton step on φ₀
    before each map step."""

    def __init__(self, problem: ScanPhysics, config, image_chunk: int = 0):
        from refine_more.reconstruction.priors import MapSmoothness

        if config.preconditioner not in ("gauss-newton", "none"):
            raise ValueError(f"unroll.preconditioner must be 'gauss-newton' or 'none', got {config.preconditioner!r}")
        if not config.gn_damping > 0:
            raise ValueError(f"unroll.gn_damping must be > 0 (Levenberg damping), got {config.gn_damping!r}")
        if config.phase_steps < 0:
            raise ValueError(f"unroll.phase_steps must be ≥ 0, got {config.phase_steps!r}")
        self.problem, self.config = problem, config
        # g image chunk by image chunk (memory, losses.data_consistency_chunked); first-order only
        self.image_chunk = 0 if config.create_graph else image_chunk
        self.preconditioned = config.preconditioner != "none"
        # weights relative to the data term's curvature at a neutral map (the same for every start
        # of the descent, so scratch and adapted runs minimise the same objective); no prior when
        # every weight is 0
        neutral = problem.scaling.initial_raw().to(problem.tissue.device).view(-1, 1, 1, 1).expand(-1, *problem.tissue.shape)
        curvature = problem.gauss_newton_matrix(neutral).diagonal(dim1=-2, dim2=-1)
        prior = MapSmoothness.relative_to(curvature, problem.tissue, config.map_smoothness, config.map_edge_scale)
        self.prior = prior if prior.active else None
        self._prior_curvature = prior.hessian_diagonal() if prior.active else None  # constant: once
        # the weights and δ as built: `set_prior_scale` scales these, so setting it again replaces
        self._built = (prior.weights.clone(), prior.edge_scale.clone()) if prior.active else None

    def set_prior_scale(self, factor: float, edge_factor: float = 1.0) -> None:
        """The prior's weights = `factor` × those it was built with, its pseudo-Huber δ = `edge_factor` ×
        `unroll.map_edge_scale` (`classical.prior_scale`: the scan's noise); setting them again
        replaces, never compounds."""
        if not (math.isfinite(factor) and factor > 0 and math.isfinite(edge_factor) and edge_factor > 0):
            raise ValueError(f"prior scale factors must be finite and > 0, got {factor!r}, {edge_factor!r}")
        if self.prior is None:
            return
        weights, edge_scale = self._built
        self.prior.weights, self.prior.edge_scale = weights * factor, edge_scale * edge_factor
        self._prior_curvature = self.prior.hessian_diagonal()

    @property
    def mean_square_scale(self) -> float:
        """‖d‖² over the number of k-space entries: g × this is the mean of |Ax − d|² over the whole
        k-space array (the public code's loss 3, whose gradient its fixed step multiplies)."""
        return self.problem.kspace_energy / self.problem.kspace.numel()

    def start(self, channels: torch.Tensor) -> torch.Tensor:
        """The refinement's starting channels: sign-canonical when the prior is on (it acts on the
        channels, and I0/T1F enter through |·|: voxels of opposite signs would be false minima);
        unchanged otherwise (the paper's unroll sees the INR's channels as they are)."""
        return channels if self.prior is None else self.problem.scaling.canonical(channels)

    def value(self, q, phase):
        if self.image_chunk:
            g = physics_consistency_chunked(self.problem, q, phase, self.image_chunk)
        else:
            g = self.problem.physics_consistency(q, phase)
        return g if self.prior is None else g + self.prior.value(q)

    def direction(self, q, phase, grad):
        if not self.preconditioned:
            return grad
        return self.problem.gauss_newton_direction(q, grad, self.config.gn_damping, self._prior_curvature)

    def whitening(self, q, phase):
        """Linear maps (u ↦ δq, v ↦ δφ₀) under which the objective's curvature is ≈ identity at
        (q, φ₀), for a joint quasi-Newton solve (unrolled.quasi_newton): the Cholesky factor of the
        per-voxel Gauss–Newton matrix (plus the prior's diagonal) for the maps, the phase step's
        metric for φ₀ (None: φ₀ stays fixed, `refine_phase` off)."""
        damping = self.config.gn_damping
        factor = self.problem.gauss_newton_whitening(q, damping, self._prior_curvature)
        maps = lambda u: torch.einsum("...ij,j...->i...", factor, u)  # noqa: E731
        if not self.config.refine_phase:
            return maps, None
        tissue = self.problem.tissue.to(q.dtype)
        scale = self.problem.phase_metric(q, damping).rsqrt()
        model = self.problem.phase_model
        if not model.per_image:
            return maps, (lambda v: scale * v)
        scale_c = self.problem.coefficient_metric(q, damping).rsqrt()
        return maps, (lambda v: model.pack(scale * model.unpack(v)[0] * tissue, scale_c * model.unpack(v)[1]))

    def nuisance_step(self, q, phase):
        if not self.config.refine_phase:
            return phase
        return self.problem.phase_steps(q, phase, self.config.phase_steps, self.config.gn_damping)
