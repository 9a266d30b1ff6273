"""Contrast synthesis from a saved INR (synthesis.py) and the zero-filled start (zero_filled_start.py)."""
import contextlib
import io
import json

import h5py
import numpy as np
import pytest
import torch

from cohort.console import main
from refine_more.config import preset
from refine_more.physics.scan import ScanPhysics
from refine_more.reconstruction.recon import reconstruct
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.files.subject import write_subject
from refine_more.reconstruction.synthesis import INR_FILE, coordinates_from_image_units, load_inr, save_inr, synthesize
from refine_more.reconstruction.zero_filled_start import channels_from_maps, refine_from_zero_filled


@pytest.fixture(scope="module")
def subject():
    return simulate_subject("sub-y01", SimulationConfig(matrix=(4, 16, 16), n_coils=2), seed=21)


@pytest.fixture(scope="module")
def tiny_result(subject):
    return reconstruct(subject, preset("tiny"))


def test_saved_inr_reproduces_the_acquired_images(tmp_path, tiny_result):
    path = save_inr(tmp_path / INR_FILE, tiny_result)
    inr, header = load_inr(path)
    assert header["n_images"] == 8 and header["shape"] == [4, 16, 16]
    T = header["n_images"]
    images = synthesize(inr, (np.arange(T) + 0.5) / T, header["data_scale"])
    np.testing.assert_allclose(images, tiny_result.images, rtol=1e-5, atol=1e-6 * np.abs(images).max())
    # in between two acquired images: a different image, neither of its neighbours
    mid = synthesize(inr, [2.0 / T], header["data_scale"])[0]
    assert not np.allclose(mid, images[1]) and not np.allclose(mid, images[2])


def test_image_units_and_their_bounds():
    np.testing.assert_allclose(coordinates_from_image_units([1, 2.5, 8], 8), [0.5 / 8, 2.0 / 8, 7.5 / 8])
    for bad in ([0.2], [8.6], [float("nan")]):
        with pytest.raises(ValueError, match="--t must lie within"):
            coordinates_from_image_units(bad, 8)


def test_load_inr_refuses_other_files(tmp_path):
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a saved REFINE-MORE INR"):
        load_inr(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_inr(tmp_path / "junk.safetensors")


def test_recon_then_synthesize_cli(tmp_path, subject):
    path = tmp_path / "sub.h5"
    write_subject(path, subject)
    out = tmp_path / "recon"
    assert main(["recon", str(path), "--out", str(out), "--preset", "tiny"]) == 0
    assert (out / INR_FILE).is_file()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["synthesize", str(out), "--t", "2.5", "3.5", "--out", str(tmp_path / "syn")]) == 0
    assert json.loads(buf.getvalue().splitlines()[-1])["shape"] == [2, 4, 16, 16]
    with h5py.File(tmp_path / "syn" / "synthesized.h5") as fh:
        assert fh["images"].shape == (2, 4, 16, 16) and np.isfinite(fh["images"][()]).all()
        np.testing.assert_allclose(fh.attrs["t_coordinate"], [2.0 / 8, 3.0 / 8])
    assert (tmp_path / "syn" / "synthesized.png").stat().st_size > 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["synthesize", str(tmp_path), "--t", "2.5", "--out", str(tmp_path / "x")]) == 1
    assert "no saved INR" in err.getvalue()


def test_channels_from_maps_inverts_physical_maps(subject):
    cfg = preset("tiny")
    prob = ScanPhysics(subject, cfg, torch.device("cpu"))
    ref = {k: subject.reference[k] for k in ("I0", "T1F", "f", "kF")}
    back = prob.physical_maps(channels_from_maps(prob, ref))
    tissue = prob.tissue_np
    for k in ref:
        np.testing.assert_allclose(back[k][tissue], ref[k][tissue], rtol=2e-3, err_msg=k)


def test_refinement_from_the_zero_filled_fit(subject):
    from refine_more.baselines.fitting import fit_images
    from refine_more.physics.operators import zero_filled_images
    cfg = preset("tiny")
    result = refine_from_zero_filled(subject, cfg)
    assert result.method == "zero-filled-start" and result.iterations["stage1"] == 0
    assert result.trainable_parameters["stage1"] == 0
    zf = zero_filled_images(torch.from_numpy(subject.kspace), torch.from_numpy(subject.coil_sens)).numpy()
    fit = fit_images(zf, subject.protocol, subject.b1, result.tissue_mask, k_band=cfg.k_band)
    tissue = result.tissue_mask.astype(bool)
    np.testing.assert_allclose(result.maps_init["T1F"][tissue], fit["T1F"][tissue], rtol=2e-3)
    assert not np.allclose(result.maps["T1F"][tissue], result.maps_init["T1F"][tissue])
