"""Refusals before a cohort run starts (:class:`RunRefused`, the CLI's exit status 2), and one
driver per output folder (:func:`output_lock`): two drivers on one folder would redo and overwrite
each other's subjects and clear each other's temporaries. Tasks the cluster cannot run:
:mod:`cohort.ray_cluster`.

The lock is ``fcntl.flock`` on ``DIR/.cohort.lock``: the kernel releases it when the holding
process dies, SIGKILL included, so it never goes stale (a pid file would). The file is never
deleted (deleting it would let a third driver lock a new inode while the second holds the old one);
its text (pid, host, start time) is only for the message. On NFS, Linux emulates ``flock`` with
POSIX byte-range locks, which NFSv4 servers honour across clients (``cluster/README.md``).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".cohort.lock"


class RunRefused(ValueError):
    """The run cannot start (another driver holds the folder, or no node can run a task)."""


@contextlib.contextmanager
def output_lock(out_dir):
    """Hold ``out_dir``'s lock for the ``with`` block; :class:`RunRefused` when another process has it."""
    path = Path(out_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)     # O_CLOEXEC (Python's default): Ray's children do not inherit it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunRefused(f"output folder {out_dir} is in use by another cohort run ({holder}); "
                             "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)                                      # releases the lock


def clear_killed_writes(out_dir: Path) -> None:
    """Remove the temporaries of cohort files (results, summary, config) a killed driver left
    half-written (SIGKILL skips atomic_path's clean-up); subject folders clear their own."""
    for stale in out_dir.glob(".*.tmp*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
