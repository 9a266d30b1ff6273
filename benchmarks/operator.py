"""A then Aᴴ (the FFT floor of every iteration): the centring shifts as torch.roll (fftshift /
ifftshift around fftn) against the same shifts folded into signs on the coil maps and the mask
(what MultiCoilCartesian does for even sizes). Ratios are measured in one run.

    python benchmarks/operator.py [--shape 24 88 88] [--coils 8] [--images 8] [--device cpu|cuda] [--repeats 10]

Writes benchmarks/results/operator.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from refine_more.physics.operators import MultiCoilCartesian, centring_modulation, fft3c, ifft3c
from timing import time_calls

RESULTS = Path(__file__).parent / "results"


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
    if centring_modulation(shape) is None:
        raise SystemExit(f"shape {shape} has an odd size: A uses the shifts there too")
    A = MultiCoilCartesian(coils, mask)
    m = A.mask

    def shifted():  # A then Aᴴ with the centring shifts (torch.roll), as A computes odd sizes
        k = fft3c(x[:, None] * coils[None]) * m
        return (ifft3c(k * m) * coils.conj()[None]).sum(dim=1)

    def modulated():
        return A.adjoint(A(x))

    err = (modulated() - shifted()).abs().max().item()
    t_shift = float(np.median(time_calls(shifted, device, args.repeats)))
    t_mod = float(np.median(time_calls(modulated, device, args.repeats)))
    out = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "shape": shape, "coils": args.coils, "images": args.images,
           "shifted_s": t_shift, "modulated_s": t_mod, "speedup": t_shift / t_mod, "max_abs_difference": err}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
