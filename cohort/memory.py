"""The peak memory of one reconstruction, measured inside its Ray worker.

Ray reuses worker processes, so the process's lifetime peak (``ru_maxrss``) would carry an earlier
task's. Linux lets a process reset its own high-water mark (``/proc/self/clear_refs`` ← 5, since
Linux 4.0); the peak of the task alone is then ``VmHWM`` of ``/proc/self/status``. Elsewhere the
peak is not measured (None), rather than reported wrong.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

_PROC = Path("/proc/self")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size to its current one; False where that is not possible."""
    try:
        (_PROC / "clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> Optional[float]:
    """This process's peak resident set size (GiB) since :func:`reset_peak_rss`; None without /proc."""
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20    # kB
    except (OSError, ValueError, IndexError):
        pass
    return None
