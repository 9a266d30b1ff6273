"""Config: types and Literal choices checked at load, one loader (file + overrides), a docstring
per field, the preset registry, the resolved config round trip."""
import ast
import dataclasses
import inspect
import json
import sys

import pytest

from refine_more import config as config_module
from refine_more.config import (PRESETS, AdaptConfig, INRConfig, ReconConfig, UnrollConfig, apply_overrides,
                                load_config, preset)
from refine_more.config.qc import QCConfig
from refine_more.networks.encoding import HashEncodingConfig


@pytest.mark.parametrize("key, value, match", [
    ("iters_stage1", "100", "config.iters_stage1: expected int"),
    ("iters_stage1", 1.5, "expected int"),
    ("lr", "1e-3", "config.lr: expected float"),
    ("progress", 1, "expected bool"),
    ("device", "gpu", r"config.device: expected one of \['auto', 'cpu', 'cuda'\]"),
])
def test_wrong_types_fail_at_load_naming_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        ReconConfig.from_dict({**preset("tiny").to_dict(), key: value})


def test_nested_literals_and_types_are_checked_too():
    base = preset("tiny").to_dict()
    with pytest.raises(ValueError, match="config.unroll.warm_start_solver: expected one of"):
        ReconConfig.from_dict({**base, "unroll": {**base["unroll"], "warm_start_solver": "newton"}})
    with pytest.raises(ValueError, match="config.inr.hash_images.log2_hashmap_size: expected int"):
        ReconConfig.from_dict({**base, "inr": {**base["inr"], "hash_images": {"log2_hashmap_size": "14"}}})
    # an int is a fine float, and every preset survives its own round trip
    assert ReconConfig.from_dict({**base, "lr": 1}).lr == 1
    for name in PRESETS:
        assert ReconConfig.from_dict(preset(name).to_dict()) == preset(name)


def test_a_toml_file_with_a_string_number_fails_at_load(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('preset = "tiny"\niters_stage1 = "100"\n')
    with pytest.raises(ValueError, match="iters_stage1: expected int"):
        load_config(path)


def test_one_loader_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\niters_stage1: 7\nunroll:\n  iterations: 3\n")
    cfg = load_config(path, "small", ["iters_stage1=9", "adapt.lr=3e-3"])
    assert (cfg.iters_stage1, cfg.unroll.iterations, cfg.adapt.lr) == (9, 3, 3e-3)
    assert cfg.inr == preset("tiny").inr                      # the file's preset, not the argument's
    assert load_config(None, "tiny", ["device=cpu"]).device == "cpu"
    with pytest.raises(ValueError, match="expected one of"):
        load_config(None, "tiny", ["device=tpu"])


def test_the_resolved_config_loads_back(tmp_path):
    cfg = apply_overrides(preset("small"), ["unroll.warm_start_steps=32", "k_band=[22, 24]"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config_hash": cfg.hash(), "config": cfg.to_dict()}))
    assert load_config(path) == cfg


def test_toml_on_python_3_10_uses_tomli(monkeypatch, tmp_path):
    """Where `tomllib` is missing (Python 3.10) the loader takes `tomli` (a dependency there)."""
    tomllib = pytest.importorskip("tomllib")
    monkeypatch.setitem(sys.modules, "tomllib", None)             # import tomllib now fails
    monkeypatch.setitem(sys.modules, "tomli", tomllib)            # the same parser, under tomli's name
    path = tmp_path / "c.toml"
    path.write_text('preset = "tiny"\niters_stage1 = 7\n')
    assert load_config(path).iters_stage1 == 7


def test_preset_registry():
    assert set(PRESETS) == {"tiny", "small", "large", "paper"} and all(PRESETS.values())
    for name in PRESETS:
        assert isinstance(preset(name), ReconConfig)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


@pytest.mark.parametrize("cls", [ReconConfig, INRConfig, UnrollConfig, AdaptConfig, HashEncodingConfig, QCConfig])
def test_every_field_has_a_docstring(cls):
    """nerfstudio style: a string right under each field says what it is."""
    node = ast.parse(inspect.getsource(cls)).body[0]
    docs = {}
    for a, b in zip(node.body, node.body[1:] + [None]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = b.value.value
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert missing == [], f"{cls.__name__}: fields without a docstring: {missing}"


def test_literal_fields_are_literals():
    hints = {c: __import__("typing").get_type_hints(c) for c in (ReconConfig, UnrollConfig, INRConfig)}
    assert "Literal" in str(hints[ReconConfig]["device"])
    assert "Literal" in str(hints[UnrollConfig]["preconditioner"])
    assert "Literal" in str(hints[UnrollConfig]["warm_start_solver"])
    assert "Literal" in str(hints[INRConfig]["hash_backend"])
    assert config_module.ReconConfig is ReconConfig


def test_qc_thresholds_are_saved_with_the_config_but_not_hashed():
    """They judge a result and do not change it (docs/decisions/017): a new threshold must not
    redo a cohort, and a resumed row is judged again against it."""
    base = preset("small")
    strict = apply_overrides(base, ["qc.max_model_excess=2.5", "qc.phase_steps=4"])
    assert strict.qc.max_model_excess == 2.5 and strict.hash() == base.hash()
    assert ReconConfig.from_dict(strict.to_dict()).qc == strict.qc
    with pytest.raises(ValueError, match="config.qc.max_unexplained: must be finite and >= 0"):
        apply_overrides(base, ["qc.max_unexplained=-1"])
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(base, ["qc.max_everything=1"])
