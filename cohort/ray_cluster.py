"""Ray for the driver: joining or starting it (:func:`connect_ray`), what one task asks for
(:func:`task_resources`) and what a failed task says (:func:`task_error`).

A task is placed on ONE node, so it must fit the largest node, not the cluster's total: a task
asking for more CPUs or GPUs than any alive node has stays pending forever, and so does every task
of a local Ray started with no CPUs. Both are refused (:class:`cohort.guards.RunRefused`) instead;
on a joined cluster only after a wait, since an autoscaler may still add a node that fits.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Optional

from .guards import RunRefused


def connect_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, log=print) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``); else start a local Ray. True when this call started
    (and so should shut down) Ray. Token authentication stays as Ray's default (on for a local
    cluster): it is never disabled here."""
    import ray
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" always starts a fresh cluster (never attaches to another one on this machine)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1")
    return True


def task_error(exc) -> str:
    """One line for a failed task: the task's own exception when it raised, else Ray's (a worker or node died)."""
    import ray
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
    if cause is not None and not isinstance(cause, ray.exceptions.RayTaskError):
        msg = f"{type(cause).__name__}: {cause}"
    else:
        msg = f"{type(exc).__name__}: {exc}"
    return msg.strip()[:4000]


def task_resources(gpus_per_task: Optional[float], cpus_per_task: float, log, wait_s: float = 0.0) -> dict:
    """The cluster's resources and the GPUs per task (none on a cluster without GPUs); refuses a
    task no node can run (after ``wait_s`` for an autoscaler: :func:`wait_for_fitting_node`)."""
    import ray
    resources, n_gpu = {}, 0.0
    if ray.is_initialized():
        cres = ray.cluster_resources()
        n_gpu = float(cres.get("GPU", 0))
        resources = {"CPU": float(cres.get("CPU", 0)), "GPU": n_gpu,
                     "nodes": sum(1 for n in ray.nodes() if n.get("Alive"))}
    gpus = (1.0 if n_gpu > 0 else 0.0) if gpus_per_task is None else float(gpus_per_task)
    if gpus > 0 and n_gpu <= 0:
        warnings.warn(f"--gpus-per-task {gpus:g} but the Ray cluster has no GPUs: running on CPU")
        log(f"warning: --gpus-per-task {gpus:g} but the Ray cluster has no GPUs: running on CPU")
        gpus = 0.0
    if ray.is_initialized():
        wait_for_fitting_node(float(cpus_per_task), gpus, wait_s, log)
    return {**resources, "gpus_per_task": gpus, "cpus_per_task": float(cpus_per_task)}


def check_num_cpus(num_cpus: Optional[int]) -> None:
    """A local Ray with no CPUs would accept tasks and never run them."""
    if num_cpus is not None and num_cpus < 1:
        raise RunRefused(f"--num-cpus {num_cpus}: a local Ray needs at least 1 CPU to run anything")


def _alive_nodes() -> list:
    """``{"CPU": n, "GPU": n}`` of each alive node."""
    import ray
    return [{k: float(n.get("Resources", {}).get(k, 0)) for k in ("CPU", "GPU")} for n in ray.nodes() if n.get("Alive")]


def wait_for_fitting_node(cpus_per_task: float, gpus_per_task: float, wait_s: float = 0.0, log=print) -> None:
    """Return once one alive node has both ``cpus_per_task`` CPUs and ``gpus_per_task`` GPUs (a
    task runs on one node); else, after ``wait_s`` (an autoscaler may add such a node), :class:`RunRefused`."""
    if cpus_per_task < 0 or gpus_per_task < 0:
        raise RunRefused(f"--cpus-per-task {cpus_per_task:g} / --gpus-per-task {gpus_per_task:g} must be >= 0")
    deadline, said = time.monotonic() + wait_s, False
    while True:
        nodes = _alive_nodes()
        if any(n["CPU"] >= cpus_per_task and n["GPU"] >= gpus_per_task for n in nodes):
            return
        big = {k: max((n[k] for n in nodes), default=0.0) for k in ("CPU", "GPU")}
        if time.monotonic() >= deadline:
            raise RunRefused(f"--cpus-per-task {cpus_per_task:g} --gpus-per-task {gpus_per_task:g}: no node of the "
                             f"Ray cluster has that much (largest: {big['CPU']:g} CPUs, {big['GPU']:g} GPUs); "
                             "tasks would wait forever")
        if not said:
            log(f"waiting up to {wait_s:.0f} s for a node with {cpus_per_task:g} CPUs and {gpus_per_task:g} GPUs "
                f"(largest now: {big['CPU']:g} CPUs, {big['GPU']:g} GPUs)")
            said = True
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def free_task_slots(cpus_per_task: float, gpus_per_task: float = 0.0) -> int:
    """How many tasks of this size the cluster could start now (``ray.available_resources``)."""
    import ray
    free = ray.available_resources()
    slots = int(free.get("CPU", 0.0) // cpus_per_task) if cpus_per_task > 0 else 1 << 30
    if gpus_per_task:
        slots = min(slots, int(free.get("GPU", 0.0) // gpus_per_task))
    return slots
