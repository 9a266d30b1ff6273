"""`reconstruct(subject, config)`: REFINE-MORE for one subject (from scratch or adapted).

Stage 1 optimises loss 1 + loss 2 (INR only); stage 2 optimises loss 1 + 2 + 3 jointly (INR and
unrolled refinement). With a `SeedState`, hash 1, MLP1 and MLP2 come from the seed and stay
frozen, the spatial hashes are trained for this subject and the U-Net is adapted through LoRA.

Image phase: the signal model gives magnitudes and the Bloch–Siegert phase φ_BS,t; the images
also carry a background phase φ₀ shared by all images (spec: "the image phase is otherwise free").
Loss 2 therefore compares |W⁽⁰⁾| with S(Q), and the refinement's data consistency (loss 3 and
the unrolled steps) models image t as S_t(Q)·exp(i(φ₀ + φ_BS,t)). φ₀ starts each iteration
from the INR's current de-aliased images (their magnitude-weighted mean phase after removing
φ_BS) and each unrolled phase refines it by a Gauss–Newton step before its map step
(`UnrollConfig.refine_phase`); it is a nuisance variable, not learned.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .config import ReconConfig
from .image_phase import PhaseModel
from .inr import INR, MapScaling
from .operators import MultiCoilCartesian, zero_filled_images
from .signal_model import BTSModel
from .unrolled import UnrolledPGD

SCORED = ("T1F", "f", "kF")


@dataclass
class Result:
    subject_id: str
    method: str                      # "refine-more" | "refine-more-adapted"
    maps: dict                       # name → (Z, Y, X) float32, 0 outside the tissue mask (incl. "k")
    maps_init: dict                  # the INR's initial maps Q⁽⁰⁾ of the final model (the "INR-only" ablation)
    images: np.ndarray               # W⁽⁰⁾ complex64 (T, Z, Y, X), in the units of the k-space
    tissue_mask: np.ndarray
    history: list                    # one dict per logged iteration: stage, iteration, seconds, losses, nRMSE
    timings: dict                    # seconds: setup, stage1, stage2 (of it: warm_start), total
    iterations: dict                 # stage1, stage2 actually run
    config_hash: str
    device: str
    trainable_parameters: dict = field(default_factory=dict)
    b1_source: str = "file"          # "file" | "bloch-siegert" (estimated from the data) | "unity"
    state: object = None             # the models, for building a SeedState (not serialised)

    def final_losses(self) -> dict:
        return {k: v for k, v in self.history[-1].items() if k.startswith("loss")} if self.history else {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def total_variation(x: torch.Tensor, n_images: int | None = None) -> torch.Tensor:
    """Anisotropic TV of complex images (T, Z, Y, X): mean |finite difference| over the 3 spatial axes.
    With `n_images`, x is a chunk of a stack of that many images, and this is its share of the
    stack's TV (the differences are within images, so the shares add up to the whole)."""
    tv = 0.0
    for dim in (1, 2, 3):
        if x.shape[dim] > 1:
            d = torch.diff(x, dim=dim).abs()
            tv = tv + (d.mean() if n_images is None else d.sum() / (d[0].numel() * n_images))
    return tv


class Problem:
    """Everything about one subject the losses need, on one device, data normalised to O(1)."""

    def __init__(self, subject, config: ReconConfig, device):
        from .b1 import b1_for
        from .coils import coil_maps_for
        from .tissue import derive_tissue_mask

        self.subject = subject
        coils_np = np.ascontiguousarray(coil_maps_for(subject))
        coils = torch.from_numpy(coils_np).to(device)
        mask = torch.from_numpy(np.asarray(subject.mask, dtype=bool)).to(device)
        self.A = MultiCoilCartesian(coils, mask)
        tissue = subject.tissue_mask if subject.tissue_mask is not None else derive_tissue_mask(subject)
        self.tissue_np = np.asarray(tissue, dtype=bool)
        self.tissue = torch.from_numpy(self.tissue_np).to(device)
        b1, self.b1_source = b1_for(subject, coils_np, self.tissue_np)
        self.b1 = torch.from_numpy(b1).to(device)
        kspace = torch.from_numpy(np.ascontiguousarray(subject.kspace)).to(device)
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

    def restricted(self, mask) -> "Problem":
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

    def data_consistency(self, images: torch.Tensor, t0: int = 0) -> torch.Tensor:
        """||A x − d||² / ||d||². With fewer images than the subject has: images t0, t0 + 1, …, and
        their share of the whole (the terms of different images add up)."""
        t1 = t0 + images.shape[0]
        if t0 == 0 and t1 == self.A.n_images:
            A, d = self.A, self.kspace
        else:
            A, d = self.A.images_subset(t0, t1), self.kspace[t0:t1]
        return (A(images) - d).abs().pow(2).sum() / self.kspace_energy

    def signal(self, channels: torch.Tensor) -> torch.Tensor:
        """S(Q): magnitudes (T, Z, Y, X) of the maps in normalised channels (4, Z, Y, X)."""
        q = self.scaling.to_physical(channels)
        return self.model.magnitude_k(q["I0"], q["T1F"], q["f"], q["k"], self.b1) * self.tissue

    def physics_consistency(self, channels: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """g(Q, φ₀) = ||A(S(Q)·e^{i(φ₀+φ_BS)}) − d||² / ||d||² (loss 3 for one phase; with a map
        prior, loss 3 is g + R, `MapDataTerm.value`)."""
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
        mag = self.signal(channels)
        metric = self._coil_energy[0] * (mag * mag).sum(0)
        return metric + damping * metric[self.tissue].mean().clamp_min(1e-30)

    @torch.no_grad()
    def phase_step(self, channels: torch.Tensor, background: torch.Tensor, damping: float = 1e-2) -> torch.Tensor:
        """One Gauss–Newton step on the images' phase for fixed maps: on φ₀ (Z, Y, X) and, with a
        per-image phase model, then on the coefficients of each image's deviation δ_t.

        x_t = S_t·e^{iφ_t}; ∂g/∂φ_t = (2/‖d‖²)·Im(x̄_t·(Aᴴ(Ax − d))_t). The metric is a
        per-voxel majorizer of the Gauss–Newton matrix, Σ_c|S_c|²·Σ_t S_t² for φ₀
        (AᴴA ≤ diag Σ_c|S_c|²): unlike the sampled diagonal p_t·Σ_c|S_c|², which the map step uses
        with a line search, it cannot overshoot along aliased directions (the sampled diagonal
        diverges here at AF 4). φ₀ decouples from the maps (∂x/∂φ₀ = i·x is orthogonal to
        ∂x/∂Q = J·e^{iφ}). Damped by `damping`·(mean metric in tissue). For δ_t = Σ_k c_t,k B_k
        the same bound gives the K×K majorizer Σ_x B_k B_l Σ_c|S_c|² S_t² per image.
        """
        background_only, coefficients = self.phase_model.unpack(background)
        mag = self.signal(channels)
        grad = self._phase_gradient(mag, background)
        phi0 = background_only - grad.sum(0) / self.phase_metric(channels, damping)
        if coefficients is None:
            return phi0
        z = self.phase_model.pack(phi0, coefficients)
        grad = self._phase_gradient(mag, z)[1:].reshape(grad.shape[0] - 1, -1)          # (T − 1, N)
        B = self.phase_model.basis.reshape(self.phase_model.n_coefficients, -1)           # (K, N)
        curvature = (self._coil_energy[0] * mag[1:] ** 2).reshape(grad.shape[0], -1)     # (T − 1, N)
        M = torch.einsum("kn,tn,ln->tkl", B, curvature, B)
        trace = M.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        M = M + (damping * trace)[:, None, None] * torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        step = torch.linalg.solve(M, (grad @ B.T)[..., None])[..., 0]
        return self.phase_model.pack(phi0, coefficients - step)

    def _phase_gradient(self, mag: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """∂g/∂φ_t per image and voxel, (T, Z, Y, X), for signal magnitudes `mag`."""
        x = torch.polar(mag, self.image_phase(background))
        r = self.A.adjoint(self.A(x) - self.kspace)
        return (2.0 / self.kspace_energy) * (x.conj() * r).imag

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


class MapDataTerm:
    """The refinement's objective (unrolled.DataTerm) for one subject: g(Q, φ₀) plus, when
    `unroll.map_smoothness` has a nonzero weight, the explicit prior R(Q) (priors.MapSmoothness),
    with the images' background phase φ₀ as the nuisance variable, a Gauss–Newton (plus the
    prior's Hessian diagonal) or plain map direction, and an optional Gauss–Newton step on φ₀
    before each map step."""

    def __init__(self, problem: Problem, config):
        from .priors import MapSmoothness

        if config.preconditioner not in ("gauss-newton", "none"):
            raise ValueError(f"unroll.preconditioner must be 'gauss-newton' or 'none', got {config.preconditioner!r}")
        if not config.gn_damping > 0:
            raise ValueError(f"unroll.gn_damping must be > 0 (Levenberg damping), got {config.gn_damping!r}")
        if config.phase_steps < 0:
            raise ValueError(f"unroll.phase_steps must be ≥ 0, got {config.phase_steps!r}")
        self.problem, self.config = problem, config
        self.preconditioned = config.preconditioner != "none"
        # weights relative to the data term's curvature at a neutral map (the same for every start
        # of the descent, so scratch and adapted runs minimise the same objective); no prior when
        # every weight is 0
        neutral = problem.scaling.initial_raw().to(problem.tissue.device).view(-1, 1, 1, 1).expand(-1, *problem.tissue.shape)
        curvature = problem.gauss_newton_matrix(neutral).diagonal(dim1=-2, dim2=-1)
        prior = MapSmoothness.relative_to(curvature, problem.tissue, config.map_smoothness, config.map_edge_scale)
        self.prior = prior if prior.active else None
        self._prior_curvature = prior.hessian_diagonal() if prior.active else None  # constant: once

    def start(self, channels: torch.Tensor) -> torch.Tensor:
        """The refinement's starting channels: sign-canonical when the prior is on (it acts on the
        channels, and I0/T1F enter through |·|: voxels of opposite signs would be false minima);
        unchanged otherwise (the paper's unroll sees the INR's channels as they are)."""
        return channels if self.prior is None else self.problem.scaling.canonical(channels)

    def value(self, q, phase):
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
        for _ in range(self.config.phase_steps):
            phase = self.problem.phase_step(q, phase, self.config.gn_damping)
        return phase


def _score(maps: dict, reference: dict, tissue: np.ndarray) -> dict:
    from .metrics import nrmse
    return {f"nrmse_{p}": nrmse(maps[p], reference[p], tissue) for p in SCORED if p in reference}


def _plateaued(values, patience, rel) -> bool:
    if patience <= 0 or len(values) <= patience:
        return False
    best_before = min(values[:-patience])
    return min(values[-patience:]) > best_before * (1 - rel)


def inr_losses(inr, prob: Problem, tv_weight: float):
    """(W⁽⁰⁾, Q⁽⁰⁾ channels, loss 1 = data consistency + λ·TV, loss 2 = signal-model fit) of the INR."""
    W = inr.images()
    c0 = inr.map_channels()
    loss1 = prob.data_consistency(W) + tv_weight * total_variation(W)
    mag = W.abs() * prob.tissue
    loss2 = (mag - prob.signal(c0)).pow(2).sum() / (mag.pow(2).sum().detach() + 1e-12)
    return W, c0, loss1, loss2


def inr_losses_chunked(inr, prob: Problem, tv_weight: float, chunk: int, backward: bool):
    """`inr_losses` over `chunk` images at a time, for memory: MLP1's activations (T·N·hidden) and
    A's coil images (T·C·N) then exist for one chunk at a time; at the paper's size they dominate.

    With `backward`, the gradients of loss 1 + loss 2 are accumulated into the parameters here:
    each chunk's graph is freed by its own backward. The parts all chunks share (the hash
    features and the maps' signal S(Q)) are computed once, cut from the graph as leaves, and
    backpropagated once at the end with what the chunks accumulated in them. Loss 2's normaliser
    (the energy of all images, a constant in `inr_losses` too) takes one more forward pass of
    MLP1 without a graph. Returns (W, c0, loss1, loss2) detached, equal to `inr_losses` to
    float32 rounding."""
    T = inr.n_images
    context = torch.enable_grad if backward else torch.no_grad
    with context():
        h_space, h_time = inr.image_features()
        c0 = inr.map_channels()
        S = prob.signal(c0)
    shared = [h_space, h_time, S]
    leaves = [v.detach().requires_grad_(backward and v.requires_grad) for v in shared]
    hs, ht, Sd = leaves
    starts = range(0, T, chunk)
    with torch.no_grad():
        energy = sum((inr.images_from(hs, ht[t0:t0 + chunk]).abs() * prob.tissue).pow(2).sum() for t0 in starts)
    W = None
    loss1 = loss2 = torch.zeros((), device=S.device)
    for t0 in starts:
        t1 = min(T, t0 + chunk)
        with context():
            Wc = inr.images_from(hs, ht[t0:t1])
            l1 = prob.data_consistency(Wc, t0) + tv_weight * total_variation(Wc, n_images=T)
            l2 = (Wc.abs() * prob.tissue - Sd[t0:t1]).pow(2).sum() / (energy + 1e-12)
            if backward and (l1.requires_grad or l2.requires_grad):
                (l1 + l2).backward()
        if W is None:
            W = torch.empty((T,) + tuple(Wc.shape[1:]), dtype=Wc.dtype, device=Wc.device)
        W[t0:t1] = Wc.detach()
        loss1, loss2 = loss1 + l1.detach(), loss2 + l2.detach()
    if backward:
        pairs = [(v, leaf.grad) for v, leaf in zip(shared, leaves) if v.requires_grad and leaf.grad is not None]
        if pairs:
            torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
    return W, c0.detach(), loss1, loss2


def reconstruct(subject, config: ReconConfig | None = None, seed_state=None, *, track_reference: bool = True,
                progress_desc: str | None = None) -> Result:
    """Reconstruct I0, T1F, f, kF for one subject. With `seed_state`, adapt instead (paper §2.4)."""
    from .adaptation import prepare_adapted_models

    config = config or ReconConfig()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    t_start = time.perf_counter()

    prob = Problem(subject, config, device)
    shape, T = subject.shape, subject.n_images
    inr = INR(T, shape, config.inr, seed=config.seed).to(device)
    unrolled = UnrolledPGD(config.unroll).to(device)
    if seed_state is None:
        inr.set_map_bias(prob.scaling.initial_raw().to(device))
        method = "refine-more"
        n1, n2 = config.iters_stage1, config.iters_stage2
        patience = 0
        params_stage1 = list(inr.parameters())
        params_stage2 = list(inr.parameters()) + list(unrolled.parameters())
    else:
        method = "refine-more-adapted"
        params_stage1, params_stage2 = prepare_adapted_models(seed_state, config, inr, unrolled)
        n1, n2 = config.adapt.iters_stage1, config.adapt.iters_stage2
        patience = config.adapt.plateau_patience
    lr = config.lr if seed_state is None else config.adapt.lr
    term = MapDataTerm(prob, config.unroll)
    lr2 = config.lr if seed_state is None else config.adapt.lr_stage2
    trainable = {"stage1": sum(p.numel() for p in params_stage1), "stage2": sum(p.numel() for p in params_stage2)}

    reference = subject.reference if (track_reference and subject.reference) else {}
    history: list = []
    timings = {"setup": time.perf_counter() - t_start}
    totals: list = []

    def log(stage, it, n, losses, channels, init_channels=None):
        if it % config.log_every and it != n - 1:
            return
        entry = {"stage": stage, "iteration": it, "seconds": time.perf_counter() - t_start,
                 **{k: float(v.detach()) for k, v in losses.items()}}
        if not all(np.isfinite(v) for k, v in entry.items() if k.startswith("loss")):
            raise FloatingPointError(f"{subject.subject_id}: non-finite loss at stage {stage} iteration {it}: {entry}")
        if reference:
            entry.update(_score(prob.physical_maps(channels), reference, prob.tissue_np))
            if init_channels is not None:  # the INR's own maps Q⁽⁰⁾ as stage 2 trains them
                entry.update({k.replace("nrmse_", "nrmse_init_"): v for k, v in
                              _score(prob.physical_maps(init_channels), reference, prob.tissue_np).items()})
        history.append(entry)

    chunk = config.image_chunk if 0 < config.image_chunk < T else 0

    def losses_and_backward():
        """Stage 1's losses, gradients accumulated (chunked: inside, as it goes)."""
        if chunk:
            return inr_losses_chunked(inr, prob, config.tv_weight, chunk, backward=True)
        W, c0, loss1, loss2 = inr_losses(inr, prob, config.tv_weight)
        (loss1 + loss2).backward()
        return W, c0, loss1, loss2

    bar = tqdm(total=n1 + n2, desc=progress_desc or subject.subject_id, disable=not config.progress, leave=False)

    # -- stage 1: INR (loss 1 + loss 2) --------------------------------------------------------
    opt = torch.optim.Adam(params_stage1, lr=lr)
    it1 = 0
    for it1 in range(n1):
        opt.zero_grad(set_to_none=True)
        W, c0, loss1, loss2 = losses_and_backward()
        total = loss1 + loss2
        opt.step()
        totals.append(total.item())
        log(1, it1, n1, {"loss1": loss1, "loss2": loss2, "loss": total}, c0)
        bar.update(1)
        bar.set_postfix(stage=1, l1=f"{loss1.item():.3g}", l2=f"{loss2.item():.3g}")
        if _plateaued(totals, patience, config.adapt.plateau_rel):
            break
    n1_done = it1 + 1 if n1 else 0
    timings["stage1"] = time.perf_counter() - t_start - timings["setup"]

    # -- stage 2: INR + unrolled refinement (loss 1 + 2 + 3) -----------------------------------
    t2 = time.perf_counter()
    warm = config.unroll.warm_start_steps > 0
    start = None
    if warm:
        # The warm start is detached, so loss 3 cannot reach the INR through it; stage 2 trains the
        # refinement alone on the warm start of the stage-1 INR, computed once. The INR stays as
        # stage 1 left it (loss 1 + 2 alone would only continue stage 1).
        unrolled_ids = {id(p) for p in unrolled.parameters()}
        params_stage2 = [p for p in params_stage2 if id(p) in unrolled_ids]
        trainable["stage2"] = sum(p.numel() for p in params_stage2)
        if n2:
            with torch.no_grad():
                W, c0, loss1, loss2 = (inr_losses_chunked(inr, prob, config.tv_weight, chunk, backward=False)
                                       if chunk else inr_losses(inr, prob, config.tv_weight))
                start = unrolled.warm_start(term.start(c0), term, prob.background_phase(W), prob.tissue)
    timings["warm_start"] = time.perf_counter() - t2  # inside stage 2's time; 0 without a warm start
    opt = torch.optim.Adam(params_stage2, lr=lr2)
    totals = []
    it2 = 0
    for it2 in range(n2):
        opt.zero_grad(set_to_none=True)
        if warm:
            outs = unrolled.learned_phases(start[0], term, start[1], prob.tissue)
        elif chunk:  # loss 1 + 2 backpropagated chunk by chunk; loss 3 through fresh maps
            W, _, loss1, loss2 = inr_losses_chunked(inr, prob, config.tv_weight, chunk, backward=True)
            c0 = inr.map_channels()
            outs = unrolled(term.start(c0), term, prob.background_phase(W), prob.tissue)
        else:
            W, c0, loss1, loss2 = inr_losses(inr, prob, config.tv_weight)
            outs = unrolled(term.start(c0), term, prob.background_phase(W), prob.tissue)
        loss3 = sum(term.value(c, z) for c, z in outs)
        total = loss1 + loss2 + loss3
        if loss1.requires_grad or loss3.requires_grad:  # with a warm start or chunks loss 1 + 2 are done
            total.backward()
        opt.step()
        totals.append(loss3.item() if warm else total.item())  # with a warm start loss 1 + 2 are constants
        log(2, it2, n2, {"loss1": loss1, "loss2": loss2, "loss3": loss3, "loss": total}, outs[-1][0], c0)
        bar.update(1)
        bar.set_postfix(stage=2, l1=f"{loss1.item():.3g}", l3=f"{loss3.item():.3g}")
        if _plateaued(totals, patience, config.adapt.plateau_rel):
            break
    n2_done = it2 + 1 if n2 else 0
    timings["stage2"] = time.perf_counter() - t2
    bar.close()

    # -- final maps ------------------------------------------------------------------------------
    with torch.no_grad():
        W = inr.images()
        c0 = inr.map_channels()
        if not n2_done:
            final = c0
        elif start is not None:  # the INR has not changed since the warm start was computed
            final = unrolled.learned_phases(start[0], term, start[1], prob.tissue)[-1][0]
        else:
            final = unrolled(term.start(c0), term, prob.background_phase(W), prob.tissue)[-1][0]
    timings["total"] = time.perf_counter() - t_start
    maps = prob.physical_maps(final)
    maps_init = prob.physical_maps(c0)
    for m in (maps, maps_init):
        if not all(np.isfinite(v).all() for v in m.values()):
            raise FloatingPointError(f"{subject.subject_id}: non-finite maps")
    return Result(
        subject_id=subject.subject_id, method=method, maps=maps, maps_init=maps_init,
        images=(W * prob.data_scale).cpu().numpy().astype(np.complex64), tissue_mask=prob.tissue_np,
        history=history, timings=timings, iterations={"stage1": n1_done, "stage2": n2_done},
        config_hash=config.hash(), device=str(device), trainable_parameters=trainable, b1_source=prob.b1_source,
        state={"inr": inr, "unrolled": unrolled, "config": config},
    )


def score_result(result: Result, reference: dict) -> dict:
    """nRMSE/SSIM per map of the final and the INR-only maps (needs `reference`)."""
    from .metrics import score_maps
    return {"refine-more": score_maps(result.maps, reference, result.tissue_mask),
            "inr-only": score_maps(result.maps_init, reference, result.tissue_mask)}
