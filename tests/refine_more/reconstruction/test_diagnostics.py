"""What a report shows beside the maps (refine_more/reconstruction/diagnostics.py), on a short
tiny reconstruction: the per-image residual adds up to the refinement's data term g with its
final phase, and the zero-filled fit of the central slice is a fit of that slice."""
import numpy as np
import pytest
import torch

from refine_more.config import apply_overrides, preset
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.reconstruction import diagnostics, recon


@pytest.mark.parametrize("overrides", [[], ["unroll.warm_start_steps=4"]])
def test_residual_per_image_adds_up_to_the_data_term(overrides):
    subject = simulate_subject("sub-d01", SimulationConfig(matrix=(4, 16, 16), n_coils=3), seed=5)
    config = apply_overrides(preset("tiny"), ["iters_stage1=6", "iters_stage2=2", *overrides])
    run = recon.setup(subject, config)
    recon.train_inr(run)
    final = recon.train_refinement(run)
    assert run.final_phase is not None
    with torch.no_grad():
        W = run.inr.images(run.chunk)
        g = float(run.physics.physics_consistency(final, run.final_phase))
    d = diagnostics.compute(run, final, W, run.physics.physical_maps(final))
    info, arrays = d["json"], d["arrays"]
    energy = np.array([float(run.physics.kspace[t].abs().pow(2).sum()) for t in range(subject.n_images)])
    rel = np.array(info["residual"]["maps"])
    assert (rel ** 2 * energy).sum() / energy.sum() == pytest.approx(g, rel=1e-4)
    assert info["residual"]["phase"] == "the refinement's final phase"
    z = info["slice_index"]
    assert z == 2 and arrays["residual"].shape == (subject.n_images, 16, 16)
    tissue = arrays["tissue"].astype(bool)
    assert (arrays["zf_T1F"][tissue] > 0).all() and (arrays["zf_T1F"][~tissue] == 0).all()
    np.testing.assert_array_equal(arrays["ref_T1F"], subject.reference["T1F"][z])
    assert info["roi_means_reference"]["WM"]["T1F"] == pytest.approx(
        subject.reference["T1F"][subject.reference["labels"] == 1].mean(), rel=1e-6)


def test_a_failure_is_a_warning_not_a_failed_reconstruction(monkeypatch):
    subject = simulate_subject("sub-d02", SimulationConfig(matrix=(4, 16, 16), n_coils=3), seed=6)

    def boom(*a, **k):
        raise RuntimeError("no diagnostics today")
    monkeypatch.setattr(diagnostics, "compute", boom)
    config = apply_overrides(preset("tiny"), ["iters_stage1=2", "iters_stage2=1"])
    with pytest.warns(UserWarning, match="no diagnostics today"):
        result = recon.reconstruct(subject, config, diagnostics=True)
    assert result.diagnostics == {} and "diagnostics" in result.timings
