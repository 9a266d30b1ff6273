"""A vial phantom like the paper's (§3.2, §3.4.2, Fig. 5), simulated, and its vial-mean analysis.

The paper's phantom: four 20 mL vials (2, 4, 8 % agar in DI water, boiled egg white) in a 200 µM
MnCl2 water bath, 128 × 128 × 12 at 1.3 × 1.3 × 5 mm, the phantom protocol
(`Protocol.paper_phantom`), a 1-D variable-density mask with AF 4 and 24 central lines. Here: the
same bath and kinds of vial, plus two more vials (6 % agar, and 3 % agar doped with MnCl2) so the
regression has six points and T1F is not a function of f alone; vials are cylinders along z.

Vial values (3T; f = M0R/M0, kF = k·f). shared/notes/qmt-literature.md has no phantom values;
these are plausible orders of magnitude from the agar/MT literature as remembered (not checked
here): MPF of agar rises roughly linearly with concentration, ≈ 1.3–1.5 % per % agar; T1 of agar in
DI water ≈ 2–2.5 s at 2 % falling with concentration; boiled egg white T1 ≈ 0.8–1 s with an MPF of
several %; 200 µM MnCl2 (r1 ≈ 6 /mM/s at 3T) gives T1 ≈ 0.65 s and no bound pool. k spans 18–30 1/s,
deliberately not all at the 23 1/s the `small` preset holds it at (spec, Identifiability).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from refine_more.physics.operators import fft3c_np
from refine_more.physics.protocol import Protocol
from refine_more.physics.signal_model import BTSModel
from refine_more.evaluation.simulate import smooth_field, variable_density_mask

BATH = "bath"
#: name: (I0, T1F s, f, k 1/s); the bath has no bound pool
VIALS = {
    "agar-2%": (0.98, 2.40, 0.030, 30.0),
    "agar-4%": (0.96, 2.00, 0.060, 27.0),
    "agar-6%": (0.94, 1.75, 0.088, 25.0),
    "agar-8%": (0.92, 1.50, 0.115, 24.0),
    "egg-white": (0.88, 0.85, 0.080, 18.0),
    "agar-3%+MnCl2": (0.97, 0.70, 0.045, 28.0),
}
BATH_VALUES = (1.00, 0.65, 0.0, 0.0)
PAPER_FOV_MM = 128 * 1.3           # in-plane field of view of the paper's phantom scan
PAPER_SLICE_MM = 5.0


@dataclass
class PhantomConfig:
    matrix: tuple = (8, 48, 48)             # (Z, Y, X); the paper's 12 × 128 × 128 scaled down
    acceleration: float = 4.0               # 1-D along y, as the paper's Fig. S2B
    calib_lines: int | None = None          # fully sampled central y lines; default 24 at Y = 128, scaled
    n_coils: int = 4
    snr: float = 200.0                      # mean vial magnitude of the brightest image / noise σ
    b1_range: float = 0.15                  # smooth B1+ within 1 ± this
    write_coil_sens: bool = True
    vials: dict = field(default_factory=lambda: dict(VIALS))

    def __post_init__(self):
        Z, Y, X = (int(n) for n in self.matrix)
        if min(Z, Y, X) < 1 or min(Y, X) < 24:
            raise ValueError(f"phantom: matrix needs Y, X >= 24 for the vials to be resolved, got {list(self.matrix)}")
        if not (np.isfinite(self.acceleration) and self.acceleration >= 1):
            raise ValueError(f"phantom: acceleration must be >= 1, got {self.acceleration}")
        if self.calib_lines is None:
            self.calib_lines = max(4, int(round(24 * Y / 128)))
        if not 1 <= self.calib_lines <= Y / self.acceleration:
            raise ValueError(f"phantom: {self.calib_lines} central lines do not fit in {Y} lines at AF "
                             f"{self.acceleration:g} ({int(round(Y / self.acceleration))} lines)")


def vial_centres(n_vials: int, matrix) -> np.ndarray:
    """(n, 2) in-plane centres (y, x) in voxels: on a ring around the container's centre."""
    Y, X = matrix[1:]
    r = 0.24 * min(Y, X)
    angles = 2 * np.pi * np.arange(n_vials) / n_vials + np.pi / 2
    return np.stack([(Y - 1) / 2 + r * np.sin(angles), (X - 1) / 2 + r * np.cos(angles)], 1)


def phantom_fractions(matrix, n_vials: int, supersample: int = 4) -> np.ndarray:
    """(1 + n_vials, Z, Y, X) volume fractions of the bath and each vial (discs in every slice,
    edges by `supersample`² subvoxels); air is the rest."""
    Z, Y, X = matrix
    s = supersample
    yy, xx = np.meshgrid((np.arange(Y * s) + 0.5) / s - 0.5, (np.arange(X * s) + 0.5) / s - 0.5, indexing="ij")
    container = np.hypot(yy - (Y - 1) / 2, xx - (X - 1) / 2) < 0.45 * min(Y, X)
    vial_r = 0.085 * min(Y, X)
    discs = [np.hypot(yy - cy, xx - cx) < vial_r for cy, cx in vial_centres(n_vials, matrix)]
    bath = container & ~np.any(discs, 0)
    frac = np.stack([bath] + discs, 0).reshape(1 + n_vials, Y, s, X, s).mean((2, 4))
    return np.broadcast_to(frac[:, None], (1 + n_vials, Z, Y, X)).astype(np.float64)


def phantom_maps(fractions: np.ndarray, vials: dict) -> tuple:
    """Maps {I0, T1F, f, k, kF} (partial-volume voxels take fraction-weighted values, as the
    anatomical simulator does), labels (0 air, 1 bath, 2… vials) and the object mask."""
    values = np.array([BATH_VALUES] + list(vials.values()), dtype=np.float64)   # (1 + n, 4)
    total = fractions.sum(0)
    inside = total > 0.5
    w = np.where(inside, fractions / np.maximum(total, 1e-9), 0.0)
    maps = {name: np.tensordot(values[:, i], w, axes=1) for i, name in enumerate(("I0", "T1F", "f", "k"))}
    maps["kF"] = maps["k"] * maps["f"]
    labels = np.where(inside, np.argmax(fractions, 0) + 1, 0).astype(np.int16)
    return maps, labels, inside


def b1_field(matrix, rng, b1_range: float) -> np.ndarray:
    """Smooth B1+ (Z, Y, X): a centre-bright bump, a random tilt and a smooth random part, scaled
    to span 1 ± b1_range (no clipping, so no flat plateaus)."""
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in matrix], indexing="ij")
    tilt = rng.uniform(-1, 1, 3)
    b1 = np.exp(-(yy**2 + xx**2)) + 0.3 * (tilt[0] * zz + tilt[1] * yy + tilt[2] * xx)
    b1 = b1 + smooth_field(matrix, rng, np.asarray(matrix, float) / 4.0, 0.1)
    b1 = b1 - 0.5 * (b1.max() + b1.min())
    return (1 + b1_range * b1 / np.abs(b1).max()).astype(np.float32)


def coil_maps(n_coils: int, matrix, rng) -> np.ndarray:
    """Birdcage maps (sigpy) with a random phase per coil, normalised to Σ|S|² = 1."""
    import sigpy.mri

    maps = sigpy.mri.birdcage_maps((n_coils,) + tuple(matrix), r=1.2).astype(np.complex64)
    maps *= np.exp(1j * rng.uniform(-np.pi, np.pi, (n_coils, 1, 1, 1))).astype(np.complex64)
    return maps / np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))


def simulate_phantom(subject_id: str, config: PhantomConfig, seed: int = 0):
    """A `Subject` of the phantom: undersampled k-space, its fully sampled reference, coil maps,
    B1+, the object mask, the true maps and labels named bath and the vials."""
    from refine_more.files.subject import Subject

    rng = np.random.default_rng(seed)
    matrix = tuple(int(n) for n in config.matrix)
    Z, Y, X = matrix
    maps, labels, inside = phantom_maps(phantom_fractions(matrix, len(config.vials)), config.vials)
    b1 = b1_field(matrix, rng, config.b1_range)
    protocol = Protocol.paper_phantom()
    t64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))
    images = BTSModel(protocol).complex_images(*(t64(maps[n]) for n in ("I0", "T1F", "f", "kF")), t64(b1)).numpy()
    phase = smooth_field(matrix, rng, np.array([2.0, 8.0, 8.0]) * max(Y, X) / 48.0, 0.7) + rng.uniform(-np.pi, np.pi)
    images = images * np.exp(1j * phase)[None] * inside[None]
    coils = coil_maps(config.n_coils, matrix, rng)
    kspace_clean = fft3c_np(images[:, None] * coils[None])
    sigma = np.abs(images).max(0)[labels >= 2].mean() / config.snr
    noise = rng.standard_normal(kspace_clean.shape) + 1j * rng.standard_normal(kspace_clean.shape)
    kspace_full = (kspace_clean + noise * sigma / np.sqrt(2)).astype(np.complex64)
    mask = np.stack([variable_density_mask((Z, Y), config.acceleration, (Z, config.calib_lines), rng, "1d")
                     for _ in range(protocol.n_images)], 0)
    reference = {name: maps[name].astype(np.float32) for name in ("I0", "T1F", "f", "kF")}
    reference.update(labels=labels, kspace_full=kspace_full)
    voxel = (PAPER_SLICE_MM * 12 / Z, PAPER_FOV_MM / Y, PAPER_FOV_MM / X)
    return Subject(subject_id=subject_id, kspace=(kspace_full * mask[:, None, :, :, None]).astype(np.complex64),
                   mask=mask, protocol=protocol, voxel_size_mm=np.asarray(voxel, dtype=np.float64),
                   coil_sens=coils if config.write_coil_sens else None, b1=b1, tissue_mask=inside,
                   reference=reference, label_names=[BATH] + list(config.vials), path=None,
                   notes=[f"simulated vial phantom: seed {seed}, SNR {config.snr}, AF {config.acceleration:g} "
                          f"(1d, {config.calib_lines} central lines)"])


def simulate_phantom_cohort(out_dir, n_subjects: int, config: PhantomConfig, seed: int = 0) -> Path:
    """Write `n_subjects` phantom files (phantom-001, …; different noise, masks, B1+, coils) and
    `out_dir/manifest.parquet`; return the manifest's path."""
    import pandas as pd

    from refine_more.files.atomic import atomic_path
    from refine_more.files.subject import write_subject

    if not (isinstance(n_subjects, (int, np.integer)) and n_subjects >= 1):
        raise ValueError(f"simulate: --subjects must be an integer >= 1, got {n_subjects}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_subjects):
        sid = f"phantom-{i + 1:03d}"
        write_subject(out_dir / f"{sid}.h5", simulate_phantom(sid, config, seed=seed * 100_003 + i))
        rows.append({"subject_id": sid, "path": f"{sid}.h5", "role": "seed" if i == 0 else ""})
    manifest = out_dir / "manifest.parquet"
    with atomic_path(manifest) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    return manifest


# -- analysis (Fig. 5B) ----------------------------------------------------------------------------
def vial_masks(labels, names, erode: int = 1) -> dict:
    """{vial name: bool (Z, Y, X)} for labels 2… (1 is the bath), each eroded in-plane by `erode`
    voxels so partial-volume edges and edge ringing stay out of the means."""
    labels = np.asarray(labels)
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndimage.generate_binary_structure(2, 1)
    out = {}
    for value, name in enumerate(names, start=1):
        if name == BATH:
            continue
        m = labels == value
        if erode:
            m = ndimage.binary_erosion(m, structure=st, iterations=erode)
        if not m.any():
            raise ValueError(f"vial {name!r}: nothing left after eroding by {erode} voxel(s)")
        out[name] = m
    return out


def vial_means(maps: dict, masks: dict, params=("T1F", "f", "kF")) -> dict:
    """{param: {vial: mean of the map in the vial's mask}}."""
    return {p: {v: float(np.asarray(maps[p], np.float64)[m].mean()) for v, m in masks.items()} for p in params}


def regression(reference, estimate) -> dict:
    """Least-squares line estimate = slope·reference + intercept, and R² of that line."""
    x, y = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"regression: need >= 2 paired values, got {x.shape} and {y.shape}")
    xm, ym = x.mean(), y.mean()
    sxx, sxy, syy = ((x - xm) ** 2).sum(), ((x - xm) * (y - ym)).sum(), ((y - ym) ** 2).sum()
    if sxx == 0:
        raise ValueError("regression: the reference values are all equal")
    slope = sxy / sxx
    intercept = ym - slope * xm
    ss_res = ((y - slope * x - intercept) ** 2).sum()
    r2 = 1.0 - ss_res / syy if syy > 0 else float(ss_res == 0)
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "n": int(x.size)}
