"""Cohort manifests without Ray: ids that are safe folder names, relative paths, duplicates."""
import pytest

from cohort.manifest import ManifestError, check_subject_id, read_manifest


@pytest.mark.parametrize("bad", ["..", ".", "a/b", "../x", "", "sub 1", "x\\y"])
def test_unsafe_subject_ids_rejected(bad, tmp_path):
    with pytest.raises(ManifestError):
        check_subject_id(bad, tmp_path)


def test_manifest_csv_relative_paths_and_duplicates(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.csv").write_text("subject_id,path,role\ns1,d/s1.h5,\ns2,/abs/s2.h5,seed\n")
    entries = read_manifest(tmp_path / "m" / "a.csv", tmp_path / "out")
    assert entries[0].path == str((tmp_path / "m" / "d" / "s1.h5").resolve())
    assert entries[1].path == "/abs/s2.h5" and entries[1].role == "seed"
    (tmp_path / "m" / "b.csv").write_text("subject_id,path\ns1,a.h5\ns1,b.h5\n")
    with pytest.raises(ManifestError, match="appears in rows"):
        read_manifest(tmp_path / "m" / "b.csv")
    (tmp_path / "m" / "c.csv").write_text("subject_id,path\n..,a.h5\n")
    with pytest.raises(ManifestError, match="invalid subject_id"):
        read_manifest(tmp_path / "m" / "c.csv")
