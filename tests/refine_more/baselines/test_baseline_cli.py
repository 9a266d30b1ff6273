"""The command-line contract on a simulated cohort, and the voxel-wise fit baseline's accuracy."""
import h5py
import numpy as np
import pandas as pd
import pytest

from refine_more.cli import main
from refine_more.files.maps_io import read_maps
from refine_more.evaluation.metrics import nrmse
from refine_more.files.subject import read_subject


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    assert main(["simulate", "--out", str(out), "--subjects", "2", "--matrix", "6", "32", "32", "--acc", "4",
                 "--seed", "7", "--quiet"]) == 0
    return out


def test_simulate_writes_manifest_and_valid_files(cohort_dir, capsys):
    manifest = pd.read_parquet(cohort_dir / "manifest.parquet")
    assert list(manifest["subject_id"]) == ["sub-001", "sub-002"]
    assert list(manifest["role"]) == ["seed", ""]
    files = [str(cohort_dir / p) for p in manifest["path"]]
    assert main(["validate", *files]) == 0
    s = read_subject(files[0])
    assert s.kspace.shape == (8, 4, 6, 32, 32) and s.mask.shape == (8, 6, 32)
    # AF 4 on the (z, y) grid, different random lines per image, fully sampled centre
    assert s.mask.sum(axis=(1, 2)).tolist() == [48] * 8
    assert not np.array_equal(s.mask[0], s.mask[1])
    assert s.mask[:, 1:5, 14:18].all()
    assert set(s.reference) >= {"T1F", "f", "kF", "I0", "kspace_full", "labels"}
    assert s.label_names == ["WM", "GM", "CSF"]


def test_validate_reports_bad_file(cohort_dir, tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    assert main(["validate", str(bad), str(tmp_path / "missing.h5")]) == 1
    out = capsys.readouterr().out
    assert "bad.h5" in out and "missing.h5" in out


def test_full_fit_recovers_truth_and_zero_filled_is_worse(cohort_dir, tmp_path):
    path = cohort_dir / "sub-001.h5"
    subject = read_subject(path)
    labels = subject.reference["labels"]
    wm_gm = (labels == 1) | (labels == 2)
    scores = {}
    for method in ("full", "zf", "llr"):
        out = tmp_path / method
        assert main(["fit", str(path), "--method", method, "--out", str(out)]) == 0
        maps, attrs = read_maps(out / "maps.h5")
        assert attrs["method"] == f"{method}-fit" and (out / "T1F.nii.gz").exists()
        scores[method] = {p: nrmse(maps[p], subject.reference[p], wm_gm) for p in ("T1F", "f")}
    assert scores["full"]["T1F"] < 5 and scores["full"]["f"] < 5, scores
    assert scores["zf"]["T1F"] > 2 * scores["full"]["T1F"] and scores["zf"]["f"] > 2 * scores["full"]["f"], scores
    # the LLR baseline de-aliases: well below zero-filled, above the fully sampled fit
    for p in ("T1F", "f"):
        assert scores["full"][p] < scores["llr"][p] < 0.7 * scores["zf"][p], scores


def test_simulated_physics_is_consistent(cohort_dir):
    """The fully sampled k-space is the signal model of the reference maps (plus noise)."""
    import torch
    from refine_more.physics.operators import zero_filled_images
    from refine_more.physics.signal_model import BTSModel
    s = read_subject(cohort_dir / "sub-002.h5")
    img = zero_filled_images(torch.from_numpy(s.reference["kspace_full"]), torch.from_numpy(s.coil_sens)).numpy()
    model = BTSModel(s.protocol)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
    mag = model.magnitude(t(s.reference["I0"]), t(s.reference["T1F"]), t(s.reference["f"]), t(s.reference["kF"]), t(s.b1)).numpy()
    m = s.tissue_mask
    rel = np.linalg.norm((np.abs(img) - mag)[:, m]) / np.linalg.norm(mag[:, m])
    assert rel < 0.02  # SNR 200
    # the Bloch–Siegert phase: saturated minus unsaturated image at the same flip angle
    dphi = np.angle(img[4] * np.conj(img[0]))[m]
    expected = (s.protocol.phi_bs_nominal * s.b1**2)[m]
    assert np.median(np.abs(np.angle(np.exp(1j * (dphi - expected))))) < 0.05


def test_simulate_phase_drift_gives_each_image_its_own_phase_of_that_size(tmp_path):
    """`simulate --phase-drift 0.4`: the same cohort as without it, except that each image's phase
    deviates by a smooth field of up to 0.4 rad (checked on the fully sampled reference k-space)."""
    from refine_more.physics.operators import ifft3c_np
    args = ["--subjects", "1", "--matrix", "4", "16", "16", "--acc", "4", "--seed", "3", "--snr", "1e6", "--quiet"]
    assert main(["simulate", "--out", str(tmp_path / "plain"), *args]) == 0
    assert main(["simulate", "--out", str(tmp_path / "drift"), *args, "--phase-drift", "0.4"]) == 0
    plain, drift = (read_subject(str(tmp_path / d / "sub-001.h5")) for d in ("plain", "drift"))
    assert np.array_equal(plain.mask, drift.mask)
    coils = plain.coil_sens
    images = [(ifft3c_np(s.reference["kspace_full"]) * coils.conj()[None]).sum(1) for s in (plain, drift)]
    tissue = plain.tissue_mask & (np.abs(images[0]).min(0) > 0.05 * np.abs(images[0]).max())
    deviation = np.angle(images[1] * images[0].conj())[:, tissue]
    peak = np.abs(deviation).max(1)
    assert np.all(peak <= 0.4 + 1e-3) and np.all(peak > 0.15), peak
    assert np.ptp(deviation.mean(1)) > 0.05  # the images differ from one another
