"""The phantom study's pieces: the phantom protocol, the vial phantom's subject file, vial masks and
means, and the regression of vial means (refine_more/evaluation/phantom.py, benchmarks/phantom.py)."""
import numpy as np
import pandas as pd
import pytest
import torch

from refine_more.cli import main
from refine_more.baselines.fitting import fit_images
from refine_more.physics.operators import zero_filled_images
from refine_more.evaluation.phantom import (BATH, VIALS, PhantomConfig, regression, simulate_phantom, vial_masks,
                                 vial_means)
from refine_more.physics.protocol import PROTOCOLS, Protocol
from refine_more.physics.signal_model import BTSModel, ernst
from refine_more.files.subject import read_subject, validate_subject_file, write_subject

MATRIX = (2, 32, 32)


@pytest.fixture(scope="module")
def phantom():
    return simulate_phantom("phantom-001", PhantomConfig(matrix=MATRIX, n_coils=2), seed=3)


def test_phantom_protocol_is_the_papers():
    p = Protocol.named("phantom")
    assert p == Protocol.paper_phantom()
    assert p.flip_angles_deg == (5.0, 10.0, 20.0, 40.0, 60.0) * 2
    assert p.saturation == (0,) * 5 + (1,) * 5
    assert p.TR_s == (0.08,) * 10 and p.TE_s == 0.012 and p.tau_exc_s == 500e-6
    assert (p.sat_b1max_uT, p.tau_sat_s, p.sat_offset_hz) == (9.128, 8e-3, 4000.0)
    # the in-vivo protocol is unchanged and still the default one by name
    assert Protocol.named("in-vivo") == Protocol.paper_in_vivo()
    assert Protocol.paper_in_vivo().sat_b1max_uT == 7.3 and Protocol.paper_in_vivo().TR_s == (0.04,) * 8
    assert set(PROTOCOLS) == {"in-vivo", "phantom"}
    with pytest.raises(ValueError, match="unknown protocol 'brain'"):
        Protocol.named("brain")
    assert Protocol.from_attrs(p.to_attrs()) == p


def test_phantom_protocol_f_to_zero_is_ernst():
    protocol = Protocol.paper_phantom()
    model = BTSModel(protocol)
    T1 = torch.tensor([0.65, 1.5, 2.4], dtype=torch.float64)
    c = protocol.constants()
    expected = ernst(1.0, T1.numpy()[None], c["alpha_rad"][:, None], c["TR_s"][:, None])
    for f0 in (0.0, 1e-9):
        s = model.magnitude(torch.ones_like(T1), T1, torch.full_like(T1, f0), torch.full_like(T1, 2.0)).numpy()
        np.testing.assert_allclose(s, expected, rtol=1e-6)
    # with a bound pool the saturated images lose signal (the stronger pulse: more than in vivo)
    s = model.magnitude(*(torch.tensor([v], dtype=torch.float64) for v in (1.0, 1.5, 0.115, 2.76)))[:, 0]
    assert torch.all(s[5:] < s[:5])


def test_phantom_file_validates_and_round_trips(phantom, tmp_path):
    path = tmp_path / "phantom-001.h5"
    write_subject(path, phantom)
    assert validate_subject_file(path) == []
    back = read_subject(path)
    assert back.protocol == Protocol.paper_phantom()
    for name in ("kspace", "mask", "coil_sens", "b1", "tissue_mask"):
        np.testing.assert_array_equal(getattr(back, name), getattr(phantom, name))
    for name in ("T1F", "f", "kF", "I0", "labels", "kspace_full"):
        np.testing.assert_array_equal(back.reference[name], phantom.reference[name])
    assert back.label_names == [BATH] + list(VIALS)
    # the paper's mask: 1-D along y (every z alike), AF 4, the central lines in every image, and
    # the undersampled k-space is the reference's where sampled and zero elsewhere
    Y = MATRIX[1]
    cfg = PhantomConfig(matrix=MATRIX)
    assert (back.mask == back.mask[:, :1]).all()
    assert back.mask[:, 0].sum(1).tolist() == [Y // 4] * 10
    c = cfg.calib_lines
    assert c == 6 and back.mask[:, 0, Y // 2 - c // 2: Y // 2 - c // 2 + c].all()
    full = back.reference["kspace_full"]
    m = back.mask[:, None, :, :, None]
    np.testing.assert_array_equal(back.kspace, np.where(m, full, 0))
    assert 0.85 <= back.b1[back.tissue_mask].min() < back.b1[back.tissue_mask].max() <= 1.15


def test_simulate_phantom_command(tmp_path):
    out = tmp_path / "ph"
    assert main(["simulate", "--phantom", "--out", str(out), "--subjects", "2", "--matrix", *map(str, MATRIX),
                 "--coils", "2", "--quiet"]) == 0
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert list(manifest["subject_id"]) == ["phantom-001", "phantom-002"]
    files = [str(out / p) for p in manifest["path"]]
    assert main(["validate", "--quiet", *files]) == 0
    a, b = (read_subject(f) for f in files)
    assert a.protocol == Protocol.paper_phantom() and a.kspace.shape == (10, 2) + MATRIX
    assert not np.array_equal(a.kspace, b.kspace)       # own noise and masks
    np.testing.assert_array_equal(a.reference["T1F"], b.reference["T1F"])   # the same phantom
    assert main(["simulate", "--phantom", "--out", str(tmp_path / "x"), "--matrix", "2", "16", "16"]) == 2


def test_vial_masks_and_means_on_known_maps(phantom):
    labels, names = phantom.reference["labels"], phantom.label_names
    masks = vial_masks(labels, names)
    assert list(masks) == list(VIALS)                   # the bath is not a vial
    for i, (name, m) in enumerate(masks.items(), start=2):
        raw = labels == i
        assert m.any() and (m <= raw).all() and m.sum() < raw.sum()       # eroded, inside its vial
    assert sum(m.astype(int) for m in masks.values()).max() == 1
    truth = vial_means(phantom.reference, masks)
    for name, (_, T1F, f, k) in VIALS.items():          # eroded masks hold no partial volume
        assert truth["T1F"][name] == pytest.approx(T1F, rel=1e-6)
        assert truth["f"][name] == pytest.approx(f, rel=1e-6)
        assert truth["kF"][name] == pytest.approx(k * f, rel=1e-6)
    # the un-eroded masks average edge voxels that mix with the bath
    raw = vial_means(phantom.reference, vial_masks(labels, names, erode=0))
    assert raw["f"]["agar-8%"] < VIALS["agar-8%"][2] * 0.999
    x = [truth["T1F"][v] for v in VIALS]
    assert regression(x, x) == pytest.approx({"slope": 1.0, "intercept": 0.0, "r2": 1.0, "n": 6})
    rng = np.random.default_rng(0)
    perturbed = {p: np.asarray(phantom.reference[p]) * 1.1 + 0.05 + 0.05 * rng.standard_normal(MATRIX)
                 for p in ("T1F", "f", "kF")}
    y = [vial_means(perturbed, masks)["T1F"][v] for v in VIALS]
    g = regression(x, y)
    assert abs(g["slope"] - 1.1) < 0.05 and abs(g["intercept"] - 0.05) < 0.05 and 0.99 < g["r2"] < 1.0
    assert g["slope"] != pytest.approx(1.0, abs=0.03) and g["r2"] != 1.0


def test_fully_sampled_fit_recovers_the_vials(phantom):
    """The phantom is the protocol's model: the fully sampled fit returns the vials' T1F and f
    (k held at 23 1/s biases f by a few % where the vial's k is 18 or 30)."""
    images = zero_filled_images(torch.from_numpy(phantom.reference["kspace_full"]), torch.from_numpy(phantom.coil_sens))
    maps = fit_images(images.numpy(), phantom.protocol, phantom.b1, phantom.tissue_mask, k_band=(23.0, 23.0))
    means = vial_means(maps, vial_masks(phantom.reference["labels"], phantom.label_names))
    for name, (_, T1F, f, _) in VIALS.items():
        assert means["T1F"][name] == pytest.approx(T1F, rel=0.02)
        assert means["f"][name] == pytest.approx(f, rel=0.08)


def test_regression_matches_polyfit():
    rng = np.random.default_rng(1)
    for n in (2, 4, 6, 30):
        x = rng.uniform(0, 3, n)
        y = 0.8 * x + 0.3 + 0.2 * rng.standard_normal(n)
        g = regression(x, y)
        slope, intercept = np.polyfit(x, y, 1)
        assert g["slope"] == pytest.approx(slope, rel=1e-10)
        assert g["intercept"] == pytest.approx(intercept, rel=1e-9, abs=1e-12)
        assert g["r2"] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-10)
    with pytest.raises(ValueError, match="2 paired values"):
        regression([1.0], [1.0])
    with pytest.raises(ValueError, match="all equal"):
        regression([1.0, 1.0], [1.0, 2.0])


def test_phantom_config_refuses_what_cannot_be_sampled():
    with pytest.raises(ValueError, match="central lines do not fit"):
        PhantomConfig(matrix=(2, 32, 32), calib_lines=12)
    with pytest.raises(ValueError, match="Y, X >= 24"):
        PhantomConfig(matrix=(2, 16, 16))
    assert PhantomConfig(matrix=(12, 128, 128)).calib_lines == 24      # the paper's
