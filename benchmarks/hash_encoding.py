"""Benchmark: HashEncoding generic torch path vs fixed-grid sparse path (forward + backward).

6k random 3D points, L=16, F=2, T in (15, 19); writes benchmarks/results/hash_encoding.json.
Run: python benchmarks/hash_encoding.py [--device cpu|cuda] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from refine_more.networks.encoding import HashEncoding, HashEncodingConfig
from timing import sync, time_calls


def _time(fn, device, repeats):
    ts = time_calls(fn, device, repeats)
    return {"median_s": ts[len(ts) // 2], "min_s": ts[0]}


def bench(device: torch.device, n_points: int, log2_T: int, repeats: int, backend: str) -> dict:
    cfg = HashEncodingConfig(n_levels=16, n_features_per_level=2, log2_hashmap_size=log2_T)
    enc = HashEncoding(3, cfg, backend=backend).to(device)
    x = torch.rand(n_points, 3, generator=torch.Generator().manual_seed(0)).to(device)
    gout = torch.randn(n_points, enc.n_output_dims, generator=torch.Generator().manual_seed(1)).to(device)

    def generic():
        enc.params.grad = None
        (enc(x) * gout).sum().backward()

    t0 = time.perf_counter()
    fp = enc.precompute(x)
    sync(device)
    t_pre = time.perf_counter() - t0

    def fixed():
        enc.params.grad = None
        (enc(fp) * gout).sum().backward()

    res = {
        "n_points": n_points, "log2_hashmap_size": log2_T, "n_params": enc.n_params,
        "generic_fwd_bwd": _time(generic, device, repeats),
        "fixed_fwd_bwd": _time(fixed, device, repeats),
        "precompute_s": t_pre,
        "nnz": int(fp.S.values().numel()),
    }
    res["speedup_median"] = res["generic_fwd_bwd"]["median_s"] / res["fixed_fwd_bwd"]["median_s"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch", help="backend of the generic path")
    ap.add_argument("--n-points", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hash_encoding.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    results = [bench(device, args.n_points, T, args.repeats, args.backend) for T in (15, 19)]
    for r in results:
        print(f"T={r['log2_hashmap_size']}: generic {r['generic_fwd_bwd']['median_s']*1e3:.1f} ms, "
              f"fixed {r['fixed_fwd_bwd']['median_s']*1e3:.1f} ms (x{r['speedup_median']:.1f}), "
              f"precompute {r['precompute_s']*1e3:.0f} ms")
    out = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "backend_generic": args.backend, "config": "3D, L=16, F=2, N_min=16, b=1.5",
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
