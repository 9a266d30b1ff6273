"""cohort.plan.plan_cohort without Ray: what runs, what resumes, and the seed."""
import pytest

from cohort.manifest import Entry
from cohort.plan import modes_of, plan_cohort

HASH = "abc123"


def _entries(*ids, bad=(), seed=None):
    return [Entry(subject_id=s, path=f"/d/{s}.h5", role="seed" if s == seed else "",
                  problems=[f"/d/{s}.h5: broken"] if s in bad else []) for s in ids]


def _done(rows):
    """A `finished` lookup over {(subject, mode): row}."""
    return lambda sid, mode: rows.get((sid, mode))


def _ok(sid, mode, config_hash=HASH, seed=None):
    return {"subject_id": sid, "mode": mode, "status": "ok", "config_hash": config_hash, "seed_subject": seed}


def _todo(plan):
    return sorted((e.subject_id, m) for e, m in plan.todo)


def test_fresh_both_mode_runs_the_seed_first_and_everything_else():
    plan = plan_cohort(_entries("a", "b", "c"), "both", HASH, _done({}))
    assert plan.seed_id == "a" and plan.seed_todo
    assert _todo(plan) == [("a", "adapted"), ("b", "adapted"), ("b", "scratch"), ("c", "adapted"), ("c", "scratch")]
    assert plan.n_tasks == 6 and plan.rows == {} and plan.needs_seed_state


def test_scratch_mode_has_no_seed():
    plan = plan_cohort(_entries("a", "b"), "scratch", HASH, _done({}))
    assert plan.seed is None and not plan.seed_todo and _todo(plan) == [("a", "scratch"), ("b", "scratch")]


def test_invalid_files_become_failed_rows_and_the_seed_role_is_honoured():
    plan = plan_cohort(_entries("a", "b", "c", bad=("a",), seed="c"), "adapted", HASH, _done({}))
    assert plan.seed_id == "c"
    assert plan.rows[("a", "adapted")]["status"] == "failed" and "broken" in plan.rows[("a", "adapted")]["error"]
    assert plan.rows[("a", "adapted")]["seed_subject"] == "c"
    assert _todo(plan) == [("b", "adapted"), ("c", "adapted")] and plan.seed_todo


def test_done_results_resume_and_only_the_rest_runs():
    done = {("a", "scratch"): _ok("a", "scratch"), ("a", "adapted"): _ok("a", "adapted", seed="a"),
            ("b", "adapted"): _ok("b", "adapted", seed="a")}
    plan = plan_cohort(_entries("a", "b"), "adapted", HASH, _done(done))
    assert _todo(plan) == [] and not plan.seed_todo and plan.n_resumed == 3
    assert all(r["resumed"] for r in plan.rows.values())
    assert "resumed" not in done[("a", "scratch")]          # the stored rows are not changed


def test_a_different_config_or_seed_is_not_done():
    done = {("a", "scratch"): _ok("a", "scratch", config_hash="other"),
            ("b", "adapted"): _ok("b", "adapted", seed="z")}
    plan = plan_cohort(_entries("a", "b"), "adapted", HASH, _done(done))
    assert plan.n_resumed == 0 and plan.seed_todo and _todo(plan) == [("a", "adapted"), ("b", "adapted")]


def test_force_redoes_everything():
    done = {(s, m): _ok(s, m, seed="a" if m == "adapted" else None) for s in "ab" for m in ("scratch", "adapted")}
    plan = plan_cohort(_entries("a", "b"), "both", HASH, _done(done), force=True)
    assert plan.n_resumed == 0 and plan.n_tasks == 4 and plan.seed_todo


def test_a_lost_seed_state_redoes_the_seed_alone():
    done = {("a", "scratch"): _ok("a", "scratch"), ("b", "scratch"): _ok("b", "scratch")}
    plan = plan_cohort(_entries("a", "b"), "both", HASH, _done(done))
    assert not plan.seed_todo and plan.needs_seed_state and ("a", "scratch") in plan.rows
    redo = plan.redo_seed()
    assert redo.seed_todo and ("a", "scratch") not in redo.rows and ("b", "scratch") in redo.rows
    assert _todo(redo) == [("a", "adapted"), ("b", "adapted")]


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        modes_of("fast")
