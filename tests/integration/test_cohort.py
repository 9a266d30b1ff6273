"""Cohort driver end to end on a real local Ray (2 CPUs) with real MLflow (sqlite and a server)."""
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import h5py
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

from cohort import cli
from cohort.driver import run_cohort
from cohort.results import CONFIG_FILE, DONE, SUMMARY_FILE, subject_dir

from conftest import N_SUBJECTS, VENV_BIN, free_port


def _mlflow_runs(uri, experiment="refine-more-cohort"):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return client, client.search_runs([exp.experiment_id], max_results=1000)


# -- end to end, both modes ------------------------------------------------------------------------
def test_cohort_both_modes(local_ray, sim_cohort, tiny_config, tmp_path, monkeypatch):
    import ray
    puts = []
    real_put = ray.put

    def counting_put(value, *a, **k):
        if isinstance(value, dict) and "__header__" in value:
            puts.append(1)
        return real_put(value, *a, **k)
    monkeypatch.setattr(ray, "put", counting_put)

    out = tmp_path / "out"
    t0 = time.time()
    rep = run_cohort(sim_cohort, out, mode="both", config=tiny_config, progress=False)
    print(f"both-mode cohort of {N_SUBJECTS}: {time.time() - t0:.1f} s\n{rep.summary_text}")

    # the seed state went into the object store exactly once
    assert len(puts) == 1 and rep.seed_puts == 1
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 2 * N_SUBJECTS
    assert set(zip(df.subject_id, df["mode"])) == {(f"sub-{i:03d}", m) for i in range(1, N_SUBJECTS + 1)
                                                   for m in ("scratch", "adapted")}
    assert (df.status == "ok").all() and not df.resumed.any()
    for c in ("node", "device", "stage1_s", "stage2_s", "total_s", "iterations_stage1", "iterations_stage2",
              "loss_final", "nrmse_T1F", "ssim_f", "mlflow_run_id", "maps_path", "montage_path"):
        assert df[c].notna().all(), c
    ad = df[df["mode"] == "adapted"]
    assert (ad.method == "refine-more-adapted").all() and (ad.seed_subject == "sub-001").all()
    assert (ad.iterations_stage1 == tiny_config.adapt.iters_stage1).all()
    assert set(df[df.is_seed].subject_id) == {"sub-001"}
    for _, r in df.iterrows():
        d = subject_dir(out, r.subject_id, r["mode"])
        for f in ("maps.h5", "T1F.nii.gz", "montage.png", "loss.png", "history.json", "history.csv", CONFIG_FILE, DONE,
                  "diagnostics.json", "diagnostics.safetensors", "report.html"):
            assert (d / f).is_file(), d / f
        done = json.loads((d / DONE).read_text())
        assert done["config_hash"] == tiny_config.hash() and done["mode"] == r["mode"]
        with h5py.File(d / "maps.h5") as h:
            assert h.attrs["subject_id"] == r.subject_id and h["T1F"].shape == (6, 24, 24)
    assert (subject_dir(out, "sub-001", "scratch") / "seed_state.safetensors").is_file()
    assert (out / "summary.png").is_file() and (out / "report.html").is_file()
    assert df.report_path.notna().all() and (df.report_s > 0).all() and (df.diagnostics_s > 0).all()
    cohort_page = (out / "report.html").read_text()
    assert all(f'href="{s}/{m}/report.html"' in cohort_page for s, m in zip(df.subject_id, df["mode"]))
    _opens_offline_in_chromium(out / "report.html", set(df.subject_id), tmp_path)
    assert rep.summary["speedup"] > 0 and all(r > 0 for r in rep.summary["nrmse_ratio"].values())
    stored = json.loads((out / SUMMARY_FILE).read_text())
    assert stored["speedup"] == pytest.approx(rep.summary["speedup"]) and "nrmse_ratio" in stored
    assert stored["report_seconds"]["cohort"] > 0 and stored["report_seconds"]["subject_reports_in_tasks"] > 0
    assert "adapted / scratch" in rep.summary_text
    assert json.loads((out / CONFIG_FILE).read_text())["config_hash"] == tiny_config.hash()

    # MLflow: the parent and one child per subject and mode, with runtime metrics and artifacts
    client, runs = _mlflow_runs(rep.tracking_uri)
    assert rep.tracking_uri == f"sqlite:///{out.resolve()}/mlflow.db"
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == rep.parent_run_id
    p = parents[0]
    assert p.data.params["config_hash"] == tiny_config.hash() and p.data.params["mode"] == "both"
    assert "manifest_sha256" in p.data.params and "ray.CPU" in p.data.params
    assert p.data.metrics["cohort_wall_s"] > 0 and p.data.metrics["subjects_per_hour"] > 0
    assert p.data.metrics["speedup"] > 0 and p.data.metrics["nrmse_ratio_T1F"] > 0
    assert {a.path for a in client.list_artifacts(p.info.run_id)} >= {"results.parquet", "summary.png", "report.html"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
    assert len(children) == 2 * N_SUBJECTS
    assert {(c.data.params["subject"], c.data.params["mode"]) for c in children} == \
        set(zip(df.subject_id, df["mode"]))
    assert set(df.mlflow_run_id) == {c.info.run_id for c in children}
    for c in children:
        assert c.info.status == "FINISHED"
        for k in ("stage1_s", "stage2_s", "total_s", "nrmse_T1F", "ssim_T1F"):
            assert k in c.data.metrics, k
        assert "lora_rank" in c.data.params
        hist = client.get_metric_history(c.info.run_id, "train/loss")
        steps = [m.step for m in hist]
        assert len(hist) >= 2 and steps == sorted(steps)
        assert {a.path for a in client.list_artifacts(c.info.run_id)} >= {"montage.png", "loss.png", "maps", "report.html"}


# -- resume and failure isolation ------------------------------------------------------------------
def _opens_offline_in_chromium(path, subjects: set, tmp_path):
    """The real run's cohort report in headless Chromium, network off (tests/report_pages.py): not
    blank, every link and image resolves, one table row per subject, each linking both modes."""
    from report_pages import Page, blank_fraction, broken_refs, chromium, dump_dom, screenshot
    if not chromium():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        return
    dom = dump_dom(path)
    page = Page(dom)
    assert 'data-broken-images="0"' in dom and broken_refs(page, path.parent) == []
    assert {r["data-subject"] for r in page.rows} == subjects
    white, colours = blank_fraction(screenshot(path, tmp_path / "cohort-report.png"))
    assert white < 0.97 and colours > 40, (white, colours)


def test_resume_and_failure_isolation(local_ray, sim_cohort, tiny_config, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(1, 4):
        shutil.copy(sim_cohort.parent / f"sub-{i:03d}.h5", data / f"sub-{i:03d}.h5")
    (data / "bad.h5").write_bytes(os.urandom(4096))     # corrupt: garbage bytes
    rows = [("bad", "bad.h5", ""), ("sub-001", "sub-001.h5", ""), ("sub-002", "sub-002.h5", "seed"),
            ("gone", "missing.h5", ""), ("sub-003", "sub-003.h5", "")]
    manifest = data / "manifest.csv"
    manifest.write_text("subject_id,path,role\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    out = tmp_path / "out"
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text("preset: tiny\n")

    t0 = time.time()
    rc = cli.main(["run", str(manifest), "--out", str(out), "--config", str(config_file), "--mode", "adapted",
                   "--no-progress"])
    print(f"first run: {time.time() - t0:.1f} s")
    assert rc == 1                                        # some subjects failed; everything else written
    df = pd.read_parquet(out / "results.parquet")
    failed = df[df.status == "failed"]
    assert set(failed.subject_id) == {"bad", "gone"} and (failed["mode"] == "adapted").all()
    assert failed.error.str.contains("bad.h5").any() and failed.error.str.contains("does not exist").any()
    ok = df[df.status == "ok"]
    # the seed (role 'seed') from scratch, then every valid subject adapted, the seed included
    assert set(zip(ok.subject_id, ok["mode"])) == {("sub-002", "scratch"), ("sub-001", "adapted"),
                                                   ("sub-002", "adapted"), ("sub-003", "adapted")}
    assert (ok[ok["mode"] == "adapted"].seed_subject == "sub-002").all()
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*/" + DONE)}
    assert len(mtimes) == 4

    # rerun: nothing is reconstructed again
    rep = run_cohort(manifest, out, mode="adapted", config=tiny_config, progress=False)
    assert rep.n_reconstructed == 0 and rep.seed_puts == 0
    df2 = pd.read_parquet(out / "results.parquet")
    ok2 = df2[df2.status == "ok"]
    assert len(ok2) == 4 and ok2.resumed.all()
    assert set(df2[df2.status == "failed"].subject_id) == {"bad", "gone"}
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/" + DONE)} == mtimes

    # one adapted result lost: only it is redone, from the seed state saved on disk (put once)
    (subject_dir(out, "sub-003", "adapted") / DONE).unlink()
    rep = run_cohort(manifest, out, mode="adapted", config=tiny_config, progress=False)
    assert rep.n_reconstructed == 1 and rep.seed_puts == 1
    r = {(x["subject_id"], x["mode"]): x for x in rep.rows}
    assert r[("sub-003", "adapted")]["status"] == "ok" and not r[("sub-003", "adapted")]["resumed"]
    assert r[("sub-001", "adapted")]["resumed"]

    # --force redoes everything (a different config or seed is not "done" either: tests/cohort/test_plan.py)
    rep = run_cohort(manifest, out, mode="adapted", config=tiny_config, progress=False, force=True,
                     tracking=False)
    assert rep.n_reconstructed == 4 and not any(x["resumed"] for x in rep.rows)


# -- an MLflow tracking server ---------------------------------------------------------------------
@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    db = tmp_path / "server" / "mlflow.db"
    db.parent.mkdir()
    proc = subprocess.Popen(
        [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
         "--port", str(port), "--artifacts-destination", str(tmp_path / "server" / "artifacts"), "--workers", "1"],
        cwd=db.parent, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300   # ~100 s on a loaded 2-core machine
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not come up (exit {proc.poll()})")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def test_mlflow_tracking_server(local_ray, sim_cohort, tiny_config, tmp_path, mlflow_server):
    manifest = tmp_path / "m.parquet"
    pd.DataFrame({"subject_id": ["sub-003", "sub-004"],
                  "path": [str(sim_cohort.parent / "sub-003.h5"), str(sim_cohort.parent / "sub-004.h5")]}
                 ).to_parquet(manifest)
    out = tmp_path / "out"
    # also: asking for a GPU on a cluster without GPUs falls back to CPU tasks with a warning
    with pytest.warns(UserWarning, match="no GPUs"):
        rep = run_cohort(manifest, out, mode="scratch", config=tiny_config, tracking_uri=mlflow_server,
                         gpus_per_task=1, progress=False)
    assert rep.resources["gpus_per_task"] == 0 and all(r["device"] == "cpu" for r in rep.rows)
    assert rep.tracking_uri == mlflow_server and not (out / "mlflow.db").exists()
    client, runs = _mlflow_runs(mlflow_server)
    parent = [r for r in runs if r.info.run_id == rep.parent_run_id][0]
    assert parent.info.status == "FINISHED" and parent.data.params["mode"] == "scratch"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == rep.parent_run_id]
    assert sorted(c.data.params["subject"] for c in children) == ["sub-003", "sub-004"]
    for c in children:
        assert c.data.metrics["total_s"] > 0
        assert {a.path for a in client.list_artifacts(c.info.run_id)} >= {"montage.png", "loss.png"}
