"""INR initialisation module (paper §2.2, Fig. 1A).

- hash 1 on the image coordinate t and hash 2 on (x, y, z), concatenated, → MLP1 → complex
  weighted images W⁽⁰⁾ for every voxel and image (eq. 3);
- hash 3 on (x, y, z) → MLP2 → the four maps Q⁽⁰⁾ (eq. 5).

All coordinates are a fixed voxel grid, so the torch backend uses the encodings' precomputed
sparse interpolation (`HashEncoding.precompute`); with tinycudann on CUDA the coordinates go
to tcnn directly.

Maps are produced in *normalised units* (`MapScaling`): the U-Net of the refinement stage and
the INR both work on O(1) channels, and `MapScaling.to_physical` applies the output constraints
of §3.3 (|·| for I0 and T1F, a sigmoid for f) and this project's constraint on the exchange
rate: k = kF / f is held in `k_band` (tanh; a band of zero width holds k fixed), so kF = k·f
(spec, Identifiability).
"""
from __future__ import annotations


import torch
from torch import nn

from refine_more.config import INRConfig
from refine_more.networks.encoding import HashEncoding, tcnn_available



def mlp(n_in: int, n_out: int, hidden: int, layers: int) -> nn.Sequential:
    mods, width = [], n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, n_out))
    return nn.Sequential(*mods)


def grid_coordinates(shape, device=None) -> torch.Tensor:
    """(Z·Y·X, 3) coordinates in [0, 1], columns (x, y, z), voxel centres, C order over (z, y, x)."""
    axes = [(torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n for n in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1), zz.reshape(-1)], dim=1)


class INR(nn.Module):
    """Weighted images W⁽⁰⁾ (T, Z, Y, X) complex and map channels Q⁽⁰⁾ (4, Z, Y, X)."""

    def __init__(self, n_images: int, shape, config: INRConfig, seed: int = 0):
        super().__init__()
        self.n_images, self.shape, self.config = n_images, tuple(shape), config
        backend = config.hash_backend
        self.hash_time = HashEncoding(config.time_input_dims, config.hash_time, backend=backend,
                                      seed=seed + 1)                                            # hash 1
        self.hash_images = HashEncoding(3, config.hash_images, backend=backend, seed=seed + 2)  # hash 2
        self.hash_maps = HashEncoding(3, config.hash_maps, backend=backend, seed=seed + 3)      # hash 3
        self.mlp_images = mlp(self.hash_time.n_output_dims + self.hash_images.n_output_dims, 2,
                              config.mlp_hidden, config.mlp_layers)                              # MLP1
        self.mlp_maps = mlp(self.hash_maps.n_output_dims, 4, config.mlp_hidden, config.mlp_layers)  # MLP2
        # start the map head at a neutral point: the last layer's bias gives the initial channels
        with torch.no_grad():
            self.mlp_maps[-1].weight.mul_(0.1)
        self._points = None
        self.image_coordinates = None   # t of each image in [0, 1]; None: (i + 0.5) / T

    def set_image_coordinates(self, t) -> None:
        """Place the images at these t in [0, 1] (e.g. the acquired ones of a larger series, or
        coordinates never acquired, to synthesise them); None restores (i + 0.5) / T."""
        self.image_coordinates = None if t is None else torch.as_tensor(t, dtype=torch.float32).reshape(-1)
        if self.image_coordinates is not None:
            self.n_images = int(self.image_coordinates.numel())
        self._points = None

    def release_points(self) -> None:
        """Drop the precomputed interpolation matrices (≈ 1.5 GiB at 48×176×176 with `small`'s hashes)
        while nothing evaluates the INR; the next evaluation rebuilds them."""
        self._points = None

    # the temporal / spatial parts of the module, as adaptation freezes or retrains them
    def temporal_modules(self):
        return [self.hash_time, self.mlp_images, self.mlp_maps]

    def spatial_modules(self):
        return [self.hash_images, self.hash_maps]

    def set_map_bias(self, raw: torch.Tensor):
        with torch.no_grad():
            self.mlp_maps[-1].bias.copy_(raw)

    def _inputs(self, device):
        """(hash 2 input, hash 1 input, hash 3 input) for the voxel grid, built once per device:
        coordinates for tcnn, precomputed interpolation matrices for the torch backend."""
        if self._points is None or self._points[0] != device:
            xyz = grid_coordinates(self.shape, device)
            t = (((torch.arange(self.n_images, dtype=torch.float32, device=device) + 0.5) / self.n_images)
                 if self.image_coordinates is None else self.image_coordinates.to(device))[:, None]
            # (t, 0, …): the public code's 2-D hash 1 on a line (see INRConfig.time_input_dims)
            t = torch.cat([t, t.new_zeros(self.n_images, self.config.time_input_dims - 1)], dim=1)
            use_tcnn = device.type == "cuda" and tcnn_available() and self.config.hash_backend in ("auto", "tcnn")
            if use_tcnn:
                pts = (xyz, t, xyz)
            else:  # one matrix for hash 2 and hash 3 when their layouts are equal (memory), else one each
                space = self.hash_images.precompute(xyz)
                maps = space if self.hash_maps.accepts(space) else self.hash_maps.precompute(xyz)
                pts = (space, self.hash_time.precompute(t), maps)
            self._points = (device, pts)
        return self._points[1]

    def images(self, chunk: int = 0) -> torch.Tensor:
        """W⁽⁰⁾: complex64 (T, Z, Y, X); with `chunk`, MLP1 on that many images at a time (memory
        without a graph: its activations are T·N·hidden)."""
        h_space, h_time = self.image_features()
        if not 0 < chunk < h_time.shape[0]:
            return self.images_from(h_space, h_time)
        return torch.cat([self.images_from(h_space, h_time[t0:t0 + chunk]) for t0 in range(0, h_time.shape[0], chunk)])

    def image_features(self):
        """(hash 2 features (N, F2) of the voxels, hash 1 features (T, F1) of the images)."""
        xyz, t, _ = self._inputs(self.hash_images.params.device)
        return self.hash_images(xyz), self.hash_time(t)

    def images_from(self, h_space: torch.Tensor, h_time: torch.Tensor) -> torch.Tensor:
        """MLP1 on every (image, voxel) pair of the given features: complex (len(h_time), Z, Y, X).
        A slice of h_time gives those images alone (`losses.inr_losses` with `image_chunk`)."""
        # MLP1's first layer is linear in concat(h1, h2): split it so the (T·N)-row product is a
        # broadcast sum instead of a (T·N, F1+F2) matmul
        first, rest = self.mlp_images[0], self.mlp_images[1:]
        n1 = h_time.shape[1]
        a = h_time @ first.weight[:, :n1].T                 # (T, H)
        b = h_space @ first.weight[:, n1:].T + first.bias   # (N, H)
        out = rest(a[:, None, :] + b[None, :, :])           # (T, N, 2)
        return torch.complex(out[..., 0], out[..., 1]).reshape((h_time.shape[0],) + self.shape)

    def map_channels(self) -> torch.Tensor:
        """Q⁽⁰⁾ in normalised channels: (4, Z, Y, X)."""
        _, _, xyz = self._inputs(self.hash_maps.params.device)
        out = self.mlp_maps(self.hash_maps(xyz))            # (N, 4)
        return out.T.reshape((4,) + self.shape)
