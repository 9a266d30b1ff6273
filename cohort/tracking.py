"""MLflow logging of a cohort run, by the driver only (see the comment in ``driver.run_cohort``).

One parent run per cohort run (params: config hash + flattened config, mode, manifest sha256,
Ray resources; metrics: cohort wall time, subjects/hour, counts; artifacts: results.parquet,
summary PNG) and one nested child run per subject and mode (tag ``mlflow.parentRunId``; params:
subject, mode, lora_rank, iterations; metrics: stage runtimes, loss curves with step = global
iteration index, final nRMSE/SSIM; artifacts: montage PNG, loss PNG, maps.h5).

Resumed (subject, mode) results are not logged again: their rows keep the child run id of the
run that produced them. A failed subject gets a child run with status FAILED and an ``error`` tag.

Tracking must never cost a reconstruction: an MLflow error is reported once as a warning and the
cohort goes on without tracking (``mlflow_run_id`` is then empty).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

PARAM_MAX = 6000            # MLflow's param value limit
BATCH_PARAMS = 100
BATCH_METRICS = 1000


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


class CohortTracker:
    def __init__(self, uri: str, experiment: str, out_dir, *, enabled: bool = True, log=print):
        self.uri = uri
        self.experiment = experiment
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.log = log
        self.client = None
        self.experiment_id = None
        self.parent_run_id: Optional[str] = None

    # -- helpers ----------------------------------------------------------------------------------
    def _fail(self, what: str, exc: BaseException):
        msg = f"MLflow tracking disabled after an error while {what}: {type(exc).__name__}: {exc}"
        warnings.warn(msg)
        self.log("warning: " + msg)
        self.enabled = False

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
            if p and os.path.exists(p):
                self.client.log_artifact(run_id, str(p), artifact_path)
            elif p:
                self.log(f"warning: artifact {p} not readable from the driver (no shared output folder?)")

    # -- parent -----------------------------------------------------------------------------------
    def start_parent(self, config, *, mode, manifest, manifest_sha256, resources, n_subjects, seed_subject):
        if not self.enabled:
            return None
        try:
            from mlflow.tracking import MlflowClient
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                loc = (self.out_dir.resolve() / "mlartifacts").as_uri() if _local_store(self.uri) else None
                self.experiment_id = self.client.create_experiment(self.experiment, artifact_location=loc)
            else:
                self.experiment_id = exp.experiment_id
            run = self.client.create_run(self.experiment_id, run_name=f"cohort-{self.out_dir.name}-{mode}",
                                         tags={"refine_more.kind": "cohort", "refine_more.mode": mode})
            self.parent_run_id = run.info.run_id
            params = {"config_hash": config.hash(), "mode": mode, "manifest": str(Path(manifest).resolve()),
                      "manifest_sha256": manifest_sha256, "n_subjects": n_subjects, "seed_subject": seed_subject,
                      "out_dir": str(self.out_dir.resolve()),
                      **{f"ray.{k}": v for k, v in resources.items()},
                      **{f"config.{k}": v for k, v in flatten(config.to_dict()).items()}}
            self._batch(self.parent_run_id, params=self._params(params))
            return self.parent_run_id
        except Exception as exc:
            self._fail("starting the cohort run", exc)
            return None

    def finish_parent(self, metrics: dict, artifacts, status: str = "FINISHED"):
        if not self.enabled or not self.parent_run_id:
            return
        try:
            self._batch(self.parent_run_id, metrics=self._metrics(metrics))
            self._artifacts(self.parent_run_id, artifacts)
            self.client.set_terminated(self.parent_run_id, status=status)
        except Exception as exc:
            self._fail("finishing the cohort run", exc)

    def log_seed_state(self, path):
        """The seed state this run adapted from, as the parent run's artifact ``seed_state/`` (what
        ``cohort run --seed-from runs:/<parent run id>`` reads)."""
        if not self.enabled or not self.parent_run_id or path is None or not Path(path).is_file():
            return
        try:
            self._artifacts(self.parent_run_id, [path], "seed_state")
        except Exception as exc:
            self._fail("logging the seed state", exc)

    # -- children ---------------------------------------------------------------------------------
    def log_child(self, row: dict, history: list, lora_rank: Optional[int] = None) -> Optional[str]:
        """One nested run for a finished (or failed) subject/mode; returns its run id."""
        if not self.enabled or not self.parent_run_id:
            return None
        try:
            from refine_more.plots import global_steps
            start = int(1000 * row["started_at"]) if _finite(row.get("started_at")) else None
            tags = {"mlflow.parentRunId": self.parent_run_id, "refine_more.kind": "subject",
                    "subject_id": row["subject_id"], "mode": row["mode"], "status": row["status"]}
            if row.get("error"):
                tags["error"] = str(row["error"])[:5000]
            run = self.client.create_run(self.experiment_id, start_time=start,
                                         run_name=f"{row['subject_id']}-{row['mode']}", tags=tags)
            rid = run.info.run_id
            params = {"subject": row["subject_id"], "mode": row["mode"], "is_seed": row.get("is_seed", False),
                      "method": row.get("method"), "seed_subject": row.get("seed_subject"),
                      "config_hash": row.get("config_hash"), "node": row.get("node"), "device": row.get("device"),
                      "iterations_stage1": row.get("iterations_stage1"),
                      "iterations_stage2": row.get("iterations_stage2"),
                      "trainable_stage1": row.get("trainable_stage1"), "trainable_stage2": row.get("trainable_stage2")}
            if lora_rank is not None:
                params["lora_rank"] = lora_rank
            metrics = self._metrics({k: row.get(k) for k in row if k.endswith("_s") or k.startswith(
                ("loss", "nrmse_", "ssim_"))})
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
                self._artifacts(rid, [row.get("montage_path"), row.get("loss_png_path"), row.get("history_path")])
                self._artifacts(rid, [row.get("maps_path")], "maps")
            end = int(1000 * row["finished_at"]) if _finite(row.get("finished_at")) else None
            self.client.set_terminated(rid, status="FINISHED" if row["status"] == "ok" else "FAILED", end_time=end)
            return rid
        except Exception as exc:
            self._fail(f"logging {row.get('subject_id')}/{row.get('mode')}", exc)
            return None
