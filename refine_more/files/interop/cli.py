"""``refine-more import ...`` and ``refine-more export ...`` (registered in ``cohort.console``).

    refine-more import refine-more-mat DIR --out FILE [--protocol FILE] [--subject-id ID]
    refine-more import ismrmrd FILE --out FILE [--protocol FILE] [--subject-id ID] [--image-index ...]
    refine-more export ismrmrd FILE --out FILE
    refine-more export bids RESULTS_DIR --out DIR [--subject FILE]

Imports print a JSON report (shapes, sampled fraction, notes; for the public code's folder the
w/w0 comparison with our W/W0). Bad foreign files exit 1 with one line naming file and key.
"""
from __future__ import annotations

import json


def _import_mat(args) -> int:
    from refine_more.files.interop.public_code import import_public_folder
    report = import_public_folder(args.folder, args.out, protocol_file=args.protocol, subject_id=args.subject_id)
    print(json.dumps(report, indent=1))
    return 0


def _import_ismrmrd(args) -> int:
    from refine_more.files.interop.ismrmrd_io import import_ismrmrd
    report = import_ismrmrd(args.file, args.out, protocol_file=args.protocol, subject_id=args.subject_id,
                            dataset=args.dataset, image_index=args.image_index)
    print(json.dumps(report, indent=1))
    return 0


def _export_ismrmrd(args) -> int:
    from refine_more.files.interop.ismrmrd_io import write_ismrmrd
    print(write_ismrmrd(args.file, args.out, dataset=args.dataset))
    return 0


def _export_bids(args) -> int:
    from refine_more.files.interop.bids import entries_from_results, write_bids
    written = write_bids(args.out, entries_from_results(args.results_dir, subject_path=args.subject))
    print(f"{len(written)} maps written to {args.out}")
    return 0


def add_commands(sub) -> None:
    """``import`` (refine-more-mat, ismrmrd) and ``export`` (ismrmrd, bids)."""
    imp = sub.add_parser("import", help="a foreign raw-data format → a subject file (validated on write)")
    isub = imp.add_subparsers(dest="import_format", required=True)
    m = isub.add_parser("refine-more-mat", help="the paper's public code data folder (kspace.mat, ...)")
    m.add_argument("folder", help="folder with kspace.mat, Gaussian_2PE_mask.mat[, sensitivity_maps.mat, "
                                  "B1.mat, BTS_sat.mat]")
    i = isub.add_parser("ismrmrd", help="an ISMRMRD HDF5 file")
    i.add_argument("file")
    i.add_argument("--dataset", default="dataset", help="the ISMRMRD dataset group (default 'dataset')")
    i.add_argument("--image-index", choices=("auto", "contrast", "repetition"), default="auto",
                   help="acquisition counter that numbers the images (auto: contrast unless only repetitions vary)")
    for p, func in ((m, _import_mat), (i, _import_ismrmrd)):
        p.add_argument("--out", required=True, help="subject file to write")
        p.add_argument("--protocol", default=None,
                       help="JSON/TOML/YAML of spec attribute names overriding (or supplying) protocol values, "
                            "voxel_size_mm, subject_id")
        p.add_argument("--subject-id", default=None)
        p.set_defaults(func=func)

    exp = sub.add_parser("export", help="subject files or results → standard formats")
    esub = exp.add_subparsers(dest="export_format", required=True)
    e = esub.add_parser("ismrmrd", help="a subject file → ISMRMRD HDF5")
    e.add_argument("file")
    e.add_argument("--out", required=True)
    e.add_argument("--dataset", default="dataset")
    e.set_defaults(func=_export_ismrmrd)
    b = esub.add_parser("bids", help="a cohort run's or a recon's output folder → BIDS derivatives")
    b.add_argument("results_dir", help="cohort output (results.parquet) or recon output (maps.h5)")
    b.add_argument("--out", required=True, help="derivatives dataset folder (created or added to)")
    b.add_argument("--subject", default=None, help="for a recon output: its subject file (acquisition metadata)")
    b.set_defaults(func=_export_bids)
