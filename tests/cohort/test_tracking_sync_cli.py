"""``refine-more cohort sync-mlflow`` refuses a folder that is not a cohort's output with one line."""
from cohort.console import main


def test_sync_mlflow_on_a_folder_without_results(tmp_path, capsys):
    assert main(["cohort", "sync-mlflow", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path) in err and "results.parquet" in err


def test_sync_mlflow_refuses_a_folder_a_cohort_run_holds(tmp_path, capsys):
    import pandas as pd
    from cohort.guards import output_lock
    pd.DataFrame({"subject_id": ["s"], "mode": ["scratch"]}).to_parquet(tmp_path / "results.parquet")
    with output_lock(tmp_path):
        assert main(["cohort", "sync-mlflow", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use by another cohort run" in err
