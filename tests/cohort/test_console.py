"""The `refine-more` console script (cohort.console): every command and flag of the contract."""
import pytest

from cohort.console import COMMAND_MODULES
from refine_more.cli import build_parser


@pytest.fixture(scope="module")
def parser():
    return build_parser(COMMAND_MODULES)


@pytest.mark.parametrize("argv", [
    ["simulate", "--out", "d", "--subjects", "2", "--matrix", "6", "24", "24", "--acc", "4", "--seed", "1",
     "--snr", "200", "--mask", "1d", "--estimate-coils"],
    ["validate", "a.h5", "b.h5"],
    ["fit", "a.h5", "--method", "llr", "--out", "d", "--k-band", "22", "24"],
    ["recon", "a.h5", "--out", "d", "--preset", "tiny", "--config", "c.toml", "--set", "iters_stage1=5",
     "--set", "unroll.warm_start_steps=2", "--device", "cpu"],
    ["cohort", "run", "m.parquet", "--out", "d", "--mode", "both", "--address", "auto", "--gpus-per-task", "0.5",
     "--config", "c.yaml", "--set", "adapt.lr=3e-3", "--tracking-uri", "sqlite:///x.db", "--force"],
    ["demo", "--out", "d"],
    ["report", "d"],
])
def test_every_command_parses(parser, argv):
    args = parser.parse_args(argv)
    assert callable(args.func)


def test_the_method_package_alone_has_its_own_commands():
    args = build_parser().parse_args(["recon", "a.h5", "--out", "d"])
    assert args.preset == "small" and args.set == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo"])


def test_a_bad_override_is_a_usage_error(tmp_path, capsys):
    from cohort.console import main
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,path\ns1,a.h5\n")
    assert main(["cohort", "run", str(manifest), "--out", str(tmp_path / "o"), "--set", "iters_stage1=\"100\""]) == 2
    assert "iters_stage1" in capsys.readouterr().err
