"""The simulator's k-space, built one image at a time (memory at the paper's size): noise-free it is
the centred FFT of images × coils; its noise has the asked SD in both parts."""
import numpy as np

from refine_more.evaluation.simulate import noisy_kspace
from refine_more.physics.operators import fft3c_np


def test_noise_free_kspace_is_the_fft_of_coil_images():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((3, 4, 8, 6)) + 1j * rng.standard_normal((3, 4, 8, 6))
    coils = (rng.standard_normal((5, 4, 8, 6)) + 1j * rng.standard_normal((5, 4, 8, 6))).astype(np.complex64)
    out = noisy_kspace(images, coils, 0.0, np.random.default_rng(1))
    assert out.dtype == np.complex64 and out.shape == (3, 5, 4, 8, 6)
    np.testing.assert_allclose(out, fft3c_np(images[:, None] * coils[None]), rtol=1e-5, atol=1e-5)


def test_noise_has_the_asked_sd():
    images = np.zeros((2, 8, 16, 16), dtype=np.complex128)
    coils = np.ones((3, 8, 16, 16), dtype=np.complex64)
    out = noisy_kspace(images, coils, 0.5, np.random.default_rng(2))
    assert np.isclose(out.real.std(), 0.5 / np.sqrt(2), rtol=0.05)
    assert np.isclose(out.imag.std(), 0.5 / np.sqrt(2), rtol=0.05)
    assert abs(np.corrcoef(out.real.ravel(), out.imag.ravel())[0, 1]) < 0.05
