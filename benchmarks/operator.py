"""A then Aᴴ (the FFT floor of every iteration): the centring shifts as torch.roll (fftshift /
ifftshift around fftn) against the same shifts folded into signs on the coil maps and the mask
(what MultiCoilCartesian does for even sizes). Ratios are measured in one run.

    python benchmarks/operator.py [--shape 24 88 88] [--coils 8] [--images 8] [--device cpu|cuda] [--repeats 10]

Writes benchmarks/results/operator.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from refine_more.operators import MultiCoilCartesian

RESULTS = Path(__file__).parent / "results"


def _median_s(fn, device, repeats):
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", type=int, nargs=3, default=[24, 88, 88])
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "operator.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = tuple(args.shape)
    coils = torch.randn((args.coils,) + shape, dtype=torch.complex64, generator=g).to(device)
    mask = (torch.rand((args.images,) + shape[:2], generator=g) < 0.3).to(device)
    x = torch.randn((args.images,) + shape, dtype=torch.complex64, generator=g).to(device)
    modulated = MultiCoilCartesian(coils, mask)
    shifted = MultiCoilCartesian(coils, mask)
    shifted._coils_mod = shifted._mask_mod = None  # the roll path (odd sizes use it)
    if modulated._coils_mod is None:
        raise SystemExit(f"shape {shape} has an odd size: both paths would be the shifted one")
    err = (modulated.adjoint(modulated(x)) - shifted.adjoint(shifted(x))).abs().max().item()
    t_shift = _median_s(lambda: shifted.adjoint(shifted(x)), device, args.repeats)
    t_mod = _median_s(lambda: modulated.adjoint(modulated(x)), device, args.repeats)
    out = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "shape": shape, "coils": args.coils, "images": args.images,
           "shifted_s": t_shift, "modulated_s": t_mod, "speedup": t_shift / t_mod, "max_abs_difference": err}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
