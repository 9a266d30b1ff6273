"""GPU checks: the same components on CUDA as on the CPU. Skipped without CUDA (CI and the dev
machines have none); run them where a GPU is lent: `python -m pytest -q tests/test_cuda.py`."""
import numpy as np
import pytest
import torch

from refine_more.reconstruction.adaptation import SeedState, frozen_tensors
from refine_more.config import preset
from refine_more.networks.encoding import HashEncoding, HashEncodingConfig, tcnn_available
from refine_more.evaluation.metrics import score_maps
from refine_more.physics.operators import MultiCoilCartesian
from refine_more.reconstruction.recon import reconstruct
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("d", [1, 2, 3])
def test_torch_hash_encoding_on_cuda_matches_cpu(d):
    """The torch backend's integer hashing and interpolation give the CPU's values on the GPU
    (forward and both gradients), for dense and hashed levels."""
    cfg = HashEncodingConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                             per_level_scale=1.7)
    cpu = HashEncoding(d, cfg, backend="torch", seed=3)
    with torch.no_grad():
        cpu.params.normal_()
    gpu = HashEncoding(d, cfg, backend="torch", seed=3).to(CUDA)
    gpu.load_state_dict(cpu.state_dict())
    x = torch.rand(4000, d, generator=torch.Generator().manual_seed(1))
    g = torch.randn(4000, cpu.n_output_dims, generator=torch.Generator().manual_seed(2))
    xc, xg = x.clone().requires_grad_(True), x.to(CUDA).requires_grad_(True)
    yc, yg = cpu(xc), gpu(xg)
    (yc * g).sum().backward()
    (yg * g.to(CUDA)).sum().backward()
    torch.testing.assert_close(yg.cpu(), yc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gpu.params.grad.cpu(), cpu.params.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, atol=1e-3, rtol=1e-4)
    # the fixed-point (sparse matrix) path on the GPU equals the generic one
    fp = gpu.precompute(xg.detach())
    torch.testing.assert_close(gpu(fp), yg.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(tcnn_available(), reason="tinycudann is installed: auto picks tcnn")
def test_auto_backend_on_cuda_without_tcnn_falls_back_to_torch():
    enc = HashEncoding(3, HashEncodingConfig(n_levels=4, log2_hashmap_size=10), backend="auto").to(CUDA)
    assert enc.resolve_backend(torch.rand(5, 3, device=CUDA)) == "torch"


def test_operator_adjoint_on_cuda():
    """<A x, y> = <x, Aᴴ y> with the GPU's FFTs (complex128)."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    C, T, Z, Y, X = 4, 3, 6, 20, 18
    coils = torch.randn(C, Z, Y, X, dtype=torch.complex128, device=CUDA, generator=g)
    mask = torch.rand(T, Z, Y, device=CUDA, generator=g) < 0.4
    A = MultiCoilCartesian(coils, mask)
    x = torch.randn(T, Z, Y, X, dtype=torch.complex128, device=CUDA, generator=g)
    y = torch.randn(T, C, Z, Y, X, dtype=torch.complex128, device=CUDA, generator=g)
    lhs, rhs = torch.vdot(A(x).flatten(), y.flatten()), torch.vdot(x.flatten(), A.adjoint(y).flatten())
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


@pytest.fixture(scope="module")
def subjects():
    sim = SimulationConfig(matrix=(6, 24, 24), n_coils=4)
    return simulate_subject("sub-g01", sim, seed=5), simulate_subject("sub-g02", sim, seed=6)


def test_reconstruct_on_cuda_matches_cpu_quality(subjects):
    """The tiny preset on the GPU and on the CPU: same method, finite maps, and quality within
    the float32/kernel-order noise of each other (not bit-equal: GPU reductions reorder sums)."""
    subject = subjects[0]
    scores = {}
    for dev in ("cpu", "cuda"):
        cfg = preset("tiny").replace(device=dev)
        res = reconstruct(subject, cfg)
        assert res.device.startswith(dev)
        assert all(np.isfinite(v).all() for v in res.maps.values())
        ref = {p: subject.reference[p] for p in ("T1F", "f", "kF")}
        scores[dev] = score_maps(res.maps, ref, res.tissue_mask)
    for p in ("T1F", "f", "kF"):
        assert scores["cuda"][p]["nrmse"] == pytest.approx(scores["cpu"][p]["nrmse"], rel=0.1), p


def test_adapted_run_on_cuda_keeps_frozen_tensors_and_state_moves_to_cpu(subjects):
    """A seed reconstructed on the GPU gives a SeedState (numpy, host memory) that adapts another
    subject on the GPU with the frozen tensors bit-identical."""
    seed, target = subjects
    cfg = preset("tiny").replace(device="cuda")
    state = SeedState.from_result(reconstruct(seed, cfg))
    assert all(isinstance(v, np.ndarray) for v in state.arrays.values())
    adapted = reconstruct(target, cfg, seed_state=state.to_numpy_dict())
    assert adapted.method == "refine-more-adapted" and adapted.device.startswith("cuda")
    for k, v in frozen_tensors(adapted.state["inr"], cfg).items():
        assert np.array_equal(v, state.arrays[k]), k


def test_blocked_precompute_and_chunked_losses_on_cuda(subjects):
    """The memory paths on the GPU: the interpolation matrices built in blocks (Sᵀ through the
    CSC → CSR conversion) equal the CPU's, and the INR's losses over chunks of images equal the
    whole (losses and gradients)."""
    from refine_more.networks.inr import INR
    from refine_more.reconstruction.losses import inr_losses, inr_losses_chunked
    from refine_more.physics.scan import ScanPhysics as Problem

    cfg = HashEncodingConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                             per_level_scale=1.7)
    enc = HashEncoding(3, cfg, backend="torch")
    x = torch.rand(3000, 3, generator=torch.Generator().manual_seed(4))
    cpu = enc.precompute(x, block_points=700)
    gpu = enc.to(CUDA).precompute(x.to(CUDA), block_points=700)
    for name in ("S", "St"):
        a, b = getattr(cpu, name), getattr(gpu, name)
        assert torch.equal(a.crow_indices(), b.crow_indices().cpu()) and torch.equal(a.col_indices(), b.col_indices().cpu())
        torch.testing.assert_close(b.values().cpu(), a.values(), rtol=1e-6, atol=1e-7)

    subject = subjects[0]
    tiny = preset("tiny").replace(device="cuda")
    prob = Problem(subject, tiny, CUDA)
    inr = INR(subject.n_images, subject.shape, tiny.inr, seed=0).to(CUDA)
    W, c0, l1, l2 = inr_losses(inr, prob, tiny.tv_weight)
    (l1 + l2).backward()
    whole = {n: p.grad.clone() for n, p in inr.named_parameters()}
    inr.zero_grad(set_to_none=True)
    _, _, l1c, l2c = inr_losses_chunked(inr, prob, tiny.tv_weight, 3, backward=True)
    torch.testing.assert_close(l1c + l2c, (l1 + l2).detach(), rtol=1e-5, atol=0)
    for n, p in inr.named_parameters():
        torch.testing.assert_close(p.grad, whole[n], rtol=1e-3, atol=1e-6, msg=n)
