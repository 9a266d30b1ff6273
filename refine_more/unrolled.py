"""Unrolled proximal gradient descent (paper §2.3, Fig. 1B, eq. 7–10).

Phase k: q̂ = q − α_k ⊙ P⁻¹∇_q g(q, z) (per-map learned step sizes), then q = prox(q̂) with a
shared residual 2-D U-Net applied slice-wise (slices as the batch, the 4 maps as channels).

g is the k-space data consistency through the signal model and the operator. This module holds
no physics (DeepInverse's split of physics and models): it gets a `DataTerm` that evaluates g,
optionally preconditions its gradient (P⁻¹: the per-voxel Gauss–Newton metric; identity is the
paper's eq. 8) and optionally refines a nuisance variable z of g that is not a map (the images'
background phase) by its own step before each map step. z is not learned and carries no gradient.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .config import UnrollConfig
from .unet import UNet2D


class DataTerm(Protocol):
    preconditioned: bool  # whether `direction` returns a preconditioned (Gauss–Newton) direction

    def value(self, q: torch.Tensor, z) -> torch.Tensor:
        """g(q, z), a scalar."""

    def direction(self, q: torch.Tensor, z, grad: torch.Tensor) -> torch.Tensor:
        """P⁻¹ grad (return `grad` for plain gradient steps); P must not depend on the graph."""

    def nuisance_step(self, q: torch.Tensor, z):
        """An improved z for fixed q (return z to keep it)."""


class UnrolledPGD(nn.Module):
    def __init__(self, config: UnrollConfig, channels: int = 4):
        super().__init__()
        self.config = config
        self.unet = UNet2D(channels, config.unet_width, config.unet_levels)
        # α_k,i = step_scale_i · exp(log_step_k,i); step_scale is set by a line search on the first
        # call, so the first step is sensible whatever the maps' units (see _init_step_scale)
        self.log_step = nn.Parameter(torch.zeros(config.phases, channels))
        self.register_buffer("step_scale", torch.zeros(channels))

    def steps(self) -> torch.Tensor:
        return self.step_scale[None] * torch.exp(self.log_step)

    @torch.no_grad()
    def _init_step_scale(self, q, z, direction, weight, term: DataTerm):
        """The first phase's step by a one-time line search (the maps' units and the data's
        conditioning differ between subjects). Plain gradient: per-map scale ||q_i|| / ||∇_i g||
        (every map moves by the same relative amount) times the best relative length.
        Preconditioned: the direction is already in the maps' units (a Gauss–Newton step), so
        only its length is searched, from the full step down."""
        if term.preconditioned:
            per_map = torch.ones(q.shape[0], dtype=q.dtype, device=q.device)
            candidates = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01)
        else:
            dims = tuple(range(1, q.dim()))
            qn = (q * weight).pow(2).sum(dims).sqrt().clamp_min(1e-3)
            gn = (direction * weight).pow(2).sum(dims).sqrt().clamp_min(1e-12)
            per_map = qn / gn
            candidates = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
        best, best_rel = float(term.value(q, z)), 0.0
        for rel in candidates:
            value = float(term.value(q - (rel * per_map).view(-1, 1, 1, 1) * direction * weight, z))
            if value < best:
                best, best_rel = value, rel
        self.step_scale.copy_(max(best_rel, 1e-4) * self.config.step_init * per_map)

    def forward(self, q0: torch.Tensor, term: DataTerm, z0=None,
                weight: torch.Tensor | None = None) -> list[tuple[torch.Tensor, object]]:
        """q0 (C, Z, Y, X) map channels → [(q_k, z_k)] after each of the K phases.

        `weight` (Z, Y, X) restricts where maps are updated (the tissue mask); outside it they
        keep their input values, which the signal model then ignores.
        """
        weight = torch.ones_like(q0[0]) if weight is None else weight.to(q0.dtype)
        outputs, q, z = [], q0, z0
        for k in range(self.config.phases):
            z = term.nuisance_step(q.detach(), z)
            with torch.enable_grad():
                q_in = q if q.requires_grad else q.detach().requires_grad_()
                g = term.value(q_in, z)
                (grad,) = torch.autograd.grad(g, q_in, create_graph=self.config.create_graph and torch.is_grad_enabled())
            if not self.config.create_graph:
                grad = grad.detach()
            direction = term.direction(q.detach(), z, grad)
            if float(self.step_scale.abs().sum()) == 0.0:
                self._init_step_scale(q.detach(), z, direction.detach(), weight, term)
            q_hat = q - self.steps()[k].view(-1, 1, 1, 1) * direction * weight
            refined = self.unet(q_hat.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)  # slices as batch
            q = weight * refined + (1 - weight) * q_hat
            outputs.append((q, z))
        return outputs
