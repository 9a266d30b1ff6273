"""Per-image phase (refine_more/physics/image_phase.py): the basis, the estimate from complex images and
the Gauss–Newton steps on the k-space data, on cases whose phases are known."""
import numpy as np
import pytest
import torch

from refine_more.config import preset
from refine_more.physics.image_phase import PhaseModel, polynomial_basis
from refine_more.reconstruction.objective import RefinementObjective as MapDataTerm
from refine_more.physics.scan import ScanPhysics as Problem
from refine_more.evaluation.simulate import SimulationConfig, image_phase_drift, simulate_subject
from refine_more.reconstruction.unrolled import quasi_newton

from test_refinement import _true_channels


def _problem(order, acceleration=1.0, snr=1e9, drift=0.0, matrix=(2, 12, 12)):
    sim = SimulationConfig(matrix=matrix, n_coils=3, acceleration=acceleration, snr=snr, calib=(2, 4),
                           phase_drift=drift)
    subject = simulate_subject("sub-phase", sim, seed=5)
    cfg = preset("tiny")
    cfg.unroll.image_phase_order = order
    return subject, cfg, Problem(subject, cfg, torch.device("cpu"))


def _known_phase(prob, coefficients_scale=0.3, seed=0):
    """A nuisance variable with a random smooth φ₀ and known per-image coefficients."""
    g = torch.Generator().manual_seed(seed)
    model = prob.phase_model
    background = 0.5 * torch.randn(prob.tissue.shape, generator=g)
    coefficients = coefficients_scale * torch.randn(model.n_images - 1, model.n_coefficients, generator=g)
    return model.pack(background, coefficients)


def test_basis_is_orthonormal_over_the_tissue_and_constant_first():
    tissue = torch.zeros(3, 10, 12, dtype=torch.bool)
    tissue[:, 2:8, 3:10] = True
    B = polynomial_basis(tissue, 2)
    assert B.shape[0] == 10
    gram = torch.einsum("kn,ln->kl", B[:, tissue], B[:, tissue]) / int(tissue.sum())
    assert torch.allclose(gram, torch.eye(10), atol=1e-5)
    assert float(B[0][tissue].std()) < 1e-6  # the constant comes first
    assert float(B[:, ~tissue].abs().max()) == 0.0
    # a single slice cannot tell z from a constant: those monomials are dropped
    assert polynomial_basis(torch.ones(1, 6, 6, dtype=torch.bool), 2).shape[0] == 6
    with pytest.raises(ValueError, match="image_phase_order"):
        PhaseModel(tissue, torch.zeros(4, 3, 10, 12), order=-2)


def test_estimate_recovers_known_per_image_phases_from_images():
    subject, cfg, prob = _problem(order=1)
    truth = _true_channels(prob, subject.reference)
    z_true = _known_phase(prob)
    images = torch.polar(prob.signal(truth), prob.image_phase(z_true))
    z = prob.background_phase(images)
    _, c_true = prob.phase_model.unpack(z_true)
    phi0, c = prob.phase_model.unpack(z)
    assert torch.allclose(c, c_true, atol=1e-4)
    wrapped = torch.angle(torch.polar(torch.ones_like(phi0), phi0 - prob.phase_model.unpack(z_true)[0]))
    assert float(wrapped[prob.tissue].abs().max()) < 1e-4
    # without the model, the same call is the shared phase of before (order −1)
    _, _, plain = _problem(order=-1)
    phi = plain.background_phase(images)
    assert phi.shape == tuple(subject.shape)


def test_phase_steps_converge_to_known_phases_from_k_space():
    """Undersampled, noise-free k-space of the true maps with known phases: Gauss–Newton phase
    steps from the INR-like estimate of the wrong (shared-phase-only) start reach the truth, and
    every step lowers the data term (the steps are majorizer steps)."""
    subject, cfg, prob = _problem(order=1, acceleration=2.0)
    truth = _true_channels(prob, subject.reference)
    z_true = _known_phase(prob)
    images = torch.polar(prob.signal(truth), prob.image_phase(z_true))
    prob.kspace = prob.A(images)                         # data of exactly this model
    prob.kspace_energy = float((prob.kspace.abs() ** 2).sum())
    phi0_true, c_true = prob.phase_model.unpack(z_true)
    z = prob.phase_model.pack(phi0_true + 0.2 * prob.tissue)   # shared phase off, no per-image phase
    values = [float(prob.physics_consistency(truth, z))]
    for _ in range(60):
        z = prob.phase_step(truth, z, damping=1e-3)
        values.append(float(prob.physics_consistency(truth, z)))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(values, values[1:]))
    assert values[-1] < 1e-5 * values[0]
    assert torch.allclose(prob.phase_model.unpack(z)[1], c_true, atol=2e-3)


def test_refinement_with_per_image_phase_survives_drift_and_joint_lbfgs_runs():
    """A drift cohort's subject (simulator `phase_drift`): the data term at the true maps, after
    the phase is fitted, is far lower with the per-image model than with one shared phase; the
    joint L-BFGS warm start runs on the packed nuisance variable and does not raise the objective."""
    results = {}
    for order in (-1, 1):
        subject, cfg, prob = _problem(order=order, acceleration=2.0, snr=1e9, drift=0.4, matrix=(2, 16, 16))
        truth = _true_channels(prob, subject.reference)
        images = torch.polar(prob.signal(truth), torch.zeros_like(prob.bs_phase))
        z = prob.phase_model.pack(torch.zeros(subject.shape))
        for _ in range(40):
            z = prob.phase_step(truth, z, damping=1e-3)
        results[order] = float(prob.physics_consistency(truth, z))
        if order == 1:
            term = MapDataTerm(prob, cfg.unroll)
            start = float(term.value(truth, z))
            q, z2 = quasi_newton(term, truth, z, prob.tissue.float(), iterations=8, warmup_steps=2, block=4)
            assert z2.shape == z.shape and float(term.value(q, z2)) <= start
    assert results[1] < 0.2 * results[-1], results


def test_simulated_drift_has_the_size_asked_for_and_leaves_other_cohorts_unchanged():
    tissue = np.zeros((3, 10, 10), bool)
    tissue[:, 2:8, 2:8] = True
    drift = image_phase_drift((3, 10, 10), 4, tissue, 0.4, np.random.default_rng(0))
    peak = np.abs(drift[:, tissue]).max(1)
    assert drift.shape == (4, 3, 10, 10) and np.all(peak <= 0.4 + 1e-9) and np.all(peak >= 0.2 - 1e-9)
    sim = SimulationConfig(matrix=(2, 12, 12), n_coils=2)
    a = simulate_subject("sub-a", sim, seed=1)
    b = simulate_subject("sub-a", SimulationConfig(matrix=(2, 12, 12), n_coils=2, phase_drift=0.0), seed=1)
    assert np.array_equal(a.kspace, b.kspace)
    with pytest.raises(ValueError, match="phase_drift"):
        image_phase_drift((2, 4, 4), 2, np.ones((2, 4, 4), bool), float("nan"), np.random.default_rng(0))


def _phase_step_evaluated_anew(prob, channels, z, damping):
    """One phase step as first written: S(Q), the metrics and every residual evaluated from scratch."""
    background_only, coefficients = prob.phase_model.unpack(z)
    mag = prob.signal(channels)
    x = torch.polar(mag, prob.image_phase(z))
    grad = (2.0 / prob.kspace_energy) * (x.conj() * prob.A.adjoint(prob.A(x) - prob.kspace)).imag
    phi0 = background_only - grad.sum(0) / prob.phase_metric(channels, damping)
    z = prob.phase_model.pack(phi0, coefficients)
    x = torch.polar(mag, prob.image_phase(z))
    grad = (2.0 / prob.kspace_energy) * (x.conj() * prob.A.adjoint(prob.A(x) - prob.kspace)).imag
    grad = grad[1:].reshape(grad.shape[0] - 1, -1)
    B = prob.phase_model.basis.reshape(prob.phase_model.n_coefficients, -1)
    curvature = (prob._coil_energy[0] * prob.signal(channels)[1:] ** 2).reshape(grad.shape[0], -1)
    M = torch.einsum("kn,tn,ln->tkl", B, curvature, B)
    trace = M.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    M = M + (damping * trace)[:, None, None] * torch.eye(M.shape[-1])
    step = torch.linalg.solve(M, (grad @ B.T)[..., None])[..., 0]
    before = float(prob.physics_consistency(channels, z))
    for scale in (1.0, 0.5, 0.25):
        trial = prob.phase_model.pack(phi0, coefficients - scale * step)
        if float(prob.physics_consistency(channels, trial)) < before:
            return trial
    return z


def test_phase_steps_reuse_what_fixed_maps_allow_and_give_the_same_floats():
    """`phase_steps` computes S(Q) and the metrics once and reuses each residual for the next
    gradient: bit for bit the steps evaluated anew, with half the forward passes of A."""
    subject, cfg, prob = _problem(order=1, acceleration=2.0, snr=1e9, drift=0.4, matrix=(2, 16, 16))
    truth = _true_channels(prob, subject.reference)
    z0 = prob.phase_model.pack(torch.zeros(subject.shape))
    expected = z0
    for _ in range(6):
        expected = _phase_step_evaluated_anew(prob, truth, expected, 1e-3)
    forward, calls = prob.A.__call__, []
    prob.A = type("Counted", (), {"__call__": lambda self, x: calls.append(1) or forward(x),
                                   "adjoint": prob.A.adjoint})()
    z = prob.phase_steps(truth, z0, 6, 1e-3)
    assert torch.equal(z, expected)
    assert len(calls) <= 1 + 2 * 6 + 2       # the first gradient, then ≈ 2 per step (a halved trial now and then)
    assert prob.phase_steps(truth, z0, 0, 1e-3) is z0
    assert not prob.phase_steps(truth.clone().requires_grad_(), z0, 2, 1e-3).requires_grad   # no graph, ever
