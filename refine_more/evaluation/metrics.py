"""Map-quality metrics (numpy): NRMSE (paper eq. 16), SSIM, ROI means, and a per-parameter score."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from refine_more.files.names import MAP_NAMES

SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_WIN = 11  # window width: truncate = (11 // 2) / sigma


def _f64(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _mask(mask, shape) -> np.ndarray:
    m = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask).astype(bool)
    if m.shape != tuple(shape):
        raise ValueError(f"mask shape {m.shape} != map shape {tuple(shape)}")
    return m


def nrmse(est, ref, mask=None) -> float:
    """Paper eq. 16: ‖est − ref‖₂ / ‖ref‖₂ × 100 (percent), over the voxels of `mask`.

    NaN when the reference is zero everywhere in the mask (or the mask is empty).
    """
    est, ref = _f64(est), _f64(ref)
    if est.shape != ref.shape:
        raise ValueError(f"shapes differ: {est.shape} vs {ref.shape}")
    m = _mask(mask, ref.shape)
    den = np.linalg.norm(ref[m])
    if not np.isfinite(den) or den == 0:
        return float("nan")
    return float(100.0 * np.linalg.norm(est[m] - ref[m]) / den)


def ssim_map(est, ref, data_range: float, mask=None) -> np.ndarray:
    """SSIM map (Wang et al. 2004), slice-wise in 2D over (y, x) for (Z, Y, X) inputs (or a 2D image).

    Local statistics use a Gaussian window (σ = 1.5, 11 wide, reflective borders); C1 = (K1 L)²,
    C2 = (K2 L)² with L = `data_range`; population (not sample) covariances as in the paper.
    Outside `mask` both images are set to 0 first (maps are 0 there by convention; this stops
    junk outside the mask leaking into border windows). Non-finite values count as 0.
    """
    est, ref = _f64(est), _f64(ref)
    if est.shape != ref.shape:
        raise ValueError(f"shapes differ: {est.shape} vs {ref.shape}")
    squeeze = est.ndim == 2
    if squeeze:
        est, ref = est[None], ref[None]
        mask = None if mask is None else np.asarray(mask)[None]
    if est.ndim != 3:
        raise ValueError(f"expected (Z, Y, X) or (Y, X) maps, got {est.shape}")
    m = _mask(mask, ref.shape)
    x = np.where(m & np.isfinite(est), est, 0.0)
    y = np.where(m & np.isfinite(ref), ref, 0.0)
    sigma = (0.0, SSIM_SIGMA, SSIM_SIGMA)
    truncate = (SSIM_WIN // 2) / SSIM_SIGMA

    def filt(a):
        return gaussian_filter(a, sigma=sigma, truncate=truncate, mode="reflect")

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    C1 = (SSIM_K1 * data_range) ** 2
    C2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * mx * my + C1) * (2 * sxy + C2)) / ((mx * mx + my * my + C1) * (sxx + syy + C2))
    return s[0] if squeeze else s


def ssim(est, ref, mask=None, data_range: float | None = None) -> float:
    """Mean SSIM over the voxels of `mask` (see `ssim_map`).

    `data_range` defaults to max − min of `ref` inside the mask (so swapping est and ref is
    symmetric only when data_range is given); if that is 0 it falls back to max |ref| or 1.
    """
    ref64 = _f64(ref)
    m = _mask(mask, ref64.shape)
    if not m.any():
        return float("nan")
    if data_range is None:
        vals = ref64[m]
        vals = vals[np.isfinite(vals)]
        data_range = float(vals.max() - vals.min()) if vals.size else 0.0
        if data_range <= 0:
            data_range = float(np.abs(vals).max()) if vals.size and np.abs(vals).max() > 0 else 1.0
    s = ssim_map(est, ref64, float(data_range), m)
    return float(s[m].mean())


def roi_means(maps: dict, labels, names) -> dict:
    """{name: {param: mean over voxels with label i + 1}} for names[i]; NaN for an empty ROI."""
    lab = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    out = {}
    for i, name in enumerate(names):
        sel = lab == i + 1
        out[name] = {}
        for param, arr in maps.items():
            a = _f64(arr)
            out[name][param] = float(a[sel].mean()) if sel.any() else float("nan")
    return out


def score_maps(est: dict, ref: dict, mask=None, params=MAP_NAMES, *, with_ssim: bool = True,
               flat: bool = False) -> dict:
    """The one scoring function: nRMSE (eq. 16, percent) and mean SSIM of each map in ``params``
    that ``ref`` has, over the voxels of ``mask``.

    Returns ``{param: {"nrmse": ..., "ssim": ...}}``, or with ``flat=True``
    ``{"nrmse_<param>": ..., "ssim_<param>": ...}`` (the columns of the cohort's results table and
    the keys of a reconstruction's history). ``with_ssim=False`` leaves SSIM out (it costs a few
    Gaussian filters per map; the history logs nRMSE only). A param that ref has and est lacks is
    an error (KeyError).
    """
    out = {}
    for p in params:
        if p not in ref:
            continue
        if p not in est:
            raise KeyError(f"estimate has no map {p!r}")
        out[p] = {"nrmse": nrmse(est[p], ref[p], mask)}
        if with_ssim:
            out[p]["ssim"] = ssim(est[p], ref[p], mask)
    if flat:
        return {f"{k}_{p}": v for p, s in out.items() for k, v in s.items()}
    return out
