"""Stage 2 trained on held-out k-space (`unroll.training = "self-supervised"`), after SSDU
(Yaman et al., MRM 2020) and zero-shot SSDU (ICLR 2022), for parametric maps.

Why: trained on loss 3 over all acquired samples, the learned iterations can at best reach the
minimum of that same objective, which the classical warm start already reaches: the U-Net then
learns the identity (docs/decisions). Here the acquired set is partitioned (splitting.py): the
learned iterations start from the classical minimum over Θ and keep data consistency on Θ, and
their loss is the data term on Λ, which they never saw: k-space a classical solver of the Θ data
cannot predict better than its prior lets it. Γ is held out of all training; every
`ssdu_validate_every` iterations the network runs on Ω\\Γ (its own warm start) and is scored on Γ;
training stops after `ssdu_patience` scores without improvement and keeps the best weights,
where the untrained network (the identity, i.e. the classical minimum) is the first score.
The final maps: the learned iterations on the classical minimum over all of Ω.

Cost: a warm start per split, one on Ω\\Γ and one on Ω (each an L-BFGS solve).
"""
from __future__ import annotations

import copy
import time

import torch

from refine_more.reconstruction.classical import classical_minimum
from refine_more.reconstruction.objective import RefinementObjective
from refine_more.reconstruction.optimizer import adam
from refine_more.reconstruction.splitting import self_supervised_partition


def held_out_loss(unrolled, start, objective, held_out, tissue) -> torch.Tensor:
    """The data term on the held-out samples (`held_out`: a restricted ScanPhysics) of the learned
    iterations run from `start` = (q, z) with data consistency on `objective`."""
    q, z = unrolled.learned_iterations(start[0], objective, start[1], tissue)[-1]
    return held_out.physics_consistency(q, z)


def train_self_supervised(run) -> torch.Tensor:
    """Stage 2 on held-out k-space (see the module's docstring); returns the final map channels."""
    cfg, prob, s = run.config.unroll, run.physics, run.schedule
    t = time.perf_counter()
    part = self_supervised_partition(run.subject.mask, cfg.ssdu_validation_fraction, cfg.ssdu_loss_fraction,
                                     cfg.ssdu_splits, seed=run.config.seed)

    def objective_on(mask):
        restricted = prob.restricted(mask)
        return restricted, RefinementObjective(restricted, cfg)

    state = run.inr_state(backward=False)[:2]      # the stage-1 INR is fixed: one forward for all
    splits = []
    for theta, lam in part.splits:
        _, objective = objective_on(theta)
        splits.append((objective, classical_minimum(run, objective, state), prob.restricted(lam)))
    _, rest_objective = objective_on(part.rest)
    rest_start = classical_minimum(run, rest_objective, state)
    validation = prob.restricted(part.validation)
    full_start = classical_minimum(run, run.objective, state)
    run.timings["warm_start"] = time.perf_counter() - t

    ids = {id(p) for p in run.unrolled.parameters()}
    params = [p for p in run.params["stage2"] if id(p) in ids]
    run.params["stage2"] = params
    opt = adam(params, s["lr2"])

    def score():
        with torch.no_grad():
            return float(held_out_loss(run.unrolled, rest_start, rest_objective, validation, prob.tissue))

    best, best_state, since_best, it = score(), copy.deepcopy(run.unrolled.state_dict()), 0, -1
    run.progress("stage 2 (self-supervised)", 0, s["n2"])
    for it in range(s["n2"]):
        objective, start, held = splits[it % len(splits)]
        opt.zero_grad(set_to_none=True)
        loss = held_out_loss(run.unrolled, start, objective, held, prob.tissue)
        if not torch.isfinite(loss):  # the weights are wrecked: stop, the best ones are restored below
            break
        loss.backward()
        opt.step()
        run.bar.update(1)
        run.bar.set_postfix(stage=2, heldout=f"{loss.item():.4g}", best=f"{best:.4g}")
        run.progress("stage 2 (self-supervised)", it + 1, s["n2"])
        if (it + 1) % cfg.ssdu_validate_every == 0 or it == s["n2"] - 1:
            value = score()
            if not value < best:  # NaN included
                since_best += 1
                if since_best >= cfg.ssdu_patience or value != value:
                    break
                continue
            run.log(2, it, s["n2"], {"loss3": loss.detach(), "loss_validation": torch.tensor(value)},
                    rest_start[0])
            best, best_state, since_best = value, copy.deepcopy(run.unrolled.state_dict()), 0
    run.done["stage2"] = it + 1
    run.unrolled.load_state_dict(best_state)
    with torch.no_grad():
        final, run.final_phase = run.unrolled.learned_iterations(full_start[0], run.objective, full_start[1],
                                                                 prob.tissue)[-1]
        return final
