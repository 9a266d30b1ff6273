"""Where each running reconstruction is, for the driver's console (a real-size subject runs for an
hour; a bar that moves once per subject says nothing meanwhile).

The task writes ``DIR/<id>/<mode>/progress.json`` as it goes (:class:`ProgressFile`: the phase, done
of total, when the phase began) and removes it before ``done.json`` (or when it fails); the driver reads
the files of its in-flight tasks while it waits (:func:`describe`). A file, not a Ray actor: the output folder is
already shared by every node (tasks write their results there), and a file can be read with ``cat``.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from refine_more.files.atomic import atomic_write_text

PROGRESS_FILE = "progress.json"
MIN_INTERVAL_S = 2.0     # iterations of a small subject take milliseconds: at most one write per 2 s
POLL_S = 10.0            # how often the driver looks while no task finishes
SHOWN = 3                # running tasks named on the console line; the rest are counted


class ProgressFile:
    """``ReconRun.on_progress`` for a cohort task: (phase, done, total) → ``progress.json``, written
    atomically on every new phase and at most every `MIN_INTERVAL_S` within one. A file system error
    is a warning (once), never the task's failure: the console line is not worth an hour's run."""

    def __init__(self, path, clock=time.time):
        self.path, self.clock = Path(path), clock
        self.phase, self.phase_started, self.written = None, 0.0, float("-inf")
        self.broken = False

    def __call__(self, phase: str, done: int = 0, total: int = 0) -> None:
        now = self.clock()
        if phase == self.phase and now - self.written < MIN_INTERVAL_S and done != total:
            return
        if phase != self.phase:
            self.phase, self.phase_started = phase, now
        self._guard(lambda: atomic_write_text(self.path, json.dumps(
            {"phase": phase, "done": int(done), "total": int(total), "phase_started": self.phase_started,
             "updated": now})))
        self.written = now

    def remove(self) -> None:
        self._guard(lambda: self.path.unlink(missing_ok=True))

    def _guard(self, action) -> None:
        try:
            action()
        except OSError as exc:
            if not self.broken:
                warnings.warn(f"{self.path}: progress not written: {exc}")
            self.broken = True


def read(path) -> dict | None:
    """A progress file's content, or None (absent, caught mid-replace on a shared file system, or not
    what :class:`ProgressFile` writes)."""
    try:
        p = json.loads(Path(path).read_text())
        ok = isinstance(p["phase"], str) and all(isinstance(p[k], (int, float)) for k in
                                                 ("done", "total", "phase_started", "updated"))
        return p if ok else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def describe(out_dir, running, since: float = 0.0, now=None) -> str:
    """One line for the console: ``running`` (subject_id, mode) pairs → "sub-001/scratch: stage 1 20/40
    (1:05)", the phase's elapsed time from when it began (a long solve reports no iterations).
    Tasks without a file written after `since` (the driver's start: a killed run's file is stale) are
    left out: queued, or starting. The first `SHOWN` are named, the others counted."""
    from .results import subject_dir

    now = time.time() if now is None else now
    parts = []
    for sid, mode in running:
        p = read(subject_dir(out_dir, sid, mode) / PROGRESS_FILE)
        if not p or p["updated"] < since:
            continue
        count = f" {p['done']}/{p['total']}" if p["total"] else ""
        parts.append(f"{sid}/{mode}: {p['phase']}{count} ({_minutes(max(0.0, now - p['phase_started']))})")
    more = f"; +{len(parts) - SHOWN} more running" if len(parts) > SHOWN else ""
    return "; ".join(parts[:SHOWN]) + more
