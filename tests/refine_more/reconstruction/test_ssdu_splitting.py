"""k-space partitions for self-supervision (refine_more/reconstruction/splitting.py): disjoint, covering the
acquired set, reproducible with a seed, the centre kept for data consistency."""
import numpy as np
import pytest

from refine_more.reconstruction.splitting import central_box, hold_out, self_supervised_partition


def _mask(seed=0, shape=(5, 12, 16), density=0.35):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    mask[:, 5:7, 7:9] = True  # a sampled centre
    return mask


def test_partition_is_disjoint_and_covers_the_acquired_set():
    mask = _mask()
    part = self_supervised_partition(mask, validation_fraction=0.2, loss_fraction=0.4, n_splits=3, seed=7)
    assert not (part.validation & part.rest).any()
    assert np.array_equal(part.validation | part.rest, mask)
    assert len(part.splits) == 3
    for theta, lam in part.splits:
        assert not (theta & lam).any()
        assert np.array_equal(theta | lam, part.rest)
        assert not (lam & ~mask).any() and not (theta & ~mask).any()
    # the sizes asked for, per image (rounding aside)
    for t in range(mask.shape[0]):
        assert abs(part.validation[t].sum() - round(0.2 * mask[t].sum())) <= 1
        assert abs(part.splits[0][1][t].sum() - round(0.4 * part.rest[t].sum())) <= 1
    # the draws differ from one another
    assert not np.array_equal(part.splits[0][1], part.splits[1][1])


def test_partition_is_reproducible_with_a_seed_and_changes_with_it():
    mask = _mask(1)
    a = self_supervised_partition(mask, seed=3)
    b = self_supervised_partition(mask, seed=3)
    c = self_supervised_partition(mask, seed=4)
    assert np.array_equal(a.validation, b.validation)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a.splits, b.splits))
    assert not np.array_equal(a.validation, c.validation)


def test_centre_stays_in_data_consistency():
    mask = _mask(2)
    box = central_box(mask.shape[1:], 0.2)
    assert box.any() and box[mask.shape[1] // 2, mask.shape[2] // 2]
    part = self_supervised_partition(mask, validation_fraction=0.3, loss_fraction=0.5, seed=0, centre_fraction=0.2)
    assert not (part.validation & box).any()
    for theta, lam in part.splits:
        assert not (lam & box).any()
        assert np.array_equal(theta & box, mask & box)


def test_hold_out_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fraction"):
        hold_out(_mask(), 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(T, Z, Y\)"):
        self_supervised_partition(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="n_splits"):
        self_supervised_partition(_mask(), n_splits=0)
