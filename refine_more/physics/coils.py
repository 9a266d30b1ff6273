"""Coil sensitivity maps: ESPIRiT (sigpy) on the fully sampled k-space centre.

Public API
----------
- :func:`calibration_region` -- widths (wz, wy) of the centred phase-encode box sampled in every image.
- :func:`estimate_coil_maps` -- complex64 (C, Z, Y, X) maps, sum_c |S|^2 = 1 where nonzero.
- :func:`coil_maps_for` -- a subject's own ``coil_sens`` when present, else estimated.

How the calibration is done: the images are combined (k-space summed over t, only inside the
centred box every image sampled, so the sum is consistent) for maximal SNR. sigpy's
``EspiritCalib`` calibrates on a cube of ``calib_width`` in every dimension, which does not fit
thin slabs (few z) or anisotropic calibration boxes, and is slow in 3-D on CPU; so by default the
narrower phase-encode axis is
Fourier-transformed (its calibration lines, Hann-windowed; coil maps are smooth, so the loss of
resolution along that axis is harmless) and 2-D ESPIRiT runs on each of its slices over (other
phase-encode axis, readout). ``mode='3d'`` calibrates in 3-D instead. The readout x is always
fully sampled.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def _centred_box_ok(m2: np.ndarray, wz: int, wy: int) -> bool:
    Z, Y = m2.shape
    z0, y0 = Z // 2 - wz // 2, Y // 2 - wy // 2
    if z0 < 0 or y0 < 0 or z0 + wz > Z or y0 + wy > Y:
        return False
    return bool(m2[z0:z0 + wz, y0:y0 + wy].all())


def calibration_region(mask: np.ndarray) -> tuple:
    """Widths (wz, wy) of the largest centred box (origin at n // 2) of phase-encode lines sampled
    in every image of ``mask`` ((T, Z, Y) or (Z, Y)); (0, 0) when the centre line is missing."""
    m = np.asarray(mask).astype(bool)
    m2 = m.all(axis=0) if m.ndim == 3 else m
    Z, Y = m2.shape
    best = (0, 0)
    wy_max = Y
    for wz in range(1, Z + 1):
        # largest wy for this wz (monotone: a larger wz never allows a larger wy)
        wy = 0
        for cand in range(min(wy_max, Y), 0, -1):
            if _centred_box_ok(m2, wz, cand):
                wy = cand
                break
        if wy == 0:
            break
        wy_max = wy
        if wz * wy > best[0] * best[1]:
            best = (wz, wy)
    return best


def calibration_window(mask: np.ndarray) -> np.ndarray:
    """(Z, Y) Hann window over the centred box every image sampled (zeros elsewhere): low-pass,
    alias-free and without ringing, whatever the undersampling pattern."""
    _, Z, Y = mask.shape
    wz, wy = calibration_region(mask)
    win = np.zeros((Z, Y), dtype=np.float32)
    if wz and wy:
        z0, y0 = Z // 2 - wz // 2, Y // 2 - wy // 2
        hz = np.hanning(wz + 2)[1:-1] if wz > 1 else np.ones(1)
        hy = np.hanning(wy + 2)[1:-1] if wy > 1 else np.ones(1)
        win[z0:z0 + wz, y0:y0 + wy] = np.outer(hz, hy)
    return win


def _kernel_width(cw: int) -> int:
    return int(min(6, max(2, cw // 3)))


def _espirit(calib_ksp: np.ndarray, cw: int, thresh: float, crop: float, max_iter: int, kernel_width=None):
    import sigpy.mri.app as mr_app

    kw = _kernel_width(cw) if kernel_width is None else int(kernel_width)
    app = mr_app.EspiritCalib(calib_ksp, calib_width=cw, thresh=thresh, kernel_width=kw, crop=crop,
                              max_iter=max_iter, show_pbar=False)
    return np.asarray(app.run())


def estimate_coil_maps(kspace: np.ndarray, mask: np.ndarray, calib_width: Optional[int] = None, *,
                       thresh: float = 0.02, crop: float = 0.8, max_iter: int = 50,
                       kernel_width: Optional[int] = None, mode: str = "hybrid") -> np.ndarray:
    """ESPIRiT coil maps from the fully sampled k-space centre.

    kspace: complex (T, C, Z, Y, X) (or (C, Z, Y, X), one image); mask: (T, Z, Y) (or (Z, Y)).
    calib_width: in-plane calibration width (default: the widest centred fully sampled box, at
    most 24, and the readout cropped to match). Returns complex64 (C, Z, Y, X) with
    sum_c |S|^2 = 1 wherever the map is nonzero (zero where ESPIRiT's eigenvalue < ``crop``).
    mode: 'hybrid' (default; 2-D ESPIRiT per slice of the narrower calibration axis, fast) or
    '3d' (one 3-D calibration; needs a box >= 16 wide in z and y, and is slow on CPU).
    """
    k = np.asarray(kspace)
    m = np.asarray(mask).astype(bool)
    if k.ndim == 4:
        k = k[None]
    if m.ndim == 2:
        m = m[None]
    T, C, Z, Y, X = k.shape
    wz, wy = calibration_region(m)
    if wz == 0 or wy == 0:
        raise ValueError("estimate_coil_maps: the k-space centre is not sampled in every image; no calibration region")
    z0, y0 = Z // 2 - wz // 2, Y // 2 - wy // 2
    # combined calibration data: sum over images, zero outside the common calibration box
    acs = np.zeros((C, Z, Y, X), dtype=np.complex64)
    acs[:, z0:z0 + wz, y0:y0 + wy, :] = k[:, :, z0:z0 + wz, y0:y0 + wy, :].sum(axis=0)
    cap = 24 if calib_width is None else int(calib_width)

    if mode not in ("hybrid", "3d"):
        raise ValueError(f"estimate_coil_maps: mode must be 'hybrid' or '3d', got {mode!r}")
    if mode == "3d":
        if min(wz, wy) < 16:
            raise ValueError(f"estimate_coil_maps: mode '3d' needs a calibration box >= 16 x 16, got {wz} x {wy}")
        cw = min(wz, wy, X, cap)
        maps = _espirit(acs, cw, thresh, crop, max_iter, kernel_width)
    else:
        # hybrid: transform the narrower phase-encode axis, 2-D ESPIRiT on each of its slices
        if wz <= wy:
            axis, w_other, n_other, w_narrow, n_narrow = 1, wy, Y, wz, Z
        else:
            axis, w_other, n_other, w_narrow, n_narrow = 2, wz, Z, wy, Y
        cw = min(w_other, X, cap)
        if cw < 4:
            raise ValueError(f"estimate_coil_maps: calibration region ({wz} x {wy} phase-encode lines) is too small")
        if w_narrow > 1:
            h = np.hanning(w_narrow + 2)[1:-1].astype(np.float32)
            s0 = n_narrow // 2 - w_narrow // 2
            win = np.zeros(n_narrow, dtype=np.float32)
            win[s0:s0 + w_narrow] = h
            shape = [1, 1, 1, 1]
            shape[axis] = n_narrow
            acs = acs * win.reshape(shape)
            acs = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(acs, axes=axis), axis=axis, norm="ortho"),
                                  axes=axis)
        else:
            # a single calibration line: the same low-res profile on every slice
            acs = np.take(acs, [n_narrow // 2], axis=axis).repeat(n_narrow, axis=axis)
        maps = np.zeros((C, Z, Y, X), dtype=np.complex64)
        for i in range(n_narrow):
            sl = np.take(acs, i, axis=axis)  # (C, other, X)
            if not np.any(sl):
                continue
            mp = _espirit(np.ascontiguousarray(sl), cw, thresh, crop, max_iter, kernel_width)
            if axis == 1:
                maps[:, i] = mp
            else:
                maps[:, :, i] = mp
    maps = maps.astype(np.complex64)
    norm = np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
    nz = norm > 1e-6
    maps = np.where(nz, maps / np.where(nz, norm, 1), 0).astype(np.complex64)
    return maps


def coil_maps_for(subject, **kwargs) -> np.ndarray:
    """``subject.coil_sens`` when the file has it, else ESPIRiT maps from its k-space centre."""
    if subject.coil_sens is not None:
        return subject.coil_sens
    return estimate_coil_maps(subject.kspace, subject.mask, **kwargs)
