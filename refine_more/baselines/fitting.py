"""Voxel-wise fit of the BTS signal model to magnitude images.

The free parameters per voxel are I0, T1F, f and the fundamental exchange rate k = kF / f.
k is essentially not identifiable with this protocol (spec, section "Identifiability"), so it is
kept inside a narrow band, `K_BAND` (centre 23 1/s, like the paper's public code, 22–24 1/s),
and kF is reported as k·f.

The fit is vectorised over all voxels: a linear DESPOT1 (variable flip angle) fit of the
unsaturated images gives I0 and T1F to start from, then a batched, projected Levenberg–Marquardt
iteration in float64 refines (I0, T1F, f, k) for every voxel at once, with per-voxel damping,
accept/reject and projection onto `PARAM_BOUNDS`. Data are normalised per voxel by their maximum
over the images, so the damping and tolerances mean the same thing in every voxel.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.func import jvp

from refine_more.config import check_k_band
from refine_more.physics.protocol import Protocol
from refine_more.physics.signal_model import BTSModel

K_BAND = (20.0, 26.0)
F_INIT = 0.1
T1F_FALLBACK = 1.0
PARAM_BOUNDS = {"T1F": (0.05, 6.0), "f": (0.0, 0.5), "k": K_BAND}  # and I0 >= 0
PARAM_ORDER = ("I0", "T1F", "f", "k")

_LAMBDA_INIT = 1e-3
_LAMBDA_MIN = 1e-12
_LAMBDA_MAX = 1e12
_LAMBDA_DOWN = 0.3
_LAMBDA_UP = 10.0


def _as_tensor64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype=torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _sanitize_b1(b1, n: int, like: torch.Tensor) -> torch.Tensor:
    if b1 is None:
        return torch.ones(n, dtype=torch.float64, device=like.device)
    b = _as_tensor64(b1).to(like.device).reshape(-1)
    if b.numel() != n:
        raise ValueError(f"b1 has {b.numel()} entries, expected {n}")
    return torch.where(torch.isfinite(b) & (b > 0), b, torch.ones_like(b))


def _bounds(n: int, k_band, like: torch.Tensor):
    inf = float("inf")
    lo = torch.tensor([0.0, PARAM_BOUNDS["T1F"][0], PARAM_BOUNDS["f"][0], float(k_band[0])],
                      dtype=torch.float64, device=like.device)
    hi = torch.tensor([inf, PARAM_BOUNDS["T1F"][1], PARAM_BOUNDS["f"][1], float(k_band[1])],
                      dtype=torch.float64, device=like.device)
    return lo.expand(n, 4), hi.expand(n, 4)


def despot1_init(y: torch.Tensor, protocol: Protocol, b1: torch.Tensor, model: BTSModel, k_band=K_BAND):
    """Starting values (N, 4) = (I0, T1F, f, k) from the unsaturated images.

    Linear VFA fit S/sin α = E1 · S/tan α + I0'(1 − E1) with b1-scaled α, per voxel; T1F from E1
    (clamped to bounds); f = `F_INIT`, k = band centre (23 1/s for `K_BAND`); I0 then by linear least squares of the
    full model at those values (so the MT reduction of the signal is absorbed). Voxels where the
    regression is ill-conditioned (fewer than two distinct flip angles, E1 outside (0, 1), no
    signal) fall back to T1F = `T1F_FALLBACK`.
    """
    n = y.shape[1]
    c = protocol.constants()
    unsat = np.flatnonzero(c["saturation"] == 0)
    T1F = torch.full((n,), T1F_FALLBACK, dtype=torch.float64, device=y.device)
    if unsat.size >= 2:
        alpha = torch.as_tensor(c["alpha_rad"][unsat], dtype=torch.float64, device=y.device)[:, None] * b1[None, :]
        TR = float(np.mean(c["TR_s"][unsat]))
        s = y[unsat]
        ys = s / torch.sin(alpha)
        xs = s / torch.tan(alpha)
        xm, ym = xs.mean(0), ys.mean(0)
        sxx = ((xs - xm) ** 2).sum(0)
        sxy = ((xs - xm) * (ys - ym)).sum(0)
        ok = sxx > 1e-12 * (xm**2 + ym**2).clamp_min(1e-300)
        E1 = sxy / torch.where(ok, sxx, torch.ones_like(sxx))
        ok = ok & torch.isfinite(E1) & (E1 > 0) & (E1 < 1)
        T1 = -TR / torch.log(torch.where(ok, E1, torch.full_like(E1, 0.5)))
        T1F = torch.where(ok & torch.isfinite(T1), T1, T1F)
    lo, hi = _bounds(n, k_band, y)
    T1F = T1F.clamp(lo[:, 1], hi[:, 1])
    f = torch.full_like(T1F, F_INIT).clamp(lo[:, 2], hi[:, 2])
    k = torch.full_like(T1F, 0.5 * (float(k_band[0]) + float(k_band[1]))).clamp(lo[:, 3], hi[:, 3])
    basis = model.magnitude_k(torch.ones_like(T1F), T1F, f, k, b1)     # (T, N), signal at I0 = 1
    I0 = (basis * y).sum(0) / (basis * basis).sum(0).clamp_min(1e-300)
    I0 = torch.where(torch.isfinite(I0), I0, torch.zeros_like(I0)).clamp_min(0.0)
    return torch.stack([I0, T1F, f, k], dim=1)


def _solve_spd(A: torch.Tensor, b: torch.Tensor):
    """Solve A x = b for a batch of small SPD matrices A (n, m, m), b (n, m) by an unrolled Cholesky.

    Several times faster than batched LAPACK for m = 4 and many thousands of systems. Returns x (n, m) and a
    bool (n,) that is False where a pivot was not positive (x is then meaningless).
    """
    m = A.shape[-1]
    L = [[None] * m for _ in range(m)]
    ok = torch.ones(A.shape[0], dtype=torch.bool, device=A.device)
    for j in range(m):
        s = A[:, j, j]
        for q in range(j):
            s = s - L[j][q] * L[j][q]
        ok = ok & (s > 0)
        d = torch.sqrt(s.clamp_min(1e-300))
        L[j][j] = d
        for i in range(j + 1, m):
            t = A[:, i, j]
            for q in range(j):
                t = t - L[i][q] * L[j][q]
            L[i][j] = t / d
    z = [None] * m
    for i in range(m):
        t = b[:, i]
        for q in range(i):
            t = t - L[i][q] * z[q]
        z[i] = t / L[i][i]
    x = [None] * m
    for i in reversed(range(m)):
        t = z[i]
        for q in range(i + 1, m):
            t = t - L[q][i] * x[q]
        x[i] = t / L[i][i]
    return torch.stack(x, dim=-1), ok


_JVP_READY = False


def _jacobian(model: BTSModel, p: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """J (T, n, 4) of the model at p (n, 4) by forward-mode autograd.

    Voxels are independent, so one forward-mode pass per parameter (tangent = that parameter
    in every voxel) gives every voxel's Jacobian column at once.
    """
    global _JVP_READY
    if not _JVP_READY:
        # torch's first forward-mode call loads its jvp decompositions, which go through the
        # deprecated torch.jit.script and warn; the warning is torch-internal, not ours.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            jvp(torch.sin, (p[:1, 0],), (torch.ones_like(p[:1, 0]),))
        _JVP_READY = True
    cols = []
    for j in range(4):
        args = [p[:, i] for i in range(4)]

        def one(x, j=j, args=args):
            a = list(args)
            a[j] = x
            return model.magnitude_k(a[0], a[1], a[2], a[3], b1)

        cols.append(jvp(one, (args[j],), (torch.ones_like(args[j]),))[1])
    return torch.stack(cols, dim=-1)


def _lm_chunk(y: torch.Tensor, b1: torch.Tensor, model: BTSModel, protocol: Protocol, n_iter: int, k_band,
              step_rtol: float = 1e-9):
    """Projected LM on one chunk of normalised data y (T, n). Returns params (n, 4), cost (n,) and
    whether each voxel ever accepted a step (n,) (False: its values are the start values).

    Per voxel: damped normal equations (JᵀJ + λ·diag(JᵀJ)) δ = −Jᵀr, trial p ← Π(p + δ) (Π: the
    projection onto the bounds), accepted when the cost drops (λ × 0.3) and rejected otherwise
    (λ × 10). Voxels leave the active set once converged (relative step below `step_rtol`, cost
    at round-off, or λ at its ceiling), and the Jacobian is recomputed only where the parameters
    moved, so later iterations cost little.
    """
    n, T = y.shape[1], y.shape[0]
    dev = y.device
    lo, hi = _bounds(n, k_band, y)
    p = despot1_init(y, protocol, b1, model, k_band).clamp(lo, hi)
    typical = torch.tensor([1.0, 0.1, 0.01, 1.0], dtype=torch.float64, device=dev)  # normalised units
    eye = torch.eye(4, dtype=torch.float64, device=dev)
    lam = torch.full((n,), _LAMBDA_INIT, dtype=torch.float64, device=dev)
    r = model.magnitude_k(p[:, 0], p[:, 1], p[:, 2], p[:, 3], b1) - y
    cost = (r * r).sum(0)
    J = torch.empty((T, n, 4), dtype=torch.float64, device=dev)
    stale = torch.ones(n, dtype=torch.bool, device=dev)      # J must be (re)computed
    active = torch.ones(n, dtype=torch.bool, device=dev)
    moved = torch.zeros(n, dtype=torch.bool, device=dev)
    cost_floor = 1e-26 * T
    for _ in range(n_iter):
        ia = active.nonzero().squeeze(1)
        if ia.numel() == 0:
            break
        iJ = (active & stale).nonzero().squeeze(1)
        if iJ.numel():
            J[:, iJ] = _jacobian(model, p[iJ], b1[iJ])
            stale[iJ] = False
        Ja, ra, pa, la, ca = J[:, ia], r[:, ia], p[ia], lam[ia], cost[ia]
        JtJ = torch.einsum("tni,tnj->nij", Ja, Ja)
        g = torch.einsum("tni,tn->ni", Ja, ra)
        # Parameters sitting on a bound with the gradient pushing outwards are held there for
        # this step (projected-Newton active set): their rows and columns leave the system.
        lo_a, hi_a = lo[ia], hi[ia]
        held = ((pa <= lo_a) & (g > 0)) | ((pa >= hi_a) & (g < 0))
        free = (~held).to(torch.float64)
        JtJ = JtJ * free[:, :, None] * free[:, None, :]
        g = g * free
        diag = torch.diagonal(JtJ, dim1=-2, dim2=-1)
        # Marquardt scaling, floored so that parameters with no sensitivity (k when f = 0, all
        # of them when I0 = 0, held ones) keep the damped system positive definite.
        D = torch.maximum(diag, 1e-9 * diag.amax(-1, keepdim=True)).clamp_min(1e-30)
        A = JtJ + (la[:, None] * D)[:, :, None] * eye + (1.0 - free)[:, :, None] * eye
        delta, good = _solve_spd(A, -g)
        good = good & torch.isfinite(delta).all(-1)
        delta = torch.where(good[:, None], delta, torch.zeros_like(delta))
        p_try = torch.minimum(torch.maximum(pa + delta, lo_a), hi_a)
        r_try = model.magnitude_k(p_try[:, 0], p_try[:, 1], p_try[:, 2], p_try[:, 3], b1[ia]) - y[:, ia]
        c_try = (r_try * r_try).sum(0)
        acc = good & torch.isfinite(c_try) & (c_try < ca)
        step = ((p_try - pa).abs() / (pa.abs() + typical)).amax(-1)
        p[ia] = torch.where(acc[:, None], p_try, pa)
        r[:, ia] = torch.where(acc[None, :], r_try, ra)
        c_new = torch.where(acc, c_try, ca)
        cost[ia] = c_new
        la = torch.where(acc, la * _LAMBDA_DOWN, la * _LAMBDA_UP).clamp(_LAMBDA_MIN, _LAMBDA_MAX)
        lam[ia] = la
        stale[ia] = acc
        moved[ia] |= acc
        done = (acc & (step < step_rtol)) | (c_new <= cost_floor) | (la >= _LAMBDA_MAX)
        active[ia] = ~done
    return p, cost, moved


def fit_voxels(images_mag, protocol: Protocol, b1=None, *, n_iter: int = 40, k_band=K_BAND,
               chunk_size: int = 50_000, num_threads: int | None = None) -> dict:
    """Fit (I0, T1F, f, k) to magnitude signals (T, N); returns float32 numpy arrays (N,).

    Keys: I0, T1F, f, k, kF (= k·f), residual (the L2 norm over images of model − data, in the
    data's units) and moved (1 where the fit accepted a step, 0 where it kept its start values). Works on any device the input lives on; computations are in float64.
    Voxels whose data are all zero get I0 = 0 and the starting values for the rest.
    `num_threads`, if given, sets torch's CPU intra-op threads for the duration of the fit (the
    element-wise work here is small per op, and on a busy machine oversubscribed threads can
    slow it down by an order of magnitude; 1 is often fastest there).
    """
    if num_threads is None:
        return _fit_voxels(images_mag, protocol, b1, n_iter=n_iter, k_band=k_band, chunk_size=chunk_size)
    before = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        return _fit_voxels(images_mag, protocol, b1, n_iter=n_iter, k_band=k_band, chunk_size=chunk_size)
    finally:
        torch.set_num_threads(before)


def _fit_voxels(images_mag, protocol: Protocol, b1, *, n_iter: int, k_band, chunk_size: int) -> dict:
    check_k_band(k_band)     # a negative or inverted band would give negative kF
    y_all = _as_tensor64(images_mag)
    if y_all.dim() != 2 or y_all.shape[0] != protocol.n_images:
        raise ValueError(f"images_mag must be (T={protocol.n_images}, N), got {tuple(y_all.shape)}")
    y_all = torch.where(torch.isfinite(y_all), y_all.abs(), torch.zeros_like(y_all))
    n = y_all.shape[1]
    b1_all = _sanitize_b1(b1, n, y_all)
    model = BTSModel(protocol)
    out = {name: np.zeros(n, dtype=np.float32) for name in (*PARAM_ORDER, "kF", "residual", "moved")}
    for start in range(0, n, chunk_size):
        sl = slice(start, min(n, start + chunk_size))
        y = y_all[:, sl]
        scale = y.amax(0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        p, cost, moved = _lm_chunk(y / scale, b1_all[sl], model, protocol, n_iter, k_band)
        out["moved"][sl] = moved.cpu().numpy()
        I0 = p[:, 0] * scale
        out["I0"][sl] = I0.cpu().numpy()
        out["T1F"][sl] = p[:, 1].cpu().numpy()
        out["f"][sl] = p[:, 2].cpu().numpy()
        out["k"][sl] = p[:, 3].cpu().numpy()
        out["kF"][sl] = (p[:, 3] * p[:, 2]).cpu().numpy()
        out["residual"][sl] = (cost.sqrt() * scale).cpu().numpy()
    return out


def fit_images(images, protocol: Protocol, b1=None, tissue_mask=None, **kw) -> dict:
    """Fit every voxel of the mask; returns {I0, T1F, f, kF, k, residual, moved}: (Z, Y, X) float32, 0 outside.

    `images` (T, Z, Y, X) may be complex or real, torch or numpy. The fit uses the magnitude
    |images|: the background phase and the Bloch–Siegert phase of the saturated images are
    nuisance parameters for a voxel-wise fit (the BS phase carries B1 information, but B1 is
    supplied as a map here), and the Rician bias of magnitude data is negligible at the SNRs of
    interest (it matters only where the signal is within a few noise SDs of zero).
    Keyword arguments go to `fit_voxels` (n_iter, k_band, chunk_size, num_threads).
    """
    if isinstance(images, torch.Tensor):
        mag = images.detach().abs().to(torch.float64)
    else:
        mag = torch.as_tensor(np.abs(np.asarray(images)), dtype=torch.float64)
    if mag.dim() != 4:
        raise ValueError(f"images must be (T, Z, Y, X), got {tuple(mag.shape)}")
    spatial = tuple(mag.shape[1:])
    if tissue_mask is None:
        mask = torch.ones(spatial, dtype=torch.bool, device=mag.device)
    else:
        mask = torch.as_tensor(np.asarray(tissue_mask.cpu() if isinstance(tissue_mask, torch.Tensor) else tissue_mask),
                               dtype=torch.bool).to(mag.device)
        if tuple(mask.shape) != spatial:
            raise ValueError(f"tissue_mask shape {tuple(mask.shape)} != image shape {spatial}")
    idx = mask.reshape(-1).nonzero().squeeze(1)
    y = mag.reshape(mag.shape[0], -1)[:, idx]
    b1v = None
    if b1 is not None:
        b1t = _as_tensor64(b1).to(mag.device)
        if tuple(b1t.shape) != spatial:
            raise ValueError(f"b1 shape {tuple(b1t.shape)} != image shape {spatial}")
        b1v = b1t.reshape(-1)[idx]
    res = fit_voxels(y, protocol, b1v, **kw)
    flat_idx = idx.cpu().numpy()
    maps = {}
    for name in ("I0", "T1F", "f", "kF", "k", "residual", "moved"):
        m = np.zeros(int(np.prod(spatial)), dtype=np.float32)
        m[flat_idx] = res[name]
        maps[name] = m.reshape(spatial)
    return maps
