"""The images' phase in the refinement: φ_t(x) = φ₀(x) + φ_BS,t(x) + δ_t(x).

φ₀ is one background phase shared by all images (coil phase, B0 at the echo time), free per
voxel; φ_BS,t is the Bloch–Siegert phase of the signal model; δ_t is a per-image deviation (B0
drift and motion between acquisitions minutes apart) modelled as a low-order polynomial in
(z, y, x), δ_t = Σ_k c_t,k·B_k(x), with image 0 as the reference (c_0 = 0, so φ₀ and the c are
not degenerate). `order = -1` switches δ off: the nuisance variable is then φ₀ alone, a
(Z, Y, X) tensor, as before this model existed. With `order ≥ 0` it is one packed 1-D tensor
[φ₀.flatten(), c.flatten()] so the joint L-BFGS warm start (`unrolled.quasi_newton`) can treat it
as any other tensor. The basis is orthonormal over the tissue, so the coefficients are in radians
(RMS over the tissue) and equally scaled.

The paper's public code takes each image's phase from the INR; here the INR's images give the
starting estimate (`PhaseModel.estimate`) and the refinement keeps improving it by majorizer
Gauss–Newton steps (`physics.ScanPhysics.phase_step`), like φ₀.
"""
from __future__ import annotations

import itertools

import torch


def polynomial_basis(tissue: torch.Tensor, order: int) -> torch.Tensor:
    """Monomials z^a y^b x^c with a + b + c ≤ `order` over (−1, 1)³, orthonormalised over the
    tissue voxels (Σ_tissue B_k B_l = δ_kl · n_tissue, so a coefficient of 1 is 1 rad RMS): (K, Z, Y, X),
    zero outside the tissue. Axes of length 1 contribute only their constant."""
    shape = tissue.shape
    axes = [torch.linspace(-1.0, 1.0, n, dtype=torch.float64, device=tissue.device) if n > 1
            else torch.zeros(1, dtype=torch.float64, device=tissue.device) for n in shape]
    grid = torch.meshgrid(*axes, indexing="ij")
    powers = [p for p in itertools.product(range(order + 1), repeat=3) if sum(p) <= order]
    powers = [p for p in powers if all(e == 0 or n > 1 for e, n in zip(p, shape))]
    powers.sort(key=lambda p: (sum(p), p))
    cols = torch.stack([(grid[0] ** a) * (grid[1] ** b) * (grid[2] ** c) for a, b, c in powers])  # (K, Z, Y, X)
    inside = tissue.bool()
    n = int(inside.sum())
    if n == 0:
        raise ValueError("per-image phase model: the tissue mask is empty")
    q, r = torch.linalg.qr(cols[:, inside].T)  # (n, K)
    keep = r.diagonal().abs() > 1e-8 * r.diagonal().abs().max()  # drop monomials the tissue cannot tell apart
    basis = torch.zeros((int(keep.sum()),) + tuple(shape), dtype=torch.float64, device=tissue.device)
    basis[:, inside] = (q[:, keep] * n ** 0.5).T
    return basis.to(torch.float32)


class PhaseModel:
    """Packs and unpacks the nuisance variable and turns it into per-image phases (T, Z, Y, X)."""

    def __init__(self, tissue: torch.Tensor, bs_phase: torch.Tensor, order: int = -1):
        if not isinstance(order, int) or isinstance(order, bool) or order < -1:
            raise ValueError(f"unroll.image_phase_order must be an integer ≥ −1 (−1: no per-image phase), got {order!r}")
        self.order = order
        self.bs_phase = bs_phase                      # (T, Z, Y, X)
        self.shape = tuple(tissue.shape)
        self.n_images = bs_phase.shape[0]
        self.basis = polynomial_basis(tissue, order) if order >= 0 else None   # (K, Z, Y, X)
        self.n_voxels = int(torch.tensor(self.shape).prod())

    @property
    def per_image(self) -> bool:
        return self.basis is not None

    @property
    def n_coefficients(self) -> int:
        return 0 if self.basis is None else self.basis.shape[0]

    def pack(self, background: torch.Tensor, coefficients: torch.Tensor | None = None) -> torch.Tensor:
        """φ₀ (Z, Y, X) and c (T − 1, K) → the nuisance variable (φ₀ itself without δ)."""
        if not self.per_image:
            return background
        if coefficients is None:
            coefficients = background.new_zeros(self.n_images - 1, self.n_coefficients)
        return torch.cat([background.reshape(-1), coefficients.reshape(-1)])

    def unpack(self, z: torch.Tensor):
        """The nuisance variable → (φ₀ (Z, Y, X), c (T − 1, K) or None). With the per-image model, a
        bare φ₀ (Z, Y, X) is read as φ₀ with no deviations yet (c = 0)."""
        if not self.per_image:
            return z, None
        if tuple(z.shape) == self.shape:
            return z, z.new_zeros(self.n_images - 1, self.n_coefficients)
        return z[:self.n_voxels].view(self.shape), z[self.n_voxels:].view(self.n_images - 1, self.n_coefficients)

    def deviation(self, coefficients: torch.Tensor) -> torch.Tensor:
        """δ_t (T, Z, Y, X), δ_0 = 0."""
        rest = torch.einsum("tk,kzyx->tzyx", coefficients, self.basis)
        return torch.cat([torch.zeros_like(rest[:1]), rest], dim=0)

    def phases(self, z: torch.Tensor) -> torch.Tensor:
        """φ_t = φ₀ + φ_BS,t (+ δ_t): (T, Z, Y, X)."""
        background, coefficients = self.unpack(z)
        phase = background[None] + self.bs_phase
        return phase if coefficients is None else phase + self.deviation(coefficients)

    @torch.no_grad()
    def estimate(self, images: torch.Tensor, tissue: torch.Tensor) -> torch.Tensor:
        """The nuisance variable that best explains the phases of complex images W (T, Z, Y, X).

        δ_t (t ≥ 1): the weighted least-squares fit (weights |W_t||W_0|, tissue only) of the basis
        to the phase of W_t·W̄_0 after removing φ_BS,t − φ_BS,0 (image 0 is the reference); then
        φ₀: the phase of Σ_t W_t·e^{−i(φ_BS,t + δ_t)} (a magnitude-weighted circular mean).
        Deviations of a few tenths of a radian are far from the wrap, so the fit is linear."""
        images = images.detach()
        derotated = images * torch.polar(torch.ones_like(self.bs_phase), -self.bs_phase)
        if not self.per_image:
            return derotated.sum(0).angle()
        relative = derotated[1:] * derotated[:1].conj()                          # (T − 1, Z, Y, X)
        weight = (relative.abs() * tissue).reshape(self.n_images - 1, -1).double()
        angle = relative.angle().reshape(self.n_images - 1, -1).double()
        B = self.basis.reshape(self.n_coefficients, -1).double()                 # (K, N)
        gram = torch.einsum("kn,tn,ln->tkl", B, weight, B)
        gram = gram + 1e-9 * weight.sum(-1).clamp_min(1e-30)[:, None, None] * torch.eye(B.shape[0], dtype=B.dtype, device=B.device)
        rhs = torch.einsum("kn,tn->tk", B, weight * angle)
        coefficients = torch.linalg.solve(gram, rhs[..., None])[..., 0].to(images.real.dtype)
        dev = self.deviation(coefficients)
        background = (derotated * torch.polar(torch.ones_like(dev), -dev)).sum(0).angle()
        return self.pack(background, coefficients)
