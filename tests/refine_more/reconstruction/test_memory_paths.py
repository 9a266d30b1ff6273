"""Every memory path (issue 17) computes what the plain path computes, on the same inputs, to float32
rounding (relative difference < 1e-5): int32 interpolation matrices, one matrix shared by hash 2
and hash 3, the data term image chunk by image chunk, the checkpointed U-Net, the zero-filled
images one image at a time, and a reconstruction with `image_chunk` against one without."""
import dataclasses

import pytest
import torch

from refine_more.config import preset
from refine_more.networks.encoding import HashEncoding, HashEncodingConfig
from refine_more.networks.inr import INR, grid_coordinates
from refine_more.reconstruction.losses import data_consistency_chunked, physics_consistency_chunked
from refine_more.reconstruction.objective import RefinementObjective
from refine_more.physics.operators import ifft3c, zero_filled_images
from refine_more.physics.scan import ScanPhysics
from refine_more.reconstruction.recon import reconstruct
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.reconstruction.unrolled import UnrolledPGD

CPU = torch.device("cpu")


def rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def subject():
    return simulate_subject("sub-m01", SimulationConfig(matrix=(6, 24, 24), n_coils=4), seed=5)


@pytest.fixture(scope="module")
def prob(subject):
    return ScanPhysics(subject, preset("tiny"), CPU)


def test_interpolation_matrices_have_int32_indices_and_the_same_features_and_gradients():
    enc = HashEncoding(3, HashEncodingConfig(n_levels=6, log2_hashmap_size=12, base_resolution=4), backend="torch")
    with torch.no_grad():
        enc.params.normal_()
    x = torch.rand(3000, 3, generator=torch.Generator().manual_seed(1))
    fp = enc.precompute(x, block_points=700)            # several blocks: the offsets of crow
    for m in (fp.S, fp.St):
        assert m.crow_indices().dtype == torch.int32 and m.col_indices().dtype == torch.int32
    w = torch.randn(3000, enc.n_output_dims)
    plain = enc(x)
    (gp,) = torch.autograd.grad((plain * w).sum(), enc.params)
    fixed = enc(fp)
    (gf,) = torch.autograd.grad((fixed * w).sum(), enc.params)
    assert rel(fixed, plain) < 1e-5 and rel(gf, gp) < 1e-5


def test_hash_2_and_3_share_one_matrix_when_their_configs_are_equal(subject):
    cfg = preset("tiny").inr
    assert cfg.hash_images == cfg.hash_maps
    inr = INR(subject.n_images, subject.shape, cfg, seed=0)
    space, _, maps = inr._inputs(CPU)
    assert maps is space
    with torch.no_grad():
        inr.hash_maps.params.normal_()
    own = inr.hash_maps.precompute(grid_coordinates(subject.shape))
    shared = inr.mlp_maps(inr.hash_maps(maps))
    assert rel(shared, inr.mlp_maps(inr.hash_maps(own))) < 1e-6
    other = dataclasses.replace(cfg, hash_maps=HashEncodingConfig(n_levels=3, log2_hashmap_size=10, base_resolution=4))
    space, _, maps = INR(subject.n_images, subject.shape, other, seed=0)._inputs(CPU)
    assert maps is not space


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_data_term_by_image_chunks_equals_the_whole(prob, chunk):
    g = torch.Generator().manual_seed(chunk)
    x0 = torch.complex(torch.randn(prob.A.ishape, generator=g), torch.randn(prob.A.ishape, generator=g))
    x = x0.clone().requires_grad_()
    plain = prob.data_consistency(x)
    (gp,) = torch.autograd.grad(plain, x)
    x = x0.clone().requires_grad_()
    fused = data_consistency_chunked(prob, x, chunk)
    (gf,) = torch.autograd.grad(3.0 * fused, x)               # the upstream gradient scales it
    assert rel(fused, plain) < 1e-5 and rel(gf, 3.0 * gp) < 1e-5
    with torch.no_grad():
        assert rel(data_consistency_chunked(prob, x0, chunk), plain.detach()) < 1e-5


def test_loss_3_by_image_chunks_equals_the_whole_and_steps_aside_for_second_order(prob):
    cfg = preset("tiny").unroll
    c = prob.scaling.initial_raw().view(-1, 1, 1, 1) + 0.3 * torch.randn((4,) + prob.tissue.shape,
                                                                          generator=torch.Generator().manual_seed(2))
    phase = prob.background_phase(torch.polar(prob.signal(c), torch.zeros_like(prob.bs_phase)))
    values, grads = [], []
    for obj in (RefinementObjective(prob, cfg), RefinementObjective(prob, cfg, image_chunk=2)):
        q = c.clone().requires_grad_()
        v = obj.value(q, phase)
        values.append(v.detach())
        grads.append(torch.autograd.grad(v, q)[0])
    assert rel(values[1], values[0]) < 1e-5 and rel(grads[1], grads[0]) < 1e-5
    assert rel(physics_consistency_chunked(prob, c, phase, 5), prob.physics_consistency(c, phase)) < 1e-5
    # a phase with a gradient (the joint L-BFGS warm start moves it): both gradients, scaled upstream
    pairs = []
    for fn in (prob.physics_consistency, lambda q, z: physics_consistency_chunked(prob, q, z, 3)):
        q, z = c.clone().requires_grad_(), phase.clone().requires_grad_()
        pairs.append(torch.autograd.grad(2.0 * fn(q, z), (q, z)))
    for a, b in zip(*pairs):
        assert rel(b, a) < 1e-5
    assert RefinementObjective(prob, dataclasses.replace(cfg, create_graph=True), image_chunk=2).image_chunk == 0


def test_checkpointed_unet_gives_the_same_iterations_and_gradients(prob):
    cfg = preset("tiny").unroll
    torch.manual_seed(0)
    model = UnrolledPGD(cfg)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.normal_(0, 0.1)
    term = RefinementObjective(prob, cfg)
    c = prob.scaling.initial_raw().view(-1, 1, 1, 1).expand(-1, *prob.tissue.shape).contiguous()
    z0 = prob.background_phase(torch.polar(prob.signal(c), prob.bs_phase))
    runs = []
    for slices in (0, 4):
        model.slice_chunk = slices
        model.zero_grad(set_to_none=True)
        q = c.clone().requires_grad_()
        outs = model(q, term, z0, prob.tissue)
        loss = sum(term.value(o, z) for o, z in outs)
        loss.backward()
        runs.append((torch.stack([o for o, _ in outs]).detach(), q.grad.clone(),
                     {n: p.grad.clone() for n, p in model.named_parameters()}))
    (o0, q0, p0), (o1, q1, p1) = runs
    assert rel(o1, o0) < 1e-5 and rel(q1, q0) < 1e-5
    for n in p0:
        assert rel(p1[n], p0[n]) < 1e-5, n


def test_zero_filled_images_one_image_at_a_time(subject):
    k = torch.from_numpy(subject.kspace)
    S = torch.from_numpy(subject.coil_sens)
    num = (ifft3c(k) * S.conj()[None]).sum(dim=1)
    den = (S.abs() ** 2).sum(dim=0)
    whole = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    assert rel(zero_filled_images(k, S), whole) < 1e-5


def test_reconstruction_with_image_chunk_equals_the_plain_one(subject):
    """Stage 1 and the paper's joint stage 2 (INR + U-Net, no warm start), all memory paths on
    (chunked losses 1–3, shared matrix, checkpointed U-Net) against all off, 3 + 2 iterations."""
    base = preset("tiny").replace(iters_stage1=3, iters_stage2=2, log_every=1)
    assert base.unroll.warm_start_steps == 0 and not base.unroll.create_graph
    plain = reconstruct(subject, base, track_reference=False)
    chunked = reconstruct(subject, base.replace(image_chunk=1), track_reference=False)
    for a, b in zip(plain.history, chunked.history):
        for k in a:
            if k.startswith("loss"):
                assert b[k] == pytest.approx(a[k], rel=1e-5), (a["stage"], a["iteration"], k)
    # the maps after 5 Adam steps: Adam's first steps (≈ lr·sign(g)) amplify the rounding where g ≈ 0
    for name in ("I0", "T1F", "f", "kF"):
        m = plain.tissue_mask
        assert rel(torch.from_numpy(chunked.maps[name][m]), torch.from_numpy(plain.maps[name][m])) < 1e-4, name


@pytest.mark.parametrize("block_entries", [1, 7, 1 << 21])
def test_lean_transpose_equals_torchs_conversion(block_entries):
    """csr.transpose_csr (blocks of rows, a counting sort) is torch's CSC → CSR conversion entry for
    entry, with empty rows, empty columns and rows longer than a block."""
    from refine_more.networks.csr import transpose_csr

    g = torch.Generator().manual_seed(block_entries)
    dense = torch.rand(40, 30, generator=g) * (torch.rand(40, 30, generator=g) < 0.2)
    dense[5], dense[:, 7], dense[9] = 0, 0, torch.rand(30, generator=g)
    S = dense.to_sparse_csr()
    S = torch.sparse_csr_tensor(S.crow_indices().int(), S.col_indices().int(), S.values(), S.shape)
    ref, St = S.t().to_sparse_csr(), transpose_csr(S, block_entries)
    for attr in ("crow_indices", "col_indices", "values"):
        assert torch.equal(getattr(St, attr)(), getattr(ref, attr)()), attr
    assert St.col_indices().dtype == torch.int32


def test_images_by_chunks_equal_all_at_once(subject):
    inr = INR(subject.n_images, subject.shape, preset("tiny").inr, seed=1)
    with torch.no_grad():
        for p in inr.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert rel(inr.images(3), inr.images()) < 1e-6


def test_a_released_kspace_gives_the_same_result_and_is_gone(subject):
    """`release_kspace` (the cohort's tasks, `refine-more recon`): with coil compression, the LLR start,
    QC and the report's diagnostics (everything that runs after setup), the maps are bit-identical and
    the subject's acquired k-space is gone, while its shape still answers. On this warm-start path the
    INR's interpolation matrices are dropped in stage 2, and the result's images are still its own."""
    import copy

    from refine_more.config import apply_overrides
    config = apply_overrides(preset("tiny"), ["coil_compression=0.99", "unroll.warm_start_steps=4",
                                              "unroll.start=best", "iters_stage1=3", "iters_stage2=2"])
    kept, released = copy.deepcopy(subject), copy.deepcopy(subject)
    a = reconstruct(kept, config, diagnostics=True)
    b = reconstruct(released, config, diagnostics=True, release_kspace=True)
    assert kept.kspace is not None and released.kspace is None
    assert (released.shape, released.n_images, released.n_coils) == (subject.shape, subject.n_images, subject.n_coils)
    for name in ("I0", "T1F", "f", "kF"):
        assert (a.maps[name] == b.maps[name]).all(), name
    assert a.qc.status == b.qc.status and a.diagnostics.keys() == b.diagnostics.keys()
    inr = b.state["inr"]
    assert inr._points is None                         # released in stage 2, not rebuilt by `finish`
    with torch.no_grad():
        W = inr.images() * b.state["data_scale"]
    assert rel(W, torch.from_numpy(b.images)) < 1e-6
