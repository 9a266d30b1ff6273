"""The physics of one scan for the refinement and the losses (paper §2.1–2.2): A = U·F·C, the data
normalised to O(1), the BTS signal model S(Q) of the normalised map channels, the images' phase
(φ₀ + φ_BS + per-image deviations, image_phase.py), and what the Gauss–Newton refinement needs of
them: the per-voxel metric, its whitening, and the majorizer steps on the phase.

Image phase: the signal model gives magnitudes and the Bloch–Siegert phase φ_BS,t; the images
also carry a background phase φ₀ shared by all images (spec: "the image phase is otherwise free")
and, optionally, a low-order deviation per image (docs/decisions). Loss 2 compares |W⁽⁰⁾| with S(Q);
the refinement models image t as S_t(Q)·exp(iφ_t). The phase is a nuisance variable, not learned.
"""
from __future__ import annotations

import numpy as np
import torch

from refine_more.config import ReconConfig
from refine_more.physics.coil_compression import svd_compression
from refine_more.physics.image_phase import PhaseModel
from refine_more.physics.scaling import MapScaling
from refine_more.physics.operators import MultiCoilCartesian, squared_norm, zero_filled_images
from refine_more.physics.signal_model import BTSModel


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ScanPhysics:
    """Everything about one scan the losses need, on one device, data normalised to O(1): the
    operator A, the signal model S(Q), the map scaling, the images' phase model, and the
    Gauss–Newton metrics and phase steps built from them."""

    def __init__(self, subject, config: ReconConfig, device):
        from refine_more.physics.b1 import b1_for
        from refine_more.physics.coils import coil_maps_for
        from refine_more.physics.tissue import derive_tissue_mask

        self.subject = subject
        coils_np = np.ascontiguousarray(coil_maps_for(subject))
        tissue = subject.tissue_mask if subject.tissue_mask is not None else derive_tissue_mask(subject)
        self.tissue_np = np.asarray(tissue, dtype=bool)
        self.tissue = torch.from_numpy(self.tissue_np).to(device)
        b1, self.b1_source = b1_for(subject, coils_np, self.tissue_np)   # from the acquired coils
        self.b1 = torch.from_numpy(b1).to(device)
        kspace_np, self.coil_compression = subject.kspace, None
        if config.coil_compression:
            self.coil_compression = svd_compression(kspace_np, config.coil_compression, mask=subject.mask)
            kspace_np = self.coil_compression.kspace(kspace_np)
            coils_np = self.coil_compression.coil_maps(coils_np)
        coils = torch.from_numpy(np.ascontiguousarray(coils_np)).to(device)
        mask = torch.from_numpy(np.asarray(subject.mask, dtype=bool)).to(device)
        self.A = MultiCoilCartesian(coils, mask)
        kspace = torch.from_numpy(np.ascontiguousarray(kspace_np)).to(device)
        zf = zero_filled_images(kspace, coils)
        # one number makes the data O(1): the 99th percentile of the zero-filled magnitude in tissue
        self.data_scale = float(torch.quantile(zf.abs().amax(0)[self.tissue].float(), 0.99)) or 1.0
        self.kspace = kspace / self.data_scale
        self.kspace_energy = float((self.kspace.abs() ** 2).sum())
        self.model = BTSModel(subject.protocol)
        # I0 scale: what makes a typical tissue's brightest image ≈ 1 in these units
        typical = self.model.magnitude_k(*(torch.tensor([v]) for v in (1.0, 1.0, 0.1, 23.0)))
        self.scaling = MapScaling(I0_scale=float(1.0 / typical.max()), k_band=tuple(config.k_band))
        self.n_tissue = int(self.tissue.sum())
        self.bs_phase = self.model.bloch_siegert_phase(self.b1, self.b1).to(torch.float32)   # (T, Z, Y, X)
        self.phase_model = PhaseModel(self.tissue, self.bs_phase, config.unroll.image_phase_order)
        # diagonal of AᴴA per image and voxel, p_t·Σ_c|S_c|² (p_t: the fraction of k-space sampled for
        # image t), scaled like g: the image-domain metric the Gauss–Newton preconditioner uses
        fraction = mask.float().mean(dim=(1, 2))
        self._coil_energy = (2.0 / self.kspace_energy) * (coils.abs() ** 2).sum(0)[None]     # (1, Z, Y, X)
        self._normal_diag = fraction.view(-1, 1, 1, 1) * self._coil_energy

    def restricted(self, mask) -> "ScanPhysics":
        """The same subject seen through a subset of its acquired samples, `mask` (T, Z, Y) bool
        (splitting.py): A, the data and the Gauss–Newton diagonal use only those samples; the
        normalisation ‖d‖² stays the whole acquisition's, so terms over disjoint subsets add up."""
        import copy

        mask = torch.as_tensor(np.asarray(mask, dtype=bool), device=self.tissue.device)
        if tuple(mask.shape) != tuple(self.A.mask.shape[:1] + self.A.mask.shape[2:4]):
            raise ValueError(f"{self.subject.subject_id}: restriction mask must be (T, Z, Y) like the subject's mask")
        sub = copy.copy(self)
        sub.A = MultiCoilCartesian(self.A.coil_sens, mask)
        sub.kspace = self.kspace * mask[:, None, :, :, None].to(self.kspace.real.dtype)
        sub._normal_diag = mask.float().mean(dim=(1, 2)).view(-1, 1, 1, 1) * self._coil_energy
        return sub

    def data_consistency_of(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """‖A x − d‖²/‖d‖² of the images `index` (a 1-D index tensor) alone: their share of the whole."""
        return squared_norm(self.A.images_at(index)(images) - self.kspace[index]) / self.kspace_energy

    def data_consistency(self, images: torch.Tensor, t0: int = 0) -> torch.Tensor:
        """||A x − d||² / ||d||². With fewer images than the subject has: images t0, t0 + 1, …, and
        their share of the whole (the terms of different images add up)."""
        t1 = t0 + images.shape[0]
        if t0 == 0 and t1 == self.A.n_images:
            A, d = self.A, self.kspace
        else:
            A, d = self.A.images_subset(t0, t1), self.kspace[t0:t1]
        return squared_norm(A(images) - d) / self.kspace_energy

    def signal(self, channels: torch.Tensor) -> torch.Tensor:
        """S(Q): magnitudes (T, Z, Y, X) of the maps in normalised channels (4, Z, Y, X)."""
        q = self.scaling.to_physical(channels)
        return self._prepared_model(channels.dtype).magnitude_k(q["I0"], q["T1F"], q["f"], q["k"]) * self.tissue

    def _prepared_model(self, dtype):
        """The signal model for this subject's B1+ map in `dtype` (built once per dtype)."""
        cache = self.__dict__.setdefault("_prepared", {})
        if dtype not in cache:
            cache[dtype] = self.model.prepare(self.b1, dtype)
        return cache[dtype]

    def physics_consistency(self, channels: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """g(Q, φ₀) = ||A(S(Q)·e^{i(φ₀+φ_BS)}) − d||² / ||d||² (loss 3 for one phase; with a map
        prior, loss 3 is g + R, `objective.RefinementObjective.value`)."""
        return self.data_consistency(torch.polar(self.signal(channels), self.image_phase(background)))

    def image_phase(self, background: torch.Tensor) -> torch.Tensor:
        """φ_t = φ₀ + φ_BS,t (+ δ_t with a per-image phase model): nuisance variable → (T, Z, Y, X)."""
        return self.phase_model.phases(background)

    def background_phase(self, images: torch.Tensor) -> torch.Tensor:
        """The nuisance variable of complex images (T, Z, Y, X): φ₀ is the phase of
        Σ_t W_t·e^{−i(φ_BS,t + δ_t)} (a magnitude-weighted circular mean over the images); with a
        per-image phase model also δ_t, fitted to each image's residual phase (image_phase.py)."""
        return self.phase_model.estimate(images, self.tissue)

    @torch.no_grad()
    def signal_jacobian(self, channels: torch.Tensor, step: float = 1e-5) -> torch.Tensor:
        """∂S/∂Q per voxel: (T, Z, Y, X, 4) by central differences in float64, one pair of signal
        evaluations per map (voxels are independent, so shifting channel i everywhere gives
        column i at every voxel). Float64 because the k column is ~1e-3 of the others (k is
        barely identifiable) and float32 differences lose it. ~7 ms on 6×32×32 against ~18 ms
        for forward-mode AD (4 jvp)."""
        channels = channels.detach().double()
        columns = []
        for i in range(channels.shape[0]):
            up, down = channels.clone(), channels.clone()
            up[i] += step
            down[i] -= step
            columns.append((self.signal(up) - self.signal(down)) / (2 * step))
        return torch.stack(columns, dim=-1).to(torch.float32)

    def gauss_newton_matrix(self, channels: torch.Tensor) -> torch.Tensor:
        """H_r = Σ_t d_t,r J_t,r J_t,rᵀ per voxel, (Z, Y, X, 4, 4) (see `gauss_newton_direction`)."""
        J = self.signal_jacobian(channels)                                       # (T, Z, Y, X, 4)
        return torch.einsum("t...i,t...j->...ij", J * self._normal_diag[..., None], J)

    def gauss_newton_direction(self, channels: torch.Tensor, grad: torch.Tensor, damping: float = 1e-2,
                               extra_diagonal: torch.Tensor | None = None) -> torch.Tensor:
        """H⁻¹∇g with H the per-voxel Gauss–Newton matrix of g (4×4 at each voxel).

        g's exact Gauss–Newton matrix couples voxels through AᴴA (aliasing); its diagonal in image
        space, p_t·Σ_c|S_c|², is exact at full sampling and makes H block-diagonal:
        H_r = Σ_t d_t,r J_t,r J_t,rᵀ (J = ∂S/∂Q). Levenberg damping (`damping`·trace/4) keeps it
        invertible where a map does not affect the signal (clamped T1F, tanh-saturated k).
        H is a fixed metric (no gradient flows through it); the direction is linear in `grad`.
        `extra_diagonal` (Z, Y, X, 4) adds another term's curvature (a prior's Hessian diagonal)
        when `grad` is the gradient of g plus that term.
        """
        with torch.no_grad():
            H_inv = torch.linalg.inv(self._damped_metric(channels, damping, extra_diagonal))  # (Z, Y, X, 4, 4)
        direction = torch.einsum("...ij,j...->i...", H_inv, grad)
        return direction * self.tissue

    @torch.no_grad()
    def _damped_metric(self, channels, damping, extra_diagonal=None) -> torch.Tensor:
        """The damped per-voxel Gauss–Newton matrix of `gauss_newton_direction`, (Z, Y, X, 4, 4)."""
        H = self.gauss_newton_matrix(channels)
        trace = H.diagonal(dim1=-2, dim2=-1).sum(-1)
        eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        H = H + (damping * trace / H.shape[-1] + 1e-12 * trace.amax().clamp_min(1e-30))[..., None, None] * eye
        if extra_diagonal is not None:
            H = H + torch.diag_embed(extra_diagonal.to(H.dtype))
        return H

    @torch.no_grad()
    def gauss_newton_whitening(self, channels, damping: float = 1e-2, extra_diagonal=None) -> torch.Tensor:
        """L⁻ᵀ per voxel, (Z, Y, X, 4, 4), for H = LLᵀ the damped matrix of `gauss_newton_direction`:
        in the coordinates u of q = q_ref + L⁻ᵀu the objective's curvature is ≈ identity, where a
        quasi-Newton method's unit first step is the Gauss–Newton step."""
        L = torch.linalg.cholesky(self._damped_metric(channels, damping, extra_diagonal))
        return torch.linalg.inv(L).transpose(-1, -2).to(torch.float32)

    @torch.no_grad()
    def phase_metric(self, channels: torch.Tensor, damping: float = 1e-2) -> torch.Tensor:
        """The background phase's damped per-voxel curvature bound Σ_c|S_c|²·Σ_t S_t² (+ damping ·
        its tissue mean), (Z, Y, X): the metric of `phase_step`."""
        return self._phase_metric_of(self.signal(channels), damping)

    def _phase_metric_of(self, mag: torch.Tensor, damping: float) -> torch.Tensor:
        metric = self._coil_energy[0] * (mag * mag).sum(0)
        return metric + damping * metric[self.tissue].mean().clamp_min(1e-30)

    def phase_step(self, channels: torch.Tensor, background: torch.Tensor, damping: float = 1e-2) -> torch.Tensor:
        """One Gauss–Newton step on the images' phase for fixed maps (`phase_steps` with one step)."""
        return self.phase_steps(channels, background, 1, damping)

    @torch.no_grad()
    def phase_steps(self, channels: torch.Tensor, background: torch.Tensor, steps: int = 1,
                    damping: float = 1e-2) -> torch.Tensor:
        """`steps` Gauss–Newton steps on the images' phase for fixed maps: each on φ₀ (Z, Y, X) and,
        with a per-image phase model, then on the coefficients of each image's deviation δ_t.

        x_t = S_t·e^{iφ_t}; ∂g/∂φ_t = (2/‖d‖²)·Im(x̄_t·(Aᴴ(Ax − d))_t). The metric is a
        per-voxel majorizer of the Gauss–Newton matrix, Σ_c|S_c|²·Σ_t S_t² for φ₀
        (AᴴA ≤ diag Σ_c|S_c|²): unlike the sampled diagonal p_t·Σ_c|S_c|², which the map step uses
        with a line search, it cannot overshoot along aliased directions (the sampled diagonal
        diverges here at AF 4). φ₀ decouples from the maps (∂x/∂φ₀ = i·x is orthogonal to
        ∂x/∂Q = J·e^{iφ}). Damped by `damping`·(mean metric in tissue). For δ_t = Σ_k c_t,k B_k
        the same bound gives the K×K majorizer Σ_x B_k B_l Σ_c|S_c|² S_t² per image.

        The maps are fixed, so S(Q) and both metrics are computed once for all the steps, and a
        residual A x − d serves the objective's value and the next gradient at the same phase: the
        same arithmetic as evaluating each anew (the same floats). With a per-image phase model a
        step after an accepted one costs two forward passes of A instead of four (the first step, or
        one after a rejected coefficient step, three), and S(Q) is computed once, not four times or
        more per step; with φ₀ alone only S(Q) is saved (two evaluations per step).
        """
        if steps < 1:
            return background
        mag = self.signal(channels)
        metric = self._phase_metric_of(mag, damping)
        M = None
        residual = None                 # A x − d at `background`, where the last step left it
        for _ in range(steps):
            background_only, coefficients = self.phase_model.unpack(background)
            grad = self._phase_gradient(mag, background, residual)
            residual = None             # k-space sized: not held through the passes below
            phi0 = background_only - grad.sum(0) / metric
            if coefficients is None:
                background = phi0
                continue
            if M is None:
                M = self._coefficient_majorizer(mag, damping)
            z = self.phase_model.pack(phi0, coefficients)
            x = torch.polar(mag, self.image_phase(z))
            r = self.A(x) - self.kspace
            before = float(squared_norm(r) / self.kspace_energy)
            grad = self._phase_gradient(mag, z, r, x)[1:].reshape(M.shape[0], -1)        # (T − 1, N)
            del r
            B = self.phase_model.basis.reshape(self.phase_model.n_coefficients, -1)       # (K, N)
            step = torch.linalg.solve(M, (grad @ B.T)[..., None])[..., 0]
            # the K×K bound majorizes only the Gauss–Newton part: keep the step only where it lowers g
            background = z              # unless a trial lowers g
            for scale in (1.0, 0.5, 0.25):
                trial = self.phase_model.pack(phi0, coefficients - scale * step)
                r = self.A(torch.polar(mag, self.image_phase(trial))) - self.kspace
                if float(squared_norm(r) / self.kspace_energy) < before:
                    background, residual = trial, r
                    break
                r = None
        return background

    def _phase_gradient(self, mag: torch.Tensor, background: torch.Tensor, residual=None, x=None) -> torch.Tensor:
        """∂g/∂φ_t per image and voxel, (T, Z, Y, X), for signal magnitudes `mag` (`residual`: A x − d
        at this phase, when known; `x`: the images, when known)."""
        if x is None:
            x = torch.polar(mag, self.image_phase(background))
        if residual is None:
            residual = self.A(x) - self.kspace
        r = self.A.adjoint(residual)
        return (2.0 / self.kspace_energy) * (x.conj() * r).imag

    def _coefficient_majorizer(self, mag: torch.Tensor, damping: float) -> torch.Tensor:
        """The damped K×K majorizer of each image's phase coefficients, (T − 1, K, K)."""
        B = self.phase_model.basis.reshape(self.phase_model.n_coefficients, -1)           # (K, N)
        curvature = (self._coil_energy[0] * mag[1:] ** 2).reshape(mag.shape[0] - 1, -1)   # (T − 1, N)
        M = torch.einsum("kn,tn,ln->tkl", B, curvature, B)
        trace = M.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        return M + (damping * trace)[:, None, None] * torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)

    @torch.no_grad()
    def coefficient_metric(self, channels: torch.Tensor, damping: float = 1e-2) -> torch.Tensor:
        """The diagonal of the per-image coefficients' majorizer (T − 1, K), damped like φ₀'s."""
        mag = self.signal(channels)
        B2 = self.phase_model.basis.reshape(self.phase_model.n_coefficients, -1) ** 2
        curvature = (self._coil_energy[0] * mag[1:] ** 2).reshape(mag.shape[0] - 1, -1)
        diag = curvature @ B2.T
        return diag + damping * diag.mean(-1, keepdim=True).clamp_min(1e-30)

    def physical_maps(self, channels: torch.Tensor) -> dict:
        """Maps in the file's units: I0 back in the units of the k-space (undo `data_scale`)."""
        q = self.scaling.to_physical(channels.detach())
        q["I0"] = q["I0"] * self.data_scale
        return {k: (v * self.tissue).float().cpu().numpy() for k, v in q.items()}
