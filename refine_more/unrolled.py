"""Unrolled proximal gradient descent (paper §2.3, Fig. 1B, eq. 7–10).

Phase k: q̂ = q − α_k ⊙ ∇_q g(q) (per-map learned step sizes), then q = prox(q̂) with a shared
residual 2-D U-Net applied slice-wise (slices as the batch, the 4 maps as channels).
g is the k-space data consistency through the signal model and the operator; it is passed in
as a function so this module holds no physics (DeepInverse's split of physics and models).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import UnrollConfig
from .unet import UNet2D


class UnrolledPGD(nn.Module):
    def __init__(self, config: UnrollConfig, channels: int = 4):
        super().__init__()
        self.config = config
        self.unet = UNet2D(channels, config.unet_width, config.unet_levels)
        # α_k,i = step_scale_i · exp(log_step_k,i); step_scale is set from the first gradient so
        # the initial step moves each map by `step_init` of its norm, whatever its units
        self.log_step = nn.Parameter(torch.zeros(config.phases, channels))
        self.register_buffer("step_scale", torch.zeros(channels))

    def steps(self) -> torch.Tensor:
        return self.step_scale[None] * torch.exp(self.log_step)

    @torch.no_grad()
    def _init_step_scale(self, q, grad, weight, data_consistency):
        """Per-map scale ||q_i|| / ||∇_i g|| (so every map moves by the same relative amount),
        times the best of a few relative step lengths for the first phase (a one-time line search:
        the maps' units and the data's conditioning differ between subjects)."""
        dims = tuple(range(1, q.dim()))
        qn = (q * weight).pow(2).sum(dims).sqrt().clamp_min(1e-3)
        gn = (grad * weight).pow(2).sum(dims).sqrt().clamp_min(1e-12)
        per_map = qn / gn
        best, best_rel = float(data_consistency(q)), 0.0
        for rel in (0.3, 0.1, 0.03, 0.01, 0.003, 0.001):
            value = float(data_consistency(q - (rel * per_map).view(-1, 1, 1, 1) * grad * weight))
            if value < best:
                best, best_rel = value, rel
        self.step_scale.copy_(max(best_rel, 1e-4) * self.config.step_init * per_map)

    def forward(self, q0: torch.Tensor, data_consistency: Callable[[torch.Tensor], torch.Tensor],
                weight: torch.Tensor | None = None) -> list[torch.Tensor]:
        """q0 (C, Z, Y, X) map channels → the outputs of all K phases (each (C, Z, Y, X)).

        `weight` (Z, Y, X) restricts where maps are updated (the tissue mask); outside it they
        keep their input values, which the signal model then ignores.
        """
        weight = torch.ones_like(q0[0]) if weight is None else weight.to(q0.dtype)
        outputs, q = [], q0
        for k in range(self.config.phases):
            with torch.enable_grad():
                q_in = q if q.requires_grad else q.detach().requires_grad_()
                g = data_consistency(q_in)
                (grad,) = torch.autograd.grad(g, q_in, create_graph=self.config.create_graph and torch.is_grad_enabled())
            if not self.config.create_graph:
                grad = grad.detach()
            if float(self.step_scale.abs().sum()) == 0.0:
                self._init_step_scale(q.detach(), grad.detach(), weight, data_consistency)
            q_hat = q - self.steps()[k].view(-1, 1, 1, 1) * grad * weight
            refined = self.unet(q_hat.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)  # slices as batch
            q = weight * refined + (1 - weight) * q_hat
            outputs.append(q)
        return outputs
