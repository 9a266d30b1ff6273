"""Time and memory of one subject at the paper's size (176 × 176 × 48, 20 coils, 8 images).

Runs a short schedule of the chosen preset (default `paper`) and extrapolates to its full schedule
(paper: 1500 + 1500 iterations), next to the FFT floor: one forward and one adjoint of the
multi-coil operator A = U F C at that size, which every stage-1 iteration needs at least once.

    python benchmarks/full_size.py [--matrix 48 176 176] [--coils 20] [--preset paper]
                                   [--iters 20 5] [--device auto] [--subject FILE] [--out FILE]

The subject is simulated in a child process into a temporary HDF5 file (the simulator's float64
intermediates never share this process's peak) unless `--subject` names one; the reconstruction
does not hold `reference/kspace_full`. Writes benchmarks/results/full_size_<device>.json: seconds
per iteration per stage, the FFT floor and the ratios, peak GPU memory, the peak host RSS of the
whole process and of each phase (set-up incl. the interpolation matrices, stage 1, stage 2), the
load average (other processes distort the seconds on a shared machine; the ratios to the floor
measured in the same run are what compare), the extrapolated schedule.
`--set image_chunk=1` runs the data terms one image at a time and checkpoints the U-Net (memory).

Where the full size does not fit or takes hours: run two reduced matrices with
MALLOC_MMAP_THRESHOLD_=65536 (glibc then returns every freed tensor at once; by default it keeps
the pages of the small ones, and a linear extrapolation would scale that too), then
`--extrapolate A.json B.json` fits each phase's peak RSS as a + b·voxels and prints it at --matrix.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from refine_more.files.atomic import atomic_write_text
from refine_more.config import apply_overrides, preset
from refine_more.physics.operators import MultiCoilCartesian
from refine_more.physics.scan import resolve_device
from refine_more.reconstruction.recon import finish, setup, train_inr, train_refinement
from refine_more.files.subject import read_subject
from timing import time_calls

RESULTS = Path(__file__).parent / "results"
GiB = 2**30


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


def simulate_to_file(matrix, coils: int, path: str) -> float:
    """Simulate in a child process (its memory is not ours) and write the subject; its peak RSS."""
    code = ("import sys; from refine_more.evaluation.simulate import SimulationConfig, simulate_subject; "
            "from refine_more.files.subject import write_subject; "
            f"write_subject(sys.argv[1], simulate_subject('sub-full', SimulationConfig(matrix={tuple(matrix)}, "
            f"n_coils={coils}), seed=1))")
    subprocess.run([sys.executable, "-c", code, path], check=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def components(run) -> dict:
    """GiB held by the large tensors of a reconstruction (what the per-phase peaks are made of)."""
    def size(*ts):
        return sum(t.numel() * t.element_size() for t in ts if t is not None) / GiB

    out = {"kspace (normalised)": size(run.physics.kspace),
           "subject kspace (numpy)": run.subject.kspace.nbytes / GiB,
           "coil maps (+ sign-folded)": size(run.physics.A.coil_sens, run.physics.A._coils_mod),
           "parameters (INR + U-Net)": size(*run.inr.parameters(), *run.unrolled.parameters())}
    seen = set()
    for name, fp in zip(("hash 2", "hash 1", "hash 3"), run.inr._points[1]):
        mats = [m for m in (getattr(fp, "S", None), getattr(fp, "St", None)) if m is not None and id(m) not in seen]
        seen.update(id(m) for m in mats)
        out[f"interpolation {name}"] = sum(size(m.crow_indices(), m.col_indices(), m.values()) for m in mats)
    return out


def load_average() -> list:
    return list(os.getloadavg())


def reconstruct_measured(subject, config, log, save):
    """`recon.reconstruct`, phase by phase, with the peak RSS of each; `save(partial)` after each
    phase (a run stopped in stage 2 still leaves set-up's and stage 1's numbers)."""
    peaks = {}
    phases = (("setup", None), ("stage1", train_inr), ("stage2", train_refinement))
    run = final = None
    for name, step in phases:
        with RSSSampler() as rss:
            if step is None:
                run = setup(subject, config, track_reference=True)
                with torch.no_grad():
                    run.inr.map_channels()      # builds the interpolation matrices (else: stage 1's first iteration)
                run.timings["setup"] = time.perf_counter() - run.t_start
            else:
                final = step(run)
        peaks[name] = rss.peak / GiB
        log(f"{name} {run.timings[name]:.1f} s, peak RSS {peaks[name]:.2f} GiB")
        save({"phase_done": name, "peak_host_rss_by_phase_GiB": peaks, "timings_s": dict(run.timings), "iterations": dict(run.done),
              "peak_host_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "held_GiB": components(run)})
    return finish(run, final), peaks, components(run)


def extrapolate(paths, matrix) -> dict:
    """Each phase's peak RSS (and the simulation's) at `matrix`, linear in the voxels through two runs."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    n = [float(np.prod(r["matrix"])) for r in runs]
    target = float(np.prod(matrix))
    peaks = {k: [r["peak_host_rss_by_phase_GiB"][k] for r in runs] for k in runs[0]["peak_host_rss_by_phase_GiB"]}
    if all(r.get("simulate_peak_rss_GiB") for r in runs):
        peaks["simulate (child)"] = [r["simulate_peak_rss_GiB"] for r in runs]
    line = lambda a, b: a + (b - a) * (target - n[0]) / (n[1] - n[0])  # noqa: E731
    return {"matrix": list(matrix), "from": [r["matrix"] for r in runs],
            "peak_host_rss_GiB": {k: line(*v) for k, v in peaks.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--matrix", type=int, nargs=3, default=[48, 176, 176])
    ap.add_argument("--coils", type=int, default=20)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--iters", type=int, nargs=2, default=[20, 5], help="stage 1 and stage 2 iterations to time")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--subject", help="a subject file to use (simulated into it when it does not exist)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable), e.g. --set image_chunk=1")
    ap.add_argument("--out", help="default: benchmarks/results/full_size_<device>.json")
    ap.add_argument("--extrapolate", nargs=2, metavar="JSON", help="print two reduced runs' peaks at --matrix; run nothing")
    args = ap.parse_args()
    if args.extrapolate:
        print(json.dumps(extrapolate(args.extrapolate, args.matrix), indent=1))
        return

    def log(msg):
        print(f"[full_size {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    device = resolve_device(args.device)
    load = {"before": load_average()}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="full_size_") as tmp:
        path, simulate_rss = args.subject or os.path.join(tmp, "sub-full.h5"), None
        if not os.path.exists(path):      # --subject FILE that does not exist yet: simulated into it, kept
            simulate_rss = simulate_to_file(args.matrix, args.coils, path)
            log(f"simulated in {time.perf_counter() - t:.0f} s (child peak RSS {simulate_rss:.2f} GiB)")
        subject = read_subject(path)
    subject.reference.pop("kspace_full", None)        # never used by the reconstruction
    simulate_s = time.perf_counter() - t
    floor = fft_floor(subject, device)
    log(f"FFT floor {floor:.3f} s")

    full = apply_overrides(preset(args.preset), args.set)
    n1, n2 = args.iters
    # log once per stage: the per-iteration nRMSE bookkeeping is not part of the method's cost
    config = full.replace(iters_stage1=n1, iters_stage2=n2, device=str(device), progress=False, log_every=max(n1, n2))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out_path = Path(args.out or RESULTS / f"full_size_{device.type}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    head = {"device": str(device), "preset": args.preset, "matrix": list(subject.shape), "overrides": args.set, "subject": args.subject,
            "fft_floor_s": floor, "simulate_peak_rss_GiB": simulate_rss, "load_average_1_5_15": load}
    save = lambda partial: atomic_write_text(out_path, json.dumps({**head, "complete": False, **partial}, indent=1))  # noqa: E731
    result, peaks, sizes = reconstruct_measured(subject, config, log, save)
    load["after"] = load_average()
    tm = result.timings
    per1 = tm["stage1"] / max(1, result.iterations["stage1"])
    per2 = (tm["stage2"] - tm["warm_start"]) / max(1, result.iterations["stage2"])  # the warm start runs once
    out = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average_1_5_15": load,
        "preset": args.preset, "matrix": list(subject.shape), "coils": int(subject.coil_sens.shape[0]),
        "images": subject.n_images, "simulate_s": simulate_s, "simulate_peak_rss_GiB": simulate_rss,
        "fft_floor_s": floor, "timings_s": tm, "iterations": result.iterations,
        "stage1_s_per_iteration": per1, "stage2_s_per_iteration": per2,
        "stage1_over_fft_floor": per1 / floor, "stage2_over_fft_floor": per2 / floor,
        "full_schedule": {"iters_stage1": full.iters_stage1, "iters_stage2": full.iters_stage2,
                          "warm_start_steps": full.unroll.warm_start_steps,
                          "extrapolated_s": tm["setup"] + per1 * full.iters_stage1 + tm["warm_start"]
                          + per2 * full.iters_stage2},
        "peak_gpu_memory_GiB": torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None,
        "peak_host_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_host_rss_by_phase_GiB": peaks, "held_GiB": sizes,
        "overrides": args.set, "complete": True,
        "final_losses": result.final_losses(),
        "final_nrmse": {k: v for k, v in result.history[-1].items() if k.startswith("nrmse_")},
    }
    atomic_write_text(out_path, json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
