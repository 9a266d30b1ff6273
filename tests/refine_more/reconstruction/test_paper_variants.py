"""The stage-2 variants of issue 26 (joint_training.py, unrolled.py): the public code's fixed step,
tissue-masked U-Net input, hash 3 frozen with stage 1's Adam going on, the held-out-k-space stop, and
K = 0; and that options added later leave the hashes of recorded results as they were."""
import json
from pathlib import Path

import numpy as np
import torch

from refine_more.config import apply_overrides, preset
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.reconstruction.recon import setup, train_inr, train_refinement
from refine_more.reconstruction.splitting import self_supervised_partition

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def _subject(seed=4):
    return simulate_subject("sub-var", SimulationConfig(matrix=(2, 16, 16), n_coils=3, acceleration=3), seed=seed)


def _config(*overrides):
    cfg = apply_overrides(preset("tiny"), ["unroll.preconditioner=none", "unroll.refine_phase=false",
                                           "unroll.refine_k=false", "unroll.unet_out_kernel=3", *overrides])
    cfg.progress = False
    return cfg


def _trained(cfg, subject=None):
    run = setup(subject or _subject(), cfg)
    train_inr(run)
    return run


def test_fixed_step_is_the_codes_step_on_the_mean_square_residual_and_never_trained():
    run = _trained(_config("unroll.fixed_step=0.001", "unroll.iterations=1"))
    term, prob = run.objective, run.physics
    # ‖d‖² / entries, computed apart from the objective
    assert abs(term.mean_square_scale - float((prob.kspace.abs() ** 2).mean())) < 1e-6 * term.mean_square_scale
    assert not run.unrolled.log_step.requires_grad
    with torch.no_grad():
        W, c0 = run.inr.images(), run.inr.map_channels()
    z = prob.background_phase(W)
    q0 = c0.detach().requires_grad_()
    mean_square = term.value(q0, z) * term.mean_square_scale
    (grad,) = torch.autograd.grad(mean_square, q0)
    with torch.no_grad():     # the untrained U-Net is the identity (zero-initialised output)
        q1 = run.unrolled.learned_iterations(c0, term, z, prob.tissue)[0][0]
    expected = c0 - 1e-3 * grad * prob.tissue
    torch.testing.assert_close(q1[:3], expected[:3], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q1[3], c0[3])      # k passes through
    torch.testing.assert_close(run.unrolled.steps(), torch.full((1, 3), 1e-3 * term.mean_square_scale))


def test_tissue_masked_unet_sees_zeros_outside_the_tissue_and_leaves_them_as_they_were():
    seen = {}
    for masked in (False, True):
        run = _trained(_config(f"unroll.mask_outside_tissue={str(masked).lower()}"))
        handle = run.unrolled.unet.register_forward_hook(lambda m, args, out, key=masked: seen.setdefault(key, args[0]))
        with torch.no_grad():
            W, c0 = run.inr.images(), run.inr.map_channels()
            q = run.unrolled(c0, run.objective, run.physics.background_phase(W), run.physics.tissue)[-1][0]
        handle.remove()
        outside = ~run.physics.tissue.bool()                 # (Z, Y, X); the U-Net input is (Z, C, Y, X)
        x = seen[masked].permute(1, 0, 2, 3)[:, outside]
        assert (float(x.abs().max()) == 0.0) == masked
        assert torch.isfinite(q).all()


def test_frozen_map_hash_keeps_stage1_tables_and_stage1_adam_goes_on():
    cfg = _config("unroll.freeze_map_hash=true")
    run = _trained(cfg)
    before = {k: v.clone() for k, v in run.inr.hash_maps.state_dict().items()}
    mlp = next(run.inr.mlp_maps.parameters())
    opt = run.stage1_optimizer
    assert int(opt.state[mlp]["step"]) == cfg.iters_stage1
    unet_before = [p.clone() for p in run.unrolled.unet.parameters()]
    train_refinement(run)
    for k, v in run.inr.hash_maps.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(opt.state[mlp]["step"]) == cfg.iters_stage1 + cfg.iters_stage2       # the same Adam, on
    assert any(not torch.equal(a, b) for a, b in zip(unet_before, run.unrolled.unet.parameters()))
    # the default: a fresh Adam, hash 3 trained
    run = _trained(_config())
    before = {k: v.clone() for k, v in run.inr.hash_maps.state_dict().items()}
    train_refinement(run)
    assert any(not torch.equal(v, before[k]) for k, v in run.inr.hash_maps.state_dict().items())


def test_held_out_stop_never_trains_on_gamma_and_keeps_the_lowest_scored_weights():
    """Two runs whose data differ only on Γ train identically, stage 1 and stage 2 (every loss sees
    Ω\\Γ); their held-out scores differ. The kept weights score the lowest value recorded."""
    from refine_more.reconstruction.joint_training import HeldOutStop
    from refine_more.reconstruction.recon import train_inr

    cfg = _config("unroll.training=held-out-stop", "unroll.ssdu_validate_every=1", "unroll.ssdu_patience=3",
                  "iters_stage2=12", "log_every=1")
    subject = _subject()
    first, second = setup(subject, cfg), setup(subject, cfg)
    part = self_supervised_partition(subject.mask, cfg.unroll.ssdu_validation_fraction,
                                     cfg.unroll.ssdu_loss_fraction, 1, seed=cfg.seed)
    gamma = torch.from_numpy(part.validation)[:, None, :, :, None].expand_as(second.physics.kspace)
    second.physics.kspace = torch.where(gamma, second.physics.kspace * 1.5 + 0.01, second.physics.kspace)
    second.held_out = HeldOutStop(second)        # its Ω\\Γ and Γ from the altered data
    for run in (first, second):
        train_inr(run)
        train_refinement(run)
    losses = [[(e["stage"], e["loss"]) for e in r.history] for r in (first, second)]
    assert losses[0] == losses[1] and {stage for stage, _ in losses[0]} == {1, 2}
    stage2 = [[e for e in r.history if e["stage"] == 2] for r in (first, second)]
    assert [e["loss_held_out"] for e in stage2[0]] != [e["loss_held_out"] for e in stage2[1]]
    for run, history in zip((first, second), stage2):
        scored = [e["loss_held_out"] for e in history]
        assert run.held_out.score(run) <= min(scored) * (1 + 1e-5)
        assert 1 <= run.done["stage2"] <= cfg.iters_stage2


def test_no_learned_iteration_gives_the_inr_maps_or_the_classical_minimum():
    cfg = _config("unroll.iterations=0")
    run = _trained(cfg)
    final = train_refinement(run)              # loss 1 + 2 alone, as long as stage 2 would run
    with torch.no_grad():
        torch.testing.assert_close(final, run.inr.map_channels(), rtol=0, atol=0)
    assert run.done["stage2"] == cfg.iters_stage2
    assert not any("loss3_last" in e for e in run.history)
    stopped = _trained(_config("unroll.iterations=0", "unroll.training=held-out-stop", "unroll.ssdu_validate_every=2"))
    train_refinement(stopped)                  # Q⁽⁰⁾ itself is scored on Γ
    assert any("loss_held_out" in e for e in stopped.history)
    warm = apply_overrides(preset("tiny"), ["unroll.iterations=0", "unroll.warm_start_steps=4"])
    run = _trained(warm)
    final = train_refinement(run)
    assert run.done["stage2"] == 0 and run.final_phase is not None and torch.isfinite(final).all()


def test_new_options_at_their_neutral_values_keep_the_recorded_hashes():
    recorded = json.loads((RESULTS / "robustness.json").read_text())["scenario_config_hashes"]
    assert {h for hashes in recorded.values() for h in hashes} == {preset("small").hash()}
    base = preset("paper")
    for item in ("unroll.fixed_step=0.001", "unroll.mask_outside_tissue=true", "unroll.freeze_map_hash=true"):
        assert apply_overrides(base, [item]).hash() != base.hash(), item


def test_options_that_cannot_run_together_fail_at_load():
    import pytest

    with pytest.raises(ValueError, match="self-supervised"):
        apply_overrides(preset("tiny"), ["unroll.iterations=0", "unroll.training=self-supervised",
                                         "unroll.warm_start_steps=4"])
    with pytest.raises(ValueError, match="held-out-stop"):
        apply_overrides(preset("tiny"), ["unroll.training=held-out-stop", "unroll.warm_start_steps=4"])
