"""The subject report (refine_more/evaluation/report/): one self-contained page per result folder,
read with a plain HTML parser. The folders are made by hand (tests/report_fixture.py); the report
of a real reconstruction is checked in tests/refine_more/reconstruction/test_recon.py."""
import html
import json

import numpy as np
import pytest

from refine_more.evaluation.report.data import QC_NOT_COMPUTED, qc_view
from refine_more.evaluation.report.subject import try_write_subject_report, write_subject_report
from refine_more.evaluation.report.svg import chart, nice_ticks
from report_fixture import FLAGGED, REASONS, make_cohort
from report_pages import Page, broken_refs

SECTIONS = {"summary", "qc", "maps", "maps-grid", "residual", "residual-panels", "losses", "protocol", "config", "files"}


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("reports") / "qc")


def _page(folder, record=None):
    path = write_subject_report(folder, record)
    text = open(path, encoding="utf-8").read()
    return text, Page(text)


def test_every_section_and_nothing_from_the_network(cohort_dir):
    folder = cohort_dir / "sub-001" / "scratch"
    text, page = _page(folder)
    assert SECTIONS <= page.ids
    assert broken_refs(page, folder) == []
    srcs = [ref for tag, key, ref in page.refs if tag == "img"]
    # 4 maps x (recon, zero-filled, reference, 2 differences) + colour bars + 8 residual panels
    assert len(srcs) >= 20 + 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script src" not in text and "<link" not in text and "@import" not in text
    assert text.count("<svg") >= 3         # residual bars, a loss chart per stage
    for row in ("REFINE-MORE", "zero-filled fit", "reference", "REFINE-MORE − ref."):
        assert f">{row}</th>" in text
    assert "This run is the cohort's <b>seed</b>" in text


def test_qc_absent_reads_qc_not_computed(tmp_path):
    folder = make_cohort(tmp_path / "noqc", qc=False) / "sub-002" / "adapted"
    text, page = _page(folder)
    assert QC_NOT_COMPUTED in text and "QC flagged" not in text and "qc-banner" not in page.ids


def test_a_flagged_result_is_explained(cohort_dir):
    folder = cohort_dir.joinpath(*FLAGGED)
    text, page = _page(folder)
    assert "qc-banner" in page.ids and "QC flagged" in text
    for reason in REASONS:
        assert html.escape(reason, quote=False) in text
    assert ("span", "badge flagged qc-flag") in page.classes
    assert "<td class=\"l\">residual</td><td>0.31</td><td>0.2</td>" in text.replace("\n", "")


def test_an_adapted_report_links_its_seed(cohort_dir):
    write_subject_report(cohort_dir / "sub-001" / "scratch")
    folder = cohort_dir / "sub-002" / "adapted"
    text, page = _page(folder)
    links = [ref for tag, key, ref in page.refs if tag == "a" and "seed" in ref or ref.endswith("scratch/report.html")]
    assert links == ["../../sub-001/scratch/report.html"]
    assert (folder / links[0]).resolve() == (cohort_dir / "sub-001" / "scratch" / "report.html").resolve()


def test_a_report_that_cannot_be_written_is_a_warning(cohort_dir, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "maps.h5").write_bytes(b"not hdf5")
    said = []
    assert try_write_subject_report(folder, {"subject_id": "x"}, log=said.append) is None
    assert len(said) == 1 and "report for" in said[0] and not (folder / "report.html").exists()


@pytest.mark.parametrize("record, status, reasons", [
    ({}, None, []),
    ({"qc_status": float("nan"), "qc_reasons": None}, None, []),
    ({"qc_status": "ok", "qc_reasons": np.array([], dtype=object)}, "ok", []),
    ({"qc_status": "flagged", "qc_reasons": np.array(["a", "b"], dtype=object)}, "flagged", ["a", "b"]),
    ({"qc_status": "flagged", "qc_reasons": json.dumps(["a"])}, "flagged", ["a"]),
    ({"qc": {"status": "flagged", "reasons": ["r"], "metrics": {"m": 2}, "thresholds": {"m": 1}}}, "flagged", ["r"]),
])
def test_qc_fields_in_every_shape_a_record_holds_them(record, status, reasons):
    qc = qc_view(record)
    assert (qc["status"], qc["reasons"], qc["computed"], qc["flagged"]) == (status, reasons, status is not None,
                                                                           status == "flagged")
    assert qc["label"] == (status or QC_NOT_COMPUTED)


def test_svg_charts():
    assert nice_ticks(0.0, 1.0) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(0.01, 5.0, log=True)[0] == pytest.approx(0.01)
    svg = chart([{"kind": "dots", "label": "a", "points": [{"x": 0, "y": 1.0, "href": "x/report.html", "tip": "s1",
                                                           "flagged": True}, (0, 2.0)]}], categories=["c"])
    assert svg.count("<circle") == 2 and '<a href="x/report.html">' in svg and 'class="dot flagged"' in svg
    assert "no data" in chart([{"kind": "line", "points": []}], title="t")
