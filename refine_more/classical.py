"""The classical solver of the refinement's objective from the stage-1 INR: the warm start of the
learned iterations (docs/decisions/003, 005) and the `classical-*` rows of benchmarks/refinement.py."""
from __future__ import annotations

import torch


def classical_minimum(run, objective=None):
    """(q, z): the classical solver's minimum of `objective` (the run's by default) from the
    stage-1 INR of `run` (recon.ReconRun), detached: no gradient reaches the INR through it."""
    objective = objective or run.objective
    W, c0, _, _ = run.inr_state(backward=False)
    with torch.no_grad():
        return run.unrolled.warm_start(objective.start(c0.detach()), objective,
                                       run.physics.background_phase(W), run.physics.tissue)
