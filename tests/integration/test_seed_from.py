"""``cohort run --seed-from``: adapt from an earlier run's seed state (its folder or its MLflow run),
reconstructing no seed; the adapted maps equal those of the run that made the seed (same config)."""
import numpy as np
import pandas as pd
import pytest

from cohort.driver import run_cohort
from cohort.seed_source import SeedSourceError, resolve_seed_from
from refine_more.files.maps_io import read_maps


@pytest.fixture(scope="module")
def first_run(local_ray, sim_cohort, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("first")
    rep = run_cohort(sim_cohort, out, mode="adapted", config=tiny_config, progress=False)
    return out, rep


def _adapted_maps(out):
    df = pd.read_parquet(out / "results.parquet")
    return {r.subject_id: read_maps(out / r.subject_id / "adapted" / "maps.h5")[0]
            for r in df[df["mode"] == "adapted"].itertuples()}


@pytest.mark.parametrize("source", ["folder", "mlflow"])
def test_seed_from_reconstructs_no_seed_and_matches(first_run, sim_cohort, tiny_config, tmp_path, source):
    out_a, rep_a = first_run
    spec = str(out_a) if source == "folder" else f"runs:/{rep_a.parent_run_id}"
    rep = run_cohort(sim_cohort, tmp_path / "b", mode="adapted", config=tiny_config, progress=False,
                     seed_from=spec, tracking_uri=rep_a.tracking_uri if source == "mlflow" else None)
    df = pd.read_parquet(tmp_path / "b" / "results.parquet")
    assert set(df["mode"]) == {"adapted"} and (df.status == "ok").all() and len(df) == 4
    assert rep.n_reconstructed == 4 and rep.seed_puts == 1           # four adapted runs, no seed run
    assert not (tmp_path / "b" / "sub-001" / "scratch").exists()
    assert (df.seed_subject == "sub-001").all()
    a, b = _adapted_maps(out_a), _adapted_maps(tmp_path / "b")
    assert a.keys() == b.keys()
    for sid in a:
        for name in ("I0", "T1F", "f", "kF"):
            np.testing.assert_array_equal(a[sid][name], b[sid][name])


def test_seed_state_is_an_artifact_of_the_parent_run(first_run):
    from mlflow.tracking import MlflowClient
    _, rep = first_run
    client = MlflowClient(rep.tracking_uri)
    assert [a.path for a in client.list_artifacts(rep.parent_run_id, "seed_state")] == \
        ["seed_state/seed_state.safetensors"]


def test_incompatible_or_missing_seed_state(first_run, tiny_config, tmp_path):
    out_a, _ = first_run
    other = tiny_config.replace(k_band=(22.0, 24.0))
    with pytest.raises(SeedSourceError, match="incompatible with this config"):
        resolve_seed_from(str(out_a), other)
    with pytest.raises(SeedSourceError, match="no seed state"):
        resolve_seed_from(str(tmp_path), tiny_config)
    with pytest.raises(SeedSourceError, match="neither a file, a folder, nor an MLflow run"):
        resolve_seed_from(str(tmp_path / "nothing"), tiny_config)
