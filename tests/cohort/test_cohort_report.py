"""The cohort report (cohort/report.py) and `refine-more report DIR`, read with a plain HTML parser,
on cohort folders made by hand (tests/report_fixture.py: three subjects in both modes,
sub-002/adapted QC-flagged, sub-003/adapted failed). The real run's reports:
tests/integration/test_cohort.py; in a browser: test_report_browser.py."""
import json

import pandas as pd
import pytest

from cohort import report as cohort_report
from cohort.console import main
from cohort.results import RESULTS_FILE
from refine_more.evaluation.report.data import QC_NOT_COMPUTED
from report_fixture import FAILED, FLAGGED, REASONS, make_cohort
from report_pages import Page, broken_refs


@pytest.fixture(scope="module")
def qc_cohort(tmp_path_factory):
    out = make_cohort(tmp_path_factory.mktemp("cohort") / "qc")
    done = cohort_report.write_reports(out, rebuild_subjects=True)
    assert done["path"] and done["subject_reports"] == 5
    return out


def _page(out):
    text = (out / "report.html").read_text(encoding="utf-8")
    return text, Page(text)


def test_one_row_per_subject_linking_each_report(qc_cohort):
    text, page = _page(qc_cohort)
    assert [r["data-subject"] for r in page.rows] == ["sub-001", "sub-002", "sub-003"]
    assert broken_refs(page, qc_cohort) == []
    reports = {ref for tag, key, ref in page.refs if tag == "a" and ref.endswith("/report.html")}
    # every ok result's report (the failed one has none), from the table and the dots of the plots
    assert reports == {f"sub-00{i}/{m}/report.html" for i in (1, 2, 3) for m in ("scratch", "adapted")} - \
        {f"{FAILED[0]}/{FAILED[1]}/report.html"}
    assert {"overview", "subjects", "roi", "qc", "times", "adapted", "bland-altman", "failures"} <= page.ids
    assert "<script src" not in text and "<link" not in text


def test_a_flagged_subject_is_marked(qc_cohort):
    text, page = _page(qc_cohort)
    rows = {r["data-subject"]: r for r in page.rows}
    assert rows[FLAGGED[0]]["data-qc"] == "flagged" and "qc-flagged" in rows[FLAGGED[0]]["class"]
    assert {s for s, r in rows.items() if r["data-qc"] == "flagged"} == {FLAGGED[0]}
    assert rows[FAILED[0]]["data-status"] == "failed" and "st-failed" in rows[FAILED[0]]["class"]
    assert "1 QC flagged" in text and "1 of 6 results flagged" in text
    assert 'class="dot flagged"' in text                 # ringed in the strip plots
    assert "threshold 0.2" in text                         # the QC metric's threshold line


def test_without_qc_the_report_says_qc_not_computed(tmp_path):
    out = make_cohort(tmp_path / "noqc", qc=False)
    assert main(["report", str(out)]) == 0
    text, page = _page(out)
    assert QC_NOT_COMPUTED in text and {r["data-qc"] for r in page.rows} == {"none"}
    assert not any("qc-flagged" in c for _, c in page.classes) and 'class="dot flagged"' not in text
    assert broken_refs(page, out) == []


def test_report_command_rebuilds_from_outputs_alone(tmp_path, capsys):
    out = make_cohort(tmp_path / "c")
    assert not (out / "report.html").exists()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file() and (out / "sub-001" / "adapted" / "report.html").is_file()
    assert "5 subject reports; cohort report:" in capsys.readouterr().out
    assert main(["report", str(out / "sub-001" / "scratch")]) == 0
    assert main(["report", str(tmp_path)]) == 2


def test_qc_decided_after_the_subject_reaches_its_report(tmp_path):
    """The final row (results.parquet) flags a result its done.json did not: the subject report is
    rewritten; unchanged ones are not."""
    out = make_cohort(tmp_path / "late", qc=False)
    cohort_report.write_reports(out, rebuild_subjects=True)
    df = pd.read_parquet(out / RESULTS_FILE)
    df["qc_status"] = "ok"
    df["qc_reasons"] = [["late reason"] if (s, m) == FLAGGED else [] for s, m in zip(df.subject_id, df["mode"])]
    df.loc[(df.subject_id == FLAGGED[0]) & (df["mode"] == FLAGGED[1]), "qc_status"] = "flagged"
    df.loc[df.status == "failed", "qc_status"] = None
    rows = df.to_dict("records")
    for r in rows:
        if (r["subject_id"], r["mode"]) not in (FLAGGED,):
            r["qc_status"], r["qc_reasons"] = None, []          # as their done.json says: unchanged
    written = cohort_report.refresh_subject_reports(out, rows)
    assert [p.split("/")[-3:-1] for p in written] == [list(FLAGGED)]
    assert "late reason" in (out.joinpath(*FLAGGED) / "report.html").read_text()


def test_a_report_error_never_fails_the_run(tmp_path, monkeypatch):
    out = make_cohort(tmp_path / "err")

    def boom(*a, **k):
        raise RuntimeError("template exploded")
    monkeypatch.setattr(cohort_report, "render", boom)
    said = []
    done = cohort_report.write_reports(out, log=said.append)
    assert done["path"] is None and any("template exploded" in s for s in said)


def test_reasons_read_back_from_parquet(qc_cohort):
    """results.parquet gives list columns back as numpy arrays: the reasons still reach the page."""
    df = pd.read_parquet(qc_cohort / RESULTS_FILE)
    flagged = df[(df.subject_id == FLAGGED[0]) & (df["mode"] == FLAGGED[1])].iloc[0]
    assert list(flagged.qc_reasons) == REASONS
    text, _ = _page(qc_cohort)
    assert json.dumps(REASONS[1])[1:-1] in text        # in the flag mark's tooltip
