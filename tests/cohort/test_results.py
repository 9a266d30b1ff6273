"""The cohort summary: means per mode, the time speedup and the adapted/scratch nRMSE ratios."""
import math

import pytest

from cohort.results import format_summary, summarize, summary_metrics


def _row(sid, mode, total, t1f, status="ok"):
    return {"subject_id": sid, "mode": mode, "status": status, "total_s": total, "nrmse_T1F": t1f,
            "nrmse_f": 4.0, "ssim_T1F": 0.9}


def test_both_modes_give_the_time_speedup_and_nrmse_ratios():
    rows = [_row("a", "scratch", 60.0, 4.0), _row("b", "scratch", 40.0, 2.0),
            _row("a", "adapted", 20.0, 3.3), _row("b", "adapted", 5.0, 2.7), _row("c", "adapted", 1.0, 9.9, "failed")]
    s = summarize(rows)
    assert s["modes"]["adapted"]["ok"] == 2 and s["modes"]["adapted"]["failed"] == 1
    assert s["speedup"] == pytest.approx(50.0 / 12.5)
    assert s["nrmse_ratio"]["T1F"] == pytest.approx(3.0 / 3.0) and s["nrmse_ratio"]["f"] == pytest.approx(1.0)
    assert math.isnan(s["nrmse_ratio"]["kF"])                  # no kF scores
    text = format_summary(s, 3, 10.0)
    assert "speedup (mean scratch / mean adapted total time): 4.00x" in text
    assert "mean nRMSE adapted / scratch: T1F 1.000  f 1.000" in text
    assert summary_metrics(s)["speedup"] == pytest.approx(4.0) and "nrmse_ratio_T1F" in summary_metrics(s)


def test_one_mode_has_no_ratios():
    s = summarize([_row("a", "scratch", 60.0, 4.0)])
    assert math.isnan(s["speedup"]) and all(math.isnan(v) for v in s["nrmse_ratio"].values())
    assert "speedup" not in format_summary(s, 1, 1.0) and "adapted / scratch" not in format_summary(s, 1, 1.0)
