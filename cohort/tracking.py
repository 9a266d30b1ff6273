"""MLflow logging of a cohort run, by the driver only (see the comment in ``driver.run_cohort``).

One parent run per cohort run (params: config hash + flattened config, mode, manifest sha256,
Ray resources; inputs: the manifest as a dataset with its digest; system metrics of the driver's
machine; metrics: cohort wall time, subjects/hour, counts; artifacts: config.json, results.parquet,
summary PNG, the seed state) and one nested child run per subject and mode, failed ones included
(tag ``mlflow.parentRunId``; params: subject, mode, lora_rank, iterations; metrics: stage
runtimes, loss curves with step = global iteration index, final nRMSE/SSIM, the QC metrics
``qc_*``; tags ``qc_status`` and ``qc_reasons``; artifacts: montage PNG, loss PNG, qc.json, report.html,
maps.h5; the parent's hold the cohort's report.html). A failed subject's child run has status FAILED
and an ``error`` tag.

Resumed (subject, mode) results are not logged again: their rows keep the child run id (and
tracking state) of the run that produced them, read from the previous ``results.parquet``.

Tracking must never cost a reconstruction: an MLflow error (or a tracking server that does not
answer a short probe) is reported once as a warning and the cohort goes on without tracking. Every
row says what happened in its ``tracking`` column: ``ok`` (logged: ``mlflow_run_id``), ``off``
(``--no-tracking``) or ``failed: <reason>``; ``DIR/tracking.json`` keeps what the parent run was
to receive, so ``cohort sync-mlflow DIR`` (:mod:`cohort.tracking_sync`) can log what was missed.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

from . import tracking_system as system
from .results import CONFIG_FILE, QC_METRIC_COLUMNS, RESULTS_FILE, write_json

PARAM_MAX = 6000            # MLflow's param value limit
BATCH_PARAMS = 100
BATCH_METRICS = 1000
TRACKING_FILE = "tracking.json"
OK, OFF = "ok", "off"


def default_tracking_uri(out_dir) -> str:
    """``sqlite:///<abs out_dir>/mlflow.db`` (one writer: the driver)."""
    return "sqlite:///" + Path(out_dir).resolve().joinpath("mlflow.db").as_posix()


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/", ".")) or "://" not in uri


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def read_journal(out_dir) -> dict:
    """``DIR/tracking.json`` ({} when absent or unreadable)."""
    try:
        with open(Path(out_dir) / TRACKING_FILE) as fh:
            d = json.load(fh)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _previous_tracking(out_dir) -> dict:
    """(subject_id, mode) -> (mlflow_run_id, tracking) of the last ``results.parquet``."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        return {}
    try:
        import pandas as pd
        df = pd.read_parquet(path)
    except Exception:
        return {}
    if "mlflow_run_id" not in df.columns:
        return {}
    track = df["tracking"] if "tracking" in df.columns else [None] * len(df)
    return {(s, m): (r if isinstance(r, str) and r else None, t if isinstance(t, str) else None)
            for s, m, r, t in zip(df["subject_id"], df["mode"], df["mlflow_run_id"], track)}


class TrackingError(RuntimeError):
    """MLflow failed while ``strict`` (``cohort sync-mlflow``): nothing is skipped silently."""


class CohortTracker:
    def __init__(self, uri: str, experiment: str, out_dir, *, enabled: bool = True, log=print,
                 system_metrics: bool = True, strict: bool = False):
        self.uri = uri
        self.experiment = experiment
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.log = log
        self.strict = strict
        self.client = None
        self.experiment_id = None
        self.parent_run_id: Optional[str] = None
        self.failure: Optional[str] = None     # "failed: <reason>" once an error turned tracking off
        self.system_metrics = system_metrics
        self._monitor = None
        self._previous = _previous_tracking(self.out_dir)
        self.journal = {"tracking_uri": uri, "experiment": experiment, "parent_run_id": None,
                        "tracking": OK if enabled else OFF}

    @property
    def row_state(self) -> str:
        """What a row not logged now says: ``off`` or ``failed: <reason>``."""
        return self.failure or (OK if self.enabled else OFF)

    # -- helpers ----------------------------------------------------------------------------------
    def save_journal(self, **updates):
        self.journal.update(updates)
        write_json(self.out_dir / TRACKING_FILE, self.journal)

    def _fail(self, what: str, exc: BaseException):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first}"[:300]
        if self.strict:
            raise TrackingError(f"MLflow at {self.uri}: error while {what}: {reason}") from None
        msg = f"MLflow tracking disabled after an error while {what}: {reason}"
        warnings.warn(msg)
        self.log("warning: " + msg)
        self.enabled = False
        self.failure = f"failed: {what}: {reason}"
        system.stop_system_metrics(self._monitor, flush=False, wait_s=0)
        self._monitor = None
        self.save_journal(tracking=self.failure)

    def _client(self):
        if self.client is None:
            from mlflow.tracking import MlflowClient
            self.client = MlflowClient(tracking_uri=self.uri)
        return self.client

    def _batch(self, run_id, metrics=(), params=(), tags=()):
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:
            self.client.log_batch(run_id, metrics=metrics[:BATCH_METRICS], params=params[:BATCH_PARAMS],
                                  tags=tags[:100])
            metrics, params, tags = metrics[BATCH_METRICS:], params[BATCH_PARAMS:], tags[100:]

    @staticmethod
    def _params(d: dict):
        from mlflow.entities import Param
        return [Param(str(k), str(v)[:PARAM_MAX]) for k, v in d.items()]

    @staticmethod
    def _metrics(d: dict, step: int = 0, ts: Optional[int] = None):
        from mlflow.entities import Metric
        ts = ts or int(time.time() * 1000)
        return [Metric(k, float(v), ts, step) for k, v in d.items() if _finite(v)]

    def _artifacts(self, run_id, paths, artifact_path=None):
        for p in paths:
            if not isinstance(p, (str, os.PathLike)):      # None, or NaN from a results.parquet row
                continue
            if p and os.path.exists(p):
                self.client.log_artifact(run_id, str(p), artifact_path)
            elif p:
                self.log(f"warning: artifact {p} not readable from the driver (no shared output folder?)")

    # -- parent -----------------------------------------------------------------------------------
    def start_parent(self, config, *, mode, manifest, manifest_sha256, resources, n_subjects, seed_subject):
        params = {"config_hash": config.hash(), "mode": mode, "manifest": str(Path(manifest).resolve()),
                  "manifest_sha256": manifest_sha256, "n_subjects": n_subjects, "seed_subject": seed_subject,
                  "out_dir": str(self.out_dir.resolve()),
                  **{f"ray.{k}": v for k, v in resources.items()},
                  **{f"config.{k}": v for k, v in flatten(config.to_dict()).items()}}
        self.save_journal(mode=mode, manifest=params["manifest"], started_at=time.time(),
                          params={k: str(v)[:PARAM_MAX] for k, v in params.items()})
        return self.create_parent()

    def create_parent(self, synced: bool = False) -> Optional[str]:
        """The parent run from the journal: params, the manifest as dataset input, config.json,
        system metrics (a live run only)."""
        if not self.enabled:
            return None
        j = self.journal
        try:
            system.check_reachable(self.uri)
            client = self._client()
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                loc = (self.out_dir.resolve() / "mlartifacts").as_uri() if _local_store(self.uri) else None
                self.experiment_id = client.create_experiment(self.experiment, artifact_location=loc)
            else:
                self.experiment_id = exp.experiment_id
            tags = {"refine_more.kind": "cohort", "refine_more.mode": j["mode"]}
            if synced:
                tags["refine_more.synced"] = "true"
            start = int(1000 * j["started_at"]) if _finite(j.get("started_at")) else None
            run = client.create_run(self.experiment_id, start_time=start, tags=tags,
                                    run_name=f"cohort-{self.out_dir.name}-{j['mode']}")
            self.parent_run_id = run.info.run_id
            self.save_journal(parent_run_id=self.parent_run_id, parent_done=False)
            self._batch(self.parent_run_id, params=self._params(j["params"]))
            dataset = system.manifest_input(j["manifest"]) if j.get("manifest") else None
            if dataset is not None:
                client.log_inputs(self.parent_run_id, datasets=[dataset])
            self._artifacts(self.parent_run_id, [self.out_dir / CONFIG_FILE])
            if self.system_metrics and not synced:
                self._monitor = system.start_system_metrics(self.parent_run_id, self.uri)
                client.set_tag(self.parent_run_id, "refine_more.system_metrics",
                               "driver node" + (" with GPU" if system.gpu_monitored(self._monitor) else ""))
            return self.parent_run_id
        except TrackingError:
            raise
        except Exception as exc:
            self._fail("starting the cohort run", exc)
            return None

    def finish_parent(self, metrics: dict, artifacts, status: str = "FINISHED"):
        self.save_journal(finish={"metrics": {k: float(v) for k, v in metrics.items() if _finite(v)},
                                  "artifacts": [str(a) for a in artifacts if a], "status": status})
        system.stop_system_metrics(self._monitor)
        self._monitor = None
        self.log_finish()
        if self.failure and not self.strict:
            self.log(f"MLflow tracking {self.failure}\n  once the server is back: "
                     f"refine-more cohort sync-mlflow {self.out_dir}")

    def log_finish(self):
        """The journal's end of the parent run (metrics, artifacts, status) to MLflow."""
        fin = self.journal.get("finish")
        if not self.enabled or not self.parent_run_id or not fin:
            return
        try:
            system.check_reachable(self.uri)
            self._batch(self.parent_run_id, metrics=self._metrics(fin["metrics"]))
            self._artifacts(self.parent_run_id, fin["artifacts"])
            self.client.set_terminated(self.parent_run_id, status=fin["status"])
            self.save_journal(parent_done=True)
        except TrackingError:
            raise
        except Exception as exc:
            self._fail("finishing the cohort run", exc)

    def log_seed_state(self, path):
        """The seed state this run adapted from, as the parent run's artifact ``seed_state/`` (what
        ``cohort run --seed-from runs:/<parent run id>`` reads)."""
        if path is None or not Path(path).is_file():
            return
        self.save_journal(seed_state=str(path), seed_state_logged=False)
        if not self.enabled or not self.parent_run_id:
            return
        try:
            self._artifacts(self.parent_run_id, [path], "seed_state")
            self.save_journal(seed_state_logged=True)
        except TrackingError:
            raise
        except Exception as exc:
            self._fail("logging the seed state", exc)

    # -- children ---------------------------------------------------------------------------------
    def log_child(self, row: dict, history: list, lora_rank: Optional[int] = None, synced: bool = False) -> Optional[str]:
        """One nested run for a finished (or failed) subject/mode; returns its run id. Sets the
        row's ``tracking`` (and ``mlflow_run_id``: None unless logged)."""
        row["mlflow_run_id"], row["tracking"] = None, self.row_state
        if not self.enabled or not self.parent_run_id:
            if self.enabled:          # no parent run: nothing to nest under
                row["tracking"] = OFF
            return None
        what = f"logging {row.get('subject_id')}/{row.get('mode')}"
        try:
            system.check_reachable(self.uri)
            rid = self._child_run(row, history, lora_rank, synced)
        except TrackingError:
            raise
        except Exception as exc:
            self._fail(what, exc)
            row["tracking"] = self.failure
            return None
        row["mlflow_run_id"], row["tracking"] = rid, OK
        return rid

    def _child_run(self, row: dict, history: list, lora_rank: Optional[int], synced: bool) -> str:
        from refine_more.evaluation.plots import global_steps
        start = int(1000 * row["started_at"]) if _finite(row.get("started_at")) else None
        tags = {"mlflow.parentRunId": self.parent_run_id, "refine_more.kind": "subject",
                "subject_id": row["subject_id"], "mode": row["mode"], "status": row["status"]}
        if synced:
            tags["refine_more.synced"] = "true"
        if row.get("error"):
            tags["error"] = str(row["error"])[:5000]
        if row.get("qc_status"):        # status-ok rows: docs/decisions/017
            tags["qc_status"] = row["qc_status"]
            tags["qc_reasons"] = str(row.get("qc_reasons") or "")[:5000]
        run = self.client.create_run(self.experiment_id, start_time=start,
                                     run_name=f"{row['subject_id']}-{row['mode']}", tags=tags)
        rid = run.info.run_id
        params = {"subject": row["subject_id"], "mode": row["mode"], "is_seed": row.get("is_seed", False),
                  "method": row.get("method"), "seed_subject": row.get("seed_subject"),
                  "config_hash": row.get("config_hash"), "node": row.get("node"), "device": row.get("device"),
                  **{k: int(row[k]) for k in ("iterations_stage1", "iterations_stage2", "trainable_stage1",
                                              "trainable_stage2") if _finite(row.get(k))}}
        if lora_rank is not None:
            params["lora_rank"] = lora_rank
        metrics = self._metrics({k: row.get(k) for k in row if k.endswith("_s") or k.startswith(
            ("loss", "nrmse_", "ssim_")) or k in QC_METRIC_COLUMNS or k == "peak_rss_GiB"})
        curve = []
        if history:
            from mlflow.entities import Metric
            base = start or int(time.time() * 1000)
            for step, h in zip(global_steps(history), history):
                ts = base + int(1000 * float(h.get("seconds", 0.0)))
                for k, v in h.items():
                    if k.startswith(("loss", "nrmse_")) and _finite(v):
                        curve.append(Metric(f"train/{k}", float(v), ts, int(step)))
        self._batch(rid, metrics=metrics + curve,
                    params=self._params({k: v for k, v in params.items() if v is not None}))
        if row["status"] == "ok":
            self._artifacts(rid, [row.get("montage_path"), row.get("loss_png_path"), row.get("history_path"),
                                  row.get("report_path"), row.get("qc_path")])
            self._artifacts(rid, [row.get("maps_path")], "maps")
        end = int(1000 * row["finished_at"]) if _finite(row.get("finished_at")) else None
        self.client.set_terminated(rid, status="FINISHED" if row["status"] == "ok" else "FAILED", end_time=end)
        return rid

    def log_unrecorded(self, rows) -> None:
        """Rows the scheduler did not log (invalid files, subjects failed with their seed): a child
        run each; resumed rows keep the run id and tracking state of the run that produced them."""
        for row in rows:
            if row.get("resumed"):
                row["mlflow_run_id"], row["tracking"] = self._previous.get((row["subject_id"], row["mode"]),
                                                                           (None, None))
            elif "tracking" not in row:
                self.log_child(row, [])
