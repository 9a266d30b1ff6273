"""Wall-clock timing shared by the benchmarks (CUDA work is synchronised before the clock reads)."""
from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device: torch.device, repeats: int) -> list:
    """Seconds of `repeats` calls of fn() after one warm-up call (cuFFT plans, allocator), sorted."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)
