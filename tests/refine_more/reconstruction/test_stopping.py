"""Stopping rules that never look at the truth: the plateau rule of adapted runs and the held-out
k-space rule of self-supervised stage 2 (refine_more/reconstruction/ssdu.py)."""
import torch

from refine_more.reconstruction.classical import classical_minimum
from refine_more.config import preset
from refine_more.reconstruction.recon import plateaued, reconstruct, setup, train_inr, train_refinement
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject


def test_plateau_rule():
    assert not plateaued([5, 4, 3, 2, 1], patience=0, rel=1e-3)           # off
    assert not plateaued([5, 4, 3], patience=3, rel=1e-3)                   # not enough history
    assert not plateaued([5, 4, 3, 2, 1], patience=2, rel=1e-3)             # still improving
    assert plateaued([5, 1, 1, 1, 1], patience=3, rel=1e-3)                 # flat for 3
    assert plateaued([5, 1, 1.2, 1.1, 1.0005], patience=3, rel=1e-3)        # no better than 0.1 %
    assert not plateaued([5, 1, 1.2, 1.1, 0.99], patience=3, rel=1e-3)      # a new best by 1 %


def _config():
    cfg = preset("tiny")
    cfg.unroll.warm_start_steps, cfg.unroll.warm_start_solver = 8, "lbfgs"
    cfg.unroll.map_smoothness = (3e-4, 1e-4, 3e-3, 0.0)
    cfg.unroll.training = "self-supervised"
    cfg.unroll.ssdu_validate_every, cfg.unroll.ssdu_patience, cfg.unroll.ssdu_splits = 1, 2, 1
    cfg.iters_stage2 = 12
    return cfg


def _subject():
    return simulate_subject("sub-stop", SimulationConfig(matrix=(2, 16, 16), n_coils=3, acceleration=3), seed=4)


def test_held_out_rule_stops_and_keeps_the_best_weights_which_can_be_the_identity():
    """Trained with a learning rate that wrecks the U-Net, the loss on Γ only rises: training stops
    after `ssdu_patience` evaluations, and the kept weights are the untrained ones, so the final
    maps are the classical minimum over all acquired samples."""
    subject = _subject()
    cfg = _config()
    run = setup(subject, cfg)
    train_inr(run)
    run.schedule["lr2"] = 3.0
    final = train_refinement(run)
    assert run.done["stage2"] == cfg.unroll.ssdu_patience          # stopped early, by Γ alone
    assert float(run.unrolled.unet.out.weight.abs().max()) == 0.0   # the identity was the best
    q, z = classical_minimum(run)
    expected = run.unrolled.learned_iterations(q, run.objective, z, run.physics.tissue)[-1][0]
    torch.testing.assert_close(final, expected.detach(), rtol=0, atol=1e-6)


def test_self_supervised_reconstruction_runs_end_to_end_and_never_uses_the_reference():
    subject = _subject()
    cfg = _config()
    with_ref = reconstruct(subject, cfg)
    subject.reference = None
    without = reconstruct(subject, cfg)
    for name in ("T1F", "f", "kF"):
        torch.testing.assert_close(torch.from_numpy(with_ref.maps[name]), torch.from_numpy(without.maps[name]))
    assert 1 <= with_ref.iterations["stage2"] <= cfg.iters_stage2
