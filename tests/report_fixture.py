"""A cohort output folder made by hand for the report tests (no reconstruction, no Ray): per
subject and mode the files a real run writes (maps.h5, history.json, config.json, diagnostics,
done.json), then results.parquet and summary.json; with QC columns when asked, one result flagged,
one failed."""
import json
from pathlib import Path

import numpy as np

from cohort.results import MODES, SUMMARY_FILE, summarize, subject_dir, write_json, write_results
from refine_more.evaluation.report.data import write_diagnostics
from refine_more.files.maps_io import write_maps
from refine_more.files.names import MAP_NAMES, SCORED_MAPS

SHAPE = (4, 16, 16)
TRUTH = {"I0": 1.0, "T1F": 1.2, "f": 0.1, "kF": 2.3}
FLAGGED = ("sub-002", "adapted")
FAILED = ("sub-003", "adapted")
REASONS = ["data residual 0.31 > 0.2", "T1F WM mean outside 0.6-1.6 s"]


def _maps(rng, scale=1.0):
    labels = np.zeros(SHAPE, np.int16)
    labels[:, 3:13, 3:8] = 1
    labels[:, 3:13, 8:13] = 2
    tissue = labels > 0
    ref = {k: np.where(tissue, v * (1.0 + 0.2 * (labels == 2)), 0).astype(np.float32) for k, v in TRUTH.items()}
    est = {k: np.where(tissue, v * (1 + 0.03 * scale * rng.standard_normal(SHAPE)), 0).astype(np.float32)
           for k, v in ref.items()}
    return est, ref, labels, tissue


def _diagnostics(rng, est, ref, labels, tissue) -> dict:
    z, T = SHAPE[0] // 2, 8
    roi = {t: {k: float(est[k][labels == v].mean()) for k in MAP_NAMES} for t, v in (("WM", 1), ("GM", 2))}
    roi_ref = {t: {k: float(ref[k][labels == v].mean()) for k in MAP_NAMES} for t, v in (("WM", 1), ("GM", 2))}
    pairs = {k: [[float(est[k][labels == v].mean()) + 0.01 * i for i in range(4) for v in (1, 2)],
                 [float(ref[k][labels == v].mean()) for i in range(4) for v in (1, 2)]] for k in SCORED_MAPS}
    info = {"slice_index": z, "shape": list(SHAPE), "n_images": T, "n_coils": 4, "voxel_size_mm": [2.0, 1.5, 1.5],
            "sampled_fraction": [0.25] * T, "b1_source": "file", "coil_maps": "file",
            "protocol": {"flip_angles_deg": [5.0, 10.0, 20.0, 40.0] * 2, "saturation": [0] * 4 + [1] * 4,
                         "TR_s": 0.04, "TE_s": 0.012, "sat_pulse": "fermi"},
            "residual": {"maps": list(0.1 + 0.02 * rng.random(T)), "inr": list(0.2 + 0.02 * rng.random(T)),
                         "phase": "estimated from the INR images"},
            "roi_means": roi, "roi_means_reference": roi_ref, "roi_pairs": pairs,
            "nrmse_slice": {"refine-more": {k: 3.0 for k in MAP_NAMES}, "zero-filled fit": {k: 20.0 for k in MAP_NAMES}},
            "seconds": {"residual": 0.01, "zero_filled_fit": 0.5, "total": 0.51}}
    arrays = {"residual": rng.random((T,) + SHAPE[1:]).astype(np.float32), "tissue": tissue[z].astype(np.uint8),
              "labels": labels[z], **{f"zf_{k}": (ref[k][z] * 1.2).astype(np.float32) for k in MAP_NAMES},
              **{f"ref_{k}": ref[k][z] for k in MAP_NAMES}}
    return {"json": info, "arrays": arrays}


def _history():
    return [{"stage": s, "iteration": i, "seconds": 0.1 * i, "loss1": 1.0 / (i + 1), "loss2": 0.5 / (i + 1),
             **({"loss3": 0.2 / (i + 1)} if s == 2 else {}), "loss": 2.0 / (i + 1)}
            for s in (1, 2) for i in range(0, 20, 5)]


def _ok_row(out, sid, mode, rng, qc: bool) -> dict:
    d = subject_dir(out, sid, mode)
    est, ref, labels, tissue = _maps(rng, 1.0 if mode == "scratch" else 1.1)
    write_maps(d, est, tissue, subject_id=sid, method="refine-more" + ("-adapted" if mode == "adapted" else ""),
               config_hash="abc123", voxel_size_mm=(2.0, 1.5, 1.5))
    write_json(d / "history.json", _history())
    write_json(d / "config.json", {"config_hash": "abc123", "config": {"iters_stage1": 20, "lr": 0.01}})
    write_diagnostics(d, _diagnostics(rng, est, ref, labels, tissue))
    row = {"subject_id": sid, "mode": mode, "status": "ok", "error": None, "is_seed": sid == "sub-001" and mode == "scratch",
           "seed_subject": "sub-001" if mode == "adapted" else None, "method": "refine-more",
           "setup_s": 1.0, "stage1_s": 10.0 if mode == "scratch" else 2.0, "stage2_s": 5.0, "total_s": 16.0 if mode == "scratch" else 7.0,
           "iterations_stage1": 20, "iterations_stage2": 20, "loss_final": 0.1 + 0.01 * rng.random(),
           **{f"nrmse_{k}": 3.0 + rng.random() for k in MAP_NAMES}, **{f"ssim_{k}": 0.9 for k in MAP_NAMES},
           "config_hash": "abc123", "out_dir": str(d), "device": "cpu"}
    if qc:
        flagged = (sid, mode) == FLAGGED
        row.update(qc_status="flagged" if flagged else "ok", qc_reasons=list(REASONS) if flagged else [],
                   qc_residual=0.31 if flagged else 0.1, qc_thresholds={"residual": 0.2})
    write_json(d / "done.json", row)
    return row


def make_cohort(out, n_subjects: int = 3, qc: bool = True) -> Path:
    """The folder; sub-002/adapted is QC-flagged (with ``qc``), sub-003/adapted failed."""
    out = Path(out)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, n_subjects + 1):
        sid = f"sub-{i:03d}"
        for mode in MODES:
            if (sid, mode) == FAILED:
                rows.append({"subject_id": sid, "mode": mode, "status": "failed", "error": "ValueError: boom\nmore",
                             "seed_subject": "sub-001", **({"qc_status": None, "qc_reasons": []} if qc else {})})
            else:
                rows.append(_ok_row(out, sid, mode, rng, qc))
    write_results(out, rows)
    summary = summarize(rows)
    write_json(out / SUMMARY_FILE, {**summary, "n_subjects": n_subjects, "wall_s": 42.0, "seed_subject": "sub-001",
                                    "seed_failures": []})
    (out / "config.json").write_text(json.dumps({"config_hash": "abc123"}))
    return out
