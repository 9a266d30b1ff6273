"""Multi-coil Cartesian forward model A = U·F·C and its adjoint (torch, differentiable).

FFT convention of the spec: centred, orthonormal, over the three spatial axes:
    image = fftshift(ifftn(ifftshift(kspace), norm="ortho")), kspace = fftshift(fftn(ifftshift(image), norm="ortho")).
Shapes: images (T, Z, Y, X); k-space (T, C, Z, Y, X); coil maps (C, Z, Y, X); mask (T, Z, Y)
(a phase-encode line (y, z) is sampled for every x).
"""
from __future__ import annotations

import numpy as np
import torch

SPATIAL = (-3, -2, -1)


def fft3c(x: torch.Tensor) -> torch.Tensor:
    x = torch.fft.ifftshift(x, dim=SPATIAL)
    x = torch.fft.fftn(x, dim=SPATIAL, norm="ortho")
    return torch.fft.fftshift(x, dim=SPATIAL)


def ifft3c(k: torch.Tensor) -> torch.Tensor:
    k = torch.fft.ifftshift(k, dim=SPATIAL)
    k = torch.fft.ifftn(k, dim=SPATIAL, norm="ortho")
    return torch.fft.fftshift(k, dim=SPATIAL)


def fft3c_np(x: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=SPATIAL), axes=SPATIAL, norm="ortho"), axes=SPATIAL)


def ifft3c_np(k: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(k, axes=SPATIAL), axes=SPATIAL, norm="ortho"), axes=SPATIAL)


class MultiCoilCartesian:
    """A: (T, Z, Y, X) complex images → (T, C, Z, Y, X) sampled k-space.

    `forward` returns zeros where the mask is 0 (so A = U F C literally); `adjoint` = Cᴴ Fᴴ U.
    """

    def __init__(self, coil_sens: torch.Tensor, mask: torch.Tensor):
        if coil_sens.dim() != 4:
            raise ValueError(f"coil_sens must be (C, Z, Y, X), got {tuple(coil_sens.shape)}")
        if mask.dim() != 3 or tuple(mask.shape[1:]) != tuple(coil_sens.shape[1:3]):
            raise ValueError(f"mask must be (T, Z, Y) matching coil maps {tuple(coil_sens.shape)}, got {tuple(mask.shape)}")
        self.coil_sens = coil_sens
        # (T, 1, Z, Y, 1) so it broadcasts over coils and readout
        self.mask = mask.to(coil_sens.real.dtype)[:, None, :, :, None]
        self.n_images = mask.shape[0]

    @property
    def ishape(self):
        return (self.n_images,) + tuple(self.coil_sens.shape[1:])

    @property
    def oshape(self):
        return (self.n_images,) + tuple(self.coil_sens.shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape) != self.ishape:
            raise ValueError(f"A: expected images of shape {self.ishape}, got {tuple(images.shape)}")
        return fft3c(images[:, None] * self.coil_sens[None]) * self.mask

    def adjoint(self, kspace: torch.Tensor) -> torch.Tensor:
        if tuple(kspace.shape) != self.oshape:
            raise ValueError(f"Aᴴ: expected k-space of shape {self.oshape}, got {tuple(kspace.shape)}")
        return (ifft3c(kspace * self.mask) * self.coil_sens.conj()[None]).sum(dim=1)

    __call__ = forward

    def normal(self, images: torch.Tensor) -> torch.Tensor:
        return self.adjoint(self.forward(images))


def zero_filled_images(kspace: torch.Tensor, coil_sens: torch.Tensor) -> torch.Tensor:
    """Coil-combined zero-filled images Σ_c conj(S_c) Fᴴ k_c / Σ_c |S_c|² (T, Z, Y, X)."""
    coil_img = ifft3c(kspace)
    num = (coil_img * coil_sens.conj()[None]).sum(dim=1)
    den = (coil_sens.abs() ** 2).sum(dim=0)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
