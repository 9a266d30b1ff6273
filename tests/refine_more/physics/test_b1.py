"""B1+ from the Bloch–Siegert phase of BTS (used when a subject file has no `b1`)."""
import numpy as np

from refine_more.physics.b1 import b1_for, estimate_b1, flip_angle_pairs
from refine_more.physics.protocol import Protocol
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject


def test_pairs_of_the_paper_protocol():
    assert flip_angle_pairs(Protocol.paper_in_vivo()) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert flip_angle_pairs(Protocol(flip_angles_deg=(5, 10), saturation=(0, 0), TR_s=0.04)) == []


def test_estimate_matches_simulated_field():
    subject = simulate_subject("sub-b1", SimulationConfig(matrix=(6, 32, 32), n_coils=4, b1_range=0.4), seed=11)
    true_b1 = subject.b1
    tissue = subject.tissue_mask
    est = estimate_b1(subject.kspace, subject.mask, subject.coil_sens, subject.protocol, tissue)
    err = np.abs(est - true_b1)[tissue]
    assert np.median(err) < 0.03, np.median(err)
    assert np.all(est[~tissue] == 1.0)
    # a constant-1 guess is measurably worse: the estimate carries the field's shape (blurred by the
    # small calibration box, so the correlation is moderate at this matrix)
    assert np.median(err) < 0.7 * np.median(np.abs(1.0 - true_b1)[tissue])
    assert np.corrcoef(est[tissue], true_b1[tissue])[0, 1] > 0.5
    subject.b1 = None
    b1, source = b1_for(subject, subject.coil_sens, tissue)
    assert source == "bloch-siegert" and np.array_equal(b1, est)
