"""NRMSE (eq. 16), SSIM, ROI means and per-parameter scores."""
import numpy as np
import pytest

from refine_more.evaluation.metrics import nrmse, roi_means, score_maps, ssim, ssim_map


def smooth_image(shape=(3, 32, 40), seed=0):
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    return 1.0 + np.sin(x / 5.0) * np.cos(y / 7.0) + 0.2 * z + 0.05 * rng.standard_normal(shape)


def test_nrmse_hand_computed():
    ref = np.array([[[3.0, 4.0], [100.0, 0.0]]])
    est = np.array([[[3.0, 5.0], [-7.0, 9.0]]])
    mask = np.array([[[True, True], [False, False]]])
    # inside the mask: ‖(0, 1)‖ / ‖(3, 4)‖ = 1 / 5
    assert nrmse(est, ref, mask) == pytest.approx(20.0)
    assert nrmse(ref, ref, mask) == 0.0
    assert np.isnan(nrmse(est, np.zeros_like(ref), mask))


def test_ssim_identical_is_one():
    ref = smooth_image()
    mask = np.ones(ref.shape, bool)
    mask[:, :4] = False
    assert ssim(ref, ref, mask) == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(ssim_map(ref, ref, 1.0)[mask], 1.0)


def test_ssim_decreases_with_noise():
    ref = smooth_image()
    mask = np.ones(ref.shape, bool)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(ref.shape)
    values = [ssim(ref + s * noise, ref, mask) for s in (0.0, 0.01, 0.05, 0.2, 1.0)]
    assert values[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.5


def test_ssim_symmetric_and_bounded():
    ref = smooth_image()
    est = smooth_image(seed=9) * 1.1
    mask = np.ones(ref.shape, bool)
    a = ssim(est, ref, mask, data_range=3.0)
    b = ssim(ref, est, mask, data_range=3.0)
    assert a == pytest.approx(b, rel=1e-12)
    assert -1.0 <= a < 1.0


def test_ssim_slicewise_and_window():
    # a single bright voxel in slice 0 must not change slice 1 (2D, slice-wise), and affects only
    # an 11×11 neighbourhood within that slice
    ref = np.zeros((2, 30, 30))
    ref[:, 10:20, 10:20] = 1.0
    est = ref.copy()
    est[0, 15, 15] += 0.5
    s = ssim_map(est, ref, 1.0)
    assert np.allclose(s[1], 1.0)
    changed = np.argwhere(np.abs(s[0] - 1.0) > 1e-12)
    assert changed[:, 0].min() >= 10 and changed[:, 0].max() <= 20
    assert changed[:, 1].min() >= 10 and changed[:, 1].max() <= 20


def test_ssim_default_data_range_uses_mask():
    ref = smooth_image()
    mask = np.ones(ref.shape, bool)
    mask[:, :, :5] = False
    est = ref + 0.05 * np.random.default_rng(2).standard_normal(ref.shape)
    dr = ref[mask].max() - ref[mask].min()
    assert ssim(est, ref, mask) == pytest.approx(ssim(est, ref, mask, data_range=dr))
    # values outside the mask do not matter
    est2 = est.copy()
    est2[~mask] = 1e6
    assert ssim(est2, ref, mask) == pytest.approx(ssim(est, ref, mask))


def test_roi_means():
    labels = np.array([[[0, 1, 1], [2, 2, 0]]])
    maps = {"T1F": np.array([[[9.0, 1.0, 3.0], [5.0, 7.0, 9.0]]]), "f": np.ones((1, 2, 3))}
    out = roi_means(maps, labels, ["wm", "gm", "csf"])
    assert out["wm"]["T1F"] == pytest.approx(2.0)
    assert out["gm"]["T1F"] == pytest.approx(6.0)
    assert out["gm"]["f"] == pytest.approx(1.0)
    assert np.isnan(out["csf"]["T1F"])


def test_score_maps():
    ref = {"I0": smooth_image(), "T1F": smooth_image(seed=3)}
    est = {k: v * 1.02 for k, v in ref.items()}
    est["f"] = np.zeros_like(ref["I0"])
    mask = np.ones(ref["I0"].shape, bool)
    s = score_maps(est, ref, mask)
    assert set(s) == {"I0", "T1F"}
    assert s["I0"]["nrmse"] == pytest.approx(2.0)
    assert 0.9 < s["T1F"]["ssim"] <= 1.0
    with pytest.raises(KeyError):
        score_maps({"I0": est["I0"]}, ref, mask)
