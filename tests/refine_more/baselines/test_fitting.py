"""Voxel-wise BTS fit: recovery of known parameters, noise, B1, bounds, degenerate voxels."""
import numpy as np
import pytest
import torch

from refine_more.baselines.fitting import K_BAND, PARAM_BOUNDS, fit_images, fit_voxels
from refine_more.physics.protocol import Protocol
from refine_more.physics.signal_model import BTSModel

# (I0, T1F, f, k): WM-like, GM-like, CSF-like; k inside the band
TISSUES = np.array([
    [1000.0, 0.9, 0.13, 23.0],
    [800.0, 1.5, 0.06, 24.0],
    [1200.0, 4.0, 0.005, 23.0],
])


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # The fit does many small element-wise ops; on a small or busy CPU, torch's intra-op threads
    # can slow it down by 10-100x. Pin to one thread here and restore afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def protocol():
    return Protocol.paper_in_vivo()


@pytest.fixture(scope="module")
def model(protocol):
    return BTSModel(protocol)


def simulate(model, params, b1=None):
    p = torch.as_tensor(np.asarray(params, dtype=np.float64))
    b1t = None if b1 is None else torch.as_tensor(np.asarray(b1, dtype=np.float64))
    return model.magnitude_k(p[:, 0], p[:, 1], p[:, 2], p[:, 3], b1t)


def test_noise_free_recovery(protocol, model):
    S = simulate(model, TISSUES)
    r = fit_voxels(S, protocol)
    for name, col in (("T1F", 1), ("f", 2), ("I0", 0)):
        assert r[name].dtype == np.float32 and r[name].shape == (3,)
        np.testing.assert_allclose(r[name], TISSUES[:, col], rtol=5e-3, err_msg=name)
    np.testing.assert_allclose(r["kF"], r["k"] * r["f"], rtol=1e-5)
    assert np.all(r["residual"] < 1e-6 * TISSUES[:, 0])


def test_zero_width_k_band_holds_k_and_recovers_the_rest(protocol, model):
    """k_band = (23, 23) (the `small` preset's k): k stays 23 and, where the truth is 23, T1F, f
    and I0 are recovered from noise-free data."""
    truth = TISSUES[[0, 2]]                      # the two tissues with k = 23
    r = fit_voxels(simulate(model, truth), protocol, k_band=(23.0, 23.0))
    assert np.all(r["k"] == np.float32(23.0))
    for name, col in (("T1F", 1), ("f", 2), ("I0", 0)):
        np.testing.assert_allclose(r[name], truth[:, col], rtol=5e-3, err_msg=name)


def test_noise_free_recovery_with_b1(protocol, model):
    b1 = np.array([0.75, 1.2, 0.9])
    S = simulate(model, TISSUES, b1)
    r = fit_voxels(S, protocol, torch.as_tensor(b1))
    np.testing.assert_allclose(r["T1F"], TISSUES[:, 1], rtol=5e-3)
    np.testing.assert_allclose(r["f"], TISSUES[:, 2], rtol=5e-3)
    # ignoring a strong B1 error must bias T1F (the fit really uses b1)
    wrong = fit_voxels(S, protocol, None)
    assert abs(wrong["T1F"][0] / TISSUES[0, 1] - 1) > 0.05


@pytest.mark.parametrize("tissue", [0, 1])
def test_noise_snr200(protocol, model, tissue):
    n = 500
    rng = np.random.default_rng(1234 + tissue)
    truth = np.tile(TISSUES[tissue], (n, 1))
    b1 = rng.uniform(0.85, 1.15, n)
    S = simulate(model, truth, b1).numpy()
    noisy = S + rng.normal(0.0, S.max() / 200.0, S.shape)
    r = fit_voxels(torch.as_tensor(noisy), protocol, b1)
    for name, col in (("T1F", 1), ("f", 2)):
        rel_rmse = np.sqrt(np.mean((r[name] / truth[:, col] - 1.0) ** 2))
        assert rel_rmse < 0.05, (name, rel_rmse)
    assert np.all(np.isfinite(r["residual"]))


def test_bounds_respected(protocol, model):
    # data far outside the model's reach: bounds must still hold
    rng = np.random.default_rng(7)
    n = 300
    params = np.column_stack([
        rng.uniform(100, 2000, n), rng.uniform(0.02, 10.0, n), rng.uniform(0.0, 0.8, n), rng.uniform(2.0, 60.0, n)])
    S = simulate(model, params).numpy()
    S = np.abs(S + rng.normal(0.0, 0.05 * S.max(), S.shape))
    r = fit_voxels(S, protocol, k_band=K_BAND)
    lo, hi = PARAM_BOUNDS["T1F"]
    assert r["T1F"].min() >= lo - 1e-6 and r["T1F"].max() <= hi + 1e-6
    lo, hi = PARAM_BOUNDS["f"]
    assert r["f"].min() >= lo and r["f"].max() <= hi + 1e-7
    assert r["k"].min() >= K_BAND[0] - 1e-5 and r["k"].max() <= K_BAND[1] + 1e-5
    assert r["I0"].min() >= 0
    # a custom band is honoured too
    r2 = fit_voxels(S[:, :20], protocol, k_band=(22.0, 24.0))
    assert r2["k"].min() >= 22.0 - 1e-5 and r2["k"].max() <= 24.0 + 1e-5


def test_zero_and_degenerate_voxels(protocol, model):
    S = simulate(model, TISSUES).numpy()
    data = np.zeros((protocol.n_images, 5))
    data[:, 0] = S[:, 0]
    data[:, 2] = np.nan                    # non-finite data
    data[:, 3, ] = 1e-30                   # tiny constant
    r = fit_voxels(data, protocol, np.array([1.0, 1.0, 0.0, np.nan, 1.0]))
    for name, v in r.items():
        assert np.all(np.isfinite(v)), name
    assert r["I0"][1] == 0 and r["I0"][4] == 0 and r["I0"][2] == 0
    np.testing.assert_allclose(r["T1F"][0], TISSUES[0, 1], rtol=5e-3)


def test_chunking_matches(protocol, model):
    rng = np.random.default_rng(3)
    truth = TISSUES[rng.integers(0, 3, 40)]
    S = simulate(model, truth).numpy()
    noisy = S + rng.normal(0.0, S.max() / 100, S.shape)
    a = fit_voxels(noisy, protocol)
    b = fit_voxels(noisy, protocol, chunk_size=7, num_threads=1)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_fit_images_complex_masked(protocol, model):
    Z, Y, X = 2, 3, 4
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, (Z, Y, X))
    mask = np.ones((Z, Y, X), bool)
    mask[0, 0, :] = False
    b1 = rng.uniform(0.9, 1.1, (Z, Y, X))
    truth = TISSUES[labels.reshape(-1)]
    mag = simulate(model, truth, b1.reshape(-1)).numpy().reshape(protocol.n_images, Z, Y, X)
    phase = rng.uniform(-np.pi, np.pi, (Z, Y, X))[None] + 0.3 * np.asarray(protocol.saturation)[:, None, None, None]
    images = torch.as_tensor(mag * np.exp(1j * phase)).to(torch.complex64)
    maps = fit_images(images, protocol, b1, mask)
    assert set(maps) >= {"I0", "T1F", "f", "kF", "k"}
    for name, m in maps.items():
        assert m.shape == (Z, Y, X) and m.dtype == np.float32
        assert np.all(m[~mask] == 0), name
    t1 = truth[:, 1].reshape(Z, Y, X)
    f = truth[:, 2].reshape(Z, Y, X)
    # complex64 input: single precision limits the accuracy somewhat
    np.testing.assert_allclose(maps["T1F"][mask], t1[mask], rtol=5e-3)
    np.testing.assert_allclose(maps["f"][mask], f[mask], rtol=2e-2, atol=1e-4)
    # same answer from real numpy magnitudes
    maps2 = fit_images(np.abs(images.numpy()), protocol, torch.as_tensor(b1), torch.as_tensor(mask))
    np.testing.assert_allclose(maps2["T1F"], maps["T1F"], rtol=1e-6)
