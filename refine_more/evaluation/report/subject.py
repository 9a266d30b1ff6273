"""The subject report: ``report.html`` in a result folder (a cohort's ``DIR/<subject>/<mode>/`` or a
``refine-more recon --out DIR`` folder), built from the folder's files alone.

Sections: status and QC (status, reasons, metrics against thresholds, or "QC not computed");
the four maps with per-map windows beside the zero-filled fit and, when the subject has one, the
reference and the differences; the data residual per image; loss curves per stage; protocol and
acquisition; timing; the resolved config; the folder's files. An adapted result names its seed and
links to the seed's report.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from refine_more.files.names import MAP_NAMES

from . import figures
from .data import (REPORT_FILE, missing, qc_view, read_diagnostics, read_json, read_record, relative_link,
                   write_diagnostics)
from .html import fmt_num, render, write_html

FILES = ("maps.h5", "I0.nii.gz", "T1F.nii.gz", "f.nii.gz", "kF.nii.gz", "montage.png", "loss.png", "history.csv",
         "history.json", "config.json", "diagnostics.json", "done.json", "summary.json", "inr.safetensors",
         "seed_state.safetensors")
TIMES = ("setup", "stage1", "warm_start", "stage2", "total", "diagnostics")


def _facts(record: dict, folder: Path) -> dict:
    """The record of a cohort row or of ``recon``'s summary, in one shape."""
    timings = dict(record.get("timings_s") or {})
    for k in TIMES + ("wall",):
        if not missing(record.get(f"{k}_s")):
            timings[k] = record[f"{k}_s"]
    iters = record.get("iterations") or {s: record.get(f"iterations_{s}") for s in ("stage1", "stage2")}
    losses = record.get("final_losses") or {k: record.get(f"{k}_final") for k in ("loss", "loss1", "loss2", "loss3")}
    scores = {}
    for name in MAP_NAMES:
        nested = ((record.get("scores") or {}).get("refine-more") or {}).get(name) or {}
        n, s = record.get(f"nrmse_{name}", nested.get("nrmse")), record.get(f"ssim_{name}", nested.get("ssim"))
        if not (missing(n) and missing(s)):
            scores[name] = {"nrmse": n, "ssim": s,
                            "inr": (((record.get("scores") or {}).get("inr-only") or {}).get(name) or {}).get("nrmse")}
    mode = record.get("mode") or "recon"
    return {"subject_id": record.get("subject_id") or folder.name, "mode": mode,
            "status": record.get("status") or "ok", "error": record.get("error"),
            "method": record.get("method") or "–", "timings": timings,
            "iterations": {k: int(v) for k, v in iters.items() if not missing(v)},
            "losses": {k: v for k, v in losses.items() if not missing(v)}, "scores": scores,
            "seed_subject": record.get("seed_subject") if mode == "adapted" else None,
            "is_seed": bool(record.get("is_seed")),
            "run": {k: record.get(k) for k in ("device", "node", "config_hash", "mlflow_run_id", "subject_path")
                    if not missing(record.get(k))}}


def _seed_link(folder: Path, facts: dict, seed_report) -> Optional[str]:
    if seed_report is not None:
        return relative_link(seed_report, folder) if Path(seed_report).is_file() else None
    if not facts["seed_subject"]:
        return None
    candidate = folder.parent.parent / facts["seed_subject"] / "scratch" / REPORT_FILE
    return relative_link(candidate, folder) if candidate.is_file() else None


def _maps_section(folder: Path, diag: dict, arrays: dict) -> dict:
    """The maps figure (reconstruction, zero-filled fit, reference, differences) and its windows."""
    from refine_more.files.maps_io import read_maps

    maps, _ = read_maps(folder)
    z = int(diag.get("slice_index", maps["T1F"].shape[0] // 2))
    recon = {n: maps[n][z] for n in MAP_NAMES}
    tissue = arrays["tissue"].astype(bool) if "tissue" in arrays else maps["tissue_mask"][z]
    zf = {n: arrays[f"zf_{n}"] for n in MAP_NAMES if f"zf_{n}" in arrays}
    ref = {n: arrays[f"ref_{n}"] for n in MAP_NAMES if f"ref_{n}" in arrays}
    wins = figures.windows(recon, ref, tissue)
    rows = [("REFINE-MORE", recon, "map")]
    if zf:
        rows.append(("zero-filled fit", zf, "map"))
    if ref:
        rows.append(("reference", ref, "map"))
        rows.append(("REFINE-MORE − ref.", {n: recon[n] - ref[n] for n in ref}, "diff"))
        if zf:
            rows.append(("zero-filled − ref.", {n: zf[n] - ref[n] for n in ref if n in zf}, "diff"))
    return {"grid": figures.maps_grid(rows, wins, tissue), "slice": z, "n_slices": int(maps["T1F"].shape[0]),
            "windows": wins, "has_zf": bool(zf), "has_ref": bool(ref), "diff_fraction": figures.DIFF_FRACTION,
            "nrmse_slice": diag.get("nrmse_slice") or {}}


def _image_labels(protocol: dict, n: int) -> list:
    fa, sat = protocol.get("flip_angles_deg") or [], protocol.get("saturation") or []
    if len(fa) == n and len(sat) == n:
        return [f"{i + 1}: {fa[i]:g}°{' sat' if sat[i] else ''}" for i in range(n)]
    return [f"image {i + 1}" for i in range(n)]


def _residual_section(diag: dict, arrays: dict) -> Optional[dict]:
    res = diag.get("residual") or {}
    if not res.get("maps"):
        return None
    n = len(res["maps"])
    labels = _image_labels(diag.get("protocol") or {}, n)
    frac = diag.get("sampled_fraction") or [None] * n
    rows = [{"label": labels[i], "maps": res["maps"][i], "inr": (res.get("inr") or [None] * n)[i],
             "sampled": frac[i] if i < len(frac) else None} for i in range(n)]
    return {"bars": figures.residual_bars_svg(res["maps"], res.get("inr") or [], labels), "rows": rows,
            "images": figures.residual_panels(arrays["residual"], labels) if "residual" in arrays else None,
            "phase": res.get("phase", "")}


def _protocol_section(diag: dict) -> Optional[dict]:
    p = diag.get("protocol")
    if not p:
        return None
    per_image = {k: v for k, v in p.items() if isinstance(v, list)}
    n = max((len(v) for v in per_image.values()), default=0)
    images = [{k: v[i] for k, v in per_image.items() if i < len(v)} for i in range(n)]
    acq = {k: " × ".join(fmt_num(x) for x in diag[k]) if isinstance(diag[k], list) else diag[k]
           for k in ("shape", "voxel_size_mm", "n_coils", "coil_maps", "b1_source") if k in diag}
    return {"columns": list(per_image), "images": images, "scalars": {k: v for k, v in p.items() if k not in per_image},
            "acquisition": acq}


def subject_context(folder, record: Optional[dict] = None, seed_report=None) -> dict:
    """Everything the template shows, from the folder (``record`` overrides its done/summary file:
    a cohort's final row with QC, say)."""
    folder = Path(folder)
    record = record if record is not None else read_record(folder)
    facts = _facts(record, folder)
    diag, arrays = read_diagnostics(folder)
    history = read_json(folder / "history.json") or []
    config = read_json(folder / "config.json") or {}
    maps = _maps_section(folder, diag, arrays) if (folder / "maps.h5").is_file() else None
    return {
        "title": f"{facts['subject_id']} · {facts['mode']}", "facts": facts, "qc": qc_view(record),
        "seed_link": _seed_link(folder, facts, seed_report), "maps": maps,
        "residual": _residual_section(diag, arrays) if diag else None,
        "loss_svgs": figures.loss_svgs(history) if history else [], "stages": _stage_table(history),
        "protocol": _protocol_section(diag), "diag_seconds": diag.get("seconds") or {},
        "config_hash": config.get("config_hash"), "config_json": json.dumps(config.get("config", config), indent=1),
        "files": [f for f in FILES if (folder / f).is_file()],
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _stage_table(history: list) -> list:
    out = []
    for stage in sorted({int(h.get("stage", 1)) for h in history}):
        hs = [h for h in history if int(h.get("stage", 1)) == stage]
        last = hs[-1]
        out.append({"stage": figures.STAGE_NAMES.get(stage, f"stage {stage}"), "iterations": int(last["iteration"]) + 1,
                    **{k: last.get(k) for k in figures.LOSS_KEYS}})
    return out


def write_subject_report(folder, record: Optional[dict] = None, *, seed_report=None) -> str:
    """Write ``folder/report.html`` (atomically); returns its path. Raises on failure."""
    ctx = subject_context(folder, record, seed_report)
    return write_html(Path(folder) / REPORT_FILE, render("subject.html.j2", ctx))


def try_write_subject_report(folder, record: Optional[dict] = None, *, diagnostics: Optional[dict] = None,
                             log=print, **kw) -> Optional[str]:
    """The result's ``diagnostics`` (``Result.diagnostics``, when given) beside its maps, then
    :func:`write_subject_report`; a failure is logged, never raised (a report never fails a
    result). Returns the report's path, None when it failed."""
    try:
        if diagnostics:
            write_diagnostics(folder, diagnostics)
        return write_subject_report(folder, record, **kw)
    except Exception as exc:
        log(f"warning: report for {folder} not written: {type(exc).__name__}: {exc}")
        return None
