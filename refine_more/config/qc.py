"""The thresholds of the quality control every result gets and the rule that applies them,
:func:`judge` (the metrics are measured by ``refine_more.reconstruction.qc``; docs/decisions/017).

The thresholds live in the config so that every result folder's ``config.json`` says what its QC
status was judged against; they judge a result and do not change it, so they are not part of the
config hash, and :func:`judge` needs only the stored numbers (no torch): a resumed result is
judged again with the current thresholds, in the cohort driver.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

OK, FLAGGED = "ok", "flagged"
#: the metrics that are single numbers (results tables, MLflow); `judge` needs only these
SCALAR_METRICS = ("objective_final", "objective_llr_start", "objective_ratio", "objective_llr_images",
                  "model_excess", "image_residual_ratio", "worst_image", "fraction_T1F_at_bounds",
                  "fraction_f_at_one", "fraction_f_at_zero", "fraction_f_unphysical", "fraction_k_at_band_edges")
#: a metric that may be absent: k has no band edges when its band is a point
OPTIONAL_METRICS = ("fraction_k_at_band_edges",)


@dataclass
class QCConfig:
    max_objective_ratio: float = 1.0
    """Flag when g (loss 3's data term) of the final maps exceeds this multiple of g of the LLR-fit
    start (the voxel-wise fit of the LLR images) under the same objective: the refinement ended worse
    than the classical start it should improve on. 0: off."""
    max_model_excess: float = 4.0
    """Flag when g of the final maps exceeds this multiple of g of the LLR images themselves (free
    images, no signal model): the signal model explains the data far worse than images can (a wrong
    protocol, a corrupt image). 0: off."""
    max_unexplained: float = 0.1
    """Flag when the LLR images leave more than this fraction of the acquired k-space energy
    unexplained: no images explain the data through this operator (coil maps or mask of another
    scan). 0: off."""
    max_image_residual_ratio: float = 2.0
    """Flag when one image's mean squared residual per acquired sample, ‖A x_t − d_t‖²/n_t, exceeds
    this multiple of the median over the images (a corrupt image, drift, a wrong flip angle). 0: off."""
    max_fraction_at_bounds: float = 0.05
    """Flag when more than this fraction of the tissue voxels sits at a bound of one map: T1F at its
    clamp, f within `f_edge` of 1, k within `k_edge` of a band edge (a band that is not a point). f at 0
    is not judged: free water (a phantom's bath, CSF) has no bound pool. 0: off."""
    f_edge: float = 1e-3
    """f within this of 1 counts as at a bound (within this of 0: reported as `fraction_f_at_zero`)."""
    f_max: float = 0.5
    """f above this is unphysical (the macromolecular pool fraction: white matter ≈ 0.1–0.2, agar ≤ 0.15)."""
    max_fraction_f_unphysical: float = 5e-4
    """Flag when more than this fraction of the tissue voxels has f above `f_max`: a few voxels trapped in
    the model's f ≈ 1 branch ruin f's nRMSE (phantom sub-003: 12 voxels, 102 %) at an unchanged objective. 0: off."""
    k_edge: float = 0.01
    """k within this fraction of the band's width of one of its ends counts as at a bound."""
    phase_steps: int = 8
    """Gauss–Newton steps on the images' phase (a nuisance) at fixed maps before g is evaluated, for
    the final maps (from the refinement's own phase) and for the LLR-fit start (from the LLR images')."""


def _number(value, fmt: str = ".3g") -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return str(value)


def _reason_texts(m: dict) -> dict:
    """What each check's reason adds after ``metric value > threshold``."""
    g = lambda key: _number(m.get(key))   # noqa: E731
    return {
        "objective_ratio": f"g of the final maps {g('objective_final')}, of the LLR-fit start {g('objective_llr_start')}",
        "model_excess": f"g of the final maps {g('objective_final')}, of the LLR images {g('objective_llr_images')}",
        "objective_llr_images": "of the acquired k-space energy that the LLR images leave unexplained",
        "image_residual_ratio": f"image {_number(m.get('worst_image'), '.0f')}: residual per sample / the median image's",
    }


#: (metric, threshold field of QCConfig); a threshold of 0 turns its check off
CHECKS = (("objective_ratio", "max_objective_ratio"), ("model_excess", "max_model_excess"),
          ("objective_llr_images", "max_unexplained"), ("image_residual_ratio", "max_image_residual_ratio"),
          ("fraction_T1F_at_bounds", "max_fraction_at_bounds"), ("fraction_f_at_one", "max_fraction_at_bounds"), ("fraction_f_unphysical", "max_fraction_f_unphysical"),
          ("fraction_k_at_band_edges", "max_fraction_at_bounds"))


def judge(metrics: dict, thresholds) -> tuple:
    """(status, reasons) of `metrics` against `thresholds` (a QCConfig). A metric that could not be
    measured (missing or not finite) flags the result too, except an optional one."""
    texts, reasons = _reason_texts(metrics), []
    for name, limit_name in CHECKS:
        limit, value = float(getattr(thresholds, limit_name)), metrics.get(name)
        if not limit:
            continue
        if value is None or not math.isfinite(float(value)):
            if name not in OPTIONAL_METRICS:
                reasons.append(f"{name} could not be measured ({value})")
        elif float(value) > limit:
            extra = texts.get(name)
            reasons.append(f"{name} {float(value):.3g} > {limit:.3g}" + (f" ({extra})" if extra else ""))
    return (FLAGGED if reasons else OK), reasons
