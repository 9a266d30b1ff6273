"""`refine-more` command line (the spec's command-line contract)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _simulate(args):
    from .simulate import SimulationConfig, simulate_cohort
    cfg = SimulationConfig(matrix=tuple(args.matrix), acceleration=args.acc, n_coils=args.coils, snr=args.snr,
                           mask_type=args.mask, write_coil_sens=not args.estimate_coils)
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


def _fit(args):
    import torch

    from .b1 import b1_for
    from .coils import coil_maps_for
    from .fitting import fit_images
    from .maps_io import write_maps
    from .operators import zero_filled_images
    from .subject import derive_tissue_mask, read_subject

    subject = read_subject(args.file, load_reference=args.method == "full")
    if args.method == "full":
        if "kspace_full" not in subject.reference:
            raise SystemExit(f"{args.file}: member 'reference/kspace_full' is needed for --method full")
        kspace = subject.reference["kspace_full"]
    else:
        kspace = subject.kspace
    t0 = time.perf_counter()
    coils = coil_maps_for(subject)
    config_hash = "voxelwise-lm"
    if args.method == "llr":
        from .llr import LLR_BLOCK, LLR_ITERS, LLR_LAMBDA, llr_reconstruct
        images = llr_reconstruct(kspace, coils, subject.mask)[0].numpy()
        config_hash = f"llr-lam{LLR_LAMBDA:g}-block{'x'.join(map(str, LLR_BLOCK))}-it{LLR_ITERS}+voxelwise-lm"
    else:
        images = zero_filled_images(torch.from_numpy(kspace), torch.from_numpy(coils)).numpy()
    tissue = derive_tissue_mask(subject)
    b1, b1_source = b1_for(subject, coils, tissue)
    maps = fit_images(images, subject.protocol, b1, tissue, **({"k_band": tuple(args.k_band)} if args.k_band else {}))
    out = write_maps(args.out, {k: maps[k] for k in ("I0", "T1F", "f", "kF")}, tissue, subject_id=subject.subject_id,
                     method=f"{args.method}-fit", config_hash=config_hash,
                     voxel_size_mm=subject.voxel_size_mm)
    print(f"{subject.subject_id}: {args.method} fit (B1+ from {b1_source}) in {time.perf_counter() - t0:.1f} s → {out}")
    return 0


def _recon(args):
    from .config import load_config
    from .maps_io import write_maps
    from .plots import loss_png, montage_png
    from .recon import reconstruct
    from .subject import read_subject

    subject = read_subject(args.file)
    config = load_config(args.config, args.preset)
    if args.device:
        config.device = args.device
    result = reconstruct(subject, config)
    out = Path(args.out)
    write_maps(out, {k: result.maps[k] for k in ("I0", "T1F", "f", "kF")}, result.tissue_mask,
               subject_id=subject.subject_id, method=result.method, config_hash=result.config_hash,
               voxel_size_mm=subject.voxel_size_mm)
    ref = {k: subject.reference[k] for k in ("I0", "T1F", "f", "kF") if k in subject.reference} or None
    montage_png(out / "montage.png", result.maps, ref, title=f"{subject.subject_id} {result.method}")
    loss_png(out / "loss.png", result.history, title=subject.subject_id)
    from .maps_io import atomic_write
    summary = {"subject_id": subject.subject_id, "method": result.method, "config_hash": result.config_hash,
               "timings_s": result.timings, "iterations": result.iterations, "device": result.device,
               "final_losses": result.final_losses()}
    if ref:
        from .recon import score_result
        summary["scores"] = score_result(result, ref)
    atomic_write(str(out / "history.json"), lambda tmp: Path(tmp).write_text(json.dumps(result.history)))
    atomic_write(str(out / "summary.json"), lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1, default=float)))
    print(json.dumps(summary, indent=1, default=float))
    return 0


def _demo(args):
    """The main job: simulate a small cohort, run it through the Ray driver in `both` modes."""
    from cohort.cli import main as cohort_main

    from .simulate import SimulationConfig, simulate_cohort
    out = Path(args.out)
    t0 = time.perf_counter()
    manifest = simulate_cohort(out / "data", args.subjects, SimulationConfig(matrix=tuple(args.matrix)), seed=args.seed)
    argv = ["run", str(manifest), "--out", str(out / "recon"), "--mode", "both", "--preset", args.preset]
    if args.num_cpus:
        argv += ["--num-cpus", str(args.num_cpus)]
    rc = cohort_main(argv)
    print(f"demo: {args.subjects} subjects, matrix {tuple(args.matrix)}, preset {args.preset}: "
          f"{time.perf_counter() - t0:.0f} s wall; results in {out / 'recon'}")
    return rc


def _cohort(argv):
    from cohort.cli import main as cohort_main
    return cohort_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refine-more", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write a synthetic cohort (MNI152 anatomy) and its manifest")
    s.add_argument("--out", required=True)
    s.add_argument("--subjects", type=int, default=4)
    s.add_argument("--matrix", type=int, nargs=3, default=[12, 48, 48], metavar=("Z", "Y", "X"))
    s.add_argument("--acc", type=float, default=4.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--coils", type=int, default=4)
    s.add_argument("--snr", type=float, default=200.0)
    s.add_argument("--mask", choices=("2d", "1d"), default="2d")
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
    r.add_argument("--preset", default="small", choices=("tiny", "small", "paper"))
    r.add_argument("--config", default=None, help="TOML/YAML overriding the preset")
    r.add_argument("--device", default=None)
    r.set_defaults(func=_recon)

    d = sub.add_parser("demo", help="main job: simulate a small cohort and reconstruct it on a local Ray (adapted and scratch)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--subjects", type=int, default=4)
    d.add_argument("--matrix", type=int, nargs=3, default=[6, 32, 32], metavar=("Z", "Y", "X"))
    d.add_argument("--preset", default="small", choices=("tiny", "small", "paper"))
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-cpus", type=int, default=None)
    d.set_defaults(func=_demo)

    sub.add_parser("cohort", help="cohort reconstruction on Ray (see `refine-more cohort run -h`)", add_help=False)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cohort":
        return _cohort(argv[1:])
    args = build_parser().parse_args(argv)
    from .subject import SubjectFormatError
    try:
        return args.func(args)
    except (SubjectFormatError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
