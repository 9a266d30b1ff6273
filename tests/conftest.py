"""Fixtures for the cohort tests (tests/test_cohort*.py): a tiny simulated cohort (session), token
authentication for every Ray started by the tests, and one local Ray (num_cpus=2) shared by the
in-process driver tests."""
import os
import secrets
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SIM_MATRIX = (6, 24, 24)
N_SUBJECTS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Token authentication for the whole test session, set before any test module imports ray: Ray
# reads RAY_AUTH_MODE once, at import, so a fixture that set it later (after a tests/cohort module
# had imported ray) left the local cluster's clients in 'disabled' mode ("InvalidAuthToken").
_SESSION_TOKEN = secrets.token_hex(16)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = _SESSION_TOKEN      # never ~/.ray/auth_token
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_token():
    """The session's RAY_AUTH_TOKEN (RAY_AUTH_MODE=token is set at conftest import)."""
    return _SESSION_TOKEN


@pytest.fixture(scope="session")
def local_ray(ray_token):
    """One local Ray (2 CPUs) for the in-process driver tests; the driver joins it (ray.is_initialized)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, dashboard_host="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sim_cohort(tmp_path_factory):
    """Four tiny simulated subjects and their manifest.parquet (sub-001 is the seed)."""
    from refine_more.evaluation.simulate import SimulationConfig, simulate_cohort
    out = tmp_path_factory.mktemp("sim")
    manifest = simulate_cohort(out, N_SUBJECTS, SimulationConfig(matrix=SIM_MATRIX, n_coils=4), seed=0,
                               progress=False)
    return Path(manifest)


@pytest.fixture(scope="session")
def tiny_config():
    from refine_more.config import preset
    return preset("tiny")
