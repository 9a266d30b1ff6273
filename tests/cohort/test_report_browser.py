"""Both reports in a real browser: headless Chromium loads them from disk with the network off
(tests/report_pages.py), takes a screenshot that must not be blank, and dumps the DOM after the
pages' scripts ran: every link and image resolves offline, every image decoded, the subject table
holds one row per subject and marks the QC-flagged one.

Chromium is Debian's ``chromium``; .ci/run installs it, so in CI (``CI`` set) its absence fails
the test instead of skipping it."""
import os

import pytest

from cohort import report as cohort_report
from report_fixture import FLAGGED, REASONS, make_cohort
from report_pages import Page, blank_fraction, broken_refs, chromium, dump_dom, screenshot


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    if not chromium():
        msg = "chromium is not installed (apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    out = make_cohort(tmp_path_factory.mktemp("browser") / "cohort")
    assert cohort_report.write_reports(out, rebuild_subjects=True)["path"]
    return out


def _loaded(path):
    dom = dump_dom(path)
    page = Page(dom)
    assert 'data-broken-images="0"' in dom, "an image did not decode in the browser"
    assert broken_refs(page, path.parent) == []
    return dom, page


def _not_blank(path, tmp_path):
    white, colours = blank_fraction(screenshot(path, tmp_path / f"{path.parent.name}.png"))
    assert white < 0.97 and colours > 40, (white, colours)


def test_cohort_report_offline(cohort_dir, tmp_path):
    path = cohort_dir / "report.html"
    _not_blank(path, tmp_path)
    dom, page = _loaded(path)
    rows = {r["data-subject"]: r for r in page.rows}
    assert sorted(rows) == ["sub-001", "sub-002", "sub-003"]                 # one row per subject
    assert rows[FLAGGED[0]]["data-qc"] == "flagged" and "qc-flagged" in rows[FLAGGED[0]]["class"]
    assert "3 of 3 subjects shown" in dom                                   # the table's script ran
    assert dom.count('class="dot flagged"') >= 4                            # ringed in the strip plots


def test_flagged_subject_report_offline(cohort_dir, tmp_path):
    path = cohort_dir.joinpath(*FLAGGED) / "report.html"
    _not_blank(path, tmp_path)
    dom, page = _loaded(path)
    assert "qc-banner" in page.ids and all(r.replace(">", "&gt;") in dom for r in REASONS)
    assert "../../sub-001/scratch/report.html" in [ref for _, _, ref in page.refs]
