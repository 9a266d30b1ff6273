"""`reconstruct(subject, config)`: REFINE-MORE for one subject (from scratch or adapted), paper Fig. 1:

    setup (physics.ScanPhysics, objective.RefinementObjective, the INR and the unrolled refinement)
    → stage 1: train the INR (loss 1 + loss 2, losses.py)
    → stage 2: train the refinement (loss 3), on all acquired k-space or self-supervised (ssdu.py)
    → the final maps.

With a `SeedState`, hash 1, MLP1 and MLP2 come from the seed and stay frozen, the spatial hashes
are trained for this subject and the U-Net is adapted through LoRA (adaptation.py).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from refine_more.reconstruction.classical import classical_minimum, llr_start
from refine_more.config import ReconConfig
from refine_more.config.checks import check_subject
from refine_more.networks.inr import INR
from refine_more.reconstruction.losses import inr_losses, inr_losses_chunked, inr_losses_sampled
from refine_more.evaluation.metrics import score_maps
from refine_more.files.names import SCORED_MAPS
from refine_more.reconstruction.objective import RefinementObjective
from refine_more.reconstruction.joint_training import HeldOutStop, train_jointly
from refine_more.reconstruction.optimizer import adam, plateaued
from refine_more.reconstruction.qc import assess
from refine_more.physics.scan import ScanPhysics, resolve_device
from refine_more.reconstruction.ssdu import train_self_supervised
from refine_more.reconstruction.unrolled import UnrolledPGD


UNET_SLICE_CHUNK = 8   # slices per checkpointed U-Net chunk with `image_chunk` (unrolled.UnrolledPGD.prox)


@dataclass
class Result:
    subject_id: str
    method: str                      # "refine-more" | "refine-more-adapted"
    maps: dict                       # name → (Z, Y, X) float32, 0 outside the tissue mask (incl. "k")
    maps_init: dict                  # the INR's initial maps Q⁽⁰⁾ of the final model (the "INR-only" ablation)
    images: np.ndarray               # W⁽⁰⁾ complex64 (T, Z, Y, X), in the units of the k-space
    tissue_mask: np.ndarray
    history: list                    # one dict per logged iteration: stage, iteration, seconds, losses, nRMSE
    timings: dict                    # seconds: setup, stage1, stage2 (of it: warm_start), total
    iterations: dict                 # stage1, stage2 actually run
    config_hash: str
    device: str
    trainable_parameters: dict = field(default_factory=dict)
    b1_source: str = "file"          # "file" | "bloch-siegert" (estimated from the data) | "unity"
    state: object = None             # the models, for building a SeedState (not serialised)
    diagnostics: dict = field(default_factory=dict)   # what a report shows beside the maps (diagnostics.py)
    qc: object = None                # qc.QualityReport: the final maps checked against the data alone
    start: dict = field(default_factory=dict)   # where the warm start started ('inr' | 'llr') and its objectives

    def final_losses(self) -> dict:
        return {k: v for k, v in self.history[-1].items() if k.startswith("loss")} if self.history else {}


@dataclass
class ReconRun:
    """One reconstruction's state between its steps (`reconstruct`)."""
    subject: object
    config: ReconConfig
    physics: ScanPhysics
    objective: RefinementObjective
    inr: INR
    unrolled: UnrolledPGD
    method: str
    schedule: dict                   # n1, n2, patience, lr1, lr2
    params: dict                     # stage1, stage2: trainable parameters
    reference: dict
    t_start: float
    history: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    done: dict = field(default_factory=dict)
    bar: object = None
    final_phase: object = None       # the refinement's last nuisance (φ₀, δ_t): the report's residual
    start_choice: dict = field(default_factory=dict)   # the warm start's start and objectives (classical.py)
    _llr: object = None              # (LLR images, their fit's channels), computed once (classical.llr_start)
    inr_outputs: object = None       # (W, Q⁽⁰⁾) of an INR that stage 2 leaves as it is (the warm-start path)
    on_progress: object = None       # callable(phase, done, total): where the run is (a cohort's progress file)
    stage1_optimizer: object = None  # stage 1's Adam, for a stage 2 that goes on with it (`unroll.freeze_map_hash`)
    held_out: object = None          # joint_training.HeldOutStop: Γ out of every training loss (`held-out-stop`)

    @property
    def training_physics(self):
        """What the INR's losses see: all acquired samples, or Ω\\Γ with a held-out stop."""
        return self.held_out.physics if self.held_out is not None else self.physics

    def progress(self, phase: str, done: int = 0, total: int = 0) -> None:
        """Tell `on_progress` where the run is. A failed report is a warning: it never costs the run."""
        if self.on_progress is None:
            return
        try:
            self.on_progress(phase, done, total)
        except Exception as exc:
            warnings.warn(f"{self.subject.subject_id}: progress not reported: {type(exc).__name__}: {exc}")
            self.on_progress = None

    def llr(self) -> tuple:
        """The LLR images and their voxel-wise fit, computed once: the warm start's 'llr' start and
        QC's reference point share them (timed as ``timings['llr']``)."""
        if self._llr is None:
            self.progress("LLR images")
            t = time.perf_counter()
            with torch.no_grad():
                self._llr = llr_start(self.physics, self.config)
            self.timings["llr"] = time.perf_counter() - t
        return self._llr

    @property
    def chunk(self) -> int:
        T = self.subject.n_images
        return self.config.image_chunk if 0 < self.config.image_chunk < T else 0

    def log(self, stage, it, n, losses, channels, init_channels=None, force=False):
        if it % self.config.log_every and it != n - 1 and not force:
            return
        entry = {"stage": stage, "iteration": it, "seconds": time.perf_counter() - self.t_start,
                 **{k: float(v.detach()) for k, v in losses.items()}}
        if not all(np.isfinite(v) for k, v in entry.items() if k.startswith("loss")):
            raise FloatingPointError(f"{self.subject.subject_id}: non-finite loss at stage {stage} iteration {it}: {entry}")
        if self.reference:
            entry.update(self._score(channels, "nrmse_"))
            if init_channels is not None:  # the INR's own maps Q⁽⁰⁾ as stage 2 trains them
                entry.update(self._score(init_channels, "nrmse_init_"))
        self.history.append(entry)

    def _score(self, channels, prefix) -> dict:
        scores = score_maps(self.physics.physical_maps(channels), self.reference, self.physics.tissue_np,
                            params=SCORED_MAPS, with_ssim=False)
        return {prefix + p: s["nrmse"] for p, s in scores.items()}

    def stage1_losses(self, generator: torch.Generator):
        """One stage-1 iteration's (Q⁽⁰⁾ channels, loss 1, loss 2), gradients accumulated: on all
        images, or on `stage1_images` of them drawn at random (`losses.inr_losses_sampled`)."""
        k = self.config.stage1_images
        if not 0 < k < self.subject.n_images:
            return self.inr_state(backward=True)[1:]
        index = torch.randperm(self.subject.n_images, generator=generator)[:k].sort().values
        _, c0, loss1, loss2 = inr_losses_sampled(self.inr, self.training_physics, self.config.tv_weight,
                                                 index.to(self.physics.tissue.device))
        (loss1 + loss2).backward()
        return c0.detach(), loss1.detach(), loss2.detach()

    def inr_state(self, backward: bool):
        """(W, Q⁽⁰⁾ channels, loss 1, loss 2) of the INR, gradients accumulated with `backward`."""
        prob, tv = self.training_physics, self.config.tv_weight
        if self.chunk:
            return inr_losses_chunked(self.inr, prob, tv, self.chunk, backward=backward)
        if not backward:
            with torch.no_grad():
                return inr_losses(self.inr, prob, tv)
        W, c0, loss1, loss2 = inr_losses(self.inr, prob, tv)
        (loss1 + loss2).backward()
        return W, c0, loss1, loss2


def setup(subject, config: ReconConfig, seed_state=None, *, track_reference=True, progress_desc=None,
          release_kspace=False, on_progress=None) -> ReconRun:
    """The physics, the objective and the models of one reconstruction, scratch or adapted.
    ``release_kspace``: the caller owns `subject` and drops its acquired k-space once the physics has
    its own copy (`Subject.release_kspace`; memory at real size)."""
    from refine_more.reconstruction.adaptation import prepare_adapted_models

    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    t_start = time.perf_counter()
    check_subject(subject, config)     # one line naming the file, not a ZeroDivisionError deep inside
    prob = ScanPhysics(subject, config, device)
    if release_kspace:
        subject.release_kspace()
    inr = INR(subject.n_images, subject.shape, config.inr, seed=config.seed).to(device)
    unrolled = UnrolledPGD(config.unroll).to(device)
    if seed_state is None:
        inr.set_map_bias(prob.scaling.initial_raw().to(device))
        method = "refine-more"
        schedule = dict(n1=config.iters_stage1, n2=config.iters_stage2, patience=0, lr1=config.lr, lr2=config.lr)
        stage1 = list(inr.parameters())
        stage2 = list(inr.parameters()) + list(unrolled.parameters())
    else:
        method = "refine-more-adapted"
        stage1, stage2 = prepare_adapted_models(seed_state, config, inr, unrolled)
        a = config.adapt
        schedule = dict(n1=a.iters_stage1, n2=a.iters_stage2, patience=a.plateau_patience, lr1=a.lr, lr2=a.lr_stage2)
    reference = subject.reference if (track_reference and subject.reference) else {}
    chunk = config.image_chunk if 0 < config.image_chunk < subject.n_images else 0
    unrolled.slice_chunk = UNET_SLICE_CHUNK if chunk else 0      # memory: the same result
    objective = RefinementObjective(prob, config.unroll, image_chunk=chunk)
    run = ReconRun(subject=subject, config=config, physics=prob, objective=objective,
                   inr=inr, unrolled=unrolled, method=method, schedule=schedule,
                   params={"stage1": stage1, "stage2": stage2}, reference=reference, t_start=t_start,
                   on_progress=on_progress)
    if config.unroll.training == "held-out-stop":     # Γ out of stage 1 too: an unbiased first score
        run.held_out = HeldOutStop(run)
    run.timings["setup"] = time.perf_counter() - t_start
    run.bar = tqdm(total=schedule["n1"] + schedule["n2"], desc=progress_desc or subject.subject_id,
                   disable=not config.progress, leave=False)
    return run


def train_inr(run: ReconRun) -> None:
    """Stage 1: the INR alone, loss 1 + loss 2 (adapted runs stop on a plateau of that loss)."""
    s = run.schedule
    opt = run.stage1_optimizer = adam(run.params["stage1"], s["lr1"])
    totals, it = [], -1
    images = torch.Generator().manual_seed(run.config.seed)      # the subsets of `stage1_images`
    run.progress("stage 1", 0, s["n1"])
    for it in range(s["n1"]):
        opt.zero_grad(set_to_none=True)
        c0, loss1, loss2 = run.stage1_losses(images)
        total = loss1 + loss2
        opt.step()
        totals.append(total.item())
        run.log(1, it, s["n1"], {"loss1": loss1, "loss2": loss2, "loss": total}, c0)
        run.bar.update(1)
        run.bar.set_postfix(stage=1, l1=f"{loss1.item():.3g}", l2=f"{loss2.item():.3g}")
        run.progress("stage 1", it + 1, s["n1"])
        if plateaued(totals, s["patience"], run.config.adapt.plateau_rel):
            break
    run.done["stage1"] = it + 1
    run.timings["stage1"] = time.perf_counter() - run.t_start - run.timings["setup"]


def train_refinement(run: ReconRun) -> torch.Tensor:
    """Stage 2 (loss 3); returns the final map channels."""
    t2 = time.perf_counter()
    cfg = run.config.unroll
    if cfg.training == "self-supervised" and cfg.warm_start_steps and run.schedule["n2"]:
        final = train_self_supervised(run)
    elif cfg.warm_start_steps:
        final = _train_on_warm_start(run)
    else:
        final = train_jointly(run)
    run.timings["stage2"] = time.perf_counter() - t2
    run.timings.setdefault("warm_start", 0.0)
    return final


def _train_on_warm_start(run: ReconRun) -> torch.Tensor:
    """With a warm start, stage 2 trains the refinement alone on the warm start of the stage-1 INR,
    computed once; the INR stays as stage 1 left it (docs/decisions/003)."""
    s, term, prob = run.schedule, run.objective, run.physics
    ids = {id(p) for p in run.unrolled.parameters()}
    params = [p for p in run.params["stage2"] if id(p) in ids]
    run.params["stage2"] = params
    start = None
    t = time.perf_counter()
    W, c0, loss1, loss2 = run.inr_state(backward=False)
    # the INR stays as it is from here: keep its outputs for `finish` and free its interpolation
    # matrices for the learned iterations (the peak memory at real size)
    run.inr_outputs = (W, c0)
    run.inr.release_points()
    if s["n2"]:
        start = classical_minimum(run, inr_state=(W, c0))
        run.timings["warm_start"] = time.perf_counter() - t
        if not run.unrolled.config.iterations:      # K = 0: the classical minimum is the result
            run.done["stage2"], run.final_phase = 0, start[1]
            return start[0]
    opt = adam(params, s["lr2"])
    totals, it = [], -1
    run.progress("stage 2", 0, s["n2"])
    first = run.unrolled.first_step(start[0], term, start[1]) if start is not None else None
    for it in range(s["n2"]):
        opt.zero_grad(set_to_none=True)
        outs = run.unrolled.learned_iterations(start[0], term, start[1], prob.tissue, first=first)
        loss3 = sum(term.value(c, z) for c, z in outs)
        if loss3.requires_grad:
            loss3.backward()
        opt.step()
        totals.append(loss3.item())
        run.log(2, it, s["n2"], {"loss1": loss1, "loss2": loss2, "loss3": loss3, "loss": loss1 + loss2 + loss3},
                outs[-1][0], c0)
        run.bar.update(1)
        run.bar.set_postfix(stage=2, l3=f"{loss3.item():.4g}")
        run.progress("stage 2", it + 1, s["n2"])
        if plateaued(totals, s["patience"], run.config.adapt.plateau_rel):
            break
    run.done["stage2"] = it + 1
    if start is None:
        return c0
    with torch.no_grad():
        final, run.final_phase = run.unrolled.learned_iterations(start[0], term, start[1], prob.tissue, first=first)[-1]
        return final


def finish(run: ReconRun, final: torch.Tensor, diagnostics: bool = False) -> Result:
    """The Result: physical maps of the final and the INR's channels, images, timings, the final
    maps' quality control (qc.py; its seconds are ``timings["qc"]``, outside ``total``); with
    ``diagnostics``, what a report shows beside the maps (its time in ``timings['diagnostics']``,
    after ``total``; a failure there is a warning, never a failed reconstruction)."""
    run.bar.close()
    prob = run.physics
    if run.inr_outputs is not None:
        W, c0 = run.inr_outputs
    else:
        with torch.no_grad():
            W, c0 = run.inr.images(run.chunk), run.inr.map_channels()
    run.timings["total"] = time.perf_counter() - run.t_start
    maps, maps_init = prob.physical_maps(final), prob.physical_maps(c0)
    for m in (maps, maps_init):
        if not all(np.isfinite(v).all() for v in m.values()):
            raise FloatingPointError(f"{run.subject.subject_id}: non-finite maps")
    trainable = {k: sum(p.numel() for p in v) for k, v in run.params.items()}
    t_qc = time.perf_counter()
    run.progress("quality control")
    phase = run.final_phase if run.final_phase is not None else prob.background_phase(W)
    report = assess(prob, final, phase, run.config, llr=run._llr)
    run.timings["qc"] = time.perf_counter() - t_qc
    diag = _diagnostics(run, final, W, maps) if diagnostics else {}
    return Result(
        subject_id=run.subject.subject_id, method=run.method, maps=maps, maps_init=maps_init,
        images=(W * prob.data_scale).cpu().numpy().astype(np.complex64), tissue_mask=prob.tissue_np,
        history=run.history, timings=run.timings,
        iterations={"stage1": run.done.get("stage1", 0), "stage2": run.done.get("stage2", 0)},
        config_hash=run.config.hash(), device=str(resolve_device(run.config.device)), trainable_parameters=trainable,
        b1_source=prob.b1_source, state={"inr": run.inr, "unrolled": run.unrolled, "config": run.config,
                                         "data_scale": prob.data_scale},
        diagnostics=diag, qc=report, start=dict(run.start_choice),
    )


def _diagnostics(run: ReconRun, final: torch.Tensor, W: torch.Tensor, maps: dict) -> dict:
    from refine_more.reconstruction import diagnostics

    t = time.perf_counter()
    run.progress("report diagnostics")
    try:
        return diagnostics.compute(run, final, W, maps)
    except Exception as exc:      # a report's extras never cost a reconstruction
        warnings.warn(f"{run.subject.subject_id}: report diagnostics not computed: {type(exc).__name__}: {exc}")
        return {}
    finally:
        run.timings["diagnostics"] = time.perf_counter() - t


def reconstruct(subject, config: ReconConfig | None = None, seed_state=None, *, track_reference: bool = True,
                progress_desc: str | None = None, diagnostics: bool = False, release_kspace: bool = False,
                on_progress=None) -> Result:
    """Reconstruct I0, T1F, f, kF for one subject. With `seed_state`, adapt instead (paper §2.4).
    ``diagnostics``: also what a report shows beside the maps (``Result.diagnostics``).
    ``release_kspace``: drop `subject.kspace` once the physics holds its copy (callers that read the file).
    ``on_progress``: called with (phase, done, total) as the run goes (`ReconRun.progress`)."""
    run = setup(subject, config or ReconConfig(), seed_state, track_reference=track_reference,
                progress_desc=progress_desc, release_kspace=release_kspace, on_progress=on_progress)
    train_inr(run)
    final = train_refinement(run)
    return finish(run, final, diagnostics)


def score_result(result: Result, reference: dict) -> dict:
    """nRMSE/SSIM per map of the final and the INR-only maps (needs `reference`)."""
    return {"refine-more": score_maps(result.maps, reference, result.tissue_mask),
            "inr-only": score_maps(result.maps_init, reference, result.tissue_mask)}
