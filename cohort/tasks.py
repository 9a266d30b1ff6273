"""The Ray tasks: thin ``@ray.remote`` wrappers over :mod:`cohort.subject_run` and nothing else
(Ray's batch-inference style: each task reads its input, runs, writes its own outputs and returns
small metadata). A worker imports this module and :mod:`cohort.subject_run`, never the driver.

Options set by the driver per run with ``.options(num_cpus=, num_gpus=, max_retries=,
retry_exceptions=False)``: a worker or node that dies is retried ``max_retries`` times; a Python
exception (bad data: ``SubjectFormatError``/``ValueError``, a diverged fit) is recorded once and
never retried.
"""
from __future__ import annotations

import os
import socket

import ray

from . import subject_run


def _node() -> str:
    try:
        return ray.util.get_node_ip_address()
    except Exception:  # outside a Ray worker
        return socket.gethostname()


def _node_id():
    """The Ray node's id: unlike the IP, it tells apart two nodes on one machine."""
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside a Ray worker
        return None


def _threads():
    """Use the CPUs Ray gave this task (Ray sets OMP_NUM_THREADS to the task's num_cpus)."""
    import torch
    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))


@ray.remote(max_retries=2, retry_exceptions=False)
def subject_task(path, out_dir, mode, config_dict, seed_state, *, subject_id=None, is_seed=False, seed_subject=None):
    """``subject_run.run_subject`` in a worker; ``seed_state`` arrives resolved (top-level ObjectRef)."""
    _threads()
    return subject_run.run_subject(path, out_dir, mode, config_dict, seed_state, subject_id=subject_id,
                                   is_seed=is_seed, seed_subject=seed_subject, node=_node(), node_id=_node_id())


@ray.remote(max_retries=2, retry_exceptions=False)
def seed_task(path, out_dir, config_dict, *, subject_id=None):
    """``subject_run.run_seed`` in a worker: returns ``(row, SeedState numpy dict)``."""
    _threads()
    return subject_run.run_seed(path, out_dir, config_dict, subject_id=subject_id, node=_node(), node_id=_node_id())


@ray.remote(max_retries=0)
def warm_up_task(device):
    """``subject_run.warm_up`` in an idle worker while the seed runs (an optimisation: never retried)."""
    _threads()
    return subject_run.warm_up(device)
