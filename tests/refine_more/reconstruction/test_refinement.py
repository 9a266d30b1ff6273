"""The refinement's data term: the Gauss–Newton map direction, the background-phase step and the
preconditioned unrolled descent, checked against dense references and the true maps."""
import numpy as np
import pytest
import torch

from refine_more.config import preset
from refine_more.reconstruction.objective import RefinementObjective as MapDataTerm
from refine_more.physics.scan import ScanPhysics as Problem
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.reconstruction.unrolled import UnrolledPGD


def _subject(acceleration, matrix=(2, 12, 12), snr=1e9, seed=3):
    sim = SimulationConfig(matrix=matrix, n_coils=3, acceleration=acceleration, snr=snr, calib=(2, 4))
    return simulate_subject("sub-ref", sim, seed=seed)


def _true_channels(prob: Problem, reference: dict) -> torch.Tensor:
    """Invert MapScaling: the channels whose physical maps are the reference."""
    s = prob.scaling
    k_mid, k_half = 0.5 * (s.k_band[0] + s.k_band[1]), 0.5 * (s.k_band[1] - s.k_band[0])
    tissue = prob.tissue_np
    f = np.where(tissue, reference["f"], 0.1).clip(1e-4, 0.5)
    k = np.where(tissue, reference["kF"] / f, k_mid)
    c = np.stack([np.where(tissue, reference["I0"], 1.0) / (prob.data_scale * s.I0_scale),
                  np.where(tissue, reference["T1F"], 1.0) / s.T1_scale,
                  np.log(f / (1 - f)),
                  np.arctanh(np.clip((k - k_mid) / k_half, -0.999, 0.999))])
    return torch.from_numpy(c.astype(np.float32))


def test_gauss_newton_direction_is_the_exact_gauss_newton_step_at_full_sampling():
    """With every line sampled AᴴA = diag Σ_c|S_c|², so the per-voxel metric is g's exact
    Gauss–Newton matrix: the direction must solve the dense system built by autograd."""
    subject = _subject(acceleration=1.0)
    assert subject.mask.all()
    cfg = preset("tiny")
    prob = Problem(subject, cfg, torch.device("cpu"))
    q = _true_channels(prob, subject.reference) + 0.05 * torch.randn(4, *subject.shape, generator=torch.Generator().manual_seed(0))
    phase = torch.zeros(subject.shape)  # any φ₀: the metric does not depend on it

    def residual(flat):
        x = torch.polar(prob.signal(flat.view_as(q)), prob.image_phase(phase))
        r = prob.A(x) - prob.kspace
        return torch.cat([r.real.reshape(-1), r.imag.reshape(-1)])

    J = torch.autograd.functional.jacobian(residual, q.reshape(-1))
    H_dense = (2.0 / prob.kspace_energy) * (J.T.double() @ J.double())
    grad = torch.func.grad(lambda c: prob.physics_consistency(c, phase))(q)
    damping = 1e-2
    direction = prob.gauss_newton_direction(q, grad, damping=damping)

    n_vox = int(np.prod(subject.shape))
    tissue_idx = torch.from_numpy(np.flatnonzero(np.broadcast_to(prob.tissue_np, (4,) + subject.shape)))
    H_t = H_dense[tissue_idx][:, tissue_idx]
    voxel = tissue_idx % n_vox
    same = voxel[:, None] == voxel[None, :]
    # the metric is block diagonal here: nothing couples different voxels
    assert float(H_t[~same].abs().max()) < 1e-4 * float(H_t.diagonal().abs().max())
    # Levenberg damping as documented: damping · trace(H_r) / 4 on each voxel's block
    trace_per_voxel = torch.zeros(n_vox, dtype=H_t.dtype).index_add_(0, voxel, H_t.diagonal())
    H_damped = H_t + torch.diag(damping * trace_per_voxel[voxel] / 4)
    expected = torch.linalg.solve(H_damped, grad.reshape(-1)[tissue_idx].double())
    got = direction.reshape(-1)[tissue_idx].double()
    assert float((got - expected).norm() / expected.norm()) < 1e-3
    assert float(direction[:, ~prob.tissue].abs().max()) == 0.0
    # a prior's Hessian diagonal (extra_diagonal, (Z, Y, X, 4)) adds to the same blocks
    extra = torch.rand(*subject.shape, 4, generator=torch.Generator().manual_seed(1)) * float(H_t.diagonal().mean())
    with_prior = prob.gauss_newton_direction(q, grad, damping=damping, extra_diagonal=extra)
    extra_t = extra.permute(3, 0, 1, 2).reshape(-1)[tissue_idx].double()
    expected = torch.linalg.solve(H_damped + torch.diag(extra_t), grad.reshape(-1)[tissue_idx].double())
    got = with_prior.reshape(-1)[tissue_idx].double()
    assert float((got - expected).norm() / expected.norm()) < 1e-3


def test_background_phase_and_phase_step():
    """Noise-free, true maps: φ₀ from the true images makes g ≈ 0; from a perturbed φ₀ at AF 4 the
    Gauss–Newton phase steps decrease g monotonically and bring φ₀ back."""
    full = _subject(acceleration=1.0)
    cfg = preset("tiny")
    prob_full = Problem(full, cfg, torch.device("cpu"))
    q = _true_channels(prob_full, full.reference)
    from refine_more.physics.operators import zero_filled_images
    images = zero_filled_images(torch.from_numpy(full.kspace), prob_full.A.coil_sens)
    phi0 = prob_full.background_phase(images)
    assert float(prob_full.physics_consistency(q, phi0)) < 1e-5

    under = _subject(acceleration=4.0)
    prob = Problem(under, cfg, torch.device("cpu"))
    q = _true_channels(prob, under.reference)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in under.shape], indexing="ij")
    phi = phi0 + torch.from_numpy((0.4 * np.sin(2 * xx + yy) + 0.2 * zz).astype(np.float32))
    tissue = prob.tissue

    def phase_error(p):
        return float(torch.angle(torch.polar(torch.ones_like(p), p - phi0))[tissue].abs().mean())

    values, errors = [float(prob.physics_consistency(q, phi))], [phase_error(phi)]
    for _ in range(8):
        phi = prob.phase_step(q, phi, damping=1e-2)
        values.append(float(prob.physics_consistency(q, phi)))
        errors.append(phase_error(phi))
    assert all(b <= a * (1 + 1e-4) for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.1 * values[0]
    assert errors[-1] < 0.3 * errors[0]


def test_unrolled_descent_gauss_newton_against_plain_gradient():
    """An untrained unroll (identity U-Net) is (preconditioned) gradient descent: every phase
    lowers g from perturbed maps; the Gauss–Newton direction lowers g further and, above all,
    brings T1F and f back where plain gradient steps barely move them (why it is the default)."""
    from refine_more.evaluation.metrics import nrmse
    subject = _subject(acceleration=4.0, matrix=(2, 16, 16), snr=300)
    errors, finals = {}, {}
    for preconditioner in ("gauss-newton", "none"):
        cfg = preset("tiny")
        cfg.unroll.preconditioner = preconditioner
        cfg.unroll.iterations = 3
        prob = Problem(subject, cfg, torch.device("cpu"))
        term = MapDataTerm(prob, cfg.unroll)
        truth = _true_channels(prob, subject.reference)
        # a smooth error, like the INR's (white per-voxel errors at AF 4 are mostly in unsampled
        # k-space, where no data term can see them)
        zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in subject.shape], indexing="ij")
        smooth = np.stack([np.sin(2 * xx + yy + i) + 0.5 * np.cos(3 * yy - xx + 2 * i) for i in range(4)])
        q0 = truth + 0.3 * torch.from_numpy(smooth.astype(np.float32)) * prob.tissue
        phi = torch.zeros(subject.shape)
        for _ in range(20):  # the background phase for the true maps
            phi = prob.phase_step(truth, phi)
        with torch.no_grad():
            outputs = UnrolledPGD(cfg.unroll)(q0, term, phi, prob.tissue)
        values = [float(term.value(q0, phi))] + [float(term.value(q, z)) for q, z in outputs]
        assert all(b < a for a, b in zip(values, values[1:])), (preconditioner, values)
        maps = prob.physical_maps(outputs[-1][0])
        errors[preconditioner] = {p: nrmse(maps[p], subject.reference[p], prob.tissue_np) for p in ("T1F", "f")}
        finals[preconditioner] = values[-1]
    start = prob.physical_maps(q0)
    start_err = {p: nrmse(start[p], subject.reference[p], prob.tissue_np) for p in ("T1F", "f")}
    assert finals["gauss-newton"] < finals["none"]
    for p in ("T1F", "f"):
        assert errors["gauss-newton"][p] < 0.5 * errors["none"][p], (errors, start_err)
        assert errors["none"][p] > 0.5 * start_err[p], (errors, start_err)


def test_bad_refinement_settings_are_rejected():
    subject = _subject(acceleration=4.0)
    cfg = preset("tiny")
    prob = Problem(subject, cfg, torch.device("cpu"))
    cfg.unroll.preconditioner = "newton"
    with pytest.raises(ValueError, match="preconditioner"):
        MapDataTerm(prob, cfg.unroll)
    cfg.unroll.preconditioner, cfg.unroll.gn_damping = "gauss-newton", 0.0
    with pytest.raises(ValueError, match="gn_damping"):
        MapDataTerm(prob, cfg.unroll)


def test_nuisance_step_takes_the_configured_phase_steps_or_none():
    subject = _subject(acceleration=4.0)
    cfg = preset("tiny")
    prob = Problem(subject, cfg, torch.device("cpu"))
    q = _true_channels(prob, subject.reference)
    phi = torch.zeros(subject.shape)
    cfg.unroll.phase_steps = 3
    expected = phi
    for _ in range(3):
        expected = prob.phase_step(q, expected, cfg.unroll.gn_damping)
    assert torch.equal(MapDataTerm(prob, cfg.unroll).nuisance_step(q, phi), expected)
    cfg.unroll.refine_phase = False
    assert MapDataTerm(prob, cfg.unroll).nuisance_step(q, phi) is phi


def _smoothly_perturbed(prob, subject, amplitude=0.3):
    truth = _true_channels(prob, subject.reference)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in subject.shape], indexing="ij")
    smooth = np.stack([np.sin(2 * xx + yy + i) + 0.5 * np.cos(3 * yy - xx + 2 * i) for i in range(4)])
    phi = torch.zeros(subject.shape)
    for _ in range(20):
        phi = prob.phase_step(truth, phi)
    return truth + amplitude * torch.from_numpy(smooth.astype(np.float32)) * prob.tissue, phi


def test_warm_start_descent_is_monotone_and_recovers_the_maps():
    """`descend` never raises g (backtracking), and enough steps undo most of a smooth map error;
    the unroll's forward is exactly its learned iterations applied to the warm start, which is
    detached (no gradient reaches the INR through it)."""
    from refine_more.evaluation.metrics import nrmse
    from refine_more.reconstruction.unrolled import descend
    subject = _subject(acceleration=4.0, matrix=(2, 16, 16), snr=300)
    cfg = preset("tiny")
    prob = Problem(subject, cfg, torch.device("cpu"))
    term = MapDataTerm(prob, cfg.unroll)
    q, phi = _smoothly_perturbed(prob, subject)
    error = lambda c: nrmse(prob.physical_maps(c)["T1F"], subject.reference["T1F"], prob.tissue_np)
    start_error = error(q)
    weight = prob.tissue.float()
    # g after k steps of one descent (the step length carries over between steps), k = 0…12
    values = []
    for k in range(13):
        qk, phik = descend(term, q, phi, weight, steps=k)
        values.append(float(term.value(qk, phik)))
    assert all(b <= a for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.2 * values[0]
    assert error(qk) < 0.3 * start_error, (error(qk), start_error)
    q.requires_grad_()
    same, _ = descend(term, q, phi, weight, steps=0)
    assert torch.equal(same, q) and not same.requires_grad and q.requires_grad  # the caller's tensor untouched
    q = q.detach()

    cfg.unroll.warm_start_steps = 5
    unrolled = UnrolledPGD(cfg.unroll)
    q0, phi0 = _smoothly_perturbed(prob, subject)
    q0.requires_grad_()
    start = unrolled.warm_start(q0, term, phi0, prob.tissue)
    assert not start[0].requires_grad
    expected, _ = descend(term, q0, phi0, weight, steps=5)
    torch.testing.assert_close(start[0], expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(unrolled(q0, term, phi0, prob.tissue)[-1][0],
                                   unrolled.learned_iterations(start[0], term, start[1], prob.tissue)[-1][0], rtol=0, atol=0)
    for bad in (-1, 2.5, True):
        cfg.unroll.warm_start_steps = bad
        with pytest.raises(ValueError, match="warm_start_steps"):
            UnrolledPGD(cfg.unroll)


class _NaNAwayFromStart:
    """A toy data term g(q) = |q − 1|² whose value is NaN at any trial point with q > 1.5, so a full
    step from q = 0 (to 2) must be rejected and a shorter one taken."""
    preconditioned = True

    def value(self, q, z):
        return torch.where((q > 1.5).any(), torch.tensor(float("nan")), ((q - 1) ** 2).sum())

    def direction(self, q, z, grad):
        return grad  # ∇g = 2(q − 1): from 0 the full step overshoots to q = 2

    def nuisance_step(self, q, z):
        return z


def test_descend_rejects_steps_to_non_finite_values():
    from refine_more.reconstruction.unrolled import descend
    q0 = torch.zeros(4, 1, 2, 2)
    q, _ = descend(_NaNAwayFromStart(), q0, None, torch.ones(1, 2, 2), steps=1)
    assert torch.isfinite(q).all() and float(_NaNAwayFromStart().value(q, None)) < 4.0
    assert float(q.max()) <= 1.5


class _CoupledQuadratic:
    """A toy data term g(q, z) = ||M·[q; z] − b||² with a dense, ill-conditioned M that couples
    every voxel and the nuisance z, and a whitening by the diagonal of MᵀM only (as the per-voxel
    metric ignores aliasing and the prior's coupling): L-BFGS must still find the exact minimum."""
    preconditioned = True

    def __init__(self, shape=(4, 1, 3, 3), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.shape, self.n_q = shape, int(np.prod(shape))
        n = self.n_q + int(np.prod(shape[1:]))
        u, _ = torch.linalg.qr(torch.randn(n + 15, n, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        scales = torch.logspace(0, 1, n, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64).add(0.5)
        self.M = (u * scales) @ v.T @ torch.diag(torch.logspace(-1, 1, n, dtype=torch.float64)[torch.randperm(n, generator=g)])
        self.b = torch.randn(n + 15, generator=g, dtype=torch.float64)
        self.scale = (self.M ** 2).sum(0).rsqrt()

    def _x(self, q, z):
        return torch.cat([q.reshape(-1), z.reshape(-1)]).double()

    def value(self, q, z):
        return ((self.M @ self._x(q, z) - self.b) ** 2).sum()  # float64: float32 would limit the solve's accuracy

    def direction(self, q, z, grad):
        return grad * self.scale[: self.n_q].view(self.shape).float() ** 2

    def nuisance_step(self, q, z):
        return z

    def whitening(self, q, z):
        sq = self.scale[: self.n_q].view(self.shape).float()
        sz = self.scale[self.n_q:].view(self.shape[1:]).float()
        return (lambda u: sq * u), (lambda v: sz * v)

    def minimum(self):
        x = torch.linalg.lstsq(self.M, self.b).solution
        return x[: self.n_q].view(self.shape).float(), x[self.n_q:].view(self.shape[1:]).float()


def test_quasi_newton_finds_the_minimum_of_a_coupled_quadratic_jointly_with_the_nuisance():
    from refine_more.reconstruction.unrolled import descend, quasi_newton
    term = _CoupledQuadratic()
    q_star, z_star = term.minimum()
    q0, z0 = torch.zeros(term.shape), torch.zeros(term.shape[1:])
    weight = torch.ones(term.shape[1:])
    q, z = quasi_newton(term, q0, z0, weight, iterations=96, warmup_steps=0)
    assert not q.requires_grad and not z.requires_grad
    torch.testing.assert_close(q, q_star, rtol=0, atol=2e-3 * float(q_star.abs().max()))
    torch.testing.assert_close(z, z_star, rtol=0, atol=2e-3 * float(z_star.abs().max()))
    # the diagonally preconditioned descent (z fixed, as this toy's nuisance step keeps it) is far off
    qd, _ = descend(term, q0, z0, weight, steps=96)
    best = float(term.value(q_star, z_star))
    assert float(term.value(qd, z0)) - best > 100 * (float(term.value(q, z)) - best)
    # the mask: voxels outside `weight` keep their start values, in q and in z
    weight[0, 0, 0] = 0.0
    q_masked, z_masked = quasi_newton(term, q0 + 0.5, z0 + 0.5, weight, iterations=16, warmup_steps=0)
    assert torch.all(q_masked[:, 0, 0, 0] == 0.5) and float(z_masked[0, 0, 0]) == 0.5


def test_lbfgs_warm_start_converges_to_one_minimum_from_different_starts():
    """On a real subject with the map prior, the L-BFGS warm start (maps and background phase
    jointly) never ends above its start, ends lower than the same number of descent steps, and
    brings two different starts (different smooth errors, and φ₀ from zero instead of fitted)
    to the same objective and maps; `UnrolledPGD.warm_start` with `warm_start_solver = "lbfgs"`
    is that solve; unknown solvers are rejected."""
    from refine_more.reconstruction.unrolled import descend, quasi_newton
    subject = _subject(acceleration=4.0, matrix=(2, 16, 16), snr=300)
    cfg = preset("small")
    cfg.unroll.image_phase_order = -1  # one shared phase: this subject has no per-image drift
    prob = Problem(subject, cfg, torch.device("cpu"))
    term = MapDataTerm(prob, cfg.unroll)
    assert term.prior is not None and cfg.unroll.warm_start_solver == "lbfgs"
    weight = prob.tissue.float()
    with np.errstate(all="ignore"):  # k is held fixed in `small`: its channel is 0 (set below)
        truth = _true_channels(prob, subject.reference)
        qa, _ = _smoothly_perturbed(prob, subject)
    truth[3], qa[3] = 0.0, 0.0
    qb = truth * (1 - 0.2 * prob.tissue)  # a uniform 20 % error
    phia = torch.zeros(subject.shape)
    for _ in range(20):
        phia = prob.phase_step(truth, phia)
    phib = torch.zeros(subject.shape)
    ends, descent_ends = [], []
    for q0, phi0 in ((qa, phia), (qb, phib)):
        start_value = float(term.value(term.start(q0), phi0))
        q, phi = quasi_newton(term, term.start(q0), phi0, weight, iterations=160)
        qd, phid = descend(term, term.start(q0), phi0, weight, steps=16 + 160)
        assert float(term.value(q, phi)) <= float(term.value(qd, phid)) <= start_value
        ends.append((q, phi))
        descent_ends.append(float(term.value(qd, phid)))
    (qa, phia), (qb, phib) = ends
    va, vb = float(term.value(qa, phia)), float(term.value(qb, phib))
    # the two L-BFGS ends agree far better than the two descents with the same budget
    assert abs(va - vb) < 2e-3 * va and abs(va - vb) < 0.5 * abs(descent_ends[0] - descent_ends[1]), (va, vb, descent_ends)
    ma, mb = prob.physical_maps(qa), prob.physical_maps(qb)
    tissue = prob.tissue_np
    for name in ("I0", "T1F", "f"):
        gap = np.abs(ma[name] - mb[name])[tissue].mean() / np.abs(ma[name][tissue]).mean()
        assert gap < 0.01, (name, gap)

    cfg.unroll.warm_start_steps = 12
    unrolled = UnrolledPGD(cfg.unroll)
    q0, phi0 = qa + 0.1 * prob.tissue, phia
    got = unrolled.warm_start(q0, term, phi0, prob.tissue)
    expected = quasi_newton(term, q0, phi0, weight, 12)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    cfg.unroll.warm_start_solver = "newton"
    with pytest.raises(ValueError, match="warm_start_solver"):
        UnrolledPGD(cfg.unroll)


def test_the_first_learned_step_computed_once_gives_the_same_outputs_and_gradients():
    """Every training iteration of stage 2 starts from the same warm start, so its first nuisance
    step and direction do not change: `first_step` computed once, then passed, gives the same maps
    and the same parameter gradients (exact backprop on) as computing them each time."""
    subject = _subject(acceleration=4.0)
    cfg = preset("tiny")
    cfg.unroll.create_graph, cfg.unroll.phase_steps = True, 2
    prob = Problem(subject, cfg, torch.device("cpu"))
    term = MapDataTerm(prob, cfg.unroll)
    q, z = _smoothly_perturbed(prob, subject)
    torch.manual_seed(0)
    unrolled = UnrolledPGD(cfg.unroll)
    first = unrolled.first_step(q, term, z)
    runs = []
    for kw in ({}, {"first": first}, {"first": first}):
        unrolled.zero_grad(set_to_none=True)
        outs = unrolled.learned_iterations(q, term, z, prob.tissue, **kw)
        sum(term.value(c, zz) for c, zz in outs).backward()
        runs.append(([c.detach() for c, _ in outs], [p.grad.clone() for p in unrolled.parameters() if p.grad is not None]))
    for maps, grads in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0], maps))
        assert len(grads) == len(runs[0][1]) > 0 and all(torch.equal(a, b) for a, b in zip(runs[0][1], grads))
