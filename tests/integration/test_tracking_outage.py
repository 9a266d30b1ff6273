"""Tracking outages (issue 16, item 5) against a real ``mlflow server`` process: down at the start,
or killed after the first subject; the reconstructions finish, ``results.parquet`` is complete and
says tracking failed, and ``refine-more cohort sync-mlflow DIR`` logs what was missed once the
server is back on the same backend store (twice: nothing duplicated)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cohort import cli
from cohort.driver import run_cohort

from conftest import VENV_BIN, free_port

pytestmark = pytest.mark.slow
SUBJECTS = ("sub-002", "sub-003", "sub-004")


class Server:
    """An ``mlflow server`` on a fixed port and sqlite store, which a test can kill and restart."""

    def __init__(self, root):
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root}/store.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300       # a loaded 2-core machine took 100 s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not come up (exit {self.proc.poll()})")
                time.sleep(0.5)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def runs(self):
        client = MlflowClient(self.url)
        exp = client.get_experiment_by_name("refine-more-cohort")
        return client, client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    s = Server(root)
    yield s
    s.kill()


@pytest.fixture
def manifest(sim_cohort, tmp_path):
    path = tmp_path / "m.parquet"
    pd.DataFrame({"subject_id": list(SUBJECTS),
                  "path": [str(sim_cohort.parent / f"{s}.h5") for s in SUBJECTS]}).to_parquet(path)
    return path


def _sync(out, capsys) -> tuple:
    rc = cli.main(["sync-mlflow", str(out)])
    return rc, capsys.readouterr()


def _assert_synced(server, out, parent_id=None):
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all() and (df.tracking == "ok").all() and df.mlflow_run_id.notna().all()
    client, runs = server.runs()
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    if parent_id:
        assert parent.info.run_id == parent_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(SUBJECTS) and sorted(c.data.params["subject"] for c in children) == list(SUBJECTS)
    assert set(df.mlflow_run_id) == {c.info.run_id for c in children}
    assert all(c.info.status == "FINISHED" and "total_s" in c.data.metrics for c in children)
    assert all(client.get_metric_history(c.info.run_id, "train/loss") for c in children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["cohort_wall_s"] > 0
    assert parent.data.params["mode"] == "scratch" and len(parent.inputs.dataset_inputs) == 1
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.parquet", "config.json",
                                                                          "summary.png"}
    return parent, df


def test_server_down_at_start_then_sync(local_ray, tiny_config, manifest, tmp_path, server, capsys):
    out = tmp_path / "out"
    t0 = time.time()
    with pytest.warns(UserWarning, match="MLflow tracking disabled"):
        rep = run_cohort(manifest, out, mode="scratch", config=tiny_config, progress=False,
                         tracking_uri=server.url)
    print(f"cohort with the server down: {time.time() - t0:.1f} s")
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == len(SUBJECTS) and (df.status == "ok").all()            # reconstructions finished
    assert df.mlflow_run_id.isna().all() and df.tracking.str.startswith("failed: starting the cohort run").all()
    assert "unreachable" in df.tracking[0] and rep.parent_run_id is None
    journal = json.loads((out / "tracking.json").read_text())
    assert journal["parent_run_id"] is None and journal["finish"]["status"] == "FINISHED"

    # still down: one clear line, exit 1, nothing rewritten
    before = (out / "results.parquet").read_bytes()
    rc, cap = _sync(out, capsys)
    assert rc == 1 and cap.err.count("\n") == 1 and "unreachable" in cap.err and server.url in cap.err
    assert (out / "results.parquet").read_bytes() == before

    server.start()
    rc, cap = _sync(out, capsys)
    assert rc == 0, cap.err
    parent, df = _assert_synced(server, out)
    assert parent.data.tags["refine_more.synced"] == "true"
    # again: nothing new
    rc, _ = _sync(out, capsys)
    assert rc == 0
    _, df2 = _assert_synced(server, out, parent.info.run_id)
    assert list(df2.mlflow_run_id) == list(df.mlflow_run_id)


def test_server_killed_mid_run_then_sync(local_ray, tiny_config, manifest, tmp_path, server, capsys):
    t0 = time.time()
    server.start()
    print(f"server up: {time.time() - t0:.1f} s", file=sys.__stderr__)
    out = tmp_path / "out"
    result = {}

    def drive():
        # two CPUs per task on the 2-CPU Ray: one subject at a time
        result["report"] = run_cohort(manifest, out, mode="scratch", config=tiny_config, progress=False,
                                      tracking_uri=server.url, cpus_per_task=2, log=lambda *a: None)
    t = threading.Thread(target=drive)
    t.start()
    deadline = time.time() + 600
    while not (out / "results.parquet").is_file() and t.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    server.kill()                                  # after the first subject is logged
    print(f"killed after {time.time() - t0:.1f} s", file=sys.__stderr__)
    t.join(900)
    print(f"cohort done after {time.time() - t0:.1f} s", file=sys.__stderr__)
    rep = result["report"]
    df = pd.read_parquet(out / "results.parquet").set_index("subject_id")
    assert (df.status == "ok").all() and len(df) == len(SUBJECTS)
    logged = df[df.tracking == "ok"]
    assert len(logged) == 1 and logged.mlflow_run_id.notna().all()
    missed = df[df.tracking != "ok"]
    assert len(missed) == 2 and missed.tracking.str.startswith("failed: logging sub-").all()
    assert missed.mlflow_run_id.isna().all()

    server.start()                                 # same port, same backend store
    client, runs = server.runs()
    assert client.get_run(rep.parent_run_id).info.status == "RUNNING"     # the run never finished
    print(f"server up again after {time.time() - t0:.1f} s", file=sys.__stderr__)
    rc, cap = _sync(out, capsys)
    assert rc == 0, cap.err
    print(f"synced after {time.time() - t0:.1f} s", file=sys.__stderr__)
    parent, df2 = _assert_synced(server, out, rep.parent_run_id)
    assert df2.set_index("subject_id").loc[logged.index[0], "mlflow_run_id"] == logged.mlflow_run_id.iloc[0]
    assert "refine_more.synced" not in parent.data.tags
    assert _sync(out, capsys)[0] == 0
    _assert_synced(server, out, rep.parent_run_id)
