"""B1+ from the Bloch–Siegert phase that BTS encodes in its saturated images.

A saturated image and the unsaturated image at the same flip angle share the background phase;
their phase difference is φ_BS = φ_nom · b1² (spec, Signal model). The difference is taken on the
coil-combined calibration images (the fully sampled k-space centre, Hann-windowed: alias-free and
smooth, as B1+ is), magnitude-weighted over all flip-angle pairs.
"""
from __future__ import annotations

import numpy as np

from refine_more.physics.operators import ifft3c_np

B1_RANGE = (0.5, 1.5)


def calibration_images(kspace: np.ndarray, mask: np.ndarray, coil_sens: np.ndarray) -> np.ndarray:
    """Coil-combined low-resolution complex images (T, Z, Y, X) from the common calibration box."""
    from refine_more.physics.coils import calibration_window

    T, C, Z, Y, X = kspace.shape
    win = calibration_window(mask)
    if not win.any():
        raise ValueError("no fully sampled k-space centre common to all images: cannot estimate B1+")
    images = np.empty((T, Z, Y, X), dtype=np.complex64)
    for t in range(T):
        coil_images = ifft3c_np(kspace[t] * win[None, :, :, None])
        images[t] = np.sum(coil_images * np.conj(coil_sens), axis=0)
    return images


def flip_angle_pairs(protocol) -> list:
    """(unsaturated, saturated) image indices with the same flip angle and TR."""
    pairs = []
    for ts, sat in enumerate(protocol.saturation):
        if not sat:
            continue
        for tu, unsat in enumerate(protocol.saturation):
            if (not unsat and protocol.flip_angles_deg[tu] == protocol.flip_angles_deg[ts]
                    and protocol.TR_s[tu] == protocol.TR_s[ts]):
                pairs.append((tu, ts))
                break
    return pairs


def estimate_b1(kspace, mask, coil_sens, protocol, tissue_mask) -> np.ndarray:
    """Relative B1+ (Z, Y, X) float32: from the Bloch–Siegert phase inside `tissue_mask`, 1 outside."""
    pairs = flip_angle_pairs(protocol)
    if not pairs:
        raise ValueError("protocol has no saturated/unsaturated image pair at the same flip angle: cannot estimate B1+")
    images = calibration_images(kspace, mask, coil_sens)
    z = sum(images[ts] * np.conj(images[tu]) for tu, ts in pairs)
    b1_sq = np.angle(z) / protocol.phi_bs_nominal
    b1 = np.sqrt(np.clip(b1_sq, B1_RANGE[0] ** 2, B1_RANGE[1] ** 2))
    return np.where(tissue_mask, b1, 1.0).astype(np.float32)


def b1_for(subject, coil_sens, tissue_mask):
    """(b1 map, source): the file's `b1`, else the Bloch–Siegert estimate, else 1."""
    if subject.b1 is not None:
        return np.asarray(subject.b1, dtype=np.float32), "file"
    try:
        return estimate_b1(subject.kspace, subject.mask, coil_sens, subject.protocol, tissue_mask), "bloch-siegert"
    except ValueError:
        return np.ones(subject.shape, dtype=np.float32), "unity"
