"""Tissue masks derived from the data, for subject files without ``tissue_mask``.

The images here use the spec's centred orthonormal FFT (:func:`refine_more.physics.operators.ifft3c_np`).
"""
from __future__ import annotations

import numpy as np

from refine_more.physics.operators import ifft3c_np


def lowres_images(kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares over coils and images of the calibration (low-pass) images, (Z, Y, X).

    Uses the centred fully sampled phase-encode region common to all images (with a Hann window,
    so no ringing), which is alias-free whatever the undersampling pattern.
    """
    from refine_more.physics.coils import calibration_window

    win = calibration_window(mask)
    out = np.zeros(kspace.shape[2:], dtype=np.float64)
    for t in range(kspace.shape[0]):
        out += np.sum(np.abs(ifft3c_np(kspace[t] * win[None, :, :, None])) ** 2, axis=0)
    return np.sqrt(out)


def zero_filled_rss(kspace: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares over coils and images of the zero-filled images, (Z, Y, X)."""
    out = np.zeros(kspace.shape[2:], dtype=np.float64)
    for t in range(kspace.shape[0]):
        out += np.sum(np.abs(ifft3c_np(kspace[t])) ** 2, axis=0)
    return np.sqrt(out)


def derive_tissue_mask(subject, threshold: float = 0.25, lowres_threshold: float = 0.05) -> np.ndarray:
    """A tissue mask (bool (Z, Y, X)) derived from the data, for files without ``tissue_mask``.

    The full-resolution zero-filled RSS image (over coils and images; lightly smoothed) above
    ``threshold`` × its robust maximum, gated by the alias-free low-pass calibration image above
    ``lowres_threshold`` × its maximum (this removes undersampling ghosts away from the object),
    then closed, hole-filled (3-D and per slice) and stripped of components smaller than 1% of the
    largest. Returns ``subject.tissue_mask`` unchanged when the file has one.
    """
    from scipy import ndimage

    if subject.tissue_mask is not None:
        return subject.tissue_mask
    zf = ndimage.gaussian_filter(zero_filled_rss(subject.kspace), 0.5)
    low = lowres_images(subject.kspace, subject.mask)
    top = float(np.percentile(zf, 99.5)) if zf.size > 200 else float(zf.max())
    if top <= 0:
        return np.zeros(zf.shape, dtype=bool)
    m = zf > threshold * top
    if low.max() > 0:  # no common calibration region: no gate
        m &= low > lowres_threshold * low.max()
    st = ndimage.generate_binary_structure(3, 1)
    m = ndimage.binary_closing(m, structure=st, iterations=1, border_value=0) | m
    m = ndimage.binary_fill_holes(m, structure=st)
    for z in range(m.shape[0]):  # fill in-plane holes too (thin slabs)
        m[z] = ndimage.binary_fill_holes(m[z])
    lab, n = ndimage.label(m, structure=st)
    if n > 1:
        sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.01 * sizes.max()) + 1
        m = np.isin(lab, keep)
    return m
