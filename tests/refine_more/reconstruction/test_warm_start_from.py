"""Where the warm start starts (`unroll.start`, docs/decisions/020): the stage-1 INR, the LLR fit,
or the better of both by the objective on the acquired k-space; the LLR images are computed once
and QC reuses them."""
import numpy as np
import pytest

import refine_more.reconstruction.classical as classical
from refine_more.config import apply_overrides, preset
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.reconstruction.recon import reconstruct


@pytest.fixture(scope="module")
def subject():
    return simulate_subject("sub-s01", SimulationConfig(matrix=(6, 24, 24), n_coils=4), seed=5)


def _config(start: str):
    return apply_overrides(preset("tiny"), [f"unroll.start={start}", "unroll.warm_start_steps=8"])


@pytest.fixture(scope="module")
def runs(subject):
    return {s: reconstruct(subject, _config(s)) for s in ("inr", "llr", "best")}


def test_best_keeps_the_lower_objective_of_both_solves(runs):
    best = runs["best"].start
    assert set(best) == {"start", "objective_inr", "objective_llr", "llr_nrmse", "prior_scale"}
    assert best["start"] == min(("inr", "llr"), key=lambda k: best[f"objective_{k}"])
    # each single start solves the same problem from the same point as its half of 'best'
    assert runs["inr"].start == {"start": "inr", "objective_inr": pytest.approx(best["objective_inr"], rel=1e-5),
                                 "prior_scale": 1.0}     # `tiny` has no prior
    assert runs["llr"].start["objective_llr"] == pytest.approx(best["objective_llr"], rel=1e-5)
    # the LLR fit's own score (the classical baseline, recorded when the reference is tracked)
    assert runs["llr"].start["llr_nrmse"] == pytest.approx(best["llr_nrmse"], rel=1e-5)
    assert set(best["llr_nrmse"]) == {"T1F", "f", "kF"} and all(0 < v < 100 for v in best["llr_nrmse"].values())
    chosen = runs[best["start"]]
    for m in ("T1F", "f"):
        np.testing.assert_allclose(runs["best"].maps[m], chosen.maps[m], rtol=1e-4, atol=1e-6)


def test_the_llr_images_are_computed_once_and_qc_reuses_them(subject, monkeypatch):
    calls = []
    real = classical.llr_reconstruct

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(classical, "llr_reconstruct", counting)
    result = reconstruct(subject, _config("best"))
    assert len(calls) == 1 and result.timings["llr"] > 0
    assert result.qc.metrics["objective_llr_start"] > 0
    calls.clear()
    reconstruct(subject, _config("inr"))      # QC alone still needs them: once
    assert len(calls) == 1


def test_an_unknown_start_or_one_without_a_warm_start_is_refused():
    with pytest.raises((ValueError, TypeError), match="start"):
        apply_overrides(preset("tiny"), ["unroll.start=truth", "unroll.warm_start_steps=8"])
    with pytest.raises(ValueError, match="unroll.start = 'llr' needs a warm start"):
        apply_overrides(preset("tiny"), ["unroll.start=llr"])
