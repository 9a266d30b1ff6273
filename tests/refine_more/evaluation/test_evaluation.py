"""Cohort evaluation (refine_more/evaluation/cohort_tables.py): Bland–Altman statistics against their
definitions, the quadrant ROIs, Table 1 aggregation and the Bland–Altman figure."""
import numpy as np
import pytest

from refine_more.evaluation.cohort_tables import (bland_altman, bland_altman_png, cohort_agreement, cohort_table, quadrant_rois,
                                    roi_pairs, subject_scores)


def test_bland_altman_matches_its_definition():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.5, 2.0, 40)
    est = ref + 0.1 + rng.normal(0, 0.05, 40)
    ba = bland_altman(est, ref)
    d = est - ref
    assert ba["n"] == 40 and ba["bias"] == pytest.approx(d.mean())
    assert ba["sd"] == pytest.approx(np.sqrt(((d - d.mean()) ** 2).sum() / 39))
    assert ba["loa_high"] - ba["bias"] == pytest.approx(1.96 * ba["sd"]) == pytest.approx(ba["bias"] - ba["loa_low"])
    assert 0.05 < ba["bias"] < 0.15  # the planted offset
    with pytest.raises(ValueError, match="paired"):
        bland_altman([1.0], [1.0])


def test_quadrant_rois_split_each_tissue_into_four_disjoint_parts():
    labels = np.zeros((2, 8, 10), dtype=np.int8)
    labels[:, :, :5] = 1   # WM on the left half, GM on the right
    labels[:, :, 5:] = 2
    labels[:, 0, :] = 3    # a CSF row belongs to no ROI
    rois = quadrant_rois(labels)
    assert set(rois) == {"WM-ant-left", "WM-post-left", "GM-ant-right", "GM-post-right"}  # empty quadrants dropped
    total = sum(m.astype(int) for m in rois.values())
    assert total.max() == 1 and total.sum() == ((labels == 1) | (labels == 2)).sum()


def test_roi_pairs_and_scores_of_a_perfect_and_a_biased_estimate():
    rng = np.random.default_rng(1)
    labels = rng.integers(1, 3, (3, 12, 12))
    ref = {p: rng.uniform(0.5, 1.5, (3, 12, 12)) for p in ("I0", "T1F", "f", "kF")}
    perfect = subject_scores(ref, ref, labels)
    assert all(perfect["scores"][p]["nrmse"] == 0 for p in ref)
    est_m, ref_m = perfect["roi"]["T1F"]
    np.testing.assert_array_equal(est_m, ref_m)
    biased = {p: v * 1.1 for p, v in ref.items()}
    e, r = roi_pairs(biased, ref, labels)["f"]
    np.testing.assert_allclose(e, 1.1 * r)
    per_subject = {"perfect": [perfect, perfect], "biased": [subject_scores(biased, ref, labels)] * 2}
    rows, table = cohort_table(per_subject)
    assert rows["perfect"]["T1F"]["nrmse_mean"] == 0 and rows["biased"]["T1F"]["nrmse_mean"] > 9
    assert rows["biased"]["T1F"]["n"] == 2 and "| biased |" in table
    agreement = cohort_agreement(per_subject)
    assert agreement["perfect"]["kF"]["bias"] == 0 and agreement["biased"]["kF"]["bias"] > 0
    assert len(agreement["biased"]["f"]["diff"]) == 2 * len(e)


def test_bland_altman_figure_is_written(tmp_path):
    rng = np.random.default_rng(2)
    agreement = {m: {p: {**bland_altman(x + rng.normal(0, 0.1, 16), x), "mean": list(x), "diff": list(rng.normal(0, 0.1, 16))}
                     for p in ("T1F", "f", "kF") for x in [rng.uniform(1, 2, 16)]} for m in ("a", "b")}
    path = bland_altman_png(tmp_path / "ba.png", agreement, title="test")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing half-written left
