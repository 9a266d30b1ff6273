"""The method's commands of ``refine-more``: simulate, validate, fit, recon; and the machinery
that builds the whole command line from modules.

A module that brings commands defines ``add_commands(subparsers)``, which adds its subparsers
(each with ``set_defaults(func=...)``, ``func(args) -> exit status``), and is named once in the
application's list (``cohort.console.COMMAND_MODULES``). This module's own ``main`` runs its
commands alone; the ``refine-more`` console script is :func:`cohort.console.main`.

Exit status: 0 done; 1 a bad input file or a failed command (one line naming the file and
member); 2 a refused command line (arguments, config, output folder), found before any work.
No error ends in a traceback (``REFINE_MORE_TRACEBACK=1`` shows it).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

DESCRIPTION = "REFINE-MORE: scan-specific qMT (BTS) reconstruction, one subject or a cohort on Ray."


class UsageError(Exception):
    """A command line refused before any work (exit 2): its message is the one line printed."""


def out_dir_problem(path) -> Optional[str]:
    """Why ``path`` cannot be an output folder (a file, below a file, not writable); None when it
    can. Creates nothing."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        return f"--out {path}: is a file, not a folder"
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"--out {path}: {probe} is a file, so the folder cannot be made"
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        return f"--out {path}: {probe} is not writable ({exc.strerror or exc})"
    return None


def check_out_dir(path) -> None:
    problem = out_dir_problem(path)
    if problem:
        raise UsageError(problem)


def _simulate(args):
    from refine_more.evaluation.simulate import SimulationConfig, simulate_cohort
    check_out_dir(args.out)
    if args.subjects < 1:
        raise UsageError(f"simulate: --subjects must be >= 1, got {args.subjects}")
    if args.phantom:  # the paper's vial phantom (Fig. 5): phantom protocol, 1-D mask (refine_more/evaluation/phantom.py)
        from refine_more.evaluation.phantom import PhantomConfig, simulate_phantom_cohort
        try:
            pcfg = PhantomConfig(matrix=tuple(args.matrix), acceleration=args.acc, n_coils=args.coils, snr=args.snr,
                                 write_coil_sens=not args.estimate_coils)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        print(simulate_phantom_cohort(args.out, args.subjects, pcfg, seed=args.seed))
        return 0
    try:
        cfg = SimulationConfig(matrix=tuple(args.matrix), acceleration=args.acc, n_coils=args.coils, snr=args.snr,
                               mask_type=args.mask, write_coil_sens=not args.estimate_coils,
                               phase_drift=args.phase_drift)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    manifest = simulate_cohort(args.out, args.subjects, cfg, seed=args.seed, progress=not args.quiet)
    print(manifest)
    return 0


def _validate(args):
    from refine_more.files.subject import validate_subject_file
    bad = 0
    for path in args.files:
        problems = validate_subject_file(path)
        for line in problems:
            print(line)
        bad += bool(problems)
        if not problems and not args.quiet:
            print(f"{path}: ok")
    return 1 if bad else 0


def _fit_images(args, subject, kspace, coils):
    """The images the fit sees, and the 'config hash' that names how they were made."""
    import torch

    from refine_more.physics.operators import zero_filled_images
    if args.method == "llr":
        from refine_more.baselines.llr import LLR_BLOCK, LLR_ITERS, LLR_LAMBDA, llr_reconstruct
        images = llr_reconstruct(kspace, coils, subject.mask)[0].numpy()
        return images, f"llr-lam{LLR_LAMBDA:g}-block{'x'.join(map(str, LLR_BLOCK))}-it{LLR_ITERS}+voxelwise-lm"
    return zero_filled_images(torch.from_numpy(kspace), torch.from_numpy(coils)).numpy(), "voxelwise-lm"


def _fit(args):
    from refine_more.physics.b1 import b1_for
    from refine_more.physics.coils import coil_maps_for
    from refine_more.baselines.fitting import fit_images
    from refine_more.files.maps_io import write_maps
    from refine_more.files.names import MAP_NAMES
    from refine_more.files.subject import read_subject
    from refine_more.physics.tissue import derive_tissue_mask

    check_out_dir(args.out)
    k_band = tuple(args.k_band) if args.k_band else None
    if k_band is not None and not (0 < k_band[0] <= k_band[1] < float("inf")):
        raise UsageError(f"fit: --k-band LOW HIGH needs 0 < LOW <= HIGH (k in 1/s; equal holds k fixed), "
                         f"got {args.k_band[0]:g} {args.k_band[1]:g}")
    subject = read_subject(args.file, load_reference=args.method == "full")
    if args.method == "full":
        if "kspace_full" not in subject.reference:
            raise SystemExit(f"{args.file}: member 'reference/kspace_full' is needed for --method full")
        kspace = subject.reference["kspace_full"]
    else:
        kspace = subject.kspace
    t0 = time.perf_counter()
    coils = coil_maps_for(subject)
    images, config_hash = _fit_images(args, subject, kspace, coils)
    tissue = derive_tissue_mask(subject)
    b1, b1_source = b1_for(subject, coils, tissue)
    maps = fit_images(images, subject.protocol, b1, tissue, **({"k_band": k_band} if k_band else {}))
    if not maps["moved"][tissue].any():
        raise ValueError(f"{args.file}: the fit never moved from its start values in any voxel "
                         "(are the images zero?): nothing written")
    out = write_maps(args.out, {k: maps[k] for k in MAP_NAMES}, tissue, subject_id=subject.subject_id,
                     method=f"{args.method}-fit", config_hash=config_hash,
                     voxel_size_mm=subject.voxel_size_mm)
    print(f"{subject.subject_id}: {args.method} fit (B1+ from {b1_source}) in {time.perf_counter() - t0:.1f} s → {out}")
    return 0


def _recon(args):
    from refine_more.config import load_config
    from refine_more.reconstruction.recon import reconstruct
    from refine_more.files.subject import read_subject

    overrides = list(args.set or []) + ([f"device={args.device}"] if args.device else [])
    try:
        config = load_config(args.config, args.preset, overrides)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    check_out_dir(args.out)
    subject = read_subject(args.file, load_reference="maps")   # not kspace_full: as large as the data
    result = reconstruct(subject, config, diagnostics=True, release_kspace=True)
    with _staged(Path(args.out)) as out:
        _write_recon(out, args, subject, config, result)
    if result.qc.flagged:       # the maps were written; say plainly that they need a look
        print(f"{subject.subject_id}: flagged by QC: " + "; ".join(result.qc.reasons), file=sys.stderr)
    if args.bids:
        from refine_more.files.interop.bids import BidsEntry, write_bids
        write_bids(args.bids, [BidsEntry(str(Path(args.out) / "maps.h5"), str(args.file))])
    return 0


class _staged:
    """``with _staged(out) as tmp``: the outputs are written into ``out/.staging-*``; on success the
    old ``summary.json`` goes first, then every new file moves in with ``summary.json`` last, so a
    folder never pairs new maps with a stale summary (no summary: the result is incomplete)."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.out))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                (self.out / "summary.json").unlink(missing_ok=True)
                names = sorted(os.listdir(self.tmp), key=lambda n: n == "summary.json")
                for name in names:
                    os.replace(self.tmp / name, self.out / name)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _write_recon(out: Path, args, subject, config, result) -> None:
    """Maps, NIfTI, config.json, montage, loss curves, history, the report's diagnostics,
    summary.json (with the quality control: status, reasons, metrics, thresholds) and report.html
    (a report that cannot be written is a warning) into ``out``."""
    from refine_more.files.atomic import atomic_write_text
    from refine_more.files.maps_io import write_maps
    from refine_more.evaluation.metrics import score_maps
    from refine_more.files.names import MAP_NAMES
    from refine_more.evaluation.plots import loss_png, montage_png
    from refine_more.evaluation.report.subject import try_write_subject_report

    write_maps(out, {k: result.maps[k] for k in MAP_NAMES}, result.tissue_mask,
               subject_id=subject.subject_id, method=result.method, config_hash=result.config_hash,
               voxel_size_mm=subject.voxel_size_mm)
    atomic_write_text(out / "config.json", json.dumps({"config_hash": config.hash(), "config": config.to_dict()},
                                                      indent=1))
    from refine_more.reconstruction.synthesis import INR_FILE, save_inr
    save_inr(out / INR_FILE, result)           # what `refine-more synthesize` needs
    ref = {k: subject.reference[k] for k in MAP_NAMES if k in subject.reference} or None
    montage_png(out / "montage.png", result.maps, ref, title=f"{subject.subject_id} {result.method}, {result.qc.headline()}")
    loss_png(out / "loss.png", result.history, title=subject.subject_id)
    summary = {"subject_id": subject.subject_id, "method": result.method, "config_hash": result.config_hash,
               "timings_s": result.timings, "iterations": result.iterations, "device": result.device,
               "final_losses": result.final_losses(), "warm_start": result.start,
               "qc": {**result.qc.to_dict(), "thresholds": vars(config.qc)}}   # docs/decisions/017
    if ref:
        summary["scores"] = {"refine-more": score_maps(result.maps, ref, result.tissue_mask),
                             "inr-only": score_maps(result.maps_init, ref, result.tissue_mask)}
    atomic_write_text(out / "history.json", json.dumps(result.history))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=float))
    try_write_subject_report(out, json.loads(json.dumps(summary, default=float)), diagnostics=result.diagnostics,
                             log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(summary, indent=1, default=float))


def add_config_arguments(p: argparse.ArgumentParser, default_preset: str = "small") -> None:
    """``--preset``, ``--config FILE`` and repeatable ``--set KEY=VALUE`` (see ``config.load_config``)."""
    from refine_more.config import PRESETS
    p.add_argument("--preset", default=default_preset, choices=tuple(PRESETS),
                   help="config preset: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items())
                   + f" (default {default_preset})")
    p.add_argument("--config", default=None, help="TOML/YAML/JSON file overriding the preset's keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key after the file (repeatable; JSON values, dotted keys: "
                        "--set iters_stage1=200 --set unroll.warm_start_steps=32 --set k_band=[22,24])")


def add_commands(sub) -> None:
    """simulate, validate, fit, recon."""
    s = sub.add_parser("simulate", help="write a synthetic cohort (MNI152 anatomy) and its manifest")
    s.add_argument("--out", required=True)
    s.add_argument("--subjects", type=int, default=4)
    s.add_argument("--matrix", type=int, nargs=3, default=[12, 48, 48], metavar=("Z", "Y", "X"))
    s.add_argument("--acc", type=float, default=4.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--coils", type=int, default=4)
    s.add_argument("--snr", type=float, default=200.0)
    s.add_argument("--mask", choices=("2d", "1d"), default="2d")
    s.add_argument("--phase-drift", type=float, default=0.0, metavar="RADIANS",
                   help="each image's own random smooth phase of up to this size (B0 drift, motion)")
    s.add_argument("--estimate-coils", action="store_true", help="do not store coil_sens (readers run ESPIRiT)")
    s.add_argument("--phantom", action="store_true",
                   help="the paper's vial phantom with its protocol and a 1-D mask instead of brains (--mask, --phase-drift unused)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_simulate)

    v = sub.add_parser("validate", help="check subject files against the format")
    v.add_argument("files", nargs="+")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_validate)

    f = sub.add_parser("fit", help="voxel-wise fit of zero-filled, fully sampled or LLR images")
    f.add_argument("file")
    f.add_argument("--method", choices=("zf", "full", "llr"), default="zf",
                   help="images to fit: zero-filled, the fully sampled reference, or locally low-rank (refine_more/baselines/llr.py)")
    f.add_argument("--out", required=True)
    f.add_argument("--k-band", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="bounds of k = kF/f in 1/s (default 20 26; 23 23 holds k fixed, as the `small` preset does)")
    f.set_defaults(func=_fit)

    r = sub.add_parser("recon", help="REFINE-MORE from scratch for one subject")
    r.add_argument("file")
    r.add_argument("--out", required=True)
    add_config_arguments(r)
    r.add_argument("--device", default=None, help="auto, cpu or cuda (the same as --set device=...)")
    r.add_argument("--bids", default=None, metavar="DIR", help="also write the maps as BIDS derivatives in DIR")
    r.set_defaults(func=_recon)


def build_parser(command_modules=(__name__,), prog: str = "refine-more") -> argparse.ArgumentParser:
    """The parser with the commands of every module in ``command_modules`` (import names)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    for name in command_modules:
        importlib.import_module(name).add_commands(sub)
    return p


def main(argv=None, command_modules=(__name__,)) -> int:
    """Parse ``argv`` and run the command; a refused command line exits 2, anything else that goes
    wrong 1, each with one line on stderr (see the module docstring)."""
    args = build_parser(command_modules).parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:   # SubjectFormatError, config and file errors: their own line
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:               # a bug or a library's error: still one line
        if os.environ.get("REFINE_MORE_TRACEBACK"):
            raise
        print(f"error: {type(exc).__name__}: {_one_line(exc)} (REFINE_MORE_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a SubjectFormatError lists every problem: joined)."""
    return " | ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
