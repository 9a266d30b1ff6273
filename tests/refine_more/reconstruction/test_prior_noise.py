"""The prior's weight follows the scan's noise (`unroll.prior_noise_reference`, docs/decisions/022):
the noise level ν/s read from the data alone tracks σ² (16× from SNR 200 to 50), does not move with
the acceleration, and `small`'s prior keeps its tuned weights at SNR 200 and grows at SNR 50."""
import pytest
import torch

from refine_more.config import apply_overrides, preset
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.physics.scan import ScanPhysics
from refine_more.reconstruction.classical import llr_start, noise_level
from refine_more.reconstruction.objective import RefinementObjective

CPU = torch.device("cpu")


def _level(snr: float, acceleration: float = 4.0, seed: int = 11) -> float:
    subject = simulate_subject("sub-n", SimulationConfig(matrix=(6, 32, 32), n_coils=4, acceleration=acceleration,
                                                         mask_type="2d", snr=snr), seed=seed)
    physics = ScanPhysics(subject, preset("small"), CPU)
    return noise_level(physics, llr_start(physics, preset("small"))[0])


def test_the_noise_level_tracks_the_noise_and_not_the_sampling():
    at200, at50, af5 = _level(200.0), _level(50.0), _level(200.0, acceleration=5.0)
    assert 10 < at50 / at200 < 20                     # σ² × 16, less what the LLR images absorb
    assert af5 / at200 == pytest.approx(1.0, abs=0.15)
    reference = preset("small").unroll.prior_noise_reference
    assert at200 < reference < at50 / 3               # tuned weights at SNR 200, ≥ 3× at SNR 50


def test_setting_the_prior_scale_replaces_it_and_leaves_the_data_term_alone():
    subject = simulate_subject("sub-n", SimulationConfig(matrix=(4, 16, 16), n_coils=4), seed=3)
    physics = ScanPhysics(subject, preset("small"), CPU)
    objective = RefinementObjective(physics, preset("small").unroll)
    q = objective.start(physics.scaling.initial_raw().view(-1, 1, 1, 1).expand(-1, *subject.shape).clone())
    q = q + 0.1 * torch.randn(q.shape, generator=torch.Generator().manual_seed(0))
    prior = float(objective.prior.value(q))
    objective.set_prior_scale(4.0)
    objective.set_prior_scale(4.0)                    # again: replaces, never compounds
    assert float(objective.prior.value(q)) == pytest.approx(4 * prior, rel=1e-5)
    objective.set_prior_scale(1.0)
    assert float(objective.prior.value(q)) == pytest.approx(prior, rel=1e-5)
    off = RefinementObjective(physics, apply_overrides(preset("small"), ["unroll.map_smoothness=[0,0,0,0]"]).unroll)
    off.set_prior_scale(4.0)                          # no prior: nothing to scale
    assert off.prior is None


def test_the_edge_scale_follows_the_noise_and_replaces():
    """δ × edge_factor (decision 023): a jump of 1 in a normalised channel costs ≈ 2δ·1 under the
    pseudo-Huber penalty, so its cost follows δ; setting the factor again replaces it."""
    subject = simulate_subject("sub-n", SimulationConfig(matrix=(4, 16, 16), n_coils=4), seed=3)
    physics = ScanPhysics(subject, preset("small"), CPU)
    config = apply_overrides(preset("small"), ["unroll.map_edge_scale=[0,0.01,0.01,0]"]).unroll
    objective = RefinementObjective(physics, config)
    q = objective.start(physics.scaling.initial_raw().view(-1, 1, 1, 1).expand(-1, *subject.shape).clone())
    q[1:3, :, :, : subject.shape[2] // 2] += 1.0      # a step edge in T1F and f, far above δ
    edge = float(objective.prior.value(q))
    objective.set_prior_scale(1.0, 2.0)
    objective.set_prior_scale(1.0, 2.0)               # again: replaces, never compounds
    assert float(objective.prior.value(q)) == pytest.approx(2 * edge, rel=0.02)
    assert torch.allclose(objective.prior.edge_scale, torch.tensor([0, 0.02, 0.02, 0]))
    objective.set_prior_scale(3.0, 1.0)               # the weights and δ apart
    assert float(objective.prior.value(q)) == pytest.approx(3 * edge, rel=1e-5)
    with pytest.raises(ValueError, match="finite and > 0"):
        objective.set_prior_scale(1.0, float("nan"))
