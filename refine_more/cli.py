"""The method's commands of ``refine-more``: simulate, validate, fit, recon; and the machinery
that builds the whole command line from modules.

A module that brings commands defines ``add_commands(subparsers)``, which adds its subparsers
(each with ``set_defaults(func=...)``, ``func(args) -> exit status``), and is named once in the
application's list (``cohort.console.COMMAND_MODULES``). This module's own ``main`` runs its
commands alone; the ``refine-more`` console script is :func:`cohort.console.main`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

DESCRIPTION = "REFINE-MORE: scan-specific qMT (BTS) reconstruction, one subject or a cohort on Ray."


def _simulate(args):
    from .simulate import SimulationConfig, simulate_cohort
    cfg = SimulationConfig(matrix=tuple(args.matrix), acceleration=args.acc, n_coils=args.coils, snr=args.snr,
                           mask_type=args.mask, write_coil_sens=not args.estimate_coils, phase_drift=args.phase_drift)
    manifest = simulate_cohort(args.out, args.subjects, cfg, seed=args.seed, progress=not args.quiet)
    print(manifest)
    return 0


def _validate(args):
    from .subject import validate_subject_file
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

    from .operators import zero_filled_images
    if args.method == "llr":
        from .llr import LLR_BLOCK, LLR_ITERS, LLR_LAMBDA, llr_reconstruct
        images = llr_reconstruct(kspace, coils, subject.mask)[0].numpy()
        return images, f"llr-lam{LLR_LAMBDA:g}-block{'x'.join(map(str, LLR_BLOCK))}-it{LLR_ITERS}+voxelwise-lm"
    return zero_filled_images(torch.from_numpy(kspace), torch.from_numpy(coils)).numpy(), "voxelwise-lm"


def _fit(args):
    from .b1 import b1_for
    from .coils import coil_maps_for
    from .fitting import fit_images
    from .maps_io import write_maps
    from .names import MAP_NAMES
    from .subject import read_subject
    from .tissue import derive_tissue_mask

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
    maps = fit_images(images, subject.protocol, b1, tissue, **({"k_band": tuple(args.k_band)} if args.k_band else {}))
    out = write_maps(args.out, {k: maps[k] for k in MAP_NAMES}, tissue, subject_id=subject.subject_id,
                     method=f"{args.method}-fit", config_hash=config_hash,
                     voxel_size_mm=subject.voxel_size_mm)
    print(f"{subject.subject_id}: {args.method} fit (B1+ from {b1_source}) in {time.perf_counter() - t0:.1f} s → {out}")
    return 0


def _recon(args):
    from .atomic import atomic_write_text
    from .config import load_config
    from .maps_io import write_maps
    from .metrics import score_maps
    from .names import MAP_NAMES
    from .plots import loss_png, montage_png
    from .recon import reconstruct
    from .subject import read_subject

    subject = read_subject(args.file)
    overrides = list(args.set or []) + ([f"device={args.device}"] if args.device else [])
    config = load_config(args.config, args.preset, overrides)
    result = reconstruct(subject, config)
    out = Path(args.out)
    write_maps(out, {k: result.maps[k] for k in MAP_NAMES}, result.tissue_mask,
               subject_id=subject.subject_id, method=result.method, config_hash=result.config_hash,
               voxel_size_mm=subject.voxel_size_mm)
    atomic_write_text(out / "config.json", json.dumps({"config_hash": config.hash(), "config": config.to_dict()},
                                                      indent=1))
    ref = {k: subject.reference[k] for k in MAP_NAMES if k in subject.reference} or None
    montage_png(out / "montage.png", result.maps, ref, title=f"{subject.subject_id} {result.method}")
    loss_png(out / "loss.png", result.history, title=subject.subject_id)
    summary = {"subject_id": subject.subject_id, "method": result.method, "config_hash": result.config_hash,
               "timings_s": result.timings, "iterations": result.iterations, "device": result.device,
               "final_losses": result.final_losses()}
    if ref:
        summary["scores"] = {"refine-more": score_maps(result.maps, ref, result.tissue_mask),
                             "inr-only": score_maps(result.maps_init, ref, result.tissue_mask)}
    atomic_write_text(out / "history.json", json.dumps(result.history))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=float))
    if args.bids:
        from .interop.bids import BidsEntry, write_bids
        write_bids(args.bids, [BidsEntry(str(out / "maps.h5"), str(args.file))])
    print(json.dumps(summary, indent=1, default=float))
    return 0


def add_config_arguments(p: argparse.ArgumentParser, default_preset: str = "small") -> None:
    """``--preset``, ``--config FILE`` and repeatable ``--set KEY=VALUE`` (see ``config.load_config``)."""
    from .config import PRESETS
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
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_simulate)

    v = sub.add_parser("validate", help="check subject files against the format")
    v.add_argument("files", nargs="+")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_validate)

    f = sub.add_parser("fit", help="voxel-wise fit of zero-filled, fully sampled or LLR images")
    f.add_argument("file")
    f.add_argument("--method", choices=("zf", "full", "llr"), default="zf",
                   help="images to fit: zero-filled, the fully sampled reference, or locally low-rank (refine_more/llr.py)")
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
    """Parse ``argv`` and run the command; bad input files, values or paths exit 1 with one line."""
    args = build_parser(command_modules).parse_args(list(sys.argv[1:] if argv is None else argv))
    from .subject import SubjectFormatError
    try:
        return args.func(args)
    except (SubjectFormatError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
