"""Atomic file writing: a temporary file in the same folder, then ``os.replace``.

A reader never sees a half-written file, and a writer killed mid-way leaves only a temporary
named ``.<stem>.<random>.tmp<suffix>`` beside the final name (the cohort clears those on a redo).
The final file gets the mode a plain ``open`` would give it (0666 less the umask), not ``mkstemp``'s
0600: results on a shared cluster file system stay readable by the group.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Context manager: ``with atomic_path(p) as tmp: write(tmp)`` replaces ``p`` with ``tmp`` on
    success (``os.replace``, same folder) and removes ``tmp`` on error, leaving ``p`` untouched.
    The temp name keeps the final suffix (``.png``, ``.nii.gz``, ...) so libraries that choose a
    format by extension work."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, dot, rest = os.path.basename(path).partition(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp" + ((dot + rest) if dot else ""), dir=folder)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path, writer_fn: Callable[[str], None]) -> str:
    """Write ``path`` atomically: ``writer_fn(tmp_path)`` writes a temp file in the same folder,
    which then replaces ``path``; on any error ``path`` is untouched. Returns ``path``.

    e.g. ``atomic_write("fig.png", lambda p: fig.savefig(p))``.
    """
    with atomic_path(path) as tmp:
        writer_fn(tmp)
    return os.fspath(path)


def atomic_write_text(path, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path`` as str."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return str(atomic_write(path, write))


def json_default(o):
    """``json.dumps(default=...)`` for numpy scalars and arrays, paths and anything else as str."""
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
