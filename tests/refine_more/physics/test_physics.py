"""BTS signal model and protocol: references, limits, gradients."""
import numpy as np
import pytest
import torch

from refine_more.physics.protocol import Protocol, super_lorentzian
from refine_more.physics.signal_model import BTSModel, ernst


def iterate_to_steady_state(I0, T1F, f, k, protocol, b1=1.0, n_tr=3000):
    """Obviously-correct float64 reference: play the sequence TR by TR until it settles."""
    c = protocol.constants()
    out = []
    for t in range(protocol.n_images):
        alpha = c["alpha_rad"][t] * b1
        TR = c["TR_s"][t]
        E_W0 = np.exp(-c["W0"][t] * b1**2 * c["tau_exc_s"])
        E_W = np.exp(-c["W_sat"] * b1**2 * c["tau_sat_s"]) if c["saturation"][t] else 1.0
        Ek = np.exp(-k * TR)
        X = np.array([[1 - f + f * Ek, (1 - f) * (1 - Ek)], [f - f * Ek, f + Ek - f * Ek]])
        E1 = np.array([np.exp(-TR / T1F), np.exp(-TR / c["T1R_s"])])
        m_eq = np.array([1 - f, f])
        m = m_eq.copy()
        for _ in range(n_tr):
            signal = m[0] * np.sin(alpha)
            m = np.array([m[0] * np.cos(alpha), m[1] * E_W0 * E_W])
            m = E1 * m + (1 - E1) * m_eq
            m = X @ m
        out.append(I0 * signal)
    return np.array(out)


@pytest.fixture(scope="module")
def protocol():
    return Protocol.paper_in_vivo()


def test_protocol_constants_match_literature(protocol):
    # K_BS = 74.0 rad/G² for an 8 ms Fermi at 4 kHz (Sacolick 2010) with the spec's default shape
    assert protocol.K_BS_rad_per_G2 == pytest.approx(74.0, rel=2e-3)
    # G0 default = super-Lorentzian at 1140 Hz, T2R = 12 us (qMRLab's on-resonance extrapolation)
    assert super_lorentzian(1140.0, 12e-6) == pytest.approx(protocol.G0_s, rel=1e-2)
    # 40° hard pulse of 0.5 ms: W0 ≈ 86 1/s, E_W0 ≈ 0.958
    w0 = protocol.W0_nominal()[3]
    assert w0 == pytest.approx(86.0, rel=1e-2)
    assert np.exp(-w0 * 500e-6) == pytest.approx(0.958, abs=1e-3)


def test_matches_float64_iterative_reference(protocol):
    model = BTSModel(protocol)
    for I0, T1F, f, k, b1 in [(1.0, 0.85, 0.14, 23.0, 1.0), (2.5, 1.4, 0.06, 30.0, 0.8), (0.7, 3.5, 0.01, 15.0, 1.2)]:
        ref = iterate_to_steady_state(I0, T1F, f, k, protocol, b1)
        got = model.magnitude_k(*(torch.tensor([v], dtype=torch.float64) for v in (I0, T1F, f, k)),
                                b1=torch.tensor([b1], dtype=torch.float64))[:, 0].numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-9)
        got32 = model.magnitude_k(*(torch.tensor([v], dtype=torch.float32) for v in (I0, T1F, f, k)),
                                  b1=torch.tensor([b1]))[:, 0].numpy()
        np.testing.assert_allclose(got32, ref, rtol=1e-5)


def test_f_to_zero_is_ernst(protocol):
    model = BTSModel(protocol)
    T1 = torch.tensor([0.8, 1.3, 4.0], dtype=torch.float64)
    I0 = torch.ones_like(T1)
    for f0 in (0.0, 1e-9):
        s = model.magnitude(I0, T1, torch.full_like(T1, f0), torch.full_like(T1, 2.0)).numpy()
        c = protocol.constants()
        expected = ernst(1.0, T1.numpy()[None], c["alpha_rad"][:, None], c["TR_s"][:, None])
        np.testing.assert_allclose(s, expected, rtol=1e-6)


def test_saturation_lowers_signal_in_tissue(protocol):
    model = BTSModel(protocol)
    s = model.magnitude(torch.ones(2), torch.tensor([0.85, 1.4]), torch.tensor([0.13, 0.06]), torch.tensor([3.0, 1.4]))
    n = protocol.n_images // 2
    assert torch.all(s[n:] < s[:n])


def test_gradients_match_finite_differences(protocol):
    model = BTSModel(protocol)
    gen = torch.Generator().manual_seed(0)
    n = 5
    params = [
        (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_(),
        (0.6 + 2 * torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_(),
        (0.02 + 0.2 * torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_(),
        (0.5 + 5 * torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_(),
    ]
    b1 = (0.8 + 0.4 * torch.rand(n, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c, d, e: model.magnitude(a, b, c, d, e), (*params, b1))
    assert torch.autograd.gradcheck(lambda a, b, c, d, e: torch.view_as_real(model.complex_images(a, b, c, d, e)),
                                    (*params, b1))


def test_finite_over_parameter_box(protocol):
    model = BTSModel(protocol)
    grid = torch.meshgrid(
        torch.tensor([0.0, 1e-3, 10.0]),            # I0
        torch.tensor([0.05, 0.5, 2.0, 6.0]),        # T1F (s)
        torch.tensor([0.0, 1e-4, 0.1, 0.5, 0.99]),  # f
        torch.tensor([0.0, 0.1, 5.0, 50.0]),        # kF (1/s)
        torch.tensor([0.3, 1.0, 1.8]),              # b1
        indexing="ij")
    I0, T1F, f, kF, b1 = (g.reshape(-1).requires_grad_() for g in grid)
    s = model.complex_images(I0, T1F, f, kF, b1)
    assert torch.isfinite(torch.view_as_real(s)).all()
    torch.view_as_real(s).sum().backward()
    for p in (I0, T1F, f, kF, b1):
        assert torch.isfinite(p.grad).all()


def test_bloch_siegert_phase_only_on_saturated_images(protocol):
    model = BTSModel(protocol)
    b1 = torch.tensor([1.0, 1.2])
    phi = model.bloch_siegert_phase(b1, b1)
    sat = torch.tensor(protocol.saturation, dtype=torch.bool)
    assert torch.all(phi[~sat] == 0)
    np.testing.assert_allclose(phi[sat][0].numpy(), protocol.phi_bs_nominal * np.array([1.0, 1.44]), rtol=1e-6)
    # φ = K_BS · B1max² with B1max in gauss
    assert protocol.phi_bs_nominal == pytest.approx(protocol.K_BS_rad_per_G2 * (7.3e-2) ** 2)


def test_protocol_attrs_round_trip(protocol):
    assert Protocol.from_attrs(protocol.to_attrs()) == protocol
    with pytest.raises(ValueError, match="one entry per image"):
        Protocol(flip_angles_deg=(5, 10), saturation=(0,), TR_s=0.04)


def test_prepared_model_is_the_model_for_its_b1(protocol):
    """The refinement's S(Q) with its b1 factors computed once (PreparedBTS) equals magnitude_k,
    values and gradients, for a single TR and for a TR per image."""
    import dataclasses

    g = torch.Generator().manual_seed(4)
    n = 50
    b1 = 0.85 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    for proto in (protocol, dataclasses.replace(protocol, TR_s=tuple(0.03 + 0.005 * i for i in range(protocol.n_images)))):
        model = BTSModel(proto)
        params = [(0.5 + torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(),
                  (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(),
                  (0.05 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(),
                  (20 + 6 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()]
        prepared = model.prepare(b1, torch.float64)
        a = prepared.magnitude_k(*params)
        ga = torch.autograd.grad(a.sum(), params)
        # reference: the per-image steady state solved as a 2×2 linear system (module docstring)
        c = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in proto.constants().items()}
        I0, T1F, f, k = params
        ref = []
        for t in range(proto.n_images):
            TR, alpha = c["TR_s"][t], c["alpha_rad"][t] * b1
            E_W0 = torch.exp(-c["W0"][t] * b1 ** 2 * c["tau_exc_s"])
            E_W = torch.exp(-c["W_sat"] * b1 ** 2 * c["tau_sat_s"]) if c["saturation"][t] > 0 else torch.ones_like(b1)
            E1F, E1R, Ek = torch.exp(-TR / T1F), torch.exp(-TR / c["T1R_s"]), torch.exp(-k * TR)
            X = torch.stack([torch.stack([1 - f + f * Ek, (1 - f) * (1 - Ek)], -1),
                             torch.stack([f - f * Ek, f + Ek - f * Ek], -1)], -2)            # (n, 2, 2)
            D = torch.diag_embed(torch.stack([E1F * torch.cos(alpha), E1R * E_W0 * E_W], -1))
            r = torch.stack([(1 - E1F) * (1 - f), (1 - E1R) * f], -1)[..., None]
            m = torch.linalg.solve(torch.eye(2, dtype=torch.float64) - X @ D, X @ r)[..., 0, 0]
            ref.append(I0 * torch.sin(alpha) * m)
        ref = torch.stack(ref)
        gr = torch.autograd.grad(ref.sum(), params)
        assert torch.allclose(a, ref, rtol=1e-10, atol=1e-12)
        assert all(torch.allclose(x, y, rtol=1e-8, atol=1e-12) for x, y in zip(ga, gr))
        assert torch.allclose(model.magnitude_k(*params, b1), a)


@pytest.mark.parametrize("band", [(20.0, 26.0), (23.0, 23.0)])
def test_map_scaling_to_channels_inverts_to_physical(band):
    """The QC turns the LLR fit's maps into channels (reconstruction/qc.py): the way back is exact
    inside the ranges, f and k are kept off the ends where the channels would be infinite."""
    from refine_more.physics.scaling import MapScaling
    scaling = MapScaling(I0_scale=2.5, k_band=band)
    maps = {"I0": torch.tensor([0.5, 1.0, 3.0, 0.2]), "T1F": torch.tensor([0.3, 0.9, 1.5, 4.0]),
            "f": torch.tensor([0.005, 0.13, 0.06, 0.3]), "k": torch.tensor([21.0, 23.0, 24.5, 25.9])}
    if band[0] == band[1]:
        maps["k"] = torch.full((4,), band[0])
    back = scaling.to_physical(scaling.to_channels(maps))
    for name in maps:
        torch.testing.assert_close(back[name], maps[name], rtol=1e-4, atol=1e-6)
    ends = {**maps, "f": torch.tensor([0.0, 1.0, 0.5, 0.5]), "k": torch.full((4,), band[1])}
    assert torch.isfinite(scaling.to_channels(ends)).all()
