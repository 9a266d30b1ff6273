"""Quality control (reconstruction/qc.py, config/qc.py; docs/decisions/017): every result is checked
from its own data, never from ``reference/``, and deliberately broken inputs (evaluation/
broken_inputs.py, written to real subject files) are flagged, not reported ok.

`tiny` (fast): a clean subject is ok; one image's k-space ×3 and the coil maps of another subject
are flagged; the QC of a file whose reference members are corrupted or removed is the same. `small`
(slow): those and two flip angles swapped, which shows only in maps near the objective's minimum
(tiny's 40 iterations leave g 100× above the LLR images', and its objective checks are off)."""
import math

import h5py
import numpy as np
import pytest

from refine_more.config import preset
from refine_more.config.qc import QCConfig, judge
from refine_more.evaluation.broken_inputs import broken
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.files.subject import read_subject, write_subject
from refine_more.reconstruction.recon import reconstruct

SIM = SimulationConfig(matrix=(6, 24, 24), n_coils=4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A clean subject file, a copy with its reference/ values replaced by noise, one with no
    reference/ at all, and its three broken versions (coil maps from another subject)."""
    folder = tmp_path_factory.mktemp("qc")
    subject, other = simulate_subject("sub-q01", SIM, seed=3), simulate_subject("sub-q02", SIM, seed=4)
    paths = {"clean": write_subject(folder / "clean.h5", subject)}
    paths["reference-corrupted"] = write_subject(folder / "reference-corrupted.h5", subject)
    rng = np.random.default_rng(0)
    with h5py.File(paths["reference-corrupted"], "r+") as f:
        for member in f["reference"].values():           # wrong values that still pass validation
            kind, noise = member.dtype.kind, np.abs(rng.standard_normal(member.shape)) * 7.0
            member[...] = rng.integers(0, 4, member.shape) if kind == "i" else noise * (1 + 1j if kind == "c" else 1)
    paths["reference-removed"] = write_subject(folder / "reference-removed.h5", subject)
    with h5py.File(paths["reference-removed"], "r+") as f:
        del f["reference"]
    for breakage in ("image-scaled", "flip-angles-swapped", "coils-of-another-subject"):
        paths[breakage] = write_subject(folder / f"{breakage}.h5", broken(subject, breakage, other=other))
    return paths


def _qc(path, preset_name="tiny", **kw):
    return reconstruct(read_subject(path), preset(preset_name).replace(device="cpu", progress=False), **kw).qc


@pytest.fixture(scope="module")
def clean_qc(files):
    return _qc(files["clean"])


class _Untouchable(dict):
    """A reference that fails the test when anything looks at it."""
    def _refuse(self, *args, **kwargs):
        raise AssertionError("the reconstruction or its QC looked at reference/")
    __getitem__ = __iter__ = __len__ = __contains__ = get = items = keys = values = _refuse


def test_judge_names_the_metric_its_value_and_the_threshold():
    metrics = {"objective_final": 2e-3, "objective_llr_start": 1e-3, "objective_ratio": 2.0,
               "objective_llr_images": 1e-4, "model_excess": 20.0, "image_residual_ratio": 9.0, "worst_image": 3,
               "fraction_T1F_at_bounds": 0.0, "fraction_f_at_one": 0.2, "fraction_f_at_zero": 0.6,
               "fraction_f_unphysical": 0.2, "fraction_k_at_band_edges": None}
    status, reasons = judge(metrics, QCConfig())
    assert status == "flagged" and len(reasons) == 5 and reasons[4] == "fraction_f_unphysical 0.2 > 0.0005"
    assert reasons[0].startswith("objective_ratio 2 > 1 (") and "of the LLR-fit start 0.001" in reasons[0]
    assert reasons[1].startswith("model_excess 20 > 4 (")
    assert reasons[2].startswith("image_residual_ratio 9 > 2 (image 3:")
    assert reasons[3] == "fraction_f_at_one 0.2 > 0.05"      # f at 0 is free water: reported, not judged
    calm = QCConfig(max_objective_ratio=0, max_model_excess=0, max_image_residual_ratio=0, max_fraction_at_bounds=0,
                    max_fraction_f_unphysical=0)
    assert judge(metrics, calm) == ("ok", [])                      # 0 turns a check off
    assert judge({**metrics, "worst_image": 3.0}, QCConfig())[1][2].startswith("image_residual_ratio 9 > 2 (image 3:")


def test_a_metric_that_could_not_be_measured_flags_except_the_k_band_edges():
    metrics = dict.fromkeys(("objective_ratio", "model_excess", "objective_llr_images", "image_residual_ratio",
                             "fraction_T1F_at_bounds", "fraction_f_at_one", "fraction_f_unphysical"), 0.0)
    assert judge({**metrics, "fraction_k_at_band_edges": math.nan}, QCConfig()) == ("ok", [])   # k held fixed
    status, reasons = judge({**metrics, "model_excess": math.nan}, QCConfig())
    assert status == "flagged" and reasons == ["model_excess could not be measured (nan)"]


def test_a_clean_subject_is_ok(clean_qc):
    assert clean_qc.status == "ok" and clean_qc.reasons == [] and clean_qc.headline() == "QC ok"
    m = clean_qc.metrics
    assert len(m["image_residuals"]) == len(m["image_residual_ratios"]) == 8
    assert 0 < m["objective_llr_images"] < m["objective_final"] and m["objective_llr_start"] > 0
    assert np.median(m["image_residual_ratios"]) == pytest.approx(1.0)


def test_qc_never_reads_the_reference(files, clean_qc):
    """The same QC from a file whose reference/ members are noise, and from one without them whose
    in-memory reference fails the test when touched (the reconstruction not tracking nRMSE)."""
    assert _qc(files["reference-corrupted"]).to_dict() == clean_qc.to_dict()
    subject = read_subject(files["reference-removed"])
    assert subject.reference == {}
    subject.reference = _Untouchable()
    result = reconstruct(subject, preset("tiny").replace(device="cpu"), track_reference=False)
    assert result.qc.to_dict() == clean_qc.to_dict()


@pytest.mark.parametrize("breakage, metric", [("image-scaled", "image_residual_ratio"),
                                              ("coils-of-another-subject", "objective_llr_images")])
def test_broken_inputs_are_flagged(files, breakage, metric):
    qc = _qc(files[breakage])
    assert qc.status == "flagged" and any(r.startswith(f"{metric} ") for r in qc.reasons), qc.reasons
    assert qc.headline().startswith("QC FLAGGED (") and metric in qc.headline()
    if breakage == "image-scaled":
        assert qc.metrics["worst_image"] == 3 and "(image 3:" in qc.reasons[0]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["clean", "image-scaled", "flip-angles-swapped", "coils-of-another-subject"])
def test_small_flags_every_broken_input_and_not_the_clean_one(files, case):
    qc = _qc(files[case], "small")
    assert qc.status == ("ok" if case == "clean" else "flagged"), (qc.reasons, qc.metrics)


def test_free_water_at_f_zero_is_not_a_bound_failure_and_unphysical_f_is():
    """The vial phantom's bath has no bound pool (f = 0: CSF is the brain's case): its true maps are
    reported with `fraction_f_at_zero` and judged ok; the same maps with f pinned at 1 are flagged."""
    import torch

    from refine_more.evaluation.phantom import PhantomConfig, simulate_phantom
    from refine_more.physics.scaling import MapScaling
    from refine_more.reconstruction.qc import fraction_at_bounds

    subject = simulate_phantom("ph-001", PhantomConfig(matrix=(2, 32, 32), n_coils=2))
    maps = {n: torch.from_numpy(np.asarray(subject.reference[n], dtype=np.float64)) for n in ("T1F", "f")}
    maps["k"] = torch.full_like(maps["f"], 23.0)
    tissue = torch.from_numpy(subject.tissue_mask.astype(bool))
    qc, scaling = QCConfig(), MapScaling(I0_scale=1.0, k_band=(23.0, 23.0))
    fractions = fraction_at_bounds(maps, tissue, scaling, qc)
    assert fractions["fraction_f_at_zero"] > 0.3 and fractions["fraction_f_at_one"] == 0.0, fractions
    assert judge({**fractions, **dict.fromkeys(("objective_ratio", "model_excess", "objective_llr_images",
                                                  "image_residual_ratio"), 0.0)}, qc) == ("ok", [])
    # the robustness phantom's sub-003: 12 of 8712 voxels trapped at f ≈ 0.97–0.99 (f nRMSE 102 %, objective as its peers')
    spikes = maps["f"].clone().reshape(-1)
    inside = np.flatnonzero(subject.tissue_mask)
    spikes[torch.from_numpy(inside[:: len(inside) // 12][:12])] = 0.98
    spikes = spikes.reshape(maps["f"].shape)
    trapped = fraction_at_bounds({**maps, "f": spikes}, tissue, scaling, qc)
    assert trapped["fraction_f_at_one"] == 0.0 and trapped["fraction_f_unphysical"] > 2 * qc.max_fraction_f_unphysical
    status, reasons = judge({**trapped, **dict.fromkeys(("objective_ratio", "model_excess", "objective_llr_images",
                                                         "image_residual_ratio"), 0.0)}, qc)
    assert status == "flagged" and reasons[0].startswith("fraction_f_unphysical "), reasons
    pinned = fraction_at_bounds({**maps, "f": torch.where(maps["f"] > 0, 1.0, 0.0).double()}, tissue, scaling, qc)
    assert pinned["fraction_f_at_one"] > 0.05
    assert judge({**pinned, **dict.fromkeys(("objective_ratio", "model_excess", "objective_llr_images",
                                               "image_residual_ratio"), 0.0)}, qc)[0] == "flagged"
