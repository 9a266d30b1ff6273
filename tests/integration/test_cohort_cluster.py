"""`ray job submit` of `python -m cohort run` to a real Ray head with token authentication."""
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import N_SUBJECTS, REPO, VENV_BIN, free_port

RAY = str(VENV_BIN / "ray")

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_head():
    """A Ray head (2 CPUs) with token auth, in its own temp dir and HOME.

    Started with ``ray start --block`` in a new process group, and stopped by signalling exactly that
    group: ``ray stop`` would kill every Ray process on the machine (other users' clusters, and the
    local Ray of this very pytest session, whose driver then exits)."""
    root = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))       # short: Ray's unix sockets live here
    home = root / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    ports = {"--port": gcs, "--dashboard-port": dash, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    cmd = [RAY, "start", "--head", "--block", "--dashboard-host=127.0.0.1", "--num-cpus=2",
           "--disable-usage-stats", f"--temp-dir={root / 'ray'}", *[f"{k}={v}" for k, v in ports.items()]]
    log = open(root / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:       # ready when the job API answers (with the token)
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not start: {(root / 'head.log').read_text()[-3000:]}")
            p = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, timeout=60)
            if p.returncode == 0:
                break
            time.sleep(1)
        yield {"env": env, "dashboard": url, "root": root}
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)       # the head's process group only (raylet, gcs, workers)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_ray_job_submit_token_auth(ray_head, sim_cohort, tmp_path):
    out = tmp_path / "out"
    env = ray_head["env"]
    runtime_env = {"excludes": [".venv", ".git", "benchmarks/results", "*.egg-info", "notebooks", ".pytest_cache"]}
    cmd = [RAY, "job", "submit", "--address", ray_head["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           sys.executable, "-m", "cohort", "run", str(sim_cohort), "--out", str(out), "--preset", "tiny",
           "--mode", "adapted", "--no-progress"]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    print(f"ray job submit: {time.time() - t0:.1f} s")
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-5000:]
    job_id = re.search(r"raysubmit_\w+", log).group(0)
    st = subprocess.run([RAY, "job", "status", "--address", ray_head["dashboard"], job_id], env=env,
                        capture_output=True, text=True, timeout=120)
    # `ray job status` prints "Job '<id>' succeeded" for status SUCCEEDED
    assert re.search(rf"Job '{job_id}' succeeded", re.sub(r"\x1b\[[0-9;]*m", "", st.stdout + st.stderr)), \
        st.stdout + st.stderr

    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all()
    ad = df[df["mode"] == "adapted"]
    assert sorted(ad.subject_id) == [f"sub-{i:03d}" for i in range(1, N_SUBJECTS + 1)]
    assert set(df[df["mode"] == "scratch"].subject_id) == {"sub-001"}      # the seed
    for sid in ad.subject_id:
        assert (out / sid / "adapted" / "maps.h5").is_file() and (out / sid / "adapted" / "done.json").is_file()
    assert (out / "mlflow.db").is_file() and (out / "summary.png").is_file()

    # without the token the job API refuses the client
    bad = {**env, "RAY_AUTH_TOKEN": "0" * 32}
    p = subprocess.run([RAY, "job", "list", "--address", ray_head["dashboard"]], env=bad, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0


def test_example_cluster_yaml_follows_ray_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    import yaml
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text()), schema)
    job = yaml.safe_load((REPO / "cluster" / "rayjob-kuberay.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "python -m cohort run" in job["spec"]["entrypoint"]
