"""Stage 1 on a random subset of the images (`stage1_images`, losses.inr_losses_sampled): with
every image it is `inr_losses`; over all subsets its loss 1 averages to the whole stack's; the
images of A restricted to an index are those of the whole operator."""
import itertools

import numpy as np
import pytest
import torch

from refine_more.config import preset
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.networks.inr import INR
from refine_more.physics.scan import ScanPhysics
from refine_more.reconstruction.losses import inr_losses, inr_losses_sampled


@pytest.fixture(scope="module")
def problem():
    subject = simulate_subject("sub-s1", SimulationConfig(matrix=(4, 16, 16), n_coils=3), seed=5)
    config = preset("tiny")
    prob = ScanPhysics(subject, config, torch.device("cpu"))
    inr = INR(subject.n_images, subject.shape, config.inr, seed=0)
    return subject, config, prob, inr


def test_images_at_is_the_operator_restricted(problem):
    _, _, prob, _ = problem
    A = prob.A
    x = torch.randn(A.ishape, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([1, 4, 6])
    assert torch.allclose(A.images_at(index)(x[index]), A(x)[index])
    y = torch.randn(A.oshape, dtype=torch.complex64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(A.images_at(index).adjoint(y[index]), A.adjoint(y)[index], atol=1e-6)


def test_every_image_is_the_whole_loss(problem):
    _, config, prob, inr = problem
    with torch.no_grad():
        _, _, l1, l2 = inr_losses(inr, prob, config.tv_weight)
        _, _, s1, s2 = inr_losses_sampled(inr, prob, config.tv_weight, torch.arange(inr.n_images))
    assert torch.isclose(l1, s1, rtol=1e-5) and torch.isclose(l2, s2, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_subsets_average_to_the_whole_loss_1(problem, k):
    _, config, prob, inr = problem
    T = inr.n_images
    with torch.no_grad():
        whole = float(inr_losses(inr, prob, config.tv_weight)[2])
        parts = [float(inr_losses_sampled(inr, prob, config.tv_weight, torch.tensor(c))[2])
                 for c in itertools.combinations(range(T), k)]
    assert np.isclose(np.mean(parts), whole, rtol=1e-4)
    assert np.std(parts) > 0          # the subsets do differ: it is an estimate, not the whole


def test_reconstruction_with_one_image_per_iteration(problem):
    from refine_more.reconstruction.recon import reconstruct
    subject, config, _, _ = problem
    a = reconstruct(subject, config.replace(stage1_images=1))
    b = reconstruct(subject, config.replace(stage1_images=1))
    assert all(np.array_equal(a.maps[k], b.maps[k]) for k in a.maps)      # the draws follow config.seed
    assert all(np.isfinite(v).all() for v in a.maps.values())
    assert a.iterations["stage1"] == config.iters_stage1
