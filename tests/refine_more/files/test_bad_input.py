"""Bad input as a careless user gives it (issue 16.6): files whose headers lie about their data,
degenerate files that used to give plausible wrong maps, bad configs, bad command lines. Each case
gets one clear line naming the file and the member, attribute or option; the command line exits 2
when it refuses its arguments (before any work) and 1 for a bad input file, never a traceback."""
import os
import stat
import tracemalloc

import h5py
import numpy as np
import pytest

from cohort.console import main
from refine_more.files.subject import (SubjectFormatError, read_subject, validate_subject_file,
                                 validate_subject_headers, write_subject)

from test_subject_io import _copy_without, make_subject


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.h5"
    write_subject(p, make_subject(with_optional=False))
    return p


def _members(lines):
    return [ln.split("'")[1] for ln in lines]


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _declare_kspace(src, dst, shape, write_chunks=0):
    """A copy of ``src`` whose kspace declares ``shape`` (chunked, gzip), only ``write_chunks`` written."""
    _copy_without(src, dst, drop_member="kspace")
    with h5py.File(dst, "a") as f:
        d = f.create_dataset("kspace", shape=shape, dtype=np.complex64, chunks=(1, 1) + shape[2:],
                             compression="gzip")
        for i in range(write_chunks):
            d[0, i] = 1.0
    return dst


# -- headers that lie: caught without reading -----------------------------------------------------
def test_declared_but_never_written_kspace_is_refused_without_reading_it(tmp_path, good):
    shape = (8, 128, 16, 256, 256)        # 8 GiB declared in a file of a few kB
    bad = _declare_kspace(good, tmp_path / "empty.h5", shape)
    assert os.path.getsize(bad) < 1_000_000
    tracemalloc.start()
    problems = validate_subject_headers(bad)
    full = validate_subject_file(bad)     # the complete check stops at the headers too
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6, peak
    assert problems == full and _members(problems) == ["kspace"] and "never written" in problems[0]


def test_partly_written_kspace_names_its_chunks(tmp_path, good):
    bad = _declare_kspace(good, tmp_path / "part.h5", (8, 4, 6, 24, 24), write_chunks=2)
    (line,) = validate_subject_headers(bad)
    assert "member 'kspace'" in line and "2 of its 32 chunks" in line


def test_a_declared_size_above_the_cap_is_refused(tmp_path, good, monkeypatch):
    monkeypatch.setenv("REFINE_MORE_MAX_MEMBER_GIB", "0.0001")     # ~100 kB; the k-space is 221 kB
    (line,) = validate_subject_headers(good)
    assert "member 'kspace'" in line and "REFINE_MORE_MAX_MEMBER_GIB" in line
    monkeypatch.delenv("REFINE_MORE_MAX_MEMBER_GIB")
    assert validate_subject_headers(good) == []


def test_compressed_files_pass_the_written_check(tmp_path):
    p = tmp_path / "lzf.h5"
    write_subject(p, make_subject(), compression="lzf")
    with h5py.File(p) as f:   # far less storage than declared: compression, not a missing write
        assert f["reference/kspace_full"].id.get_storage_size() < f["reference/kspace_full"].nbytes
    assert validate_subject_file(p) == []


# -- degenerate values: headers pass, the read (the cohort's task) fails ---------------------------
@pytest.mark.parametrize("what, member, words", [
    ("zero_kspace", "kspace", "is all zero"),
    ("zero_image", "kspace", "image(s) [3] are all zero"),
    ("zero_coils", "coil_sens", "is all zero"),
    ("nan_kspace", "kspace", "non-finite"),
])
def test_degenerate_values_fail_when_read_not_at_the_headers(tmp_path, what, member, words):
    s = make_subject()
    if what == "zero_kspace":
        s.kspace[:] = 0
    elif what == "zero_image":
        s.kspace[3] = 0
    elif what == "zero_coils":
        s.coil_sens[:] = 0
    else:
        s.kspace[0, 0, 0, 0, 0] = np.nan
    p = tmp_path / f"{what}.h5"
    write_subject(p, s)
    assert validate_subject_headers(p) == []
    with pytest.raises(SubjectFormatError) as ei:
        read_subject(p)
    assert ei.value.member == member and words in str(ei.value) and str(p) in str(ei.value)


@pytest.mark.parametrize("attrs, name, words", [
    ({"flip_angles_deg": np.array([5, 10, 20, 1e9, 5, 10, 20, 40.0])}, "flip_angles_deg", "at most 90"),
    ({"sat_b1max_uT": 1e6}, "sat_b1max_uT", "[0, 50]"),
    ({"sat_offset_hz": 1e9}, "sat_offset_hz", "[100, 100000]"),
    ({"sat_offset_hz": 5.0}, "sat_offset_hz", "[100, 100000]"),
    ({"tau_sat_s": 8.0}, "tau_sat_s", "wrong unit"),
    ({"saturation": np.zeros(8, np.uint8)}, "saturation", "off and on"),
    ({"flip_angles_deg": np.full(8, 10.0)}, "flip_angles_deg", "2 distinct flip angles"),
])
def test_absurd_or_unidentifiable_protocols_are_refused(tmp_path, good, attrs, name, words):
    bad = _copy_without(good, tmp_path / "p.h5", set_attrs=attrs)
    (line,) = validate_subject_headers(bad)
    assert f"attribute '{name}'" in line and words in line, line


def test_a_single_image_is_refused(tmp_path):
    s = make_subject(with_optional=False)
    s.kspace, s.mask = s.kspace[:1], s.mask[:1]
    p = tmp_path / "one.h5"
    write_subject(p, s)   # the writer keeps the 8-image protocol: rewrite it for one image
    with h5py.File(p, "a") as f:
        for k in ("flip_angles_deg", "saturation"):
            f.attrs[k] = f.attrs[k][:1]
        f.attrs["TR_s"] = np.float64(0.04)
    (line,) = validate_subject_headers(p)
    assert "attribute 'saturation'" in line and "off and on" in line


def test_symlink_loop_and_dangling_link_are_named(tmp_path):
    loop = tmp_path / "loop.h5"
    os.symlink(loop, loop)
    dangling = tmp_path / "dangling.h5"
    os.symlink(tmp_path / "gone.h5", dangling)
    assert "symbolic link loop" in validate_subject_file(loop)[0]
    assert "dangling symbolic link" in validate_subject_file(dangling)[0]


def test_reconstruct_on_zero_kspace_names_the_member_not_a_division(tiny_config):
    from refine_more.reconstruction.recon import reconstruct
    s = make_subject()
    s.kspace[:] = 0
    with pytest.raises(ValueError, match="member 'kspace': is all zero"):
        reconstruct(s, tiny_config)


def test_a_unet_deeper_than_the_matrix_is_refused_before_any_work(tiny_config):
    from refine_more.reconstruction.recon import reconstruct
    cfg = tiny_config.replace(unroll=tiny_config.unroll.__class__(**{**vars(tiny_config.unroll), "unet_levels": 9}))
    with pytest.raises(ValueError, match=r"unet_levels = 9 needs slices of at least 512 × 512.*unet_levels <= 4"):
        reconstruct(make_subject(), cfg)


# -- configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [
    ("iters_stage1=-5", "config.iters_stage1"), ("unroll.iterations=-1", "config.unroll.iterations"),
    ("lr=NaN", "config.lr"), ("adapt.lora_rank=0", "config.adapt.lora_rank"),
    ("inr.hash_maps.log2_hashmap_size=40", "config.inr.hash_maps: log2_hashmap_size"),
    ("unroll.map_smoothness=[0,-1,0,0]", "config.unroll.map_smoothness"),
])
def test_config_values_out_of_range_fail_at_load(override, key):
    from refine_more.config import load_config
    with pytest.raises(ValueError) as ei:
        load_config(None, "tiny", [override])
    assert str(ei.value).startswith(key) and "\n" not in str(ei.value)


@pytest.mark.parametrize("name, text, words", [
    ("c.yaml", "iters_stage1: [1, 2\nlr: 3\n", "YAML syntax error at line"),
    ("c.yaml", "- 1\n- 2\n", "expected a table of keys, got list"),
    ("c.json", '{"iters_stage1": 5,}', "JSON syntax error at line 1"),
    ("c.toml", "iters_stage1 = = 5\n", "TOML syntax error"),
    ("c.yaml", "unroll:\n  iterations: -1\n", "config.unroll.iterations: must be an integer >= 0"),
    ("c.yaml", "inr: 5\n", "config.inr: expected a table"),
    ("c.yaml", "iters_stage1: -5\n", "config.iters_stage1"),
])
def test_recon_refuses_a_bad_config_file_in_one_line(tmp_path, capsys, good, name, text, words):
    cfg = tmp_path / name
    cfg.write_text(text)
    out = tmp_path / "out"
    assert main(["recon", str(good), "--out", str(out), "--preset", "tiny", "--config", str(cfg)]) == 2
    _one_error_line(capsys, words)
    assert not out.exists()


# -- command lines -------------------------------------------------------------------------------
def test_out_that_is_a_file_or_below_one_is_refused_before_any_work(tmp_path, capsys, good):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        assert main(["recon", str(good), "--out", str(out), "--preset", "tiny"]) == 2
        _one_error_line(capsys, "--out", str(a_file))
        assert main(["fit", str(good), "--out", str(out)]) == 2
        _one_error_line(capsys, "--out")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (a folder nobody can write)")
def test_out_that_cannot_be_written_is_refused(capsys, good):
    assert main(["recon", str(good), "--out", "/proc/self/refine-more-out", "--preset", "tiny"]) == 2
    _one_error_line(capsys, "not writable")


@pytest.mark.parametrize("band", [["30", "20"], ["-5", "0"], ["0", "5"]])
def test_fit_refuses_a_bad_k_band(tmp_path, capsys, good, band):
    assert main(["fit", str(good), "--out", str(tmp_path / "o"), "--k-band", *band]) == 2
    _one_error_line(capsys, "--k-band")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, words", [
    (["--matrix", "0", "24", "24"], "--matrix"), (["--acc", "0"], "--acc"), (["--acc", "-2"], "--acc"),
    (["--subjects", "0"], "--subjects"), (["--coils", "0"], "--coils"), (["--snr", "-1"], "--snr"),
])
def test_simulate_refuses_bad_arguments(tmp_path, capsys, args, words):
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--quiet", *args]) == 2
    _one_error_line(capsys, words)
    assert not out.exists()


def test_a_bad_input_file_is_one_line_and_exit_1(tmp_path, capsys):
    missing = tmp_path / "nope.h5"
    assert main(["recon", str(missing), "--out", str(tmp_path / "o"), "--preset", "tiny"]) == 1
    _one_error_line(capsys, str(missing), "file not found")


def test_a_fit_that_never_moves_is_visible():
    """The voxel-wise fit says where it kept its start values; `refine-more fit` refuses to write
    maps when that is every voxel (cli._fit)."""
    from refine_more.baselines.fitting import fit_images
    from refine_more.physics.protocol import Protocol
    protocol = Protocol.paper_in_vivo()
    zeros = fit_images(np.zeros((8, 2, 3, 3)), protocol)
    assert not zeros["moved"].any()
    rng = np.random.default_rng(0)
    signal = np.abs(rng.normal(1.0, 0.1, (8, 2, 3, 3)))
    assert fit_images(signal, protocol)["moved"].all()


# -- outputs -------------------------------------------------------------------------------------
def test_atomic_files_take_the_umask_not_0600(tmp_path):
    from refine_more.files.atomic import atomic_write_text
    old = os.umask(0o027)
    try:
        p = atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640


def test_recon_output_is_staged_and_a_failed_write_leaves_the_old_result(tmp_path):
    from refine_more.cli import _staged
    out = tmp_path / "o"
    out.mkdir()
    (out / "maps.h5").write_text("old")
    (out / "summary.json").write_text("old")
    with pytest.raises(RuntimeError):
        with _staged(out) as tmp:
            (tmp / "maps.h5").write_text("new")
            raise RuntimeError("killed while writing")
    assert sorted(os.listdir(out)) == ["maps.h5", "summary.json"] and (out / "maps.h5").read_text() == "old"
    with _staged(out) as tmp:
        (tmp / "maps.h5").write_text("new")
        (tmp / "summary.json").write_text("new")
    assert sorted(os.listdir(out)) == ["maps.h5", "summary.json"]
    assert (out / "maps.h5").read_text() == (out / "summary.json").read_text() == "new"


def test_a_subject_format_error_survives_pickling(tmp_path):
    """Ray sends a task's error to the driver pickled: it must arrive as itself, not as
    'UnserializableException' with a traceback inside the results table."""
    import pickle
    err = SubjectFormatError("a.h5", "kspace", "a.h5: member 'kspace': is all zero", ["a.h5: member 'kspace': is all zero"])
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is SubjectFormatError and str(back) == str(err)
    assert (back.path, back.member, back.problems) == (err.path, err.member, err.problems)


def test_maps_and_nifti_take_the_umask_too(tmp_path):
    """Every writer replaces the temporary's contents, not the file: the umask's mode survives."""
    from refine_more.files.maps_io import write_maps
    from refine_more.files.names import MAP_NAMES
    shape = (2, 3, 4)
    old = os.umask(0o022)
    try:
        write_maps(tmp_path, {k: np.ones(shape, np.float32) for k in MAP_NAMES}, np.ones(shape, bool),
                   subject_id="s1", method="zf-fit", config_hash="x", voxel_size_mm=(1.0, 1.0, 1.0))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert "maps.h5" in modes and any(n.endswith(".nii.gz") for n in modes)
    assert set(modes.values()) == {0o644}, modes
