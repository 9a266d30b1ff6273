"""One subject of a cohort, as plain functions (no Ray): reconstruct it and write its outputs.

:func:`run_subject` and :func:`run_seed` are what the Ray tasks of :mod:`cohort.tasks` call; they
run the same in a test or a notebook. Each writes ``DIR/<subject_id>/<mode>/`` (see
:mod:`cohort.results`), ``done.json`` last, and returns the subject's results row.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Optional

from refine_more.files.atomic import atomic_write_text
from refine_more.evaluation.metrics import score_maps
from refine_more.files.names import MAP_NAMES

from . import plots
from .memory import peak_rss_gib, reset_peak_rss
from .resume import input_digest
from .progress import PROGRESS_FILE, ProgressFile
from .results import (CONFIG_FILE, DONE, MODES, QC_FILE, SEED_STATE_FILE, clean, history_csv,
                      qc_columns, subject_dir, write_json)


def _fresh_dir(odir: Path) -> None:
    """The subject folder, with nothing in it that passes for a finished result."""
    odir.mkdir(parents=True, exist_ok=True)
    (odir / DONE).unlink(missing_ok=True)          # a redo is not "done" until it finishes
    (odir / PROGRESS_FILE).unlink(missing_ok=True)  # a killed attempt's phase is not this one's
    # temporaries of an attempt that was killed mid-write (SIGKILL skips atomic_path's clean-up);
    # one attempt writes a subject folder at a time (Ray retries only after a worker died)
    for stale in odir.glob(".*.tmp*"):
        stale.unlink(missing_ok=True)


def _write_outputs(odir: Path, sid: str, mode: str, subject, result, config) -> dict:
    """Maps, resolved config, montage, history and loss curves; returns their paths and the history."""
    from refine_more.files.maps_io import write_maps
    from refine_more.reconstruction.synthesis import INR_FILE, save_inr

    maps_path = write_maps(odir, result.maps, result.tissue_mask, subject_id=sid, method=result.method,
                           config_hash=result.config_hash, voxel_size_mm=subject.voxel_size_mm)
    write_json(odir / CONFIG_FILE, {"config_hash": config.hash(), "config": config.to_dict()})
    save_inr(odir / INR_FILE, result)          # what `refine-more synthesize` needs
    qc_path = write_json(odir / QC_FILE, {**result.qc.to_dict(), "thresholds": vars(config.qc)})
    title = f"{sid} {mode} ({result.method}), {result.qc.headline()}"
    montage_path = plots.montage(odir / "montage.png", result.maps, subject.reference, result.tissue_mask, title)
    history = [{k: clean(v) for k, v in h.items()} for h in result.history]
    history_path = write_json(odir / "history.json", history)
    atomic_write_text(odir / "history.csv", history_csv(history))
    loss_png = plots.loss_plot(odir / "loss.png", history, title)
    return {"maps_path": str(maps_path), "montage_path": str(montage_path), "loss_png_path": str(loss_png),
            "history_path": str(history_path), "qc_path": str(qc_path), "history": history}


def _row(sid: str, mode: str, result, *, is_seed: bool, seed_subject: Optional[str], node: Optional[str],
         node_id: Optional[str], scores: dict, path, inputs: dict, odir: Path, outputs: dict, started: float) -> dict:
    """The results row of a finished reconstruction (the columns of :data:`cohort.results.COLUMNS`)."""
    final = result.final_losses()
    t, it, tr = result.timings, result.iterations, result.trainable_parameters
    row = {
        "subject_id": sid, "mode": mode, "status": "ok", "error": None, "resumed": False,
        "is_seed": bool(is_seed), "seed_subject": seed_subject if mode == "adapted" else (sid if is_seed else None),
        "method": result.method, "node": node or socket.gethostname(), "node_id": node_id, "device": result.device,
        "setup_s": t.get("setup"), "stage1_s": t.get("stage1"), "stage2_s": t.get("stage2"), "total_s": t.get("total"),
        "qc_s": t.get("qc"), **qc_columns(result.qc.to_dict()), "warm_start_from": result.start.get("start"),
        "prior_scale": result.start.get("prior_scale"),
        "iterations_stage1": int(it.get("stage1", 0)), "iterations_stage2": int(it.get("stage2", 0)),
        "trainable_stage1": int(tr.get("stage1", 0)), "trainable_stage2": int(tr.get("stage2", 0)),
        "loss_final": final.get("loss"), "loss1_final": final.get("loss1"),
        "loss2_final": final.get("loss2"), "loss3_final": final.get("loss3"),
        **scores,
        "config_hash": result.config_hash, "subject_path": str(path), **inputs, "out_dir": str(odir),
        **{k: v for k, v in outputs.items() if k != "history"}, "started_at": started,
    }
    row["finished_at"] = time.time()
    row["wall_s"] = row["finished_at"] - started
    return {k: clean(v) for k, v in row.items()}


def _report(odir: Path, row: dict, result) -> dict:
    """The diagnostics beside the maps and ``report.html`` (refine_more/evaluation/report/), before
    done.json; a report that cannot be written is logged and the subject goes on. Returns the row's
    ``report_path`` (None then) and the seconds it cost: ``report_s`` here, ``diagnostics_s`` in
    the reconstruction (after its total)."""
    from refine_more.evaluation.report.subject import try_write_subject_report

    row["diagnostics_s"] = result.timings.get("diagnostics")
    t0 = time.perf_counter()
    report = try_write_subject_report(odir, row, diagnostics=result.diagnostics)
    return {"report_path": report, "report_s": time.perf_counter() - t0}


def reconstruct_subject(path, out_dir, mode: str, config_dict: dict, seed_state=None, *,
                        subject_id: Optional[str] = None, is_seed: bool = False,
                        seed_subject: Optional[str] = None, save_seed_state: bool = False,
                        node: Optional[str] = None, node_id: Optional[str] = None):
    """Reconstruct one subject, write its outputs (``done.json`` last); return ``(row, result)``.
    The row records the input's digest (:func:`cohort.resume.input_digest`), read before the file."""
    from refine_more.config import ReconConfig
    from refine_more.reconstruction.recon import reconstruct
    from refine_more.files.subject import read_subject

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "adapted" and seed_state is None:
        raise ValueError("an adapted reconstruction needs a seed state")
    started = time.time()
    measured = reset_peak_rss()     # the worker may have run another subject before: this one's peak alone
    config = ReconConfig.from_dict(config_dict)
    inputs = input_digest(path)
    subject = read_subject(path, load_reference="maps")   # scores need the maps; kspace_full is as large as the data
    sid = subject_id or subject.subject_id
    odir = subject_dir(out_dir, sid, mode)
    _fresh_dir(odir)
    progress = ProgressFile(odir / PROGRESS_FILE)   # the driver's console reads it while the task runs
    try:
        result = reconstruct(subject, config, seed_state=seed_state if mode == "adapted" else None,
                             track_reference=True, progress_desc=f"{sid}/{mode}", diagnostics=True, release_kspace=True,
                             on_progress=progress)
        reference = {k: v for k, v in (subject.reference or {}).items() if k in MAP_NAMES}
        scores = score_maps(result.maps, reference, result.tissue_mask, flat=True) if reference else {}
        if reference:   # the stage-1 INR's own maps Q⁽⁰⁾ (the "INR-only" ablation), beside the result's
            scores.update({f"inr_{k}": v for k, v in score_maps(result.maps_init, reference, result.tissue_mask,
                                                                 flat=True, with_ssim=False).items()})
            # the LLR fit, when the warm start computed it (unroll.start llr | best): the classical baseline
            scores.update({f"llr_nrmse_{k}": v for k, v in result.start.get("llr_nrmse", {}).items()})
        progress("writing outputs")
        outputs = _write_outputs(odir, sid, mode, subject, result, config)
        if save_seed_state and not result.qc.flagged:      # a flagged seed is never published (decisions/017)
            from refine_more.reconstruction.adaptation import SeedState
            SeedState.from_result(result).save(odir / SEED_STATE_FILE)
        row = _row(sid, mode, result, is_seed=is_seed, seed_subject=seed_subject, node=node, node_id=node_id,
                   scores=scores, path=path, inputs=inputs, odir=odir, outputs=outputs, started=started)
        row.update(_report(odir, row, result))
        row["peak_rss_GiB"] = peak_rss_gib() if measured else None   # reading, reconstruction, outputs, report
        progress.remove()
        write_json(odir / DONE, row)                   # LAST: marks it done
    finally:
        progress.remove()
    row["history"] = outputs["history"]    # for the driver's MLflow logging; not stored in results.parquet
    return row, result


def run_subject(path, out_dir, mode: str, config_dict: dict, seed_state=None, *,
                subject_id: Optional[str] = None, is_seed: bool = False, seed_subject: Optional[str] = None,
                node: Optional[str] = None, node_id: Optional[str] = None) -> dict:
    """Reconstruct one subject (``mode`` 'scratch' or 'adapted', the latter with ``seed_state``:
    a SeedState or its numpy dict), write its outputs; return its results row (with ``history``).

    Raises what the reconstruction raises (``SubjectFormatError``/``ValueError`` for bad data).
    """
    row, _ = reconstruct_subject(path, out_dir, mode, config_dict, seed_state, subject_id=subject_id,
                                 is_seed=is_seed, seed_subject=seed_subject, node=node, node_id=node_id)
    return row


def run_seed(path, out_dir, config_dict: dict, *, subject_id: Optional[str] = None,
             node: Optional[str] = None, node_id: Optional[str] = None) -> tuple:
    """Reconstruct the seed from scratch (outputs under ``<id>/scratch``, plus
    ``seed_state.safetensors`` for resuming); return ``(row, SeedState numpy dict)``. A seed that
    QC flags writes no seed state and returns None for it: the driver falls back to another."""
    from refine_more.reconstruction.adaptation import SeedState
    row, result = reconstruct_subject(path, out_dir, "scratch", config_dict, None, subject_id=subject_id,
                                      is_seed=True, save_seed_state=True, node=node, node_id=node_id)
    return row, None if result.qc.flagged else SeedState.from_result(result).to_numpy_dict()


def warm_up(device: str = "cpu") -> dict:
    """Pay a fresh worker's one-time start-up, so that its first reconstruction does not: the
    package's imports (torch among them), torch._dynamo (which torch.optim imports at the first
    optimiser: ~2 s on a CPU), matplotlib, and on a GPU the CUDA context. The driver runs it on the
    idle workers while the seed reconstructs (~7 s per worker on the 2-core VM). Returns where it ran."""
    import os
    t0 = time.perf_counter()

    import torch

    from refine_more.reconstruction import recon  # noqa: F401  (the reconstruction's import chain)
    from refine_more.reconstruction.optimizer import adam
    from refine_more.evaluation.plots import _plt
    from refine_more.evaluation.report import subject  # noqa: F401  (jinja2, the report's figures)

    adam([torch.nn.Parameter(torch.zeros(1))], 1e-3)
    _plt()
    if device == "cuda" and torch.cuda.is_available():
        torch.zeros(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    return {"node": socket.gethostname(), "pid": os.getpid(), "seconds": time.perf_counter() - t0}


def load_seed_state_dict(out_dir, seed_id: str) -> Optional[dict]:
    """The saved seed state of a finished seed (resume), as a numpy dict; None when unusable."""
    from refine_more.reconstruction.adaptation import SeedState, SeedStateError
    p = subject_dir(out_dir, seed_id, "scratch") / SEED_STATE_FILE
    try:
        return SeedState.load(p).to_numpy_dict()
    except (SeedStateError, OSError, ValueError):
        return None
