"""Where a running reconstruction is (cohort/progress.py): the task's progress file, written as the
run goes through its phases and gone once it ends, and the driver's one-line description of it."""
import json

import pytest

from cohort.progress import PROGRESS_FILE, ProgressFile, describe, read


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_a_new_phase_is_written_at_once_iterations_at_most_every_two_seconds(tmp_path):
    clock = Clock()
    progress = ProgressFile(tmp_path / PROGRESS_FILE, clock=clock)
    progress("stage 1", 0, 40)
    assert read(tmp_path / PROGRESS_FILE) == {"phase": "stage 1", "done": 0, "total": 40,
                                              "phase_started": 1000.0, "updated": 1000.0}
    clock.t += 0.5
    progress("stage 1", 1, 40)                        # too soon: not written
    assert read(tmp_path / PROGRESS_FILE)["done"] == 0
    clock.t += 2.0
    progress("stage 1", 2, 40)
    assert read(tmp_path / PROGRESS_FILE)["done"] == 2
    clock.t += 0.1
    progress("stage 1", 40, 40)                       # the last iteration always
    assert read(tmp_path / PROGRESS_FILE)["done"] == 40
    clock.t += 0.1
    progress("LLR images")                            # a new phase always, with its own start
    p = read(tmp_path / PROGRESS_FILE)
    assert (p["phase"], p["phase_started"]) == ("LLR images", pytest.approx(1002.7))
    assert not list(tmp_path.glob(".*tmp*"))          # written atomically, no temporaries left
    progress.remove()
    assert not (tmp_path / PROGRESS_FILE).exists()
    progress.remove()                                 # twice: no error


def test_describe_says_where_each_running_task_is_and_skips_stale_or_missing_files(tmp_path):
    def write(sid, mode, **p):
        d = tmp_path / sid / mode
        d.mkdir(parents=True)
        (d / PROGRESS_FILE).write_text(json.dumps(p))

    write("sub-001", "scratch", phase="classical solve from the LLR start", done=0, total=0,
          phase_started=1000.0, updated=1000.0)
    write("sub-002", "adapted", phase="stage 1", done=7, total=20, phase_started=1100.0, updated=1150.0)
    write("sub-003", "adapted", phase="stage 2", done=1, total=5, phase_started=10.0, updated=20.0)  # a killed run's
    write("sub-006", "scratch", phase="stage 2", done="1", total=5, phase_started=1000.0, updated=1000.0)  # not ours
    (tmp_path / "sub-004" / "adapted").mkdir(parents=True)
    (tmp_path / "sub-004" / "adapted" / PROGRESS_FILE).write_text("{not json")                  # caught mid-write
    running = [("sub-001", "scratch"), ("sub-002", "adapted"), ("sub-003", "adapted"), ("sub-004", "adapted"),
               ("sub-005", "scratch"), ("sub-006", "scratch")]                                  # queued: no file
    assert describe(tmp_path, running, since=900.0, now=1725.0) == (
        "sub-001/scratch: classical solve from the LLR start (12:05); sub-002/adapted: stage 1 7/20 (10:25)")
    assert describe(tmp_path, [], since=900.0) == ""
    for i in range(7, 12):
        write(f"sub-{i:03d}", "adapted", phase="stage 1", done=1, total=20, phase_started=1700.0, updated=1700.0)
    line = describe(tmp_path, running + [(f"sub-{i:03d}", "adapted") for i in range(7, 12)], since=900.0, now=1725.0)
    assert line.count("/adapted: stage 1") == 2 and line.endswith("; +4 more running")


def test_a_progress_file_that_cannot_be_written_is_a_warning(tmp_path):
    (tmp_path / "a-file").write_text("")
    progress = ProgressFile(tmp_path / "a-file" / PROGRESS_FILE)     # its folder is a file: OSError
    with pytest.warns(UserWarning, match="progress not written"):
        progress("stage 1", 0, 40)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # warned once: no second warning
        progress("stage 2", 0, 5)
        progress.remove()


def test_a_reconstruction_reports_its_phases_in_order(tiny_config):
    from refine_more.config import apply_overrides
    from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
    from refine_more.reconstruction.recon import reconstruct

    subject = simulate_subject("sub-p", SimulationConfig(matrix=(4, 16, 16), n_coils=2), seed=1)
    config = apply_overrides(tiny_config, ["unroll.warm_start_steps=2", "unroll.start=\"llr\"",
                                           "iters_stage1=3", "iters_stage2=2"])
    calls = []
    reconstruct(subject, config, on_progress=lambda *a: calls.append(a), diagnostics=True)
    phases = [c[0] for c in calls]
    order = ["stage 1", "LLR images", "classical solve from the LLR start", "stage 2", "quality control",
             "report diagnostics"]
    assert [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]] == order
    assert [c for c in calls if c[0] == "stage 1"] == [("stage 1", i, 3) for i in range(4)]
    assert [c for c in calls if c[0] == "stage 2"] == [("stage 2", i, 2) for i in range(3)]


def test_a_failing_progress_report_never_costs_the_run(tiny_config):
    from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
    from refine_more.reconstruction.recon import reconstruct

    def broken(*_):
        raise OSError("disk full")

    subject = simulate_subject("sub-p", SimulationConfig(matrix=(4, 16, 16), n_coils=2), seed=1)
    with pytest.warns(UserWarning, match="sub-p: progress not reported: OSError: disk full"):
        result = reconstruct(subject, tiny_config.replace(iters_stage1=2, iters_stage2=1), on_progress=broken)
    assert result.maps["T1F"].shape == (4, 16, 16)


def test_a_cohort_task_reports_progress_and_leaves_no_file_behind(sim_cohort, tiny_config, tmp_path, monkeypatch):
    import cohort.subject_run as subject_run

    seen = []

    class Spy(ProgressFile):
        def __call__(self, phase, done=0, total=0):
            super().__call__(phase, done, total)
            seen.append((phase, self.path.exists()))

        def remove(self):
            seen.append(("removed; done.json there", (self.path.parent / "done.json").exists()))
            super().remove()

    monkeypatch.setattr(subject_run, "ProgressFile", Spy)
    cfg = {**tiny_config.to_dict(), "progress": False}
    path = str(sim_cohort.parent / "sub-002.h5")
    subject_run.run_subject(path, tmp_path, "scratch", cfg, subject_id="sub-002")
    odir = tmp_path / "sub-002" / "scratch"
    assert ("stage 1", True) in seen and ("writing outputs", True) in seen
    # removed before done.json is written, and again (a no-op) on the way out
    assert seen[-2:] == [("removed; done.json there", False), ("removed; done.json there", True)]
    assert (odir / "done.json").exists() and not (odir / PROGRESS_FILE).exists()

    monkeypatch.setattr("refine_more.reconstruction.recon.finish", lambda *a, **k: 1 / 0)   # fails after stage 2
    with pytest.raises(ZeroDivisionError):
        subject_run.run_subject(path, tmp_path, "scratch", cfg, subject_id="sub-002")
    assert not (odir / PROGRESS_FILE).exists() and not (odir / "done.json").exists()
