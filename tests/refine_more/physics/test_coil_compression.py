"""SVD coil compression (physics/coil_compression.py): the virtual coils' operator is the acquired
coils' operator followed by Vᴴ, the energy kept is what was asked, and a reconstruction through the
compressed physics scores like one through all coils."""
import numpy as np
import pytest
import torch

from refine_more.config import preset
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.physics.coil_compression import svd_compression
from refine_more.physics.operators import MultiCoilCartesian


@pytest.fixture(scope="module")
def subject():
    return simulate_subject("sub-cc1", SimulationConfig(matrix=(6, 24, 24), n_coils=12), seed=11)


def _operator(coils, mask):
    return MultiCoilCartesian(torch.from_numpy(np.ascontiguousarray(coils)), torch.from_numpy(mask))


def test_virtual_coils_are_the_acquired_operator_then_vh(subject):
    cc = svd_compression(subject.kspace, 0.95)
    assert 1 <= cc.n_virtual < 12 and cc.energy_kept >= 0.95
    A = _operator(subject.coil_sens, subject.mask)
    Av = _operator(cc.coil_maps(subject.coil_sens), subject.mask)
    x = torch.randn(A.ishape, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    Vh = torch.from_numpy(cc.matrix.conj().T.astype(np.complex64))
    expected = torch.einsum("nc,tc...->tn...", Vh, A(x))
    assert torch.allclose(Av(x), expected, atol=1e-5 * float(expected.abs().max()))
    # and the data: d' = Vᴴd, energy kept as reported
    dv = cc.kspace(subject.kspace)
    assert np.isclose((np.abs(dv) ** 2).sum() / (np.abs(subject.kspace) ** 2).sum(), cc.energy_kept, rtol=1e-4)


def test_fewest_coils_for_the_energy(subject):
    s2 = svd_compression(subject.kspace, 0.95).singular_values ** 2
    cumulative = np.cumsum(s2) / s2.sum()
    for energy in (0.5, 0.9, 0.99, 1.0):
        cc = svd_compression(subject.kspace, energy)
        assert cc.energy_kept >= energy - 1e-9
        assert cc.n_virtual == 1 or cumulative[cc.n_virtual - 2] < energy
    with pytest.raises(ValueError, match="energy"):
        svd_compression(subject.kspace, 0.0)


def test_all_coils_keep_the_residual_norm(subject):
    """energy 1: V is unitary on the coil axis, so ‖A'x − d'‖ = ‖Ax − d‖ for any x."""
    cc = svd_compression(subject.kspace, 1.0)
    A = _operator(subject.coil_sens, subject.mask)
    Av = _operator(cc.coil_maps(subject.coil_sens), subject.mask)
    x = torch.randn(A.ishape, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    r = (A(x) - torch.from_numpy(subject.kspace)).abs().pow(2).sum()
    rv = (Av(x) - torch.from_numpy(cc.kspace(subject.kspace))).abs().pow(2).sum()
    assert torch.isclose(r, rv, rtol=1e-4)


def test_reconstruction_through_virtual_coils(subject):
    from refine_more.evaluation.metrics import score_maps
    from refine_more.reconstruction.recon import reconstruct

    ref = {k: subject.reference[k] for k in ("T1F", "f")}
    scores = {}
    for energy in (0.0, 0.99):
        result = reconstruct(subject, preset("tiny").replace(coil_compression=energy), track_reference=False)
        scores[energy] = {k: v["nrmse"] for k, v in score_maps(result.maps, ref, result.tissue_mask, with_ssim=False).items()}
    for m in ("T1F", "f"):
        assert scores[0.99][m] <= 1.1 * scores[0.0][m] + 0.5, scores


def test_covariance_over_the_sampled_lines_is_the_whole(subject):
    from refine_more.physics.coil_compression import coil_covariance
    np.testing.assert_allclose(coil_covariance(subject.kspace, subject.mask), coil_covariance(subject.kspace),
                               rtol=1e-5, atol=1e-6 * np.abs(coil_covariance(subject.kspace)).max())
