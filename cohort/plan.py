"""What a cohort run has to do, decided without Ray: :func:`plan_cohort`.

Given the manifest's entries (validated), the modes and the config hash, and what is already
finished on disk (the ``done.json`` rows, passed in as a lookup), the plan says which
(subject, mode) results are known already (failed: invalid files; resumed: done with this config,
and for adapted rows with this seed) and which must be reconstructed, and whether the seed is
reconstructed first as a seed task.

Modes, and what the seed's rows are:

- ``scratch``: every valid subject from scratch (no seed).
- ``adapted``: the seed (``role == 'seed'``, else the first valid row) is reconstructed from
  scratch (a ``scratch`` row with ``is_seed=True``: that run is the real cost of the adapted
  cohort), then EVERY valid subject, the seed included, is adapted from the seed state. Adapting
  the seed to itself costs one short adapted run and keeps ``DIR/<id>/adapted/maps.h5`` true for
  every subject.
- ``both``: every valid subject from scratch (the seed's scratch run is the seed) and every valid
  subject adapted, the seed included: one row per subject and mode.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from .manifest import Entry, choose_seed
from .results import MODES, failed_row

#: (subject_id, mode) -> the row stored in its done.json, or None
Finished = Callable[[str, str], Optional[dict]]
#: (entry, mode, stored row) -> (why it must be redone, whether its input changed), or None to resume
#: (:func:`cohort.resume.check_done`: the outputs are there and the input is the same file)
Check = Callable[[Entry, str, dict], Optional[tuple]]


def modes_of(mode: str) -> tuple:
    """The result modes of a run mode ('scratch', 'adapted' or 'both')."""
    if mode not in ("scratch", "adapted", "both"):
        raise ValueError(f"mode must be scratch, adapted or both, got {mode!r}")
    return MODES if mode == "both" else (mode,)


def resumable(done: Optional[dict], mode: str, config_hash: str, seed_subject: Optional[str]) -> bool:
    """A stored row counts as done when it finished ok with this config (and seed, if adapted)."""
    if not done or done.get("config_hash") != config_hash or done.get("mode") != mode or done.get("status") != "ok":
        return False
    return mode != "adapted" or done.get("seed_subject") == seed_subject


@dataclass(frozen=True)
class CohortPlan:
    modes: tuple
    seed: Optional[Entry]
    rows: dict             # (subject_id, mode) -> row known before running: failed or resumed
    todo: list             # (entry, mode) to reconstruct as subject tasks
    seed_todo: bool        # the seed's scratch run is reconstructed first, as the seed task
    external_seed: Optional[str] = None   # --seed-from: the seed subject of an earlier run
    redo: tuple = ()       # (subject_id, mode, reason): done with this config, but redone (check)
    fallbacks: tuple = ()  # the other valid entries, in manifest order: seeds to try when the seed fails

    @property
    def seed_id(self) -> Optional[str]:
        return self.external_seed or (self.seed.subject_id if self.seed else None)

    @property
    def needs_seed_state(self) -> bool:
        return any(m == "adapted" for _, m in self.todo)

    @property
    def n_resumed(self) -> int:
        return sum(bool(r.get("resumed")) for r in self.rows.values())

    @property
    def n_tasks(self) -> int:
        return len(self.todo) + int(self.seed_todo)

    def redo_seed(self) -> "CohortPlan":
        """The plan with the seed reconstructed again (its saved state is missing or unusable):
        its scratch run IS the seed, so it leaves the known rows and the subject tasks."""
        key = (self.seed_id, "scratch")
        rows = {k: v for k, v in self.rows.items() if k != key}
        todo = [(e, m) for e, m in self.todo if (e.subject_id, m) != key]
        return dataclasses.replace(self, rows=rows, todo=todo, seed_todo=True)


def plan_cohort(entries: list, mode: str, config_hash: str, finished: Finished, *, force: bool = False,
                external_seed: Optional[str] = None, check: Optional[Check] = None) -> CohortPlan:
    """The plan of a cohort run (see the module docstring); ``finished`` looks up done.json rows,
    ``check`` vets the ones that match (None: trust them). A seed whose input changed takes its
    adapted rows with it: they were adapted from another seed state.
    ``external_seed``: adapted rows adapt from an earlier run's seed state (``--seed-from``) and
    no seed is reconstructed."""
    modes = modes_of(mode)
    seed = choose_seed(entries) if "adapted" in modes and not external_seed else None
    seed_id = external_seed or (seed.subject_id if seed else None)
    redo = {}

    def done(e, m: str) -> Optional[dict]:
        prev = None if force else finished(e.subject_id, m)
        if not resumable(prev, m, config_hash, seed_id if m == "adapted" else None):
            return None
        stale = check(e, m, prev) if check else None
        if stale:
            redo[(e.subject_id, m)] = stale
            return None
        return {**prev, "resumed": True}

    seed_row = done(seed, "scratch") if seed else None
    seed_moved = seed is not None and redo.get((seed_id, "scratch"), ("", False))[1]
    rows: dict = {}
    for e in entries:
        if not e.valid:
            for m in modes:
                rows[(e.subject_id, m)] = failed_row(e.subject_id, m, "; ".join(e.problems), path=e.path,
                                                     config_hash=config_hash,
                                                     seed_subject=seed_id if m == "adapted" else None)
    todo = []
    for e in (e for e in entries if e.valid):
        for m in modes:
            row = seed_row if e is seed and m == "scratch" else done(e, m)
            if row and m == "adapted" and seed_moved:
                redo[(e.subject_id, m)], row = (f"its seed {seed_id} is redone: input changed", False), None
            if row:
                rows[(e.subject_id, m)] = row
            else:
                todo.append((e, m))
    if seed_row:
        # adapted mode: the seed's scratch run belongs to the cohort's results too
        rows[(seed_id, "scratch")] = seed_row
    plan = CohortPlan(modes=modes, seed=seed, rows=rows, todo=todo, seed_todo=False, external_seed=external_seed,
                      redo=tuple((sid, m, why) for (sid, m), (why, _) in redo.items()),
                      fallbacks=tuple(e for e in entries if e.valid and e is not seed))
    if seed and plan.needs_seed_state and not rows.get((seed_id, "scratch"), {}).get("resumed"):
        plan = plan.redo_seed()
    return plan
