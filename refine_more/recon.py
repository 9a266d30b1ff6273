"""`reconstruct(subject, config)`: REFINE-MORE for one subject (from scratch or adapted).

Stage 1 optimises loss 1 + loss 2 (INR only); stage 2 optimises loss 1 + 2 + 3 jointly (INR and
unrolled refinement). With a `SeedState`, hash 1, MLP1 and MLP2 come from the seed and stay
frozen, the spatial hashes are trained for this subject and the U-Net is adapted through LoRA.

Image phase: the signal model gives magnitudes (plus a Bloch–Siegert phase), but the measured
images also carry a free background phase. Loss 2 therefore compares |W⁽⁰⁾| with S(Q), and the
refinement's data consistency (loss 3, and the gradient steps) models the images as
S(Q)·exp(i∠W⁽⁰⁾) with the phase of the INR's current weighted images, held constant within an
iteration. This uses the INR's de-aliased, TV-regularised phase rather than a separately
estimated one, and the phase keeps improving as stage 2 trains the INR jointly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .config import ReconConfig
from .inr import INR, MapScaling
from .operators import MultiCoilCartesian, zero_filled_images
from .signal_model import BTSModel
from .unrolled import UnrolledPGD

SCORED = ("T1F", "f", "kF")


@dataclass
class Result:
    subject_id: str
    method: str                      # "refine-more" | "refine-more-adapted"
    maps: dict                       # name → (Z, Y, X) float32, 0 outside the tissue mask (incl. "k")
    maps_init: dict                  # the INR's initial maps Q⁽⁰⁾ of the final model (the "INR-only" ablation)
    images: np.ndarray               # W⁽⁰⁾ complex64 (T, Z, Y, X), in the units of the k-space
    tissue_mask: np.ndarray
    history: list                    # one dict per logged iteration: stage, iteration, seconds, losses, nRMSE
    timings: dict                    # seconds: setup, stage1, stage2, total
    iterations: dict                 # stage1, stage2 actually run
    config_hash: str
    device: str
    trainable_parameters: dict = field(default_factory=dict)
    b1_source: str = "file"          # "file" | "bloch-siegert" (estimated from the data) | "unity"
    state: object = None             # the models, for building a SeedState (not serialised)

    def final_losses(self) -> dict:
        return {k: v for k, v in self.history[-1].items() if k.startswith("loss")} if self.history else {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of complex images (T, Z, Y, X): mean |finite difference| over the 3 spatial axes."""
    tv = 0.0
    for dim in (1, 2, 3):
        if x.shape[dim] > 1:
            tv = tv + torch.diff(x, dim=dim).abs().mean()
    return tv


class Problem:
    """Everything about one subject the losses need, on one device, data normalised to O(1)."""

    def __init__(self, subject, config: ReconConfig, device):
        from .b1 import b1_for
        from .coils import coil_maps_for
        from .subject import derive_tissue_mask

        self.subject = subject
        coils_np = np.ascontiguousarray(coil_maps_for(subject))
        coils = torch.from_numpy(coils_np).to(device)
        mask = torch.from_numpy(np.asarray(subject.mask, dtype=bool)).to(device)
        self.A = MultiCoilCartesian(coils, mask)
        tissue = subject.tissue_mask if subject.tissue_mask is not None else derive_tissue_mask(subject)
        self.tissue_np = np.asarray(tissue, dtype=bool)
        self.tissue = torch.from_numpy(self.tissue_np).to(device)
        b1, self.b1_source = b1_for(subject, coils_np, self.tissue_np)
        self.b1 = torch.from_numpy(b1).to(device)
        kspace = torch.from_numpy(np.ascontiguousarray(subject.kspace)).to(device)
        zf = zero_filled_images(kspace, coils)
        # one number makes the data O(1): the 99th percentile of the zero-filled magnitude in tissue
        self.data_scale = float(torch.quantile(zf.abs().amax(0)[self.tissue].float(), 0.99)) or 1.0
        self.kspace = kspace / self.data_scale
        self.kspace_energy = float((self.kspace.abs() ** 2).sum())
        self.model = BTSModel(subject.protocol)
        # I0 scale: what makes a typical tissue's brightest image ≈ 1 in these units
        typical = self.model.magnitude_k(*(torch.tensor([v]) for v in (1.0, 1.0, 0.1, 23.0)))
        self.scaling = MapScaling(I0_scale=float(1.0 / typical.max()), k_band=tuple(config.k_band))
        self.n_tissue = int(self.tissue.sum())

    def data_consistency(self, images: torch.Tensor) -> torch.Tensor:
        """||A x − d||² / ||d||²."""
        return (self.A(images) - self.kspace).abs().pow(2).sum() / self.kspace_energy

    def signal(self, channels: torch.Tensor) -> torch.Tensor:
        """S(Q): magnitudes (T, Z, Y, X) of the maps in normalised channels (4, Z, Y, X)."""
        q = self.scaling.to_physical(channels)
        return self.model.magnitude_k(q["I0"], q["T1F"], q["f"], q["k"], self.b1) * self.tissue

    def physics_consistency(self, channels: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """g(Q) = ||A(S(Q)·e^{iφ}) − d||² / ||d||² (loss 3 for one phase)."""
        return self.data_consistency(torch.polar(self.signal(channels), phase))

    def physical_maps(self, channels: torch.Tensor) -> dict:
        """Maps in the file's units: I0 back in the units of the k-space (undo `data_scale`)."""
        q = self.scaling.to_physical(channels.detach())
        q["I0"] = q["I0"] * self.data_scale
        return {k: (v * self.tissue).float().cpu().numpy() for k, v in q.items()}


def _score(maps: dict, reference: dict, tissue: np.ndarray) -> dict:
    from .metrics import nrmse
    return {f"nrmse_{p}": nrmse(maps[p], reference[p], tissue) for p in SCORED if p in reference}


def _plateaued(values, patience, rel) -> bool:
    if patience <= 0 or len(values) <= patience:
        return False
    best_before = min(values[:-patience])
    return min(values[-patience:]) > best_before * (1 - rel)


def reconstruct(subject, config: ReconConfig | None = None, seed_state=None, *, track_reference: bool = True,
                progress_desc: str | None = None) -> Result:
    """Reconstruct I0, T1F, f, kF for one subject. With `seed_state`, adapt instead (paper §2.4)."""
    from .adaptation import prepare_adapted_models

    config = config or ReconConfig()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    t_start = time.perf_counter()

    prob = Problem(subject, config, device)
    shape, T = subject.shape, subject.n_images
    inr = INR(T, shape, config.inr, seed=config.seed).to(device)
    unrolled = UnrolledPGD(config.unroll).to(device)
    if seed_state is None:
        inr.set_map_bias(prob.scaling.initial_raw().to(device))
        method = "refine-more"
        n1, n2 = config.iters_stage1, config.iters_stage2
        patience = 0
        params_stage1 = list(inr.parameters())
        params_stage2 = list(inr.parameters()) + list(unrolled.parameters())
    else:
        method = "refine-more-adapted"
        params_stage1, params_stage2 = prepare_adapted_models(seed_state, config, inr, unrolled)
        n1, n2 = config.adapt.iters_stage1, config.adapt.iters_stage2
        patience = config.adapt.plateau_patience
    lr = config.lr if seed_state is None else config.adapt.lr
    lr2 = config.lr if seed_state is None else config.adapt.lr_stage2
    trainable = {"stage1": sum(p.numel() for p in params_stage1), "stage2": sum(p.numel() for p in params_stage2)}

    reference = subject.reference if (track_reference and subject.reference) else {}
    history: list = []
    timings = {"setup": time.perf_counter() - t_start}
    totals: list = []

    def log(stage, it, n, losses, channels):
        if it % config.log_every and it != n - 1:
            return
        entry = {"stage": stage, "iteration": it, "seconds": time.perf_counter() - t_start,
                 **{k: float(v.detach()) for k, v in losses.items()}}
        if not all(np.isfinite(v) for k, v in entry.items() if k.startswith("loss")):
            raise FloatingPointError(f"{subject.subject_id}: non-finite loss at stage {stage} iteration {it}: {entry}")
        if reference:
            entry.update(_score(prob.physical_maps(channels), reference, prob.tissue_np))
        history.append(entry)

    def inr_losses():
        W = inr.images()
        c0 = inr.map_channels()
        loss1 = prob.data_consistency(W) + config.tv_weight * total_variation(W)
        mag = W.abs() * prob.tissue
        loss2 = (mag - prob.signal(c0)).pow(2).sum() / (mag.pow(2).sum().detach() + 1e-12)
        return W, c0, loss1, loss2

    bar = tqdm(total=n1 + n2, desc=progress_desc or subject.subject_id, disable=not config.progress, leave=False)

    # -- stage 1: INR (loss 1 + loss 2) --------------------------------------------------------
    opt = torch.optim.Adam(params_stage1, lr=lr)
    it1 = 0
    for it1 in range(n1):
        opt.zero_grad(set_to_none=True)
        W, c0, loss1, loss2 = inr_losses()
        total = loss1 + loss2
        total.backward()
        opt.step()
        totals.append(total.item())
        log(1, it1, n1, {"loss1": loss1, "loss2": loss2, "loss": total}, c0)
        bar.update(1)
        bar.set_postfix(stage=1, l1=f"{loss1.item():.3g}", l2=f"{loss2.item():.3g}")
        if _plateaued(totals, patience, config.adapt.plateau_rel):
            break
    n1_done = it1 + 1 if n1 else 0
    timings["stage1"] = time.perf_counter() - t_start - timings["setup"]

    # -- stage 2: INR + unrolled refinement (loss 1 + 2 + 3) -----------------------------------
    t2 = time.perf_counter()
    opt = torch.optim.Adam(params_stage2, lr=lr2)
    totals = []
    it2 = 0
    for it2 in range(n2):
        opt.zero_grad(set_to_none=True)
        W, c0, loss1, loss2 = inr_losses()
        phase = W.detach().angle()
        outs = unrolled(c0, lambda c: prob.physics_consistency(c, phase), prob.tissue)
        loss3 = sum(prob.physics_consistency(c, phase) for c in outs)
        total = loss1 + loss2 + loss3
        total.backward()
        opt.step()
        totals.append(total.item())
        log(2, it2, n2, {"loss1": loss1, "loss2": loss2, "loss3": loss3, "loss": total}, outs[-1])
        bar.update(1)
        bar.set_postfix(stage=2, l1=f"{loss1.item():.3g}", l3=f"{loss3.item():.3g}")
        if _plateaued(totals, patience, config.adapt.plateau_rel):
            break
    n2_done = it2 + 1 if n2 else 0
    timings["stage2"] = time.perf_counter() - t2
    bar.close()

    # -- final maps ------------------------------------------------------------------------------
    with torch.no_grad():
        W = inr.images()
        c0 = inr.map_channels()
        phase = W.angle()
        final = unrolled(c0, lambda c: prob.physics_consistency(c, phase), prob.tissue)[-1] if n2_done else c0
    timings["total"] = time.perf_counter() - t_start
    maps = prob.physical_maps(final)
    maps_init = prob.physical_maps(c0)
    for m in (maps, maps_init):
        if not all(np.isfinite(v).all() for v in m.values()):
            raise FloatingPointError(f"{subject.subject_id}: non-finite maps")
    return Result(
        subject_id=subject.subject_id, method=method, maps=maps, maps_init=maps_init,
        images=(W * prob.data_scale).cpu().numpy().astype(np.complex64), tissue_mask=prob.tissue_np,
        history=history, timings=timings, iterations={"stage1": n1_done, "stage2": n2_done},
        config_hash=config.hash(), device=str(device), trainable_parameters=trainable, b1_source=prob.b1_source,
        state={"inr": inr, "unrolled": unrolled, "config": config},
    )


def score_result(result: Result, reference: dict) -> dict:
    """nRMSE/SSIM per map of the final and the INR-only maps (needs `reference`)."""
    from .metrics import score_maps
    return {"refine-more": score_maps(result.maps, reference, result.tissue_mask),
            "inr-only": score_maps(result.maps_init, reference, result.tissue_mask)}
