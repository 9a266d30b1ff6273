"""The classical solver of the refinement's objective from the stage-1 INR: the warm start of the
learned iterations (docs/decisions/003, 005) and the `classical-*` rows of benchmarks/refinement.py."""
from __future__ import annotations

import torch


def classical_minimum(run, objective=None, inr_state=None):
    """(q, z): the classical solver's minimum of `objective` (the run's by default) from the
    stage-1 INR of `run` (recon.ReconRun), detached: no gradient reaches the INR through it.
    `inr_state`: the (W, Q⁽⁰⁾) of ``run.inr_state`` when the caller has it (saves an INR forward)."""
    objective = objective or run.objective
    W, c0 = inr_state if inr_state is not None else run.inr_state(backward=False)[:2]
    with torch.no_grad():
        return run.unrolled.warm_start(objective.start(c0.detach()), objective,
                                       run.physics.background_phase(W), run.physics.tissue)
