"""Normalised map channels ↔ physical maps (I0, T1F, f, k, kF): the output constraints of the
paper's §3.3 and this project's k band. The INR and the refinement work on O(1) channels; the
signal model on physical maps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from refine_more.config import check_k_band


@dataclass
class MapScaling:
    """Normalised map channels ↔ physical maps.

    Channels (all O(1)): c0 → I0 = I0_scale·|c0|, c1 → T1F = T1_scale·|c1|, c2 → f = sigmoid(c2),
    c3 → k = k_mid + k_half·tanh(c3), kF = k·f. Physical bounds on T1F keep the signal model sane.
    """
    I0_scale: float
    T1_scale: float = 1.0
    k_band: tuple = (20.0, 26.0)
    T1_bounds: tuple = (0.05, 6.0)

    def __post_init__(self):
        check_k_band(self.k_band)

    def to_physical(self, c: torch.Tensor) -> dict:
        """c (4, *P) → dict of (*P) tensors I0, T1F, f, k, kF."""
        k_mid = 0.5 * (self.k_band[0] + self.k_band[1])
        k_half = 0.5 * (self.k_band[1] - self.k_band[0])
        I0 = self.I0_scale * c[0].abs()
        T1F = (self.T1_scale * c[1].abs()).clamp(*self.T1_bounds)
        f = torch.sigmoid(c[2])
        k = k_mid + k_half * torch.tanh(c[3])
        return {"I0": I0, "T1F": T1F, "f": f, "k": k, "kF": k * f}

    def to_channels(self, maps: dict) -> torch.Tensor:
        """Physical maps (I0, T1F, f, k: tensors of one shape P) → channels (4, *P), the inverse of
        `to_physical` within its range: f is kept 1e-6 off 0 and 1 and k as far off the band's ends
        (the channels would be infinite there); a band that is a point gives c3 = 0."""
        k_mid = 0.5 * (self.k_band[0] + self.k_band[1])
        k_half = 0.5 * (self.k_band[1] - self.k_band[0])
        f = maps["f"].clamp(1e-6, 1 - 1e-6)
        k = torch.atanh(((maps["k"] - k_mid) / k_half).clamp(-1 + 1e-6, 1 - 1e-6)) if k_half > 0 \
            else torch.zeros_like(f)
        return torch.stack([maps["I0"] / self.I0_scale, maps["T1F"] / self.T1_scale, torch.log(f / (1 - f)), k])

    @staticmethod
    def canonical(c: torch.Tensor) -> torch.Tensor:
        """The same maps with the sign-free channels (I0, T1F enter through |·|) made ≥ 0. The
        refinement starts here: its smoothness prior acts on the channels, and a voxel whose sign
        differs from its neighbours' would be held in a false minimum (crossing 0 means I0 = 0)."""
        return torch.cat([c[:2].abs(), c[2:]], dim=0)

    def initial_raw(self) -> torch.Tensor:
        """Channel values of a neutral start: I0 = I0_scale, T1F = 1 s, f ≈ 0.1, k mid-band."""
        return torch.tensor([1.0, 1.0 / self.T1_scale, -2.2, 0.0])
