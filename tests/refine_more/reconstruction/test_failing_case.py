"""Issue 24's failing case, reconstructed as the robustness benchmark makes it: af4-2d, 6×32×32, 4 coils,
seed 5002 (the benchmark's sub-003). From the INR start alone its INR maps were 46 % T1F and the refinement
polished them into 163 % / 344 % (benchmarks/results/refinement.json); with the LLR fit as a second start
(`unroll.start=best`) it must land within 2× the scenario's median and below its own LLR fit."""
import pytest

from refine_more.config import apply_overrides, preset
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.reconstruction.recon import reconstruct, score_result

pytestmark = pytest.mark.slow

# benchmarks/results/robustness.json, af4-2d at today's `small` (7746380582a9): median nRMSE % of refine-more
# over the 16 subjects (session 13's quadratic prior: 3.90 / 4.30)
MEDIAN_T1F, MEDIAN_F = 3.81, 4.22


def test_seed_5002_lands_within_twice_the_median_and_below_its_llr_fit():
    subject = simulate_subject("sub-003", SimulationConfig(matrix=(6, 32, 32), n_coils=4, acceleration=4.0,
                                                           mask_type="2d"), seed=5002)
    config = apply_overrides(preset("small"), ["unroll.start=best", "progress=false"])
    result = reconstruct(subject, config)

    scores = score_result(result, subject.reference)["refine-more"]
    nrmse = {m: scores[m]["nrmse"] for m in ("T1F", "f")}
    llr = result.start["llr_nrmse"]
    assert nrmse["T1F"] <= 2 * MEDIAN_T1F and nrmse["f"] <= 2 * MEDIAN_F, nrmse
    assert nrmse["T1F"] < llr["T1F"] and nrmse["f"] < llr["f"], (nrmse, llr)
    # the case fails from the INR start: its own maps stay far off, so the better start is what saves it
    assert result.start["start"] == "llr", result.start
    assert result.qc.status == "ok", result.qc
