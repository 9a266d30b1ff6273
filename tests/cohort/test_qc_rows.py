"""Where the quality control shows up in a cohort (docs/decisions/017), without Ray: the subject's
row, done.json and qc.json, the montage title, results.parquet, summary.json's counts and the
console summary naming every flagged subject; a flagged seed writes no seed state; a resumed row is
judged again with the current thresholds; a row written before QC is not resumed; MLflow's child
run carries the QC tag and metrics."""
import dataclasses
import json

import pandas as pd
import pytest

from cohort import plots
from cohort.memory import reset_peak_rss
from cohort.results import (QC_FILE, QC_METRIC_COLUMNS, SEED_STATE_FILE, format_summary, rejudge, subject_dir,
                            summarize, summary_metrics, write_results)
from cohort.subject_run import run_seed
from refine_more.config.qc import QCConfig
from refine_more.evaluation.broken_inputs import scale_image
from refine_more.files.subject import read_subject, write_subject


@pytest.fixture(scope="module")
def seeds(sim_cohort, tiny_config, tmp_path_factory, monkeypatch_module):
    """run_seed on sub-001 as it is and on sub-002 with image 3's k-space ×3; the montage titles."""
    tmp = tmp_path_factory.mktemp("qc-rows")
    broken = write_subject(tmp / "sub-002.h5", scale_image(read_subject(sim_cohort.parent / "sub-002.h5")))
    titles = {}
    real = plots.montage

    def montage(path, maps, reference, tissue_mask, title):
        titles[title.split(" ")[0]] = title
        return real(path, maps, reference, tissue_mask, title)
    monkeypatch_module.setattr(plots, "montage", montage)
    cfg = {**tiny_config.to_dict(), "progress": False}
    out = tmp / "out"
    clean_row, clean_state = run_seed(sim_cohort.parent / "sub-001.h5", out, cfg, subject_id="sub-001")
    flagged_row, flagged_state = run_seed(broken, out, cfg, subject_id="sub-002")
    return out, (clean_row, clean_state), (flagged_row, flagged_state), titles


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_row_done_json_and_qc_json_carry_the_qc(seeds, tiny_config):
    out, (clean, _), (flagged, _), titles = seeds
    assert clean["status"] == flagged["status"] == "ok"
    assert clean["qc_status"] == "ok" and clean["qc_reasons"] == ""
    assert flagged["qc_status"] == "flagged" and flagged["qc_reasons"].startswith("image_residual_ratio ")
    assert "(image 3:" in flagged["qc_reasons"] and flagged["qc_worst_image"] == 3
    assert all(isinstance(flagged[c], (int, float)) for c in QC_METRIC_COLUMNS if c != "qc_fraction_k_at_band_edges")
    assert flagged["qc_s"] > 0
    if reset_peak_rss():    # Linux: measured in the task (cohort/memory.py); None where it cannot be
        assert 0.1 < flagged["peak_rss_GiB"] < 8, flagged["peak_rss_GiB"]
    done = json.loads((subject_dir(out, "sub-002", "scratch") / "done.json").read_text())
    assert done["qc_status"] == "flagged" and done["qc_reasons"] == flagged["qc_reasons"]
    report = json.loads((subject_dir(out, "sub-002", "scratch") / QC_FILE).read_text())
    assert report["status"] == "flagged" and len(report["metrics"]["image_residual_ratios"]) == 8
    assert report["thresholds"] == vars(tiny_config.qc)
    assert titles["sub-001"].endswith(", QC ok")
    assert titles["sub-002"].endswith(", QC FLAGGED (image_residual_ratio)")


def test_a_flagged_seed_publishes_no_seed_state(seeds):
    out, (_, clean_state), (_, flagged_state), _ = seeds
    assert clean_state is not None and (subject_dir(out, "sub-001", "scratch") / SEED_STATE_FILE).is_file()
    assert flagged_state is None and not (subject_dir(out, "sub-002", "scratch") / SEED_STATE_FILE).exists()


def test_results_parquet_summary_and_console_name_the_flagged(seeds):
    out, (clean, _), (flagged, _), _ = seeds
    rows = [dict(clean), dict(flagged)]
    df = pd.read_parquet(write_results(out, rows)).set_index("subject_id")
    assert list(df.qc_status) == ["ok", "flagged"] and df.loc["sub-001", "qc_reasons"] == ""
    assert df.loc["sub-002", "qc_reasons"] == flagged["qc_reasons"]
    assert all(df[c].dtype.kind in "fi" for c in QC_METRIC_COLUMNS), df[QC_METRIC_COLUMNS].dtypes
    summary = summarize(rows)
    scratch = summary["modes"]["scratch"]
    assert scratch["ok"] == 2 and scratch["flagged"] == 1
    assert scratch["flagged_subjects"] == [{"subject_id": "sub-002", "reasons": flagged["qc_reasons"]}]
    assert summary_metrics(summary)["n_flagged_scratch"] == 1.0
    text = format_summary(summary, 2, 1.0)
    assert "ok   2 (QC flagged 1)" in text
    assert f"    sub-002/scratch: {flagged['qc_reasons']}" in text.splitlines()


def test_a_resumed_row_is_judged_again_with_the_current_thresholds(seeds, tiny_config):
    _, (clean, _), (flagged, _), _ = seeds
    strict = dataclasses.replace(tiny_config.qc, max_image_residual_ratio=1.0001)
    again = rejudge(clean, strict)
    assert again["qc_status"] == "flagged" and again["qc_reasons"].startswith("image_residual_ratio ")
    assert rejudge(flagged, dataclasses.replace(tiny_config.qc, max_image_residual_ratio=0))["qc_status"] == "ok"
    assert rejudge(clean, tiny_config.qc) == clean
    # a row from before session 15 has f near 0 or 1 in one number: judged as f at 1 (an upper bound of it)
    legacy = {k: v for k, v in clean.items() if not k.startswith("qc_fraction_f_at_")}
    assert rejudge({**legacy, "qc_fraction_f_at_bounds": 0.0}, tiny_config.qc)["qc_status"] == "ok"
    assert rejudge({**legacy, "qc_fraction_f_at_bounds": 0.6}, tiny_config.qc)["qc_reasons"] == "fraction_f_at_one 0.6 > 0.05"
    assert rejudge(legacy, tiny_config.qc)["qc_reasons"] == "fraction_f_at_one could not be measured (None)"
    failed = {"subject_id": "x", "mode": "scratch", "status": "failed", "qc_status": None}
    assert rejudge(failed, strict) is failed


def test_the_child_run_has_the_qc_tag_and_metrics(seeds, tiny_config, tmp_path):
    from mlflow.tracking import MlflowClient

    from cohort.tracking import CohortTracker, default_tracking_uri
    _, _, (flagged, _), _ = seeds
    tracker = CohortTracker(default_tracking_uri(tmp_path), "qc", tmp_path, system_metrics=False, log=lambda m: None)
    tracker.start_parent(tiny_config, mode="scratch", manifest=tmp_path / "m.parquet", manifest_sha256="0",
                         resources={}, n_subjects=1, seed_subject=None)
    rid = tracker.log_child(dict(flagged), [])
    run = MlflowClient(tracker.uri).get_run(rid)
    assert run.data.tags["qc_status"] == "flagged" and run.data.tags["qc_reasons"] == flagged["qc_reasons"]
    assert run.data.metrics["qc_image_residual_ratio"] == pytest.approx(flagged["qc_image_residual_ratio"])
    assert "qc_s" in run.data.metrics and (run.data.metrics.get("peak_rss_GiB", 0) > 0.1 or not reset_peak_rss())
    artifacts = {a.path for a in MlflowClient(tracker.uri).list_artifacts(rid)}
    assert QC_FILE in artifacts
