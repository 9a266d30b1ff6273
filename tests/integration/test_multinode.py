"""Two Ray nodes on this machine (a head and a second node with its own raylet, temp dir, ports and
a `node2` resource; token authentication on): a cohort runs across both (results record each
subject's node_id), then the second node's raylet is SIGKILLed while it runs a subject: its task is
retried on the head, the cohort completes and nothing is half-written. Both nodes see one file
system, as a cluster must (cluster/README.md, "Shared storage")."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from cohort.results import DONE
from conftest import VENV_BIN, free_port

pytestmark = pytest.mark.slow
RAY = str(VENV_BIN / "ray")
N = 8

NODES = """import json, ray
ray.init(address="{addr}", log_to_driver=False)
print(json.dumps([{{"id": n["NodeID"], "res": n["Resources"]}} for n in ray.nodes() if n["Alive"]]))
"""


def _start(root: Path, name: str, env: dict, args: list, workers: int) -> subprocess.Popen:
    """`ray start --block` in its own process group, temp dir and ports (a separate raylet); worker
    ports from ``workers`` on, outside Ray's default range that other clusters here use."""
    cmd = [RAY, "start", "--block", "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={root / name}",
           *[f"--{k}={free_port()}" for k in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                                              "dashboard-agent-grpc-port", "metrics-export-port",
                                              "runtime-env-agent-port")],
           f"--min-worker-port={workers}", f"--max-worker-port={workers + 99}", *args]
    return subprocess.Popen(cmd, env=env, stdout=open(root / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):      # this node's process group only (never `ray stop`)
        try:
            os.killpg(proc.pid, sig)
            proc.wait(15)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _alive_nodes(addr: str, env: dict, want: int, root: Path) -> list:
    deadline = time.time() + 180
    while time.time() < deadline:
        p = subprocess.run([sys.executable, "-c", NODES.format(addr=addr)], env=env, capture_output=True, text=True,
                           timeout=120)
        if p.returncode == 0 and len(nodes := json.loads(p.stdout.strip().splitlines()[-1])) >= want:
            return nodes
        time.sleep(2)
    raise RuntimeError(f"{want} Ray nodes did not come up: {p.stderr[-2000:]} "
                       f"{''.join(f.read_text()[-1500:] for f in root.glob('*.log'))}")


def _procs() -> list:
    """(pid, name, ppid, pgid, argv0) of every process."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            argv0 = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        name, fields = text.split("(", 1)[1].rsplit(")", 1)[0], text.rsplit(")", 1)[1].split()
        out.append((int(stat.parent.name), name, int(fields[1]), int(fields[2]), argv0))
    return out


def _raylet(pgid: int) -> list:
    """The raylet that `ray start` (process group ``pgid``) runs."""
    return [pid for pid, name, _, group, _ in _procs() if group == pgid and name == "raylet"]


def _running_subjects(raylet: int) -> list:
    """Workers of that raylet (its children, each in its own group) running a subject task now."""
    return [pid for pid, _, ppid, _, argv0 in _procs() if ppid == raylet and argv0 == "ray::subject_task"]


@pytest.fixture
def two_nodes(ray_token):
    root = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))      # short: Ray's unix sockets live here
    (root / "home").mkdir()
    env = {**os.environ, "HOME": str(root / "home"), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    base, gcs = 20000 + 200 * random.randrange(50), free_port()
    procs = [_start(root, "head", env, ["--head", f"--port={gcs}", "--include-dashboard=false",
                                        f"--ray-client-server-port={free_port()}", '--resources={"head": 1}'],
                    base)]
    try:
        addr = f"127.0.0.1:{gcs}"
        _alive_nodes(addr, env, 1, root)
        procs.append(_start(root, "node2", env, [f"--address={addr}", '--resources={"node2": 1}'],
                            base + 100))
        nodes = _alive_nodes(addr, env, 2, root)
        node2 = next(n["id"] for n in nodes if "node2" in n["res"])
        yield {"addr": addr, "env": env, "node2": node2, "node2_proc": procs[1], "root": root}
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(root, ignore_errors=True)


def test_cohort_across_two_nodes_survives_losing_one(two_nodes, tmp_path):
    from refine_more.evaluation.simulate import SimulationConfig, simulate_cohort

    from conftest import SIM_MATRIX
    manifest = simulate_cohort(tmp_path / "data", N, SimulationConfig(matrix=SIM_MATRIX, n_coils=4), seed=1,
                               progress=False)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cohort", "run", str(manifest), "--out", str(out), "--address", two_nodes["addr"],
           "--preset", "tiny", "--set", "adapt.iters_stage1=60", "--no-tracking", "--no-progress"]
    driver = subprocess.Popen(cmd, env=two_nodes["env"], stdout=open(tmp_path / "driver.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    node2, raylet = two_nodes["node2"], _raylet(two_nodes["node2_proc"].pid)
    assert len(raylet) == 1, raylet
    killed = None
    try:
        deadline = time.time() + 400
        while driver.poll() is None and killed is None and time.time() < deadline:
            done_on_2 = [p for p in out.glob(f"*/adapted/{DONE}") if json.loads(p.read_text())["node_id"] == node2]
            if done_on_2 and _running_subjects(raylet[0]):
                time.sleep(1.0)                          # inside the reconstruction, not at its start
                if _running_subjects(raylet[0]):
                    os.kill(raylet[0], signal.SIGKILL)   # node loss: the second node's raylet
                    killed = raylet[0]
            time.sleep(0.2)
        rc = driver.wait(400)
    finally:
        _stop(driver)
    log = (tmp_path / "driver.log").read_text()
    assert killed, "the second node never ran a subject while the cohort was running:\n" + log[-3000:]
    assert rc == 0, log[-5000:]

    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == N + 1 and (df.status == "ok").all(), df[["subject_id", "mode", "status", "error"]]
    assert df.node_id.notna().all() and node2 in set(df.node_id) and len(set(df.node_id)) == 2
    for d in (out / r.subject_id / r["mode"] for _, r in df.iterrows()):
        assert (d / DONE).is_file() and (d / "maps.h5").is_file()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
