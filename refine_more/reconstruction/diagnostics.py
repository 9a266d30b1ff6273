"""What a report shows beside the maps, computed at the end of a reconstruction while the scan's
physics is at hand, so that no report has to read the k-space again. Cheap: one pass of A and Aᴴ
per image and a voxel-wise fit of one slice.

- the data residual per image: ‖A x_t − d_t‖ / ‖d_t‖ for the model images of the final maps,
  x_t = S_t(Q)·e^{iφ_t} with the refinement's final phase (loss 3 image by image; without a
  refinement, the phase estimated from the INR's images), and for the INR's images W⁽⁰⁾
  themselves (loss 1); and the
  coil-combined residual |Aᴴ(A x_t − d_t)| of the central slice, relative to the 99th percentile
  of the zero-filled image |Aᴴ d| in tissue there;
- the zero-filled fit of the central slice (refine_more/baselines/fitting.py), a sanity anchor;
- the reference's central slice, and ROI means (WM, GM of ``reference/labels``; the quadrant ROIs
  of the Bland–Altman plots) when the subject file has a reference;
- the protocol, the sampled fraction per image and where B1+ came from.

:func:`compute` returns ``{"json": {...}, "arrays": {name: ndarray}}``; the writers put them beside
the maps (refine_more/evaluation/report/data.py).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from refine_more.files.names import MAP_NAMES, SCORED_MAPS


def _norm(x: torch.Tensor) -> float:
    return float(x.abs().pow(2).sum().sqrt())


@torch.no_grad()
def _residuals(prob, final: torch.Tensor, W: torch.Tensor, z: int, phase=None) -> tuple:
    """Per image: relative residual of the maps' model images (``phase``: the refinement's final
    nuisance; None: estimated from W) and of the INR's images, the coil-combined residual (central
    slice) and the zero-filled image (central slice, complex)."""
    x = torch.polar(prob.signal(final), prob.image_phase(prob.background_phase(W) if phase is None else phase))
    A, d = prob.A, prob.kspace
    coil_energy = (A.coil_sens.abs() ** 2).sum(0)[z]
    rel_maps, rel_inr, res, zf = [], [], [], []
    for t in range(A.n_images):
        At, dt = A.images_subset(t, t + 1), d[t:t + 1]
        dn = _norm(dt) or 1.0
        r = At(x[t:t + 1]) - dt
        rel_maps.append(_norm(r) / dn)
        rel_inr.append(_norm(At(W[t:t + 1]) - dt) / dn)
        res.append(At.adjoint(r)[0, z].abs())
        back = At.adjoint(dt)[0, z]         # Σ_c S̄_c Fᴴ d_c: the zero-filled image before Σ|S|²
        zf.append(torch.where(coil_energy > 0, back / coil_energy.clamp_min(1e-12), torch.zeros_like(back)))
    tissue = prob.tissue[z]
    zf = torch.stack(zf)
    scale = float(torch.quantile(zf.abs().amax(0)[tissue].float(), 0.99)) if bool(tissue.any()) else 0.0
    res = torch.stack(res) / (coil_energy.clamp_min(1e-12) * (scale or 1.0))
    return rel_maps, rel_inr, res.float().cpu().numpy(), zf


def _zero_filled_fit(prob, zf_slice: torch.Tensor, z: int, k_band) -> dict:
    from refine_more.baselines.fitting import fit_images

    tissue = prob.tissue_np[z:z + 1]
    images = (zf_slice * prob.data_scale)[:, None].cpu().numpy()
    b1 = prob.b1.cpu().numpy()[z:z + 1]
    fit = fit_images(images, prob.subject.protocol, b1, tissue, k_band=tuple(k_band))
    return {name: fit[name][0].astype(np.float32) for name in MAP_NAMES}


def _roi_means(maps: dict, labels: np.ndarray) -> dict:
    from refine_more.evaluation.cohort_tables import TISSUES
    out = {}
    for tissue, value in TISSUES.items():
        m = labels == value
        if m.any():
            out[tissue] = {p: float(np.asarray(maps[p], np.float64)[m].mean()) for p in MAP_NAMES if p in maps}
    return out


def _reference_parts(subject, maps: dict, zf_fit: dict, tissue_slice: np.ndarray, z: int) -> tuple:
    """Reference slices, ROI means and pairs, and slice nRMSE of the maps and of the zero-filled fit."""
    from refine_more.evaluation.cohort_tables import roi_pairs
    from refine_more.evaluation.metrics import nrmse

    ref = {k: np.asarray(v) for k, v in (subject.reference or {}).items() if k in MAP_NAMES}
    labels = (subject.reference or {}).get("labels")
    info, arrays = {}, {f"ref_{k}": v[z].astype(np.float32) for k, v in ref.items()}
    if labels is not None:
        labels = np.asarray(labels)
        arrays["labels"] = labels[z].astype(np.int16)
        info["roi_means"] = _roi_means(maps, labels)
        if ref:
            info["roi_means_reference"] = _roi_means(ref, labels)
            scored = [p for p in SCORED_MAPS if p in ref]
            info["roi_pairs"] = {p: [e.tolist(), r.tolist()] for p, (e, r) in
                                 roi_pairs(maps, ref, labels, scored).items()}
    if ref and tissue_slice.any():
        info["nrmse_slice"] = {"refine-more": {k: nrmse(maps[k][z], ref[k][z], tissue_slice) for k in ref},
                               "zero-filled fit": {k: nrmse(zf_fit[k], ref[k][z], tissue_slice)
                                                   for k in ref if k in zf_fit}}
    return info, arrays


def compute(run, final: torch.Tensor, W: torch.Tensor, maps: dict) -> dict:
    """The report's diagnostics of a finished reconstruction (see the module docstring); ``run``: a
    ``recon.ReconRun``, ``final``: the final map channels, ``W``: the INR's images (normalised),
    ``maps``: the physical maps of ``final``."""
    t0 = time.perf_counter()
    prob, subject = run.physics, run.subject
    z = int(prob.tissue.shape[0] // 2)
    phase = run.final_phase
    rel_maps, rel_inr, res, zf = _residuals(prob, final, W, z, phase)
    t1 = time.perf_counter()
    zf_fit = _zero_filled_fit(prob, zf, z, run.config.k_band)
    t2 = time.perf_counter()
    tissue_slice = prob.tissue_np[z]
    info = {
        "slice_index": z, "shape": list(prob.tissue_np.shape), "n_images": int(prob.A.n_images),
        "n_coils": int(prob.A.coil_sens.shape[0]), "voxel_size_mm": [float(v) for v in subject.voxel_size_mm],
        "sampled_fraction": [float(v) for v in np.asarray(subject.mask, bool).mean(axis=(1, 2))],
        "b1_source": prob.b1_source, "coil_maps": "file" if subject.coil_sens is not None else "ESPIRiT",
        "protocol": _protocol(subject.protocol),
        "residual": {"maps": rel_maps, "inr": rel_inr,
                     "phase": "the refinement's final phase" if phase is not None
                     else "estimated from the INR images (no refinement ran)"},
    }
    arrays = {"residual": res, "tissue": tissue_slice.astype(np.uint8),
              **{f"zf_{k}": v for k, v in zf_fit.items()}}
    ref_info, ref_arrays = _reference_parts(subject, maps, zf_fit, tissue_slice, z)
    info.update(ref_info)
    arrays.update(ref_arrays)
    info["seconds"] = {"residual": t1 - t0, "zero_filled_fit": t2 - t1, "total": time.perf_counter() - t0}
    return {"json": info, "arrays": arrays}


def _protocol(protocol) -> dict:
    """The protocol's fields as JSON values (lists for per-image ones)."""
    out = {}
    for k, v in protocol.to_attrs().items():
        v = np.asarray(v)
        out[k] = v.tolist() if v.ndim else v.item()
    return out
