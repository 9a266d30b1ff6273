"""Stage 2 without a warm start (the paper, Fig. 1B, eq. 10): loss 1 + 2 + 3 jointly over the INR and
the learned iterations, which start from the INR's maps Q⁽⁰⁾ as they train.

The variants issue 26 measures (`config.unroll`, docs/paper-departures.md):
- `freeze_map_hash`: hash 3 stays as stage 1 left it and stage 1's Adam goes on, with the U-Net
  (and whatever else stage 2 trains) as a new parameter group (the public code);
- `training = 'held-out-stop'`: SSDU's Γ (splitting.py) is held out of every loss, stage 1's too
  (a Γ the INR was fitted to in stage 1 scores best before stage 2 moves it: the stop came at once); every
  `ssdu_validate_every` iterations the last phase's data term on Γ is scored, training stops after
  `ssdu_patience` scores without a new lowest one, and the weights of the lowest are kept (the
  untrained refinement is the first score). The final maps use all acquired k-space;
- K = 0 (`unroll.iterations`): loss 1 + 2 alone, the INR trained as long, Q⁽⁰⁾ the result.
"""
from __future__ import annotations

import copy
import math

import torch
from torch.utils.checkpoint import checkpoint

from refine_more.reconstruction.losses import inr_losses, inr_losses_chunked
from refine_more.reconstruction.objective import RefinementObjective
from refine_more.reconstruction.optimizer import adam, plateaued
from refine_more.reconstruction.splitting import self_supervised_partition


class HeldOutStop:
    """Γ held out of training, and the stopping rule on it (see the module's docstring)."""

    def __init__(self, run):
        cfg, prob = run.config.unroll, run.physics
        part = self_supervised_partition(run.subject.mask, cfg.ssdu_validation_fraction, cfg.ssdu_loss_fraction,
                                         1, seed=run.config.seed)
        self.physics = prob.restricted(part.rest)             # what every loss sees
        self.objective = RefinementObjective(self.physics, cfg, image_chunk=run.chunk)
        self.validation = prob.restricted(part.validation)
        self.every, self.patience = cfg.ssdu_validate_every, cfg.ssdu_patience
        self.best, self.best_state, self.since_best = float("inf"), None, 0

    def score(self, run) -> float:
        """The last phase's data term on Γ (the untrained refinement, before any step: the first score)."""
        with torch.no_grad():
            W, c0 = run.inr.images(run.chunk), run.inr.map_channels()
            prob, start = run.physics, self.objective.start(c0)
            phase = prob.background_phase(W)
            outs = run.unrolled(start, self.objective, phase, prob.tissue)
            q, z = outs[-1] if outs else (start, phase)     # K = 0: Q⁽⁰⁾ itself
            return float(self.validation.physics_consistency(q, z))

    def update(self, run, value: float) -> bool:
        """Record a score; True when training should stop (NaN stops at once)."""
        if value < self.best:
            self.best, self.since_best = value, 0
            self.best_state = copy.deepcopy((run.inr.state_dict(), run.unrolled.state_dict()))
            return False
        self.since_best += 1
        return value != value or self.since_best >= self.patience

    def restore(self, run) -> None:
        if self.best_state is not None:
            run.inr.load_state_dict(self.best_state[0])
            run.unrolled.load_state_dict(self.best_state[1])


def _optimizer(run):
    """A fresh Adam over stage 2's parameters; with `freeze_map_hash`, stage 1's Adam (its moments
    kept) without hash 3, and stage 2's other parameters as a new group."""
    s = run.schedule
    if not (run.config.unroll.freeze_map_hash and run.stage1_optimizer is not None):
        return adam(run.params["stage2"], s["lr2"])
    frozen = {id(p) for p in run.inr.hash_maps.parameters()}
    for p in run.inr.hash_maps.parameters():
        p.requires_grad_(False)
    opt = run.stage1_optimizer
    for group in opt.param_groups:      # stage 1's groups go on at stage 2's rate (adapted runs: lr_stage2)
        group["lr"] = s["lr2"]
    known = {id(p) for group in opt.param_groups for p in group["params"]}
    new = [p for p in run.params["stage2"] if id(p) not in known and id(p) not in frozen]
    if new:
        opt.add_param_group({"params": new, "lr": s["lr2"]})
    run.params["stage2"] = [p for p in run.params["stage2"] if id(p) not in frozen]
    return opt


def _forward(run, prob, term):
    """One training iteration's (Q⁽⁰⁾, loss 1, loss 2, [data term of each phase]) on `prob`'s samples."""
    inr, tv = run.inr, run.config.tv_weight
    if run.chunk:  # loss 1 + 2 backpropagated chunk by chunk here; loss 3 through fresh maps
        W, _, loss1, loss2 = inr_losses_chunked(inr, prob, tv, run.chunk, backward=True)
        c0 = checkpoint(inr.map_channels, use_reentrant=False)   # MLP2 recomputed in backward (memory)
    else:
        W, c0, loss1, loss2 = inr_losses(inr, prob, tv)
    outs = run.unrolled(term.start(c0), term, run.physics.background_phase(W), run.physics.tissue)
    return c0, loss1, loss2, outs, [term.value(c, z) for c, z in outs]


def train_jointly(run) -> torch.Tensor:
    """Stage 2 of the paper (and its variants above); returns the final map channels."""
    s, prob, term, inr = run.schedule, run.physics, run.objective, run.inr
    stop = run.held_out if s["n2"] else None
    if stop is not None:
        prob, term = stop.physics, stop.objective
        stop.update(run, stop.score(run))
    opt = _optimizer(run)
    totals, it = [], -1
    run.progress("stage 2", 0, s["n2"])
    for it in range(s["n2"]):
        opt.zero_grad(set_to_none=True)
        c0, loss1, loss2, outs, phases = _forward(run, prob, term)
        loss3 = sum(phases) if phases else torch.zeros((), device=c0.device)
        total = loss1 + loss2 + loss3
        if total.requires_grad:     # K = 0 with image chunks: loss 1 + 2 were backpropagated chunk by chunk
            total.backward()
        opt.step()
        totals.append(total.item())
        losses = {"loss1": loss1, "loss2": loss2, "loss3": loss3, "loss": total}
        if phases:
            losses["loss3_last"] = phases[-1]          # against the noise floor (issue 26)
        halt = scored = False
        if stop is not None and ((it + 1) % stop.every == 0 or it == s["n2"] - 1):
            value = stop.score(run)
            halt, scored = stop.update(run, value), True
            if math.isfinite(value):      # a NaN score stops (best weights restored); the log refuses NaN
                losses["loss_held_out"] = torch.tensor(value)
        run.log(2, it, s["n2"], losses, outs[-1][0] if outs else c0, c0, force=scored)   # every score kept
        run.bar.update(1)
        run.bar.set_postfix(stage=2, l1=f"{loss1.item():.3g}", l3=f"{loss3.item():.3g}")
        run.progress("stage 2", it + 1, s["n2"])
        if halt or plateaued(totals, s["patience"], run.config.adapt.plateau_rel):
            break
    run.done["stage2"] = it + 1
    if stop is not None:
        stop.restore(run)
    prob, term = run.physics, run.objective               # the final maps see all acquired k-space
    with torch.no_grad():
        W = inr.images(run.chunk)
        c0 = inr.map_channels()
        if not (s["n2"] and run.unrolled.config.iterations):
            return c0
        final, run.final_phase = run.unrolled(term.start(c0), term, prob.background_phase(W), prob.tissue)[-1]
        return final
