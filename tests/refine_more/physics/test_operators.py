"""Multi-coil Cartesian operator: adjointness, identity at full sampling, FFT convention."""
import numpy as np
import sigpy as sp
import sigpy.mri
import torch

from refine_more.physics.operators import MultiCoilCartesian, fft3c, ifft3c, zero_filled_images


def _normalised_coils(shape, n_coils=4):
    maps = sigpy.mri.birdcage_maps((n_coils,) + shape).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    return torch.from_numpy(maps)


def test_adjoint_complex64():
    gen = torch.Generator().manual_seed(1)
    T, shape = 8, (6, 24, 24)
    coils = _normalised_coils(shape)
    mask = torch.rand((T,) + shape[:2], generator=gen) < 0.3
    A = MultiCoilCartesian(coils, mask)
    x = torch.randn(A.ishape, dtype=torch.complex64, generator=gen)
    y = torch.randn(A.oshape, dtype=torch.complex64, generator=gen)
    lhs = torch.vdot(A(x).reshape(-1), y.reshape(-1))
    rhs = torch.vdot(x.reshape(-1), A.adjoint(y).reshape(-1))
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


def test_full_sampling_normal_operator_is_identity():
    T, shape = 3, (6, 24, 24)
    coils = _normalised_coils(shape)
    A = MultiCoilCartesian(coils, torch.ones((T,) + shape[:2], dtype=torch.bool))
    x = torch.randn(A.ishape, dtype=torch.complex64)
    torch.testing.assert_close(A.normal(x), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zero_filled_images(A(x), coils), x, atol=1e-5, rtol=1e-5)


def test_fft_convention_matches_spec_and_sigpy():
    x = np.random.default_rng(0).standard_normal((2, 5, 6, 7)) + 0j
    k = fft3c(torch.from_numpy(x)).numpy()
    spec = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=(-3, -2, -1)), axes=(-3, -2, -1), norm="ortho"), axes=(-3, -2, -1))
    np.testing.assert_allclose(k, spec, atol=1e-12)
    np.testing.assert_allclose(k, sp.fft(x, axes=(-3, -2, -1)), atol=1e-12)  # sigpy's centred ortho FFT
    np.testing.assert_allclose(ifft3c(torch.from_numpy(k)).numpy(), x, atol=1e-12)
    # a constant image has all its energy at the k-space origin n // 2
    k1 = fft3c(torch.ones(1, 5, 6, 7, dtype=torch.complex128)).numpy()
    assert np.unravel_index(np.abs(k1).argmax(), k1.shape) == (0, 2, 3, 3)


def test_modulated_operator_equals_the_shifted_one():
    """For even sizes A folds the centring shifts into signs on the coil maps and the mask; it must
    give fftshift∘fftn∘ifftshift exactly (complex128), and odd sizes keep the shifts."""
    from refine_more.physics.operators import centring_modulation
    gen = torch.Generator().manual_seed(3)
    for shape in ((6, 24, 24), (4, 10, 6), (2, 6, 10), (5, 6, 8)):
        T, C = 3, 2
        coils = torch.randn((C,) + shape, dtype=torch.complex128, generator=gen)
        mask = torch.rand((T,) + shape[:2], generator=gen) < 0.5
        A = MultiCoilCartesian(coils, mask)
        assert (A._coils_mod is None) == (centring_modulation(shape) is None) == any(n % 2 for n in shape)
        x = torch.randn(A.ishape, dtype=torch.complex128, generator=gen)
        y = torch.randn(A.oshape, dtype=torch.complex128, generator=gen)
        m = mask.to(torch.float64)[:, None, :, :, None]
        torch.testing.assert_close(A(x), fft3c(x[:, None] * coils[None]) * m, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(A.adjoint(y), (ifft3c(y * m) * coils.conj()[None]).sum(1), atol=1e-12, rtol=1e-12)


def test_images_subset_is_the_operator_of_those_images_and_checks_bounds():
    import pytest
    gen = torch.Generator().manual_seed(5)
    coils = _normalised_coils((4, 12, 10))
    mask = torch.rand((6, 4, 12), generator=gen) < 0.5
    A = MultiCoilCartesian(coils, mask)
    x = torch.randn(A.ishape, dtype=torch.complex64, generator=gen)
    sub = A.images_subset(2, 5)
    assert sub.ishape == (3, 4, 12, 10)
    torch.testing.assert_close(sub(x[2:5]), A(x)[2:5])
    for bad in ((5, 7), (-1, 2), (3, 3)):
        with pytest.raises(ValueError, match="images_subset"):
            A.images_subset(*bad)
