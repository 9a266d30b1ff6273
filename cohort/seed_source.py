"""``cohort run --seed-from DIR_OR_MLFLOW_RUN``: a seed state published by an earlier run.

Accepted sources:
- a ``seed_state.safetensors`` file;
- an earlier cohort output folder: its seed's ``<seed>/scratch/seed_state.safetensors``,
  found through ``results.parquet`` (the row marked ``is_seed``) or, failing that, the only such
  file in the folder;
- an MLflow run: ``runs:/<run_id>`` or a bare 32-hex run id, whose parent-run artifact
  ``seed_state/seed_state.safetensors`` (logged by every cohort run that had a seed state) is
  downloaded from the tracking URI of this run.

The state is checked against this run's config (``SeedState.check_compatible``, as on resume).
"""
from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .results import RESULTS_FILE, SEED_STATE_FILE, subject_dir

SEED_ARTIFACT_DIR = "seed_state"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class SeedSourceError(ValueError):
    """--seed-from names no usable seed state (not found, unreadable or incompatible)."""


def _from_folder(folder: Path) -> Path:
    if (folder / SEED_STATE_FILE).is_file():
        return folder / SEED_STATE_FILE
    table = folder / RESULTS_FILE
    if table.is_file():
        import pandas as pd
        df = pd.read_parquet(table)
        seeds = df[(df["is_seed"] == True) & (df["mode"] == "scratch") & (df["status"] == "ok")]  # noqa: E712
        for sid in seeds["subject_id"]:
            path = subject_dir(folder, str(sid), "scratch") / SEED_STATE_FILE
            if path.is_file():
                return path
    found = sorted(folder.glob(f"*/scratch/{SEED_STATE_FILE}"))
    if len(found) == 1:
        return found[0]
    raise SeedSourceError(f"--seed-from {folder}: no seed state ({len(found)} '*/scratch/{SEED_STATE_FILE}' files)")


def _from_mlflow(run_id: str, tracking_uri: Optional[str], dst: str) -> Path:
    import mlflow.artifacts
    try:
        got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{SEED_ARTIFACT_DIR}/{SEED_STATE_FILE}",
                                                  tracking_uri=tracking_uri, dst_path=dst)
    except Exception as exc:
        raise SeedSourceError(f"--seed-from MLflow run {run_id} at {tracking_uri}: no seed state artifact "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return Path(got)


def resolve_seed_from(spec: str, config, tracking_uri: Optional[str] = None):
    """``(numpy dict for ray.put, seed subject id, path of the state file read)``; raises
    :class:`SeedSourceError`. A downloaded file lives in a temporary folder until this process
    ends (the run logs it as its own artifact at the end) or at once when it is unusable."""
    from refine_more.reconstruction.adaptation import SeedState, SeedStateError

    spec = str(spec)
    path = Path(spec)
    tmp = None
    if path.exists():
        state_path = path if path.is_file() else _from_folder(path)
    elif spec.startswith("runs:/") or _RUN_ID.match(spec):
        run_id = spec[len("runs:/"):].split("/")[0] if spec.startswith("runs:/") else spec
        tmp = tempfile.mkdtemp(prefix="seed-from-")
        atexit.register(shutil.rmtree, tmp, True)
    else:
        raise SeedSourceError(f"--seed-from {spec}: neither a file, a folder, nor an MLflow run (runs:/<id>)")
    try:
        if tmp:
            state_path = _from_mlflow(run_id, tracking_uri, tmp)
        state = SeedState.load(state_path)
        state.check_compatible(config)
    except (SeedStateError, SeedSourceError) as exc:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SeedSourceError(f"--seed-from {spec}: {exc}" if isinstance(exc, SeedStateError) else str(exc)) from None
    return state.to_numpy_dict(), str(state.meta.get("seed_subject") or "external-seed"), state_path
