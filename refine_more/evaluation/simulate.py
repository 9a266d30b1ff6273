"""Synthetic BTS cohort from real anatomy (MNI152 2009 templates shipped with nilearn).

Per subject: a rigid transform of the template, tissue-value jitter, smooth within-tissue
variation, a smooth B1+ field, birdcage coil maps (sigpy), a smooth background phase, complex
Gaussian noise at a chosen SNR, and a variable-density sampling mask per image.

Tissue values (3T; this project's convention f = M0R/M0, kF = k·f, see shared/notes/qmt-literature.md):
- WM: T1F 0.90 s, f 0.13, k 23 1/s (kF 3.0).  f: in-vivo MPF 0.12–0.16 (Yarnykh 2012, Underhill 2011);
  Stanisz 2005 (3T) F = 0.139 → f = 0.122, kf ≈ 3.2 1/s; T1 0.85–1.08 s (qMRLab defaults, Stanisz 2005).
- GM: T1F 1.50 s, f 0.06, k 24 1/s (kF 1.44).  MPF 0.05–0.08; Stanisz 2005 F = 0.05 → f = 0.048,
  T1 1.4–1.8 s (qMRLab, Stanisz 2005).
- CSF: T1F 4.0 s, f 0.005, k 23 1/s: essentially no macromolecules; T1 ≈ 4.3 s.
k is kept inside the band the reconstruction assumes (20–26 1/s, around the paper code's 22–24 and
Yarnykh's k ≈ 22 1/s at f = 0.15): k is not identifiable from this protocol (spec, Identifiability),
so a truth outside the band would only measure the prior's bias, which the spec already quantifies.
Relative proton density I0: WM 0.69, GM 0.80, CSF 1.0 (typical water content ratios).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from refine_more.physics.operators import fft3c_np
from refine_more.physics.protocol import Protocol
from refine_more.physics.signal_model import BTSModel

TISSUES = ("WM", "GM", "CSF")
TISSUE_VALUES = {  # I0, T1F (s), f, k (1/s)
    "WM": dict(I0=0.69, T1F=0.90, f=0.13, k=23.0),
    "GM": dict(I0=0.80, T1F=1.50, f=0.06, k=24.0),
    "CSF": dict(I0=1.00, T1F=4.00, f=0.005, k=23.0),
}


@dataclass
class SimulationConfig:
    matrix: tuple = (12, 48, 48)          # (Z, Y, X)
    acceleration: float = 4.0
    mask_type: str = "2d"                  # "2d": variable density over (z, y); "1d": over y only
    n_coils: int = 4
    snr: float = 200.0                     # mean WM magnitude of the brightest image / noise σ
    calib: tuple | None = None             # fully sampled centre (z, y); default 24×24 scaled to the matrix
    rotation_deg: float = 5.0              # max |rotation| about each axis
    shift_mm: float = 4.0
    value_jitter: float = 0.04             # per-subject relative SD of tissue values
    texture: float = 0.04                  # smooth within-tissue relative variation
    b1_range: float = 0.15                 # B1+ varies about 1 ± this
    write_coil_sens: bool = True           # False: readers estimate coil maps with ESPIRiT
    write_b1: bool = True
    flip_angles_deg: tuple = (5.0, 10.0, 20.0, 40.0)
    phase_drift: float = 0.0               # radians: each image's own smooth phase up to this size (B0 drift, motion)

    def __post_init__(self):
        """Refuse values that would end in a traceback or a useless cohort (one line, naming the option)."""
        m = tuple(self.matrix)
        if len(m) != 3 or not all(isinstance(n, (int, np.integer)) and n >= 2 for n in m):
            raise ValueError(f"simulate: --matrix must be 3 integers Z Y X, each >= 2, got {list(m)}")
        if not (np.isfinite(self.acceleration) and self.acceleration >= 1):
            raise ValueError(f"simulate: --acc must be >= 1 (1: fully sampled), got {self.acceleration}")
        if not (isinstance(self.n_coils, (int, np.integer)) and self.n_coils >= 1):
            raise ValueError(f"simulate: --coils must be an integer >= 1, got {self.n_coils}")
        if not (np.isfinite(self.snr) and self.snr > 0):
            raise ValueError(f"simulate: --snr must be finite and > 0, got {self.snr}")
        if self.mask_type not in ("2d", "1d"):
            raise ValueError(f"simulate: --mask must be 2d or 1d, got {self.mask_type!r}")
        if not (np.isfinite(self.phase_drift) and self.phase_drift >= 0):
            raise ValueError(f"simulate: --phase-drift must be finite and >= 0, got {self.phase_drift}")


def default_calib(matrix) -> tuple:
    """24×24 fully sampled centre at the paper's 48 × 176 phase-encode grid, scaled down (min 4)."""
    Z, Y, _ = matrix
    return (max(4, min(Z, int(round(24 * Z / 48)))), max(4, min(Y, int(round(24 * Y / 176)))))


# -- anatomy -------------------------------------------------------------------------------------
def load_templates(resolution_mm: int = 2):
    """MNI152 2009 GM/WM probability maps and brain mask from the nilearn package (no download)."""
    from nilearn import datasets

    gm = datasets.load_mni152_gm_template(resolution=resolution_mm).get_fdata().astype(np.float32)
    wm = datasets.load_mni152_wm_template(resolution=resolution_mm).get_fdata().astype(np.float32)
    brain = datasets.load_mni152_brain_mask(resolution=resolution_mm).get_fdata() > 0.5
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    csf = np.clip(1.0 - gm - wm, 0, 1) * brain
    # nilearn arrays are (x, y, z) in RAS at `resolution_mm`; ours are (z, y, x)
    to_zyx = lambda a: np.ascontiguousarray(np.transpose(a, (2, 1, 0)))
    return {"WM": to_zyx(wm * brain), "GM": to_zyx(gm * brain), "CSF": to_zyx(csf)}, float(resolution_mm)


def _rotation(angles_rad):
    a, b, c = angles_rad
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def resample_anatomy(probs: dict, template_mm: float, matrix, rng, rotation_deg, shift_mm):
    """Tissue probabilities on the output grid, after a random rigid transform; and voxel size."""
    brain = sum(probs.values()) > 0.1
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    centre = (lo + hi) / 2.0
    extent_mm = (hi - lo + 1) * template_mm * 1.08          # small margin around the brain
    matrix = np.asarray(matrix)
    voxel_mm = extent_mm / matrix
    R = _rotation(np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3)))
    shift = rng.uniform(-shift_mm, shift_mm, 3) / template_mm
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2.0 for n in matrix], indexing="ij"), 0)
    out_mm = grid * voxel_mm[:, None, None, None]
    src = np.einsum("ij,jzyx->izyx", R, out_mm) / template_mm + (centre + shift)[:, None, None, None]
    sigma = np.maximum(0.0, 0.4 * voxel_mm / template_mm - 0.2)  # anti-alias before sampling
    out = {}
    for name, p in probs.items():
        out[name] = ndimage.map_coordinates(ndimage.gaussian_filter(p, sigma), src, order=1, mode="constant").astype(np.float32)
    return out, voxel_mm


def smooth_field(shape, rng, scale_vox, amplitude):
    """Zero-mean smooth random field with unit-ish SD times `amplitude`."""
    noise = rng.standard_normal(shape)
    field = ndimage.gaussian_filter(noise, np.maximum(np.asarray(scale_vox, float), 0.5), mode="wrap")
    return amplitude * field / (field.std() + 1e-12)


def image_phase_drift(shape, n_images, tissue, size, rng):
    """Per-image phase deviations (T, Z, Y, X) of up to `size` radians over the tissue: an offset,
    a linear gradient and a smooth random field (σ a third of the field of view), as B0 drift and
    motion between acquisitions would give; each image's largest |deviation| is `size`·U(0.5, 1)."""
    if not (np.isfinite(size) and size >= 0):
        raise ValueError(f"phase_drift must be a finite number of radians ≥ 0, got {size!r}")
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = np.asarray(tissue, bool) if np.any(tissue) else np.ones(shape, bool)
    out = np.zeros((n_images,) + tuple(shape))
    for t in range(n_images):
        field = rng.uniform(-1, 1) + sum(rng.uniform(-1, 1) * g for g in grid)
        field = field + smooth_field(shape, rng, np.asarray(shape, float) / 3.0, 0.5)
        out[t] = field * size * rng.uniform(0.5, 1.0) / np.abs(field[inside]).max()
    return out


# -- sampling ------------------------------------------------------------------------------------
def variable_density_mask(shape_zy, acceleration, calib, rng, mask_type="2d", sigma_frac=0.35):
    """One (Z, Y) mask: fully sampled centre `calib` (z, y) plus Gaussian-density random lines,
    exactly round(Z·Y / acceleration) lines in all (2D) or whole z-columns of y lines (1D)."""
    Z, Y = shape_zy
    if mask_type == "1d":
        cy = calib[1]
        n_lines = int(round(Y / acceleration))
        line = _draw_1d(Y, n_lines, cy, rng, sigma_frac)
        return np.broadcast_to(line[None, :], (Z, Y)).copy()
    if mask_type != "2d":
        raise ValueError(f"mask_type must be '2d' or '1d', got {mask_type!r}")
    n_total = int(round(Z * Y / acceleration))
    mask = np.zeros((Z, Y), dtype=bool)
    cz, cy = min(calib[0], Z), min(calib[1], Y)
    mask[Z // 2 - cz // 2: Z // 2 - cz // 2 + cz, Y // 2 - cy // 2: Y // 2 - cy // 2 + cy] = True
    remaining = n_total - mask.sum()
    if remaining > 0:
        kz, ky = np.meshgrid((np.arange(Z) - Z // 2) / (Z / 2), (np.arange(Y) - Y // 2) / (Y / 2), indexing="ij")
        density = np.exp(-(kz**2 + ky**2) / (2 * sigma_frac**2))
        density[mask] = 0
        chosen = rng.choice(Z * Y, size=int(remaining), replace=False, p=(density / density.sum()).ravel())
        mask.ravel()[chosen] = True
    return mask


def _draw_1d(n, n_lines, calib, rng, sigma_frac):
    line = np.zeros(n, dtype=bool)
    line[n // 2 - calib // 2: n // 2 - calib // 2 + calib] = True
    remaining = n_lines - line.sum()
    if remaining > 0:
        k = (np.arange(n) - n // 2) / (n / 2)
        density = np.exp(-k**2 / (2 * sigma_frac**2))
        density[line] = 0
        line[rng.choice(n, size=int(remaining), replace=False, p=density / density.sum())] = True
    return line


# -- one subject ---------------------------------------------------------------------------------
def noisy_kspace(images: np.ndarray, coils: np.ndarray, sigma: float, rng) -> np.ndarray:
    """F(images·coils) plus complex Gaussian noise of SD σ, complex64 (T, C, Z, Y, X), one image at a
    time: the float64 k-space of all images and coils at once (and its noise) made the simulator's
    15.4 GiB peak at the paper's size. The noise is drawn as before (all real parts, then all
    imaginary parts, in C order), so a seed gives the same subject to float32 rounding."""
    T, C = images.shape[0], coils.shape[0]
    out = np.empty((T, C) + images.shape[1:], dtype=np.complex64)
    for t in range(T):
        out[t] = fft3c_np(images[t][None] * coils)
    scale = sigma / np.sqrt(2)
    for part in (1.0, 1j):
        for t in range(T):
            out[t] += (part * scale * rng.standard_normal(out.shape[1:])).astype(np.complex64)
    return out


def simulate_subject(subject_id: str, config: SimulationConfig, seed: int, templates=None):
    """Return a `Subject` (refine_more.files.subject) with reference truth and fully sampled k-space."""
    import sigpy.mri

    from refine_more.files.subject import Subject

    rng = np.random.default_rng(seed)
    Z, Y, X = config.matrix
    if templates is None:
        templates = load_templates(1 if max(Y, X) > 110 else 2)
    probs, template_mm = templates
    p, voxel_mm = resample_anatomy(probs, template_mm, config.matrix, rng, config.rotation_deg, config.shift_mm)
    total = p["WM"] + p["GM"] + p["CSF"]
    tissue_mask = total > 0.5
    # partial-volume voxels take probability-weighted tissue values; background is empty
    weights = {t: np.where(tissue_mask, p[t] / np.maximum(total, 1e-6), 0.0) for t in TISSUES}
    maps = {}
    for name in ("I0", "T1F", "f", "k"):
        value = np.zeros(config.matrix, dtype=np.float64)
        for t in TISSUES:
            base = TISSUE_VALUES[t][name] * (1 + config.value_jitter * rng.standard_normal())
            texture = 1 + smooth_field(config.matrix, rng, np.array([1.0, 3.0, 3.0]) * max(Y, X) / 48.0, config.texture)
            value += weights[t] * base * texture
        maps[name] = value
    maps["f"] = np.clip(maps["f"], 0.0, 0.5)
    maps["k"] = np.clip(maps["k"], 20.5, 25.5)
    maps["kF"] = maps["k"] * maps["f"]
    labels = np.zeros(config.matrix, dtype=np.int16)
    stacked = np.stack([p[t] for t in TISSUES], 0)
    labels[tissue_mask] = (np.argmax(stacked, 0) + 1)[tissue_mask]

    # B1+: a smooth centre-bright bump with a random tilt, within 1 ± b1_range
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in config.matrix], indexing="ij")
    tilt = rng.uniform(-1, 1, 3)
    b1 = 1 + config.b1_range * (0.6 * np.exp(-(yy**2 + xx**2 + 0.5 * zz**2)) - 0.3 + 0.3 * (tilt[0] * zz + tilt[1] * yy + tilt[2] * xx) / 3)
    b1 = np.clip(b1, 1 - config.b1_range, 1 + config.b1_range).astype(np.float32)

    protocol = Protocol.paper_in_vivo(config.flip_angles_deg)
    model = BTSModel(protocol)
    t64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))
    images = model.complex_images(t64(maps["I0"]), t64(maps["T1F"]), t64(maps["f"]), t64(maps["kF"]), t64(b1)).numpy()
    bg_phase = smooth_field(config.matrix, rng, np.array([2.0, 8.0, 8.0]) * max(Y, X) / 48.0, 1.0) + rng.uniform(-np.pi, np.pi)
    images = images * np.exp(1j * bg_phase)[None] * tissue_mask[None]
    if config.phase_drift:  # its own generator, so cohorts without drift stay what they were
        images = images * np.exp(1j * image_phase_drift(config.matrix, protocol.n_images, tissue_mask,
                                                        config.phase_drift, np.random.default_rng([seed, 0x5EED])))

    coils = sigpy.mri.birdcage_maps((config.n_coils,) + tuple(config.matrix), r=1.3).astype(np.complex64)
    coils *= np.exp(1j * rng.uniform(-np.pi, np.pi, config.n_coils))[:, None, None, None].astype(np.complex64)
    coils /= np.sqrt((np.abs(coils) ** 2).sum(0, keepdims=True))
    wm = labels == 1
    sigma = np.abs(images).max(0)[wm].mean() / config.snr if wm.any() else np.abs(images).max() / config.snr
    kspace_full = noisy_kspace(images, coils, sigma, rng)

    calib = config.calib or default_calib(config.matrix)
    mask = np.stack([variable_density_mask((Z, Y), config.acceleration, calib, rng, config.mask_type)
                     for _ in range(protocol.n_images)], 0)
    kspace = kspace_full * mask[:, None, :, :, None]

    reference = {name: maps[name].astype(np.float32) for name in ("I0", "T1F", "f", "kF")}
    reference["labels"] = labels
    reference["kspace_full"] = kspace_full
    return Subject(
        subject_id=subject_id,
        kspace=kspace.astype(np.complex64),
        mask=mask,
        protocol=protocol,
        voxel_size_mm=np.asarray(voxel_mm, dtype=np.float64),
        coil_sens=coils if config.write_coil_sens else None,
        b1=b1 if config.write_b1 else None,
        tissue_mask=tissue_mask,
        reference=reference,
        label_names=list(TISSUES),
        path=None,
        notes=[f"simulated: seed {seed}, SNR {config.snr}, AF {config.acceleration} ({config.mask_type})"
               + (f", per-image phase drift up to {config.phase_drift} rad" if config.phase_drift else "")],
    )


def simulate_cohort(out_dir, n_subjects: int, config: SimulationConfig, seed: int = 0, progress: bool = True):
    """Write `n_subjects` subject files and `out_dir/manifest.parquet`; return the manifest path."""
    import pandas as pd
    from tqdm import tqdm

    from refine_more.files.subject import write_subject

    if not (isinstance(n_subjects, (int, np.integer)) and n_subjects >= 1):
        raise ValueError(f"simulate: --subjects must be an integer >= 1, got {n_subjects}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    Z, Y, X = config.matrix
    templates = load_templates(1 if max(Y, X) > 110 else 2)
    rows = []
    for i in tqdm(range(n_subjects), desc="simulate", disable=not progress):
        sid = f"sub-{i + 1:03d}"
        subject = simulate_subject(sid, config, seed=seed * 100_003 + i, templates=templates)
        path = out_dir / f"{sid}.h5"
        write_subject(path, subject)
        rows.append({"subject_id": sid, "path": path.name, "role": "seed" if i == 0 else ""})
    manifest = out_dir / "manifest.parquet"
    tmp = manifest.with_suffix(".parquet.tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    os.replace(tmp, manifest)
    return manifest


def config_from_dict(d: dict) -> SimulationConfig:
    names = {f.name for f in dataclasses.fields(SimulationConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown simulation options: {sorted(unknown)}")
    return SimulationConfig(**d)
