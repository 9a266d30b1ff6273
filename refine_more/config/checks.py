"""Checks of a reconstruction config beyond its types (:mod:`refine_more.config` checks those):
the ranges of its values, the config files' syntax, and the U-Net's depth against a matrix.

Every problem is one line naming the key (``config.unroll.iterations: must be an integer >= 1,
got 0``), raised as a ``ValueError`` when the config is built, so a bad value stops the command
(and a cohort, in its driver) before any reconstruction starts.
"""
from __future__ import annotations

import math
from pathlib import Path


def _int_at_least(low: int):
    return lambda v: isinstance(v, int) and v >= low, f"an integer >= {low}"


def _positive():
    return lambda v: math.isfinite(v) and v > 0, "finite and > 0"


def _non_negative():
    return lambda v: math.isfinite(v) and v >= 0, "finite and >= 0"


def _fraction():
    return lambda v: math.isfinite(v) and 0 < v < 1, "a fraction in (0, 1)"


#: dotted key -> (test, what it must be); keys absent from a config are skipped
RANGES = {
    "seed": _int_at_least(0), "lr": _positive(), "iters_stage1": _int_at_least(1),
    "iters_stage2": _int_at_least(0), "stage1_images": _int_at_least(0),
    "coil_compression": (lambda v: math.isfinite(v) and 0 <= v <= 1, "0 (off) or a fraction in (0, 1]"),
    "tv_weight": _non_negative(), "log_every": _int_at_least(1),
    "inr.mlp_hidden": _int_at_least(1), "inr.mlp_layers": _int_at_least(1),
    "inr.time_input_dims": (lambda v: v in (1, 2, 3), "1, 2 or 3"),
    "unroll.unet_out_kernel": (lambda v: isinstance(v, int) and v >= 1 and v % 2 == 1, "an odd integer >= 1"),
    "unroll.iterations": _int_at_least(0), "unroll.unet_width": _int_at_least(1),
    "unroll.unet_levels": _int_at_least(0), "unroll.step_init": _positive(),
    "unroll.gn_damping": _non_negative(), "unroll.phase_steps": _int_at_least(0),
    "unroll.image_phase_order": _int_at_least(-1), "unroll.warm_start_steps": _int_at_least(0),
    "unroll.ssdu_validation_fraction": _fraction(), "unroll.ssdu_loss_fraction": _fraction(),
    "unroll.ssdu_splits": _int_at_least(1), "unroll.ssdu_validate_every": _int_at_least(1),
    "unroll.ssdu_patience": _int_at_least(1), "unroll.fixed_step": _non_negative(), "unroll.prior_noise_reference": _non_negative(),
    "adapt.lora_rank": _int_at_least(1), "adapt.lora_beta": _positive(), "adapt.iters_stage1": _int_at_least(1),
    "adapt.iters_stage2": _int_at_least(0), "adapt.lr": _positive(), "adapt.lr_stage2": _positive(),
    "adapt.plateau_patience": _int_at_least(0), "adapt.plateau_rel": _non_negative(),
    "qc.max_objective_ratio": _non_negative(), "qc.max_model_excess": _non_negative(),
    "qc.max_unexplained": _non_negative(), "qc.max_image_residual_ratio": _non_negative(),
    "qc.max_fraction_at_bounds": _non_negative(), "qc.f_edge": _fraction(), "qc.k_edge": _fraction(),
    "qc.phase_steps": _int_at_least(0),
}
#: number tuples whose every entry must be finite and >= 0
NON_NEGATIVE_LISTS = ("unroll.map_smoothness", "unroll.map_edge_scale")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def range_problems(config) -> list:
    """Every value out of its range, one line each (``config.<key>: must be ..., got ...``)."""
    problems = []
    for key, (ok, what) in RANGES.items():   # the hash encodings check their own (encoding.py)
        value = _get(config, key)
        if value is not None and not ok(value):
            problems.append(f"config.{key}: must be {what}, got {value!r}")
    for key in NON_NEGATIVE_LISTS:
        value = _get(config, key)
        if value is not None and not all(math.isfinite(v) and v >= 0 for v in value):
            problems.append(f"config.{key}: every entry must be finite and >= 0, got {list(value)}")
    unroll = getattr(config, "unroll", None)
    if unroll is not None and unroll.ssdu_validation_fraction + unroll.ssdu_loss_fraction >= 1:
        problems.append("config.unroll.ssdu_validation_fraction + ssdu_loss_fraction: must be < 1 "
                        f"(Θ keeps the rest), got {unroll.ssdu_validation_fraction + unroll.ssdu_loss_fraction}")
    if unroll is not None and unroll.start != "inr" and not unroll.warm_start_steps:
        problems.append(f"config.unroll.start = {unroll.start!r} needs a warm start (unroll.warm_start_steps > 0): "
                        "without one the learned iterations start from the INR's maps")
    if unroll is not None and unroll.training == "self-supervised" and not unroll.iterations:
        problems.append("config.unroll.training = 'self-supervised' trains the learned iterations: it needs "
                        "unroll.iterations >= 1, got 0")
    if unroll is not None and unroll.training == "held-out-stop" and unroll.warm_start_steps:
        problems.append("config.unroll.training = 'held-out-stop' is the joint (paper) stage 2: it needs "
                        f"unroll.warm_start_steps = 0, got {unroll.warm_start_steps}")
    return problems


def check_ranges(config) -> None:
    """Raise one ``ValueError`` listing every out-of-range value ('; ' between them: one line)."""
    problems = range_problems(config)
    if problems:
        raise ValueError("; ".join(problems))


def check_for_matrix(config, shape, where: str = "subject") -> None:
    """The U-Net's 2**unet_levels must fit the slices (Y, X): it pads each slice to a multiple of
    it, so a deeper U-Net multiplies memory and time without seeing anything new."""
    levels = config.unroll.unet_levels
    y, x = int(shape[-2]), int(shape[-1])
    if 2**levels > min(y, x):
        raise ValueError(f"{where}: config.unroll.unet_levels = {levels} needs slices of at least "
                         f"{2**levels} × {2**levels}, the matrix (Z, Y, X) is {tuple(int(n) for n in shape)}: "
                         f"use unet_levels <= {int(math.log2(min(y, x)))}")


def read_config_file(path) -> dict:
    """A TOML/YAML/JSON config file as a table; a syntax error or a non-table is one ValueError
    line naming the file (and the line and column where the parser knows them)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"config file {path}: is a directory")
    if path.suffix not in (".toml", ".tml", ".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path}: use .toml, .yaml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path}: cannot be read ({exc})") from None
    if path.suffix == ".json":
        data = _parse_json(path, text)
    else:
        data = _parse_toml(path, text) if path.suffix in (".toml", ".tml") else _parse_yaml(path, text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a table of keys, got {type(data).__name__}")
    return data


def _parse_json(path: Path, text: str):
    import json
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"config file {path}: JSON syntax error at line {exc.lineno}, column {exc.colno}: "
                         f"{exc.msg}") from None


def _parse_toml(path: Path, text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path}: TOML syntax error: {str(exc).splitlines()[0]}") from None


def _parse_yaml(path: Path, text: str):
    import yaml
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config file {path}: YAML syntax error{where}: {what}") from None
    return {} if data is None else data


def check_subject(subject, config) -> None:
    """What reconstructing ``subject`` (in memory: files were checked when read) with ``config``
    needs: some k-space signal (the normalisation divides by its energy) and a U-Net that fits."""
    where = subject.path or subject.subject_id
    if not any(subject.kspace[t].any() for t in range(subject.kspace.shape[0])):
        raise ValueError(f"{where}: member 'kspace': is all zero: nothing to reconstruct")
    check_for_matrix(config, subject.shape, str(where))
