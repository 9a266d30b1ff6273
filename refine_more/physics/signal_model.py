"""BTS steady-state signal model (paper eq. 12–15), differentiable, batched over voxels.

Two-pool model (free F, bound R), with the pools' longitudinal magnetisations in units of the
total M0 (so they relax towards 1 − f and f). One TR is split into instantaneous operators, in
this order (the order that gives the A, B, C of the paper's eq. 13):

1. excitation: m_F ← m_F cos α,            m_R ← m_R · E_W0   (signal ∝ m_F sin α)
2. saturation: m_R ← m_R · E_W              (E_W = 1 for images without the saturation pulse)
3. relaxation over TR: m ← E1 m + (1 − E1) m_eq, with m_eq = (1 − f, f)
4. exchange over TR: m ← X m,  X = [[A, (1−f)(1−Ek)], [B, C]],
   A = 1 − f + f Ek, B = f − f Ek, C = f + Ek − f Ek, Ek = exp(−k TR), k = kF / f.

The steady state m = (I − X D)⁻¹ X r (D = diag(E1F cos α, E1R E_W0 E_W), r = (1 − E1) m_eq) is
solved in closed form for the 2×2 system. With f → 0 it reduces to the Ernst equation.
The numerator's first term, (1 − f)[(1 − E1F) A + (1 − E1R) B], is the paper's eq. 12 numerator.
"""
from __future__ import annotations

import numpy as np
import torch

from refine_more.physics.protocol import Protocol

F_MIN = 1e-6  # keeps k = kF / f finite (and differentiable) as f → 0


class BTSModel:
    """S(I0, T1F, f, kF; b1) for one protocol. Constants are cached per device and dtype.

    Parameter tensors share a shape P (any, e.g. (N,) voxels); `b1` broadcasts against P.
    Outputs have shape (T, *P): image-major, like the k-space.
    """

    def __init__(self, protocol: Protocol):
        self.protocol = protocol
        self._np = protocol.constants()
        self._cache: dict = {}

    def _const(self, like: torch.Tensor) -> dict:
        key = (like.device, like.dtype)
        if key not in self._cache:
            c = {}
            for name, v in self._np.items():
                c[name] = torch.as_tensor(np.asarray(v, dtype=np.float64), dtype=like.dtype, device=like.device)
            self._cache[key] = c
        return self._cache[key]

    # -- magnitudes -----------------------------------------------------------------------------
    def prepare(self, b1, dtype=None) -> "PreparedBTS":
        """The model for one B1+ map: what depends on the protocol and b1 alone, computed once."""
        return PreparedBTS(self, b1, dtype)

    def magnitude_k(self, I0, T1F, f, k, b1=None) -> torch.Tensor:
        """Real signal (T, *P) parameterised by the fundamental exchange rate k (1/s)."""
        b1 = torch.ones_like(I0) if b1 is None else torch.as_tensor(b1, dtype=I0.dtype, device=I0.device)
        shape = torch.broadcast_shapes(b1.shape, I0.shape, T1F.shape, f.shape, torch.as_tensor(k).shape)
        return self.prepare(b1.expand(shape), I0.dtype).magnitude_k(I0, T1F, f, k)

    def magnitude(self, I0, T1F, f, kF, b1=None) -> torch.Tensor:
        """Real signal (T, *P) in the paper's parameters (k = kF / f)."""
        f_safe = f.clamp_min(F_MIN)
        return self.magnitude_k(I0, T1F, f, kF / f_safe, b1)

    # -- complex images -------------------------------------------------------------------------
    def bloch_siegert_phase(self, b1, like: torch.Tensor) -> torch.Tensor:
        """φ_BS (T, *P): only saturated images carry it; it scales with b1²."""
        c = self._const(like)
        shape_t = (-1,) + (1,) * like.dim()
        b1 = torch.ones_like(like) if b1 is None else torch.as_tensor(b1, dtype=like.dtype, device=like.device)
        return c["saturation"].view(shape_t) * c["phi_bs"] * b1 * b1

    def complex_images(self, I0, T1F, f, kF, b1=None, background_phase=None) -> torch.Tensor:
        """Complex weighted images (T, *P): |S| · exp(i(φ_BS + background phase))."""
        mag = self.magnitude(I0, T1F, f, kF, b1)
        phase = self.bloch_siegert_phase(b1, I0)
        if background_phase is not None:
            phase = phase + background_phase
        return torch.polar(mag, phase) if mag.dtype in (torch.float32, torch.float64) else mag * torch.exp(1j * phase)


class PreparedBTS:
    """`BTSModel.magnitude_k` for one B1+ map b1 (shape P): the flip angles, the saturation and
    the bound pool's relaxation depend on b1 and the protocol only, so their (T, *P) factors
    (cos α, sin α, d2 = E1R·E_W0·E_W) are computed once per subject, and with one TR for all
    images the factors of T1F, f and k stay per voxel. A call then costs a few (T, *P)
    products and no transcendental function of them: the refinement evaluates S(Q) thousands of
    times (profile: 8× the FFTs of A at 12×64×64)."""

    def __init__(self, model: BTSModel, b1, dtype=None):
        b1 = torch.as_tensor(b1)
        b1 = b1.to(dtype or b1.dtype)
        c = model._const(b1)
        shape_t = (-1,) + (1,) * b1.dim()
        b1sq = b1 * b1
        alpha = c["alpha_rad"].view(shape_t) * b1                      # (T, *P)
        E_W0 = torch.exp(-c["W0"].view(shape_t) * b1sq * c["tau_exc_s"])  # W0 ∝ ω1² ∝ b1²
        W_sat = c["W_sat"] * b1sq                                        # W ∝ B1max² ∝ b1²
        E_W = torch.where(c["saturation"].view(shape_t) > 0, torch.exp(-W_sat * c["tau_sat_s"]), torch.ones_like(W_sat))
        TR = c["TR_s"]
        self.TR = (TR[:1] if bool((TR == TR[0]).all()) else TR).view(shape_t)
        self.cos_alpha, self.sin_alpha = torch.cos(alpha), torch.sin(alpha)
        self.E1R = torch.exp(-self.TR / c["T1R_s"])
        self.d2 = self.E1R * E_W0 * E_W

    def magnitude_k(self, I0, T1F, f, k) -> torch.Tensor:
        """Real signal (T, *P); the parameters have b1's shape P."""
        E1F = torch.exp(-self.TR / T1F)
        Ek = torch.exp(-k * self.TR)
        A = 1 - f + f * Ek
        B = f - f * Ek
        C = f + Ek - f * Ek
        X01 = (1 - f) * (1 - Ek)
        d1 = E1F * self.cos_alpha
        d2 = self.d2
        r0 = (1 - E1F) * (1 - f)
        r1 = (1 - self.E1R) * f
        xr0 = A * r0 + X01 * r1
        xr1 = B * r0 + C * r1
        det = 1 - A * d1 - C * d2 + Ek * d1 * d2
        mF = ((1 - C * d2) * xr0 + X01 * d2 * xr1) / det
        return I0 * self.sin_alpha * mF


def ernst(I0, T1, alpha_rad, TR):
    """SPGR steady state: I0 sin α (1 − E1) / (1 − E1 cos α)."""
    E1 = np.exp(-TR / T1)
    return I0 * np.sin(alpha_rad) * (1 - E1) / (1 - E1 * np.cos(alpha_rad))
