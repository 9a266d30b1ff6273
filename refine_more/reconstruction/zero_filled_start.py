"""The refinement started from the zero-filled fit instead of the INR (the paper's Fig. S4 ablation).

The INR module is removed: the voxel-wise fit of the zero-filled images gives the starting maps
Q⁽⁰⁾ and the zero-filled images give the background phase; stage 2 (the preset's, loss 3) then
trains the unrolled refinement from there. Nothing else changes, so the difference to the full
method is what the INR's initialisation is worth.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from refine_more.baselines.fitting import fit_images
from refine_more.physics.operators import zero_filled_images
from refine_more.reconstruction.recon import Result, finish, setup, train_refinement


class FixedStart(nn.Module):
    """Stands in for the INR: fixed images W⁽⁰⁾ and map channels Q⁽⁰⁾, nothing to train."""

    def __init__(self, images: torch.Tensor, channels: torch.Tensor):
        super().__init__()
        self.register_buffer("_images", images)
        self.register_buffer("_channels", channels)
        self.n_images = images.shape[0]

    def images(self, chunk: int = 0) -> torch.Tensor:
        """W⁽⁰⁾; `chunk` is accepted for the INR's interface and does nothing (nothing to compute)."""
        return self._images

    def map_channels(self) -> torch.Tensor:
        return self._channels


def channels_from_maps(physics, maps: dict) -> torch.Tensor:
    """The inverse of ``physics.physical_maps``: (4, Z, Y, X) channels of physical maps; outside
    the tissue (and where a map is not finite) the neutral start of ``MapScaling.initial_raw``."""
    s = physics.scaling
    tissue = physics.tissue_np
    k_mid, k_half = 0.5 * (s.k_band[0] + s.k_band[1]), 0.5 * (s.k_band[1] - s.k_band[0])
    f = np.clip(maps["f"], 1e-4, 1 - 1e-4)
    k = maps["kF"] / f
    tanh_k = np.clip((k - k_mid) / k_half, -0.999, 0.999) if k_half > 0 else np.zeros_like(k)
    c = np.stack([maps["I0"] / (physics.data_scale * s.I0_scale), maps["T1F"] / s.T1_scale,
                  np.log(f / (1 - f)), np.arctanh(tanh_k)]).astype(np.float32)
    neutral = s.initial_raw().numpy().astype(np.float32)[:, None, None, None]
    keep = tissue[None] & np.isfinite(c)
    return torch.from_numpy(np.where(keep, c, np.broadcast_to(neutral, c.shape)))


def refine_from_zero_filled(subject, config, *, track_reference: bool = True) -> Result:
    """Stage 2 of `config` from the zero-filled fit (no INR); Result.maps_init is that fit."""
    run = setup(subject, config, track_reference=track_reference)
    prob, device = run.physics, run.physics.tissue.device
    zf = zero_filled_images(prob.kspace * prob.data_scale,      # the k-space and coils the physics uses
                            prob.A.coil_sens).cpu()                 # (ESPIRiT if estimated, virtual if compressed)
    maps = fit_images(zf.numpy(), subject.protocol, subject.b1, prob.tissue_np, k_band=config.k_band)
    channels = channels_from_maps(prob, maps).to(device)
    run.inr = FixedStart((zf / prob.data_scale).to(device=device, dtype=torch.complex64), channels)
    run.method = "zero-filled-start"
    run.params = {"stage1": [], "stage2": list(run.unrolled.parameters())}
    run.schedule["n1"] = 0
    run.done["stage1"] = 0
    run.timings["stage1"] = 0.0
    return finish(run, train_refinement(run))
