"""notebooks/adapted_vs_scratch.ipynb runs top to bottom on a tiny cohort's output.

The output is made by the plain functions of :mod:`cohort.subject_run` and
:mod:`cohort.results` (no Ray): the seed from scratch, then each subject adapted and from scratch,
which is what a `both`-mode run writes.
"""
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(sim_cohort, tiny_config, tmp_path_factory):
    from cohort.results import write_results
    from cohort.subject_run import run_seed, run_subject

    out = tmp_path_factory.mktemp("run")
    cfg = {**tiny_config.to_dict(), "progress": False}
    paths = {sid: str(sim_cohort.parent / f"{sid}.h5") for sid in ("sub-001", "sub-002")}
    seed_row, seed_state = run_seed(paths["sub-001"], out, cfg, subject_id="sub-001")
    rows = [seed_row,
            run_subject(paths["sub-002"], out, "scratch", cfg, subject_id="sub-002"),
            *[run_subject(p, out, "adapted", cfg, seed_state, subject_id=sid, seed_subject="sub-001",
                          is_seed=sid == "sub-001") for sid, p in paths.items()]]
    write_results(out, rows)
    return out


def test_subject_run_writes_the_results_and_the_resolved_config(tiny_run, tiny_config):
    import json

    import pandas as pd

    from refine_more.config import load_config
    df = pd.read_parquet(tiny_run / "results.parquet")
    assert sorted(zip(df.subject_id, df["mode"])) == [("sub-001", "adapted"), ("sub-001", "scratch"),
                                                      ("sub-002", "adapted"), ("sub-002", "scratch")]
    assert (df.status == "ok").all() and df.nrmse_T1F.gt(0).all() and df.ssim_T1F.gt(0).all()
    saved = tiny_run / "sub-002" / "adapted" / "config.json"
    assert json.loads(saved.read_text())["config_hash"] == tiny_config.hash()
    assert load_config(saved).hash() == tiny_config.hash()


def test_notebook_runs_top_to_bottom(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_MORE_RUN", str(tiny_run))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(REPO / "notebooks" / "adapted_vs_scratch.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "speedup (scratch / adapted total time)" in text
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
