"""What MLflow users expect on a cohort's parent run besides params and metrics: system metrics
(MLflow's own monitor: CPU, memory, disk, network; GPU when ``nvidia-ml-py`` finds one), the
manifest as a dataset input with its digest, and a tracking server's reachability.

System metrics are those of the driver's machine (the driver is the only MLflow writer); workers
on other nodes are not monitored. Sampling every 2 s and logging the mean of 5 samples keeps a long
run's metric history small; the samples left when the run ends are logged too, so even a run
shorter than one interval gets a point.
"""
from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Optional

SAMPLING_INTERVAL_S = 2.0
SAMPLES_PER_POINT = 5
STOP_TIMEOUT_S = 30.0        # a monitor stuck on a dead server is left behind (daemon thread)
PROBE_TIMEOUT_S = 10.0


def check_reachable(uri: str) -> None:
    """Raise ``ConnectionError`` when ``uri`` is an HTTP tracking server that does not answer.

    MLflow's client retries a refused connection for minutes; one short probe first keeps a dead
    server from stalling the driver. Any HTTP answer (even 401/404) counts as reachable."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"tracking server {uri} unreachable ({reason})") from None


def start_system_metrics(run_id: str, uri: str):
    """MLflow's system-metrics monitor on ``run_id`` (None when it cannot start, e.g. no psutil)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SAMPLING_INTERVAL_S,
                                       samples_before_logging=SAMPLES_PER_POINT, tracking_uri=uri)
    except Exception as exc:   # psutil missing, or an MLflow without the monitor
        logging.getLogger(__name__).warning("no system metrics: %s: %s", type(exc).__name__, exc)
        return None
    monitor.start()
    return monitor


def gpu_monitored(monitor) -> bool:
    return monitor is not None and any("GPU" in type(m).__name__.upper() or "ROCM" in type(m).__name__.upper()
                                       for m in monitor.monitors)


def stop_system_metrics(monitor, flush: bool = True, wait_s: float = STOP_TIMEOUT_S) -> None:
    """Stop the monitor and log the samples it holds (one last point), waiting ``wait_s`` at most
    (0 after an MLflow error: the monitor may be retrying a dead server)."""
    if monitor is None:
        return

    def _stop():
        monitor.finish()
        if flush:
            monitor.collect_metrics()
            last = monitor.aggregate_metrics()
            if last:
                monitor.publish_metrics(last)
                monitor.mlflow_logger.flush()

    t = threading.Thread(target=_stop, daemon=True, name="stop-system-metrics")
    t.start()
    t.join(wait_s)


def read_table(path):
    """A manifest table as a DataFrame (Parquet, CSV or TSV, as :func:`cohort.manifest.read_manifest`)."""
    import pandas as pd
    path = Path(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    return pd.read_parquet(path)


def manifest_input(manifest) -> Optional[object]:
    """The manifest as an MLflow ``DatasetInput`` (MLflow's digest of the table's content; the
    file's sha256 is the parent run's ``manifest_sha256`` param); None when it is gone."""
    import mlflow.data
    from mlflow.entities import Dataset, DatasetInput, InputTag

    path = Path(manifest).resolve()
    if not path.is_file():
        return None
    with warnings.catch_warnings():    # MLflow registers the local source under two schemes
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        ds = mlflow.data.from_pandas(read_table(path), source=str(path), name=path.stem)
    return DatasetInput(Dataset(**ds.to_dict()), tags=[InputTag("mlflow.data.context", "cohort")])
