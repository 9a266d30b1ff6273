"""Quality control of one reconstruction, from its acquisition alone (docs/decisions/017).

A cohort runs unattended, and its worst outcome is a wrong map reported ``ok``. So every result is
checked against what its own data say, never against the ``reference/`` members a simulated file
carries (``measure`` sees the ScanPhysics: k-space, mask, coil maps, B1+, protocol, tissue mask):

- the objective: g, loss 3's data term ‖A x − d‖²/‖d‖² with x_t = S_t(Q)·e^{iφ_t}, of the final maps
  against g of the LLR-fit start (the voxel-wise fit of the locally low-rank images, the classical
  baseline) under the same objective (``objective_ratio``), and against g of the LLR images
  themselves, free images without the signal model (``model_excess``: how much worse the signal
  model explains the data than images can); g of those images says how much of the data no
  images explain through this operator (``objective_llr_images``);
- single images: each image's mean squared residual per acquired sample against the median
  image's (``image_residual_ratios``). The noise floor per sample is the same in every image of
  one scan, so a clean fit gives ≈ 1 everywhere; the residual normalised by the image's own
  energy, ‖A x_t − d_t‖²/‖d_t‖² (``image_residuals``, reported), is not: at a converged fit it is
  noise over signal, larger for the dim images (docs/decisions/017);
- the maps: the fraction of tissue voxels at a bound (T1F at its clamp, f at 1, k at an end of its
  band when the band is not a point); f at 0 is reported, not judged (free water has no bound pool).

The images' phase is a nuisance: each set of maps is scored after ``qc.phase_steps`` Gauss–Newton
steps on it (from the refinement's own phase for the final maps, from the LLR images' for the
start). Cost: the LLR images and their fit, a few phase steps and one pass of A per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from refine_more.config.qc import FLAGGED, SCALAR_METRICS, judge  # noqa: F401 (SCALAR_METRICS re-exported)
from refine_more.reconstruction.classical import llr_start


@dataclass
class QualityReport:
    status: str                                   # "ok" | "flagged"
    reasons: list = field(default_factory=list)   # one short line per threshold crossed
    metrics: dict = field(default_factory=dict)   # SCALAR_METRICS, image_residuals, image_residual_ratios

    @property
    def flagged(self) -> bool:
        return self.status == FLAGGED

    def to_dict(self) -> dict:
        return {"status": self.status, "reasons": list(self.reasons), "metrics": dict(self.metrics)}

    def headline(self) -> str:
        """For a figure's title: 'QC ok', or 'QC FLAGGED (the metrics over their thresholds)'."""
        if not self.flagged:
            return f"QC {self.status}"
        return "QC FLAGGED (" + ", ".join(r.split(" ")[0] for r in self.reasons) + ")"


def assess(physics, channels: torch.Tensor, phase, config, llr=None) -> QualityReport:
    """The QC of the maps `channels` (4, Z, Y, X) whose images have the phase `phase` (the
    objective's nuisance variable), against the thresholds ``config.qc``. `llr`: the run's
    ``classical.llr_start`` when it already has it (computed here otherwise)."""
    metrics = measure(physics, channels, phase, config, llr)
    status, reasons = judge(metrics, config.qc)
    return QualityReport(status, reasons, metrics)


@torch.no_grad()
def measure(physics, channels: torch.Tensor, phase, config, llr=None) -> dict:
    """The QC metrics (see the module docstring) of `channels` with the images' phase `phase`."""
    steps, damping = config.qc.phase_steps, config.unroll.gn_damping
    channels = channels.detach()
    final = _squared_residuals(physics, _model_images(physics, channels, phase, steps, damping))
    images, start_channels = llr if llr is not None else llr_start(physics, config)
    start_phase = physics.background_phase(images)
    start = _squared_residuals(physics, _model_images(physics, start_channels, start_phase, steps, damping))
    free = _squared_residuals(physics, images)
    energy = physics.kspace_energy
    g_final, g_start, g_images = final.sum() / energy, start.sum() / energy, free.sum() / energy
    samples = physics.A.mask.reshape(physics.A.n_images, -1).sum(1).cpu().numpy().astype(np.float64)
    per_sample = final / np.maximum(samples, 1.0)
    ratios = per_sample / max(float(np.median(per_sample)), 1e-300)
    image_energy = np.array([float(physics.kspace[t].abs().pow(2).sum()) for t in range(physics.A.n_images)])
    maps = physics.scaling.to_physical(channels)
    return {
        "objective_final": float(g_final), "objective_llr_start": float(g_start),
        "objective_ratio": float(g_final / max(g_start, 1e-300)), "objective_llr_images": float(g_images),
        "model_excess": float(g_final / max(g_images, 1e-300)),
        "image_residual_ratio": float(ratios.max()), "worst_image": int(ratios.argmax()),
        **fraction_at_bounds(maps, physics.tissue, physics.scaling, config.qc),
        "image_residuals": [float(v) for v in final / np.maximum(image_energy, 1e-300)],
        "image_residual_ratios": [float(v) for v in ratios],
    }


def _model_images(physics, channels, phase, steps: int, damping: float) -> torch.Tensor:
    """x_t = S_t(Q)·e^{iφ_t} after `steps` Gauss–Newton steps on the phase at fixed maps."""
    phase = physics.phase_steps(channels, phase, steps, damping)
    return torch.polar(physics.signal(channels), physics.image_phase(phase))


def _squared_residuals(physics, images: torch.Tensor) -> np.ndarray:
    """‖A_t x_t − d_t‖² per image, one image at a time (its coil k-space alone in memory)."""
    out = []
    for t in range(images.shape[0]):
        r = physics.A.images_subset(t, t + 1)(images[t:t + 1]) - physics.kspace[t:t + 1]
        out.append(float(r.abs().pow(2).sum()))
    return np.array(out, dtype=np.float64)


def fraction_at_bounds(maps: dict, tissue: torch.Tensor, scaling, qc) -> dict:
    """Fractions of the tissue voxels at a bound: T1F at its clamp, f within `qc.f_edge` of 1, k within
    `qc.k_edge` of the band's width of an end (None when the band is a point). f near 0 is reported
    apart (`fraction_f_at_zero`), not judged: free water (a phantom's bath, CSF) has no bound pool."""
    def share(at_bound) -> float:
        inside = at_bound[tissue]
        return float(inside.float().mean()) if inside.numel() else 0.0

    lo, hi = scaling.T1_bounds
    T1F, f, k = maps["T1F"], maps["f"], maps["k"]
    out = {"fraction_T1F_at_bounds": share((T1F <= lo * (1 + 1e-4)) | (T1F >= hi * (1 - 1e-4))),
           "fraction_f_at_one": share(f > 1 - qc.f_edge), "fraction_f_at_zero": share(f < qc.f_edge),
           "fraction_f_unphysical": share(f > qc.f_max),
           "fraction_k_at_band_edges": None}
    k_lo, k_hi = scaling.k_band
    if k_hi > k_lo:
        edge = qc.k_edge * (k_hi - k_lo)
        out["fraction_k_at_band_edges"] = share((k < k_lo + edge) | (k > k_hi - edge))
    return out
