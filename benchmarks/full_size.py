"""Time and memory of one subject at the paper's size (176 × 176 × 48, 20 coils, 8 images).

Runs a short schedule of the chosen preset (default `paper`) and extrapolates to its full schedule
(paper: 1500 + 1500 iterations), next to the FFT floor: one forward and one adjoint of the
multi-coil operator A = U F C at that size, which every stage-1 iteration needs at least once.

    python benchmarks/full_size.py [--matrix 48 176 176] [--coils 20] [--preset paper]
                                   [--iters 20 5] [--device auto] [--out FILE]

Writes benchmarks/results/full_size.json (device, seconds per iteration per stage, the FFT floor,
peak GPU memory, the rise of host memory during the reconstruction, the extrapolated schedule).
`--set image_chunk=1` runs the INR's losses one image at a time (memory). On a CPU use a smaller --matrix: the full size is
hours there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import threading
import time
from pathlib import Path

import numpy as np
import torch

from refine_more.config import apply_overrides, preset
from refine_more.operators import MultiCoilCartesian
from refine_more.physics import resolve_device
from refine_more.recon import reconstruct
from refine_more.simulate import SimulationConfig, simulate_subject
from timing import time_calls

RESULTS = Path(__file__).parent / "results"


def fft_floor(subject, device, repeats: int = 5) -> float:
    """Median seconds of A then Aᴴ (complex64) on all images of `subject`."""
    A = MultiCoilCartesian(torch.from_numpy(subject.coil_sens).to(device), torch.from_numpy(subject.mask).to(device))
    x = torch.randn(A.ishape, dtype=torch.complex64, device=device)
    return float(np.median(time_calls(lambda: A.adjoint(A(x)), device, repeats)))


class RSSSampler:
    """Peak resident memory of this process while the block runs, sampled from /proc (Linux; on
    the CPU the recon's tensors live there, so this is the CPU's analogue of peak GPU memory)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak, self.start = interval_s, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--matrix", type=int, nargs=3, default=[48, 176, 176])
    ap.add_argument("--coils", type=int, default=20)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--iters", type=int, nargs=2, default=[20, 5], help="stage 1 and stage 2 iterations to time")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable), e.g. --set image_chunk=1")
    ap.add_argument("--profile", action="store_true",
                    help="also: peak memory of stage 1 alone, and torch.profiler's top operations of a short run")
    ap.add_argument("--out", default=str(RESULTS / "full_size.json"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    t = time.perf_counter()
    subject = simulate_subject("sub-full", SimulationConfig(matrix=tuple(args.matrix), n_coils=args.coils), seed=1)
    simulate_s = time.perf_counter() - t
    floor = fft_floor(subject, device)

    full = apply_overrides(preset(args.preset), args.set)
    n1, n2 = args.iters
    # log once per stage: the per-iteration nRMSE bookkeeping is not part of the method's cost
    config = full.replace(iters_stage1=n1, iters_stage2=n2, device=str(device), progress=False, log_every=max(n1, n2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with RSSSampler() as rss:
        result = reconstruct(subject, config)
    tm = result.timings
    per1 = tm["stage1"] / max(1, result.iterations["stage1"])
    per2 = (tm["stage2"] - tm["warm_start"]) / max(1, result.iterations["stage2"])  # the warm start runs once
    out = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "preset": args.preset, "matrix": args.matrix, "coils": args.coils, "images": subject.n_images,
        "simulate_s": simulate_s, "fft_floor_s": floor, "timings_s": tm, "iterations": result.iterations,
        "stage1_s_per_iteration": per1, "stage2_s_per_iteration": per2,
        "stage1_over_fft_floor": per1 / floor, "stage2_over_fft_floor": per2 / floor,
        "full_schedule": {"iters_stage1": full.iters_stage1, "iters_stage2": full.iters_stage2,
                          "warm_start_steps": full.unroll.warm_start_steps,
                          "extrapolated_s": tm["setup"] + per1 * full.iters_stage1 + tm["warm_start"]
                          + per2 * full.iters_stage2},
        "peak_gpu_memory_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_host_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "recon_host_rss_rise_GiB": (rss.peak - rss.start) / 2**30,
        "overrides": args.set,
        "final_losses": result.final_losses(),
        "final_nrmse": {k: v for k, v in result.history[-1].items() if k.startswith("nrmse_")},
    }
    if args.profile:
        out["profile"] = profile(subject, config, device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
