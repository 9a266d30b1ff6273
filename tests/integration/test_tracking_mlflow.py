"""MLflow as its users expect (issue 15, item 4), on a real local Ray and a real MLflow store: the
parent run has system metrics, the manifest as a dataset input with its digest and the resolved
config as an artifact; every subject has a child run, the failed ones included; resumed rows keep
their run ids; a seed state downloaded from MLflow leaves no temporary folder behind."""
import json
import os
import subprocess
import sys
import tempfile

import mlflow.data
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cohort.driver import run_cohort
from cohort.seed_source import SeedSourceError, resolve_seed_from
from cohort.tracking import CohortTracker

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked_run(local_ray, sim_cohort, tiny_config, tmp_path_factory):
    """An adapted cohort of sub-003, sub-004 and a corrupt file, tracked in the default sqlite store."""
    tmp = tmp_path_factory.mktemp("tracked")
    (tmp / "bad.h5").write_bytes(b"\0garbage" * 512)
    manifest = tmp / "m.parquet"
    pd.DataFrame({"subject_id": ["sub-003", "sub-004", "bad"],
                  "path": [str(sim_cohort.parent / "sub-003.h5"), str(sim_cohort.parent / "sub-004.h5"),
                           str(tmp / "bad.h5")]}).to_parquet(manifest)
    out = tmp / "out"
    rep = run_cohort(manifest, out, mode="adapted", config=tiny_config, progress=False)
    return manifest, out, rep


def test_parent_run_has_system_metrics_dataset_and_config(tracked_run):
    manifest, out, rep = tracked_run
    client = MlflowClient(rep.tracking_uri)
    parent = client.get_run(rep.parent_run_id)
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        hist = client.get_metric_history(rep.parent_run_id, key)
        assert hist and all(m.value >= 0 for m in hist), key
    assert client.get_metric_history(rep.parent_run_id, "system/system_memory_usage_megabytes")[0].value > 10
    assert parent.data.tags["refine_more.system_metrics"].startswith("driver node")

    inputs = parent.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    expected = mlflow.data.from_pandas(pd.read_parquet(manifest), source=str(manifest), name="m")
    assert ds.name == "m" and ds.digest == expected.digest and len(ds.digest) >= 8
    assert str(manifest) in ds.source
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "cohort"

    local = client.download_artifacts(rep.parent_run_id, "config.json", str(out.parent / "dl"))
    assert json.loads(open(local).read()) == json.loads((out / "config.json").read_text())


def test_every_subject_has_a_child_run_failed_included(tracked_run):
    _, out, rep = tracked_run
    df = pd.read_parquet(out / "results.parquet")
    assert set(zip(df.subject_id, df["mode"])) == {("sub-003", "scratch"), ("sub-003", "adapted"),
                                                   ("sub-004", "adapted"), ("bad", "adapted")}
    assert (df.tracking == "ok").all() and df.mlflow_run_id.notna().all()
    client = MlflowClient(rep.tracking_uri)
    children = client.search_runs([client.get_run(rep.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{rep.parent_run_id}'")
    assert {c.info.run_id for c in children} == set(df.mlflow_run_id)
    bad = client.get_run(df.set_index("subject_id").loc["bad", "mlflow_run_id"])
    assert bad.info.status == "FAILED" and "bad.h5" in bad.data.tags["error"]
    assert bad.data.tags["status"] == "failed"


def test_resumed_rows_keep_their_run_ids(tracked_run, tiny_config):
    manifest, out, rep = tracked_run
    before = pd.read_parquet(out / "results.parquet").set_index(["subject_id", "mode"])
    rep2 = run_cohort(manifest, out, mode="adapted", config=tiny_config, progress=False)
    assert rep2.n_reconstructed == 0 and rep2.parent_run_id != rep.parent_run_id
    after = pd.read_parquet(out / "results.parquet").set_index(["subject_id", "mode"])
    ok = after[after.status == "ok"]
    assert ok.resumed.all() and (ok.tracking == "ok").all()
    assert (ok.mlflow_run_id == before.loc[ok.index, "mlflow_run_id"]).all()
    # the bad file is reported again, with a child run under the new parent
    client = MlflowClient(rep.tracking_uri)
    bad = client.get_run(after.loc[("bad", "adapted"), "mlflow_run_id"])
    assert bad.data.tags["mlflow.parentRunId"] == rep2.parent_run_id and bad.info.status == "FAILED"


def test_failed_task_row_gets_a_failed_child_run(tmp_path, tiny_config):
    """The scheduler's path for a subject whose task raised: a FAILED child with the error tag."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,path\nsub-x,x.h5\n")
    tracker = CohortTracker(f"sqlite:///{tmp_path}/mlflow.db", "exp", out, system_metrics=False)
    tracker.start_parent(tiny_config, mode="scratch", manifest=manifest, manifest_sha256="0" * 64,
                         resources={}, n_subjects=1, seed_subject=None)
    row = {"subject_id": "sub-x", "mode": "scratch", "status": "failed",
           "error": "RayTaskError: ZeroDivisionError in sub-x.h5"}
    rid = tracker.log_child(row, [])
    assert rid and row["mlflow_run_id"] == rid and row["tracking"] == "ok"
    run = MlflowClient(tracker.uri).get_run(rid)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("RayTaskError: ZeroDivision")
    # the CSV manifest is the parent's dataset input too
    inputs = MlflowClient(tracker.uri).get_run(tracker.parent_run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["m"]


def test_seed_from_mlflow_leaves_no_temporary_folder(tracked_run, tiny_config, tmp_path, monkeypatch):
    _, _, rep = tracked_run
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    code = ("import sys; from cohort.seed_source import resolve_seed_from; from refine_more.config import preset;"
            "_, sid, p = resolve_seed_from(sys.argv[1], preset('tiny'), sys.argv[2]); print(p)")
    res = subprocess.run([sys.executable, "-c", code, f"runs:/{rep.parent_run_id}", rep.tracking_uri],
                         cwd=REPO, env={**os.environ, "TMPDIR": str(tmpdir)}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert str(tmpdir) in res.stdout                 # it was downloaded there ...
    assert list(tmpdir.iterdir()) == []              # ... and removed when the process ended
    # an unusable source: removed at once
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    with pytest.raises(SeedSourceError, match="no seed state artifact"):
        resolve_seed_from("runs:/" + "0" * 32, tiny_config, rep.tracking_uri)
    assert list(tmpdir.iterdir()) == []


def test_sync_without_journal_into_another_store(tracked_run, tmp_path, capsys):
    """A folder without tracking.json (e.g. run with an older version) syncs from config.json and
    the rows: a new parent, one child per row with its loss curve, ids written back; twice: no more."""
    import shutil
    from cohort import cli
    _, out, _ = tracked_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "tracking.json"))
    df = pd.read_parquet(copy / "results.parquet")
    df["mlflow_run_id"], df["tracking"] = None, None
    df.to_parquet(copy / "results.parquet")
    uri = f"sqlite:///{tmp_path}/other.db"
    assert cli.main(["sync-mlflow", str(copy), "--tracking-uri", uri]) == 0
    assert cli.main(["sync-mlflow", str(copy), "--tracking-uri", uri]) == 0
    assert "0 child run(s) logged" in capsys.readouterr().out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("refine-more-cohort").experiment_id])
    synced = pd.read_parquet(copy / "results.parquet")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + len(synced)
    assert parents[0].data.params["config_hash"] == json.loads((copy / "config.json").read_text())["config_hash"]
    assert set(synced.mlflow_run_id) == {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId")}
    ok = synced[synced.status == "ok"].mlflow_run_id.iloc[0]
    assert len(client.get_metric_history(ok, "train/loss")) >= 2
