"""The LLR baseline (refine_more/baselines/llr.py): its proximal operator against a per-block float64
reference, and FISTA against the data on a simulated subject."""
import numpy as np
import pytest
import torch

from refine_more.baselines.llr import llr_reconstruct, llr_threshold, operator_norm
from refine_more.physics.operators import MultiCoilCartesian, zero_filled_images
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject


def _reference_threshold(X, block, threshold, shift):
    """Loop over the blocks of the shifted, zero-padded volume; numpy SVD of each Casorati matrix."""
    T, shape = X.shape[0], X.shape[1:]
    Xs = np.roll(X, shift, axis=(1, 2, 3))
    padded = [n + (-n) % b for n, b in zip(shape, block)]
    P = np.zeros((T, *padded), dtype=X.dtype)
    P[:, :shape[0], :shape[1], :shape[2]] = Xs
    out = np.zeros_like(P)
    for z in range(0, padded[0], block[0]):
        for y in range(0, padded[1], block[1]):
            for x in range(0, padded[2], block[2]):
                sl = (slice(None), slice(z, z + block[0]), slice(y, y + block[1]), slice(x, x + block[2]))
                C = P[sl].reshape(T, -1).T                                   # voxels × images
                U, s, Vh = np.linalg.svd(C, full_matrices=False)
                out[sl] = ((U * np.maximum(s - threshold, 0)) @ Vh).T.reshape(P[sl].shape)
    return np.roll(out[:, :shape[0], :shape[1], :shape[2]], [-v for v in shift], axis=(1, 2, 3))


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 2, 3)])
def test_threshold_matches_per_block_svd(shift):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 6, 10, 9)) + 1j * rng.standard_normal((5, 6, 10, 9))
    block, thr = (3, 4, 4), 1.5
    got = llr_threshold(torch.from_numpy(X), block, thr, shift).numpy()
    np.testing.assert_allclose(got, _reference_threshold(X, block, thr, shift), atol=1e-10)
    # zero threshold: the identity (padding and shifts undone exactly)
    np.testing.assert_allclose(llr_threshold(torch.from_numpy(X), block, 0.0, shift).numpy(), X, atol=1e-10)


def test_threshold_keeps_a_low_rank_block_and_removes_noise():
    """A block whose images are one curve times one spatial pattern is rank 1: a threshold below
    its singular value keeps it (shrunk by the threshold), one above removes it."""
    rng = np.random.default_rng(1)
    pattern, curve = rng.standard_normal((4, 4, 4)), rng.standard_normal(6)
    X = torch.from_numpy(curve[:, None, None, None] * pattern[None])
    sigma = float(np.linalg.norm(pattern) * np.linalg.norm(curve))
    kept = llr_threshold(X, (4, 4, 4), 0.25 * sigma).numpy()
    np.testing.assert_allclose(kept, 0.75 * X.numpy(), atol=1e-10)
    assert np.abs(llr_threshold(X, (4, 4, 4), 1.01 * sigma).numpy()).max() < 1e-12


def test_llr_reconstruction_fits_the_data_and_beats_zero_filling():
    subject = simulate_subject("sub-l01", SimulationConfig(matrix=(6, 24, 24), n_coils=4), seed=11)
    A = MultiCoilCartesian(torch.from_numpy(subject.coil_sens), torch.from_numpy(subject.mask))
    assert 0.5 < operator_norm(A) <= 1.0 + 1e-4  # coil maps normalised: ‖AᴴA‖ ≤ 1
    images, history = llr_reconstruct(subject.kspace, subject.coil_sens, subject.mask, iters=80)
    assert images.shape == (subject.n_images, *subject.shape) and torch.isfinite(images.abs()).all()
    assert history[-1] < 0.5 * history[0]  # zero-filled start → consistent with the samples
    truth = zero_filled_images(torch.from_numpy(subject.reference["kspace_full"]), torch.from_numpy(subject.coil_sens))
    zf = zero_filled_images(torch.from_numpy(subject.kspace), torch.from_numpy(subject.coil_sens))
    err = lambda x: float((x - truth).abs().pow(2).sum().sqrt() / truth.abs().pow(2).sum().sqrt())
    assert err(images) < 0.7 * err(zf), (err(images), err(zf))
