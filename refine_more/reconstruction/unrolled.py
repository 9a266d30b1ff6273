"""Unrolled proximal gradient descent (paper §2.3, Fig. 1B, eq. 7–10).

Iteration k: q̂ = q − α_k ⊙ P⁻¹∇_q g(q, z) (per-map learned step sizes), then q = prox(q̂) with a
shared residual 2-D U-Net applied slice-wise (slices as the batch, the 4 maps as channels).

g is the k-space data consistency through the signal model and the operator (plus an optional
explicit prior on the maps, which the `DataTerm` folds into its value and direction). This module holds
no physics (DeepInverse's split of physics and models): it gets a `DataTerm` that evaluates g,
optionally preconditions its gradient (P⁻¹: the per-voxel Gauss–Newton metric; identity is the
paper's eq. 8) and optionally refines a nuisance variable z of g that is not a map (the images'
background phase) by its own step before each map step. z is not learned and carries no gradient.

Warm start (`UnrollConfig.warm_start_steps`, a departure from the paper): before the K learned
iterations, M plain descent steps on g along the same (preconditioned) direction, with a monotone
backtracking step length and no learned parameters (`descend`). The per-voxel Gauss–Newton metric
ignores aliasing, so a safe step is ~0.5 and four steps cannot get far from the INR's maps (~22 %
nRMSE). On the data term alone, 16–32 steps reach its early-stopped optimum (T1F ~4 %) and more
steps over-fit; with the explicit smoothness prior of `DataTerm` (objective.RefinementObjective,
priors.MapSmoothness) the objective has a minimum, but the descent creeps towards it along slow
modes (the prior's coupling between voxels, the background phase) for thousands of steps, so a
fixed budget stopped it ±1 % T1F apart from different INRs. `warm_start_solver = "lbfgs"`
(`quasi_newton`) minimises maps and phase jointly by L-BFGS in the Gauss–Newton-whitened
coordinates and gets near the minimum in 256 iterations (~0.3 % apart from any start). The
learned iterations then polish a converged estimate instead of learning this subject's path to it,
which is what made the U-Net subject-specific (README, adaptation).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from refine_more.config import UnrollConfig
from refine_more.networks.unet import UNet2D


class DataTerm(Protocol):
    preconditioned: bool  # whether `direction` returns a preconditioned (Gauss–Newton) direction

    def value(self, q: torch.Tensor, z) -> torch.Tensor:
        """g(q, z), a scalar (the whole objective the refinement minimises: data term plus any prior)."""

    def direction(self, q: torch.Tensor, z, grad: torch.Tensor) -> torch.Tensor:
        """P⁻¹ grad (return `grad` for plain gradient steps); P must not depend on the graph."""

    def nuisance_step(self, q: torch.Tensor, z):
        """An improved z for fixed q (return z to keep it)."""

    def whitening(self, q: torch.Tensor, z):
        """(M, N): linear maps u ↦ δq and v ↦ δz (N None: z stays fixed) under which g's curvature
        at (q, z) is ≈ identity (only the `lbfgs` warm start uses it)."""


def descend(term: DataTerm, q: torch.Tensor, z, weight: torch.Tensor, steps: int, grow: float = 1.5):
    """`steps` monotone descent steps on g(q, z) (`term.value`, prior included) from q, without a graph; returns (q, z) with q detached
    (z is whatever `term.nuisance_step` returns; RefinementObjective's carries no graph either).

    Each step refines z (`term.nuisance_step`), then moves q along `term.direction` (masked by
    `weight`) by the longest of α = min(1, grow·α_prev), α/2, α/4, … that lowers g (down to 1e-3,
    below which q stays put). A trial whose g is not finite counts as no decrease. g never rises
    through a map step; the nuisance step must not raise it either (RefinementObjective's phase step is
    a majorizer step).
    """
    q, alpha = q.detach(), 1.0 / grow
    for _ in range(steps):
        z = term.nuisance_step(q, z)
        q_in = q.clone().requires_grad_()
        with torch.enable_grad():
            g = term.value(q_in, z)
            (grad,) = torch.autograd.grad(g, q_in)
        g0 = float(g.detach())
        if not math.isfinite(g0):
            break
        direction = term.direction(q, z, grad.detach()) * weight
        alpha = min(1.0, grow * alpha)
        with torch.no_grad():
            while alpha >= 1e-3 and not float(term.value(q - alpha * direction, z)) < g0:
                alpha /= 2
            if alpha >= 1e-3:
                q = q - alpha * direction
            else:
                alpha = 1e-3
    return q, z


def quasi_newton(term: DataTerm, q: torch.Tensor, z, weight: torch.Tensor, iterations: int,
                 warmup_steps: int = 16, block: int = 32, history: int = 10):
    """Minimise g(q, z) (`term.value`) jointly over the maps and the nuisance z: `warmup_steps` of
    `descend`, then `iterations` of L-BFGS (strong-Wolfe line search) in the whitened coordinates
    of `term.whitening` (q = q_ref + Mu, z = z_ref + Nv, recomputed at the current point every
    `block` iterations, which also restarts L-BFGS's memory). Returns (q, z) detached.

    Why: `descend`'s per-voxel metric ignores the prior's coupling between voxels and the
    background phase moves by majorizer steps, so its iterates creep along slow modes for
    thousands of steps and where a fixed budget stops them depends on the start (scratch vs
    adapted INR: ±1 % T1F). L-BFGS learns those modes: on 6×32×32 it reaches in 256 iterations
    (~2.5 s) an objective `descend` needs >1000 steps (~20 s) for, the same maps (±0.3 %) from
    every start. The warm-up keeps its first, unit-length whitened steps away from false minima
    (from one adapted INR, L-BFGS alone ended 3.6 % higher in the objective).
    """
    q, z = descend(term, q, z, weight, warmup_steps) if warmup_steps else (q.detach(), z)
    with torch.no_grad():
        start = float(term.value(q, z))  # each block's start: the previous block's end value
    done = 0
    while done < iterations and math.isfinite(start):  # non-finite: nothing to whiten or search from
        n = min(block, iterations - done)
        q_ref, z_ref = q.detach(), (z.detach() if isinstance(z, torch.Tensor) else z)
        maps, nuisance = term.whitening(q_ref, z_ref)
        joint = nuisance is not None and isinstance(z, torch.Tensor)
        u = torch.zeros(q.shape, dtype=q.dtype, device=q.device, requires_grad=True)  # contiguous, whatever q is
        v = torch.zeros(z.shape, dtype=z.dtype, device=z.device, requires_grad=True) if joint else None

        def point():
            step = nuisance(v) if joint else None
            # a nuisance shaped like the maps' voxels is masked here; a packed one (per-image phase) by the term
            zz = (z_ref + (step * weight if step.shape == weight.shape else step)) if joint else z_ref
            return q_ref + maps(u) * weight, zz

        opt = torch.optim.LBFGS([u] + ([v] if joint else []), lr=1.0, max_iter=n, history_size=history,
                                line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)

        def closure():
            opt.zero_grad()
            value = term.value(*point()) / start  # O(1) for the line search's tolerances
            value.backward()
            return value

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            q_new, z_new = point()
            value = float(term.value(q_new, z_new))
        if not (math.isfinite(value) and value <= start):  # never worse than the block's start
            break
        q, z, start = q_new.detach(), (z_new.detach() if joint else z_new), value
        done += n
    return q, z


class UnrolledPGD(nn.Module):
    """The K learned iterations. With ``config.refine_k`` off (the paper's code: 3 refined maps),
    the k channel passes through unchanged: no data step, not a U-Net channel."""

    def __init__(self, config: UnrollConfig):
        super().__init__()
        channels = 4 if config.refine_k else 3
        if isinstance(config.warm_start_steps, bool) or not isinstance(config.warm_start_steps, int) or config.warm_start_steps < 0:
            raise ValueError(f"unroll.warm_start_steps must be ≥ 0, got {config.warm_start_steps!r}")
        if config.warm_start_solver not in ("descent", "lbfgs"):
            raise ValueError(f"unroll.warm_start_solver must be 'descent' or 'lbfgs', got {config.warm_start_solver!r}")
        self.config = config
        self.unet = UNet2D(channels, config.unet_width, config.unet_levels, config.unet_out_kernel)
        # α_k,i = step_scale_i · exp(log_step_k,i); step_scale is set by a line search on the first
        # call, so the first step is sensible whatever the maps' units (see _init_step_scale)
        self.log_step = nn.Parameter(torch.zeros(config.iterations, channels), requires_grad=not config.fixed_step)
        self.register_buffer("step_scale", torch.zeros(channels))

    slice_chunk = 0
    """> 0: the U-Net is checkpointed this many slices at a time (recomputed in backward; only its
    input is kept): its activations per iteration, ~4 GB at the paper's size, exist for one chunk.
    Set with `image_chunk` (recon.setup); the same result."""

    def steps(self) -> torch.Tensor:
        """α (K, maps): learned, or the public code's fixed step (`fixed_step`: log_step never enters)."""
        if self.config.fixed_step:
            return self.step_scale[None].expand(self.config.iterations, -1)
        return self.step_scale[None] * torch.exp(self.log_step)

    def prox(self, x: torch.Tensor) -> torch.Tensor:
        """The U-Net on slices x (B, C, H, W), checkpointed by `slice_chunk` when it builds a graph."""
        n = self.slice_chunk
        if not (n and torch.is_grad_enabled()):
            return self.unet(x)
        return torch.cat([checkpoint(self.unet, x[i:i + n], use_reentrant=False) for i in range(0, x.shape[0], n)])

    @torch.no_grad()
    def _init_step_scale(self, q, z, direction, weight, term: DataTerm):
        """The first iteration's step by a one-time line search (the maps' units and the data's
        conditioning differ between subjects). Plain gradient: per-map scale ||q_i|| / ||∇_i g||
        (every map moves by the same relative amount) times the best relative length.
        Preconditioned: the direction is already in the maps' units (a Gauss–Newton step), so
        only its length is searched, from the full step down. Channels past the refined ones
        (k, when not refined) do not move."""
        n = self.step_scale.shape[0]
        if self.config.fixed_step:   # the code's α on ∇ mean |Ax − d|² = ∇g · ‖d‖² / entries (objective.py)
            self.step_scale.fill_(self.config.fixed_step * term.mean_square_scale)
            return
        direction = torch.cat([direction[:n], torch.zeros_like(direction[n:])], dim=0)
        if term.preconditioned:
            per_map = torch.ones(q.shape[0], dtype=q.dtype, device=q.device)
            candidates = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01)
        else:
            dims = tuple(range(1, q.dim()))
            qn = (q * weight).pow(2).sum(dims).sqrt().clamp_min(1e-3)
            gn = (direction * weight).pow(2).sum(dims).sqrt().clamp_min(1e-12)
            per_map = qn / gn                       # the pass-through channels' direction is 0
            candidates = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
        best, best_rel = float(term.value(q, z)), 0.0
        for rel in candidates:
            value = float(term.value(q - (rel * per_map).view(-1, 1, 1, 1) * direction * weight, z))
            if value < best:
                best, best_rel = value, rel
        self.step_scale.copy_(max(best_rel, 1e-4) * self.config.step_init * per_map[:n])

    def warm_start(self, q0: torch.Tensor, term: DataTerm, z0=None, weight: torch.Tensor | None = None):
        """(q, z) the learned iterations start from: q0 itself, or `warm_start_steps` of `descend`
        (detached: no gradient reaches q0 through the warm start)."""
        if not self.config.warm_start_steps:
            return q0, z0
        weight = torch.ones_like(q0[0]) if weight is None else weight.to(q0.dtype)
        if self.config.warm_start_solver == "lbfgs":
            return quasi_newton(term, q0, z0, weight, self.config.warm_start_steps)
        return descend(term, q0, z0, weight, self.config.warm_start_steps)

    def forward(self, q0: torch.Tensor, term: DataTerm, z0=None,
                weight: torch.Tensor | None = None) -> list[tuple[torch.Tensor, object]]:
        """q0 (C, Z, Y, X) map channels → [(q_k, z_k)] after each of the K learned iterations
        (`warm_start`, then `learned_iterations`).

        `weight` (Z, Y, X) restricts where maps are updated (the tissue mask); outside it they
        keep their input values, which the signal model then ignores.
        """
        q, z = self.warm_start(q0, term, z0, weight)
        return self.learned_iterations(q, term, z, weight)

    def first_step(self, q: torch.Tensor, term: DataTerm, z=None) -> tuple:
        """(direction, z) of the first learned iteration from a fixed (q, z): nothing learned enters
        them, so a stage 2 that starts every training iteration from the same warm start computes
        them once (`learned_iterations(..., first=)`: the same floats, and no backprop into q)."""
        with torch.no_grad():
            return self._direction(q.detach(), term, z)

    def learned_iterations(self, q: torch.Tensor, term: DataTerm, z=None,
                           weight: torch.Tensor | None = None, first=None) -> list[tuple[torch.Tensor, object]]:
        """The K learned iterations from (q, z), without the warm start; `first`: `first_step(q, term, z)`
        for this (q, z) with q not requiring grad."""
        weight = torch.ones_like(q[0]) if weight is None else weight.to(q.dtype)
        outputs = []
        for k in range(self.config.iterations):
            if k == 0 and first is not None:
                direction, z = first
            else:
                direction, z = self._direction(q, term, z)
            n = self.step_scale.shape[0]            # refined channels; the rest (k) pass through
            if float(self.step_scale.abs().sum()) == 0.0:
                self._init_step_scale(q.detach(), z, direction.detach(), weight, term)
            q_hat = q[:n] - self.steps()[k].view(-1, 1, 1, 1) * direction[:n] * weight
            seen = q_hat * weight if self.config.mask_outside_tissue else q_hat   # the code masks the maps
            refined = self.prox(seen.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)  # slices as batch
            q = torch.cat([weight * refined + (1 - weight) * q_hat, q[n:]], dim=0)
            outputs.append((q, z))
        return outputs

    def _direction(self, q: torch.Tensor, term: DataTerm, z):
        """One learned iteration's nuisance step, then its (preconditioned) direction at q: (direction, z)."""
        z = term.nuisance_step(q.detach(), z)
        with torch.enable_grad():
            q_in = q if q.requires_grad else q.detach().requires_grad_()
            g = term.value(q_in, z)
            (grad,) = torch.autograd.grad(g, q_in, create_graph=self.config.create_graph and torch.is_grad_enabled())
        if not self.config.create_graph:
            grad = grad.detach()
        return term.direction(q.detach(), z, grad), z
