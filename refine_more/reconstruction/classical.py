"""The classical solver of the refinement's objective: the warm start of the learned iterations
(docs/decisions/003, 005) and the `classical-*` rows of benchmarks/refinement.py. It starts from the
stage-1 INR, from the voxel-wise fit of the locally low-rank images, or from both, keeping the
lower objective on the acquired k-space (`unroll.start`, docs/decisions/020)."""
from __future__ import annotations

import math

import torch

from refine_more.baselines.fitting import fit_images
from refine_more.baselines.llr import llr_reconstruct


def llr_start(physics, config) -> tuple:
    """(LLR images (T, Z, Y, X) of the normalised data, their voxel-wise fit as map channels):
    the classical baseline, with the same (virtual) coils as the run."""
    images, _ = llr_reconstruct(physics.kspace, physics.A.coil_sens, physics.subject.mask,
                                device=physics.kspace.device)
    fit = fit_images(images, physics.subject.protocol, b1=physics.b1, tissue_mask=physics.tissue,
                     k_band=config.k_band)
    maps = {k: torch.from_numpy(fit[k]).to(physics.kspace.device) for k in ("I0", "T1F", "f", "k")}
    return images, physics.scaling.to_channels(maps)


def noise_level(physics, llr_images: torch.Tensor) -> float:
    """ν/s: the share ν of the acquired k-space energy that the LLR images leave unexplained (free images,
    so ≈ the noise's share), over the acquired samples per voxel s (images × coils × sampled fraction).
    Proportional to σ² over the signal energy per voxel, the weight a smoothness prior should have; the
    same for AF 4 and 5, 1-D or 2-D masks and phase drift (1.2–1.4e-5 at SNR 200), 4.9e-5 at SNR 100,
    1.8e-4 at SNR 50 (6×32×32, 4 coils; docs/decisions/022)."""
    A = physics.A
    nu = float(physics.data_consistency(llr_images))
    lines = float(A.mask.reshape(A.n_images, -1).sum())   # acquired (z, y) lines of every image
    per_voxel = lines * A.coil_sens.shape[0] / (physics.tissue.shape[0] * physics.tissue.shape[1])
    return nu / max(per_voxel, 1e-12)


def prior_scale(run) -> tuple:
    """(weight factor, edge factor) of the prior for this scan's noise r = (ν/s) / `unroll.prior_noise_reference`:
    the weights × max(1, r) (set at SNR 200; at lower SNR the same weights let the solve fit noise,
    decision 022) and the pseudo-Huber δ × √r (δ ∝ the maps' noise SD, which separates noise from edges;
    decision 023). (1, 1) without a reference or a prior."""
    reference = run.config.unroll.prior_noise_reference
    if not reference or run.objective.prior is None:
        return 1.0, 1.0
    ratio = noise_level(run.physics, run.llr()[0]) / reference
    if not math.isfinite(ratio):      # the LLR images' residual is not a number: QC flags it; keep the tuned prior
        return 1.0, 1.0
    return max(1.0, ratio), math.sqrt(max(ratio, 1e-6))


def classical_minimum(run, objective=None, inr_state=None):
    """(q, z): the classical solver's minimum of `objective` (the run's by default), detached: no
    gradient reaches the INR through it. Starts as `run.config.unroll.start` says; with 'best' it
    solves from the INR and from the LLR fit and keeps the lower objective (ties: the INR), and
    records both values in ``run.start_choice``.
    `inr_state`: the (W, Q⁽⁰⁾) of ``run.inr_state`` when the caller has it (saves an INR forward)."""
    objective = objective or run.objective
    which = run.config.unroll.start
    if "prior_scale" not in run.start_choice:   # once per run, the same for every objective it solves
        run.start_choice["prior_scale"], edge = prior_scale(run)
        if any(float(d) > 0 for d in run.config.unroll.map_edge_scale):
            run.start_choice["edge_scale_factor"] = edge
    scales = run.start_choice["prior_scale"], run.start_choice.get("edge_scale_factor", 1.0)
    objective.set_prior_scale(*scales)
    run.objective.set_prior_scale(*scales)   # the learned iterations' objective
    starts = {}
    if which in ("inr", "best"):
        W, c0 = inr_state if inr_state is not None else run.inr_state(backward=False)[:2]
        starts["inr"] = (c0.detach(), run.physics.background_phase(W))
    if which in ("llr", "best"):
        images, channels = run.llr()
        starts["llr"] = (channels, run.physics.background_phase(images))
    solved, values = {}, {}
    with torch.no_grad():
        for name, (c, z) in starts.items():
            run.progress(f"classical solve from the {name.upper()} start")
            q, zz = run.unrolled.warm_start(objective.start(c), objective, z, run.physics.tissue)
            solved[name], values[name] = (q, zz), float(objective.value(q, zz))
    finite = {k: v for k, v in values.items() if math.isfinite(v)}
    chosen = min(finite, key=lambda k: (finite[k], k != "inr")) if finite else next(iter(solved))
    run.start_choice.update({"start": chosen, **{f"objective_{k}": v for k, v in values.items()}})
    if "llr" in starts and run.reference:   # the LLR fit is the classical baseline: its score, for the record only
        run.start_choice["llr_nrmse"] = run._score(starts["llr"][0], "")
    return solved[chosen]
