"""Security defaults (docs/reliability.md): a local Ray started by the driver has token
authentication on and no dashboard; nothing the code loads can run code (no pickle, no
``torch.load``, no unsafe YAML: model state is safetensors, configs are safe_load/JSON/TOML)."""
import ast
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, ray
from cohort.driver import connect_ray
started = connect_ray(num_cpus=1, log=lambda *a: None)
info = ray._private.worker.global_worker.node.address_info
print(json.dumps({"started": started, "webui_url": info.get("webui_url") or "",
                  "auth_mode": os.environ.get("RAY_AUTH_MODE")}))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_local_ray_has_token_auth_and_no_dashboard(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300,
                         cwd=REPO, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"started": True, "webui_url": "", "auth_mode": "token"}, out.stderr[-2000:]


UNSAFE = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("yaml", "load"), ("yaml", "unsafe_load"),
          ("np", "load"), ("numpy", "load"), ("joblib", "load"), ("dill", "load")}


def test_no_loader_that_can_run_code():
    """Only safetensors, HDF5, JSON/TOML/yaml.safe_load and Parquet are read: a result or a seed state
    from someone else cannot execute code when loaded."""
    hits = []
    for path in sorted((REPO / "refine_more").rglob("*.py")) + sorted((REPO / "cohort").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                if (node.func.value.id, node.func.attr) in UNSAFE:
                    hits.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.func.value.id}.{node.func.attr}")
            if isinstance(node, ast.Import) and any(a.name in ("pickle", "dill", "cloudpickle") for a in node.names):
                hits.append(f"{path.relative_to(REPO)}:{node.lineno}: import of a pickle module")
    assert not hits, hits
