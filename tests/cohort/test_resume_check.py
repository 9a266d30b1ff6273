"""What a rerun may resume (cohort.resume, cohort.plan with its check), on real files without Ray:
outputs present, the same input (by stat, else by sha256), and a seed whose input changed taking
its adapted rows with it."""
import os
import shutil

from cohort.manifest import Entry
from cohort.plan import plan_cohort
from cohort.resume import OUTPUT_KEYS, changed_input, check_done, input_digest, missing_output
from cohort.results import subject_dir

HASH = "abc123"


def _subject(folder, name, content=b"k-space " * 1000):
    p = folder / name
    p.write_bytes(content)
    return p


def _done_row(out, sid, mode, path, seed=None):
    """A done.json row with its outputs written, as subject_run leaves it."""
    folder = subject_dir(out, sid, mode)
    folder.mkdir(parents=True)
    paths = {}
    for key in OUTPUT_KEYS:
        f = folder / f"{key[:-5]}.out"
        f.write_text("x")
        paths[key] = str(f)
    return {"subject_id": sid, "mode": mode, "status": "ok", "qc_status": "ok", "config_hash": HASH, "seed_subject": seed,
            "subject_path": str(path), **input_digest(path), **paths}


def test_same_file_resumes_from_its_stat_alone(tmp_path, monkeypatch):
    p = _subject(tmp_path, "a.h5")
    row = {"subject_path": str(p), **input_digest(p)}

    def no_read(path):
        raise AssertionError(f"{path} was read")
    monkeypatch.setattr("cohort.resume.file_sha256", no_read)
    assert changed_input(row, p) is None


def test_a_copy_resumes_and_another_file_does_not(tmp_path):
    a, b = _subject(tmp_path, "a.h5"), _subject(tmp_path, "b.h5", b"other k " * 1000)
    row = {"subject_path": str(a), **input_digest(a)}
    copy = tmp_path / "moved" / "a.h5"
    copy.parent.mkdir()
    shutil.copy(a, copy)                 # new path, new mtime, same bytes
    assert changed_input(row, copy) is None
    why = changed_input(row, b)          # same size, other bytes
    assert "sha256 differs" in why and f"the row pointed at {a}" in why
    a.write_bytes(b"k-space " * 999 + b"K-space ")     # rewritten in place, same size
    assert "sha256 differs" in changed_input(row, a)
    assert "no input digest" in changed_input({"subject_path": str(a)}, a)
    assert "No such file" in changed_input(row, tmp_path / "gone.h5")


def test_a_missing_output_is_named(tmp_path):
    p = _subject(tmp_path, "a.h5")
    row = _done_row(tmp_path / "out", "a", "scratch", p)
    assert missing_output(row, tmp_path / "out", "a", "scratch") is None
    os.unlink(row["maps_path"])
    assert missing_output(row, tmp_path / "out", "a", "scratch") == \
        f"maps.out is missing from {subject_dir(tmp_path / 'out', 'a', 'scratch')}"


def test_a_row_written_before_quality_control_is_redone(tmp_path):
    """A result without QC (docs/decisions/017) is never resumed as if it were checked."""
    p = _subject(tmp_path, "a.h5")
    row = _done_row(tmp_path / "out", "a", "scratch", p)
    check = check_done(tmp_path / "out")
    entry = Entry(subject_id="a", path=str(p))
    assert check(entry, "scratch", row) is None
    del row["qc_status"]
    assert check(entry, "scratch", row) == ("done.json has no quality control (written before QC)", False)


def test_plan_redoes_stale_rows_and_a_changed_seed_takes_its_adapted_rows(tmp_path):
    out = tmp_path / "out"
    paths = {s: _subject(tmp_path, f"{s}.h5", s.encode() * 4000) for s in ("a", "b", "c")}
    entries = [Entry(subject_id=s, path=str(p), role="seed" if s == "a" else "") for s, p in paths.items()]
    done = {("a", "scratch"): _done_row(out, "a", "scratch", paths["a"])}
    for s in paths:
        done[(s, "adapted")] = _done_row(out, s, "adapted", paths[s], seed="a")
    os.unlink(done[("b", "adapted")]["montage_path"])
    plan = plan_cohort(entries, "adapted", HASH, lambda s, m: done.get((s, m)), check=check_done(out))
    assert [(e.subject_id, m) for e, m in plan.todo] == [("b", "adapted")] and not plan.seed_todo
    assert [(s, m) for s, m, _ in plan.redo] == [("b", "adapted")] and "montage.out is missing" in plan.redo[0][2]
    assert plan.rows[("a", "scratch")]["resumed"] and plan.rows[("c", "adapted")]["resumed"]

    paths["a"].write_bytes(b"A" * 4000)         # the seed's file is now another one
    plan = plan_cohort(entries, "adapted", HASH, lambda s, m: done.get((s, m)), check=check_done(out))
    assert plan.seed_todo and sorted(e.subject_id for e, _ in plan.todo) == ["a", "b", "c"]
    why = {(s, m): w for s, m, w in plan.redo}
    assert "sha256 differs" in why[("a", "scratch")] and "seed a is redone" in why[("c", "adapted")]
    assert plan.rows == {} and [e.subject_id for e in plan.fallbacks] == ["b", "c"]
