"""A reconstruction's peak memory is its own, not its reused Ray worker's lifetime peak (cohort/memory.py)."""
import sys

import numpy as np
import pytest

from cohort.memory import peak_rss_gib, reset_peak_rss

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the high-water mark reset is Linux's")


def test_the_peak_follows_an_allocation_and_the_reset_forgets_it():
    assert reset_peak_rss()
    before = peak_rss_gib()
    block = np.ones(2**28 // 8)          # 256 MiB, touched
    during = peak_rss_gib()
    assert during - before > 0.23, (before, during)
    del block
    assert peak_rss_gib() > during - 0.01   # a peak: freeing does not lower it (the kernel counts in batches)
    assert reset_peak_rss()
    assert peak_rss_gib() < during - 0.2, (during, peak_rss_gib())   # the next task starts from what is resident
