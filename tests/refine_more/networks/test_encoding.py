"""Tests for refine_more.networks.encoding (multiresolution hash encoding matching tiny-cuda-nn)."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
import torch

from refine_more.networks.encoding import (
    FixedPoints,
    HashEncoding,
    HashEncodingConfig,
    level_layout,
    tcnn_available,
)

PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
M32 = 0xFFFFFFFF

# d -> config with both dense and hashed levels (checked in test_configs_mix_dense_and_hashed)
CONFIGS = {
    # res 4, 8, 16, 32; T=4 (16 rows): levels 0-2 dense (16 <= 16 is dense), level 3 hashed
    1: HashEncodingConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=4,
                          base_resolution=4, per_level_scale=2.0),
    # res 4, 8, 16, 32 -> 16, 64 dense, 256, 1024 hashed into 64 rows
    2: HashEncodingConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=6,
                          base_resolution=4, per_level_scale=2.0),
    # scales 2, 3.5, 5.75 (non-integer) -> res 3, 5, 7 -> 27->32, 125->128 dense, 343 hashed
    3: HashEncodingConfig(n_levels=3, n_features_per_level=4, log2_hashmap_size=7,
                          base_resolution=3, per_level_scale=1.5),
}


# ------------------------------------------------------------------ slow, obviously-correct reference


def ref_level_geometry(cfg, d):
    """Straight from the description of tcnn's grid (float64 except the float32 scale)."""
    levels, offset = [], 0
    for l in range(cfg.n_levels):
        scale = float(np.float32(np.float32(2.0 ** (l * np.float32(math.log2(cfg.per_level_scale))))
                                 * np.float32(cfg.base_resolution) - np.float32(1.0)))
        res = math.ceil(scale) + 1
        size = min(-(-res**d // 8) * 8, 2**cfg.log2_hashmap_size)
        levels.append((scale, res, size, offset, res**d > size))
        offset += size
    return levels


def ref_index(corner, res, size, hashed):
    if hashed:
        h = 0
        for k, i in enumerate(corner):
            h ^= (i * PRIMES[k]) & M32
        return h % size
    idx, stride = 0, 1
    for i in corner:
        idx = (idx + i * stride) & M32
        stride *= res
    return idx % size


def ref_encode(x, params, cfg, d, gout):
    """Returns (out (N, L*F), dL/dparams, dL/dx) for L = sum(out * gout), python loops, float64."""
    F = cfg.n_features_per_level
    x = np.asarray(x, dtype=np.float64)
    P = np.asarray(params, dtype=np.float64).reshape(-1, F)
    gout = np.asarray(gout, dtype=np.float64)
    N = x.shape[0]
    out = np.zeros((N, cfg.n_levels * F))
    gP = np.zeros_like(P)
    gx = np.zeros_like(x)
    for n in range(N):
        for l, (scale, res, size, offset, hashed) in enumerate(ref_level_geometry(cfg, d)):
            # pos = x * scale + 0.5 rounded to float32 as tcnn does (the rest in float64)
            pos = [float(np.float32(np.float32(x[n, k]) * np.float32(scale)) + np.float32(0.5))
                   for k in range(d)]
            cell = [math.floor(p) for p in pos]
            frac = [p - c for p, c in zip(pos, cell)]
            g = gout[n, l * F:(l + 1) * F]
            for c in range(2**d):
                bits = [(c >> k) & 1 for k in range(d)]
                corner = [cell[k] + bits[k] for k in range(d)]
                ws = [frac[k] if bits[k] else 1 - frac[k] for k in range(d)]
                row = offset + ref_index(corner, res, size, hashed)
                w = math.prod(ws)
                out[n, l * F:(l + 1) * F] += w * P[row]
                gP[row] += w * g
                for k in range(d):  # d w / d x_k = +-scale * prod_{j != k} w_j
                    dw = (1 if bits[k] else -1) * scale * math.prod(ws[:k] + ws[k + 1:])
                    gx[n, k] += dw * float(P[row] @ g)
    return out, gP.reshape(-1), gx


def _inputs(d, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    x[0] = 0.0  # corners of the domain (tcnn's +0.5 offset makes the x=1 corner wrap densely)
    x[1] = 1.0
    return x


# ----------------------------------------------------------------------------------------- tests


def test_configs_mix_dense_and_hashed():
    for d, cfg in CONFIGS.items():
        hashed = [li.hashed for li in level_layout(cfg, d)]
        assert any(hashed) and not all(hashed), (d, hashed)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_torch_backend_matches_reference(d):
    cfg = CONFIGS[d]
    enc = HashEncoding(d, cfg, backend="torch", seed=1)
    with torch.no_grad():  # O(1) values so that the comparison is not trivially ~1e-4
        enc.params.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
    x = _inputs(d).requires_grad_(True)
    gout = torch.randn(x.shape[0], enc.n_output_dims, generator=torch.Generator().manual_seed(3))
    out = enc(x)
    assert out.shape == (x.shape[0], cfg.n_levels * cfg.n_features_per_level)
    assert out.dtype == torch.float32
    (out * gout).sum().backward()

    ref_out, ref_gP, ref_gx = ref_encode(x.detach().numpy(), enc.params.detach().numpy(), cfg, d,
                                         gout.numpy())
    np.testing.assert_allclose(out.detach().numpy(), ref_out, rtol=0, atol=1e-6)
    np.testing.assert_allclose(enc.params.grad.numpy(), ref_gP, rtol=1e-5, atol=1e-5)
    # dx is defined away from cell boundaries (random interior points); it scales with `scale`
    scale_max = max(li.scale for li in level_layout(cfg, d))
    np.testing.assert_allclose(x.grad.numpy(), ref_gx, rtol=1e-4, atol=1e-5 * scale_max)


@pytest.mark.parametrize("d", [2, 3])
def test_fixed_path_equals_generic(d):
    cfg = CONFIGS[d]
    enc = HashEncoding(d, cfg, backend="torch", seed=4)
    with torch.no_grad():
        enc.params.uniform_(-1, 1, generator=torch.Generator().manual_seed(5))
    x = _inputs(d, n=300, seed=6)
    gout = torch.randn(x.shape[0], enc.n_output_dims, generator=torch.Generator().manual_seed(7))

    out = enc(x)
    (out * gout).sum().backward()
    g_generic = enc.params.grad.clone()
    enc.params.grad = None

    fp = enc.precompute(x)
    assert isinstance(fp, FixedPoints)
    assert fp.S.layout == torch.sparse_csr
    assert fp.S.shape == (x.shape[0] * cfg.n_levels, enc.n_params // cfg.n_features_per_level)
    out_fixed = enc(fp)
    torch.testing.assert_close(out_fixed, enc.forward_fixed(fp))
    torch.testing.assert_close(out_fixed, out.detach(), rtol=0, atol=1e-6)
    (out_fixed * gout).sum().backward()
    torch.testing.assert_close(enc.params.grad, g_generic, rtol=1e-5, atol=1e-6)

    # S itself: features == (S @ params.view(-1, F)).view(N, L*F)
    P = enc.params.detach().view(-1, cfg.n_features_per_level)
    torch.testing.assert_close((fp.S @ P).view(x.shape[0], -1), out.detach(), rtol=0, atol=1e-6)


def test_fixed_path_gradcheck_small():
    cfg = HashEncodingConfig(n_levels=2, n_features_per_level=1, log2_hashmap_size=4,
                             base_resolution=2, per_level_scale=2.0)
    enc = HashEncoding(2, cfg, backend="torch")
    fp = enc.precompute(_inputs(2, n=5))
    S64 = fp.S.to(torch.float64)  # linear map: its vector-Jacobian product must be S^T g
    P = enc.params.detach().double().view(-1, 1).requires_grad_(True)
    g = torch.randn(S64.shape[0], 1, dtype=torch.float64)
    from refine_more.networks.encoding import _SparseApply
    (_SparseApply.apply(P, S64, fp.St.to(torch.float64)) * g).sum().backward()
    torch.testing.assert_close(P.grad, S64.to_dense().T @ g)


def _test_image(n=64):
    """Smooth background + sharp-edged disk and square, values in [0, 1]."""
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    img = 0.3 + 0.2 * np.sin(2 * np.pi * xx) * np.cos(3 * np.pi * yy) + 0.2 * xx
    img = np.where((xx - 0.35) ** 2 + (yy - 0.4) ** 2 < 0.2**2, 0.9, img)
    img = np.where((abs(xx - 0.75) < 0.12) & (abs(yy - 0.7) < 0.15), 0.05, img)
    return img.astype(np.float32)


def test_fit_image_psnr():
    torch.manual_seed(0)
    n = 64
    img = torch.from_numpy(_test_image(n)).reshape(-1, 1)
    ij = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1)
    coords = ((ij.reshape(-1, 2).float() + 0.5) / n)
    cfg = HashEncodingConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=12,
                             base_resolution=8, per_level_scale=1.35)
    enc = HashEncoding(2, cfg, backend="torch")
    mlp = torch.nn.Sequential(torch.nn.Linear(enc.n_output_dims, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 1))
    opt = torch.optim.Adam([{"params": enc.parameters(), "lr": 1e-2},
                            {"params": mlp.parameters(), "lr": 1e-2}], eps=1e-15)
    fp = enc.precompute(coords)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.mean((mlp(enc(fp)) - img) ** 2)
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = torch.mean((mlp(enc(coords)) - img) ** 2).item()  # generic path for evaluation
    psnr = 10 * math.log10(1.0 / mse)
    # Threshold: PSNR > 40 dB on this [0, 1] image with sharp edges (observed: ~61 dB after 300
    # full-batch Adam steps, evaluated with the generic path).
    assert psnr > 40.0, psnr


def test_tcnn_dict_round_trip():
    cfg = HashEncodingConfig(n_levels=12, n_features_per_level=4, log2_hashmap_size=17,
                             base_resolution=8, per_level_scale=1.4)
    assert cfg.to_tcnn() == {
        "otype": "Grid", "type": "Hash", "n_levels": 12, "n_features_per_level": 4,
        "log2_hashmap_size": 17, "base_resolution": 8, "per_level_scale": 1.4,
        "interpolation": "Linear",
    }
    assert HashEncodingConfig.from_tcnn(cfg.to_tcnn()) == cfg
    assert HashEncodingConfig().to_tcnn() == {
        "otype": "Grid", "type": "Hash", "n_levels": 16, "n_features_per_level": 2,
        "log2_hashmap_size": 19, "base_resolution": 16, "per_level_scale": 1.5,
        "interpolation": "Linear",
    }
    assert HashEncodingConfig.from_tcnn(HashEncodingConfig().to_tcnn()) == HashEncodingConfig()
    alias = dict(cfg.to_tcnn(), otype="HashGrid")
    del alias["type"]
    assert HashEncodingConfig.from_tcnn(alias) == cfg


@pytest.mark.parametrize("bad", [
    {"otype": "Frequency"},
    {"otype": "DenseGrid"},
    {"type": "Dense"},
    {"type": "Tiled"},
    {"interpolation": "Smoothstep"},
    {"interpolation": "Nearest"},
    {"stochastic_interpolation": True},
    {"hash": "ReversedPrime"},
])
def test_tcnn_dict_rejects_unsupported(bad):
    d = dict(HashEncodingConfig().to_tcnn(), **bad)
    with pytest.raises(ValueError):
        HashEncodingConfig.from_tcnn(d)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="interpolation"):
        HashEncodingConfig(interpolation="Smoothstep")
    with pytest.raises(ValueError):
        HashEncodingConfig(n_features_per_level=3)


def test_backend_selection(monkeypatch):
    monkeypatch.setitem(sys.modules, "tinycudann", None)  # make `import tinycudann` fail
    assert not tcnn_available()
    with pytest.raises(ImportError, match="tinycudann"):
        HashEncoding(3, HashEncodingConfig(), backend="tcnn")
    with pytest.raises(ValueError, match="backend"):
        HashEncoding(3, HashEncodingConfig(), backend="cuda")
    enc = HashEncoding(3, HashEncodingConfig(log2_hashmap_size=12))  # auto
    x = torch.rand(10, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no speed warning on CPU
        assert enc.resolve_backend(x) == "torch"
        assert enc(x).shape == (10, 32)


def test_auto_on_cpu_never_uses_tcnn_even_if_installed():
    enc = HashEncoding(2, CONFIGS[2])
    assert enc.resolve_backend(torch.rand(3, 2)) == "torch"


def test_state_dict_and_init():
    enc = HashEncoding(3, HashEncodingConfig(log2_hashmap_size=12), seed=3)
    sd = enc.state_dict()
    assert list(sd) == ["params"]
    assert sd["params"].dtype == torch.float32 and sd["params"].dim() == 1
    assert enc.params.abs().max() <= 1e-4
    assert enc.params.numel() == enc.n_params
    enc2 = HashEncoding(3, HashEncodingConfig(log2_hashmap_size=12), seed=4)
    assert not torch.equal(enc.params, enc2.params)
    enc2.load_state_dict(sd)
    x = torch.rand(7, 3)
    torch.testing.assert_close(enc(x), enc2(x))


def test_level_layout_hand_computed():
    # 3D, L=16, N_min=16, b=1.5, T=19 (the defaults)
    lay = level_layout(HashEncodingConfig(), 3)
    # scale_l = 16 * 1.5^l - 1: 15, 23, 35, 53, 80 (float32: 79.99999), 120.5, ...
    assert [li.resolution for li in lay[:6]] == [16, 24, 36, 54, 81, 122]
    # 16^3=4096, 24^3=13824, 36^3=46656, 54^3=157464 (all multiples of 8) -> dense
    # 81^3=531441 -> 531448 > 2^19 -> hashed, 2^19 rows from level 4 on
    assert [li.table_size for li in lay] == [4096, 13824, 46656, 157464] + [2**19] * 12
    assert [li.hashed for li in lay] == [False] * 4 + [True] * 12
    assert [li.offset for li in lay[:6]] == [0, 4096, 17920, 64576, 222040, 222040 + 2**19]
    assert lay[0].scale == 15.0 and lay[1].scale == 23.0 and lay[5].scale == pytest.approx(120.5)
    enc = HashEncoding(3, HashEncodingConfig())
    assert enc.n_params == (222040 + 12 * 2**19) * 2
    assert enc.n_output_dims == 32

    # 2D, N_min=16, b=2, T=10: res 16, 32, 64; 32^2 = 1024 = 2^10 is still dense (boundary)
    lay = level_layout(HashEncodingConfig(n_levels=3, base_resolution=16, per_level_scale=2.0,
                                          log2_hashmap_size=10), 2)
    assert [(li.resolution, li.table_size, li.hashed) for li in lay] == [
        (16, 256, False), (32, 1024, False), (64, 1024, True)]
    # 2D, N_min=3, b=1.5: scales 2, 3.5 -> res 3, 5; 9 -> 16 and 25 -> 32 (multiple of 8)
    lay = level_layout(HashEncodingConfig(n_levels=2, base_resolution=3, per_level_scale=1.5,
                                          log2_hashmap_size=19), 2)
    assert [(li.scale, li.resolution, li.table_size, li.offset) for li in lay] == [
        (2.0, 3, 16, 0), (3.5, 5, 32, 16)]
    # and the test's own reference geometry agrees with the module everywhere it is used
    for d, cfg in CONFIGS.items():
        assert [tuple(li) for li in level_layout(cfg, d)] == ref_level_geometry(cfg, d)


@pytest.mark.skipif(not (torch.cuda.is_available() and tcnn_available()),
                    reason="needs CUDA and tinycudann")
def test_tcnn_matches_torch_backend():  # pragma: no cover - GPU only
    for d in (2, 3):
        cfg = HashEncodingConfig(n_levels=8, log2_hashmap_size=14, base_resolution=8)
        a = HashEncoding(d, cfg, backend="tcnn").cuda()
        b = HashEncoding(d, cfg, backend="torch").cuda()
        with torch.no_grad():
            a.params.uniform_(-1, 1)
        b.load_state_dict(a.state_dict())
        x = torch.rand(1000, d, device="cuda")
        g = torch.randn(1000, a.n_output_dims, device="cuda")
        ya, yb = a(x), b(x)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(a.params.grad, b.params.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d", [1, 3])
def test_precompute_in_blocks_builds_the_same_matrices(d):
    """Building the interpolation matrix block by block (for memory) gives exactly the one-block
    S and Sᵀ, and both are the dense definition (sum of corner weights per row and table entry)."""
    cfg = HashEncodingConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                             per_level_scale=1.7)
    enc = HashEncoding(d, cfg, backend="torch")
    x = torch.rand(3000, d, generator=torch.Generator().manual_seed(4))
    one, many = enc.precompute(x, block_points=1 << 20), enc.precompute(x, block_points=777)
    for name in ("S", "St"):
        a, b = getattr(one, name), getattr(many, name)
        assert torch.equal(a.crow_indices(), b.crow_indices()) and torch.equal(a.col_indices(), b.col_indices())
        assert torch.equal(a.values(), b.values())
    rows, w = enc._indices_weights(x)
    dense = torch.zeros(3000 * enc.n_levels, enc.n_rows)
    dense.index_put_((torch.arange(3000 * enc.n_levels).repeat_interleave(rows.shape[-1]), rows.reshape(-1)),
                     w.reshape(-1), accumulate=True)
    torch.testing.assert_close(one.S.to_dense(), dense)
    torch.testing.assert_close(one.St.to_dense(), dense.T)

