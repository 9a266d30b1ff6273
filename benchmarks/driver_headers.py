"""The cohort driver's up-front validation: time and peak memory, full read against headers only.

Writes a manifest of N subjects at the paper's size (176 × 176 × 48, 20 coils, 8 images, coil
maps, a fully sampled ``reference/kspace_full``) as gzip-chunked HDF5 written one chunk at a time
(low-entropy values, so the files stay small on disk but every chunk is written and decompressed
when read), then runs each validation path in its own process and records its wall time and peak
resident memory (``ru_maxrss`` of the child):

- ``full_read``: :func:`refine_more.files.subject.validate_subject_file` on every file, what the driver
  did before issue 16 (every dataset read and checked value by value);
- ``headers``: :func:`cohort.manifest.validate_entries`, the driver's validation now (members,
  dtypes, shapes, attributes, declared sizes and written storage; no array values read);
- ``imports``: the same interpreter and imports, validating nothing (the floor of both).

    python benchmarks/driver_headers.py [--subjects 8] [--data /tmp/driver_headers] [--out FILE]
                                        [--old-tree DIR]

``--old-tree DIR``: a checkout of the code before the change (``git archive b467a92 refine_more cohort
| tar -x -C DIR``); its driver validation (``validate_entries``, then a full read) is measured as
``full_read_old``, the "before" of issue 16.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

T, C, Z, Y, X = 8, 20, 48, 176, 176
RESULT = Path(__file__).resolve().parent / "results" / "driver_headers.json"


def _write_subject(path: Path, sid: str, rng) -> None:
    """One subject at the paper's size, chunk (one image, one coil) at a time."""
    import h5py

    from refine_more.physics.protocol import Protocol

    mask = rng.random((T, Z, Y)) < 0.25
    mask[:, Z // 2 - 4:Z // 2 + 4, Y // 2 - 8:Y // 2 + 8] = True
    gz = dict(compression="gzip", compression_opts=1)
    tmp = path.with_suffix(".tmp.h5")
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"format": "refine-more-subject", "format_version": np.int64(1), "subject_id": sid,
                        "sequence": "BTS", "voxel_size_mm": np.array([1.0, 1.0, 1.0])})
        for k, v in Protocol.paper_in_vivo().to_attrs().items():
            f.attrs[k] = v if isinstance(v, (str, np.ndarray)) else np.float64(v)
        f.create_dataset("mask", data=mask.astype(np.uint8), **gz)
        ks = f.create_dataset("kspace", (T, C, Z, Y, X), np.complex64, chunks=(1, 1, Z, Y, X), **gz)
        full = f.create_group("reference").create_dataset("kspace_full", (T, C, Z, Y, X), np.complex64,
                                                          chunks=(1, 1, Z, Y, X), **gz)
        cs = f.create_dataset("coil_sens", (C, Z, Y, X), np.complex64, chunks=(1, Z, Y, X), **gz)
        block = np.full((Z, Y, X), 0.1 + 0.05j, np.complex64)
        for c in range(C):
            cs[c] = block
            for t in range(T):
                ks[t, c] = block * mask[t][:, :, None]
                full[t, c] = block
        for name, value in (("T1F", 1.0), ("f", 0.1), ("kF", 2.3), ("I0", 1.0)):
            f["reference"].create_dataset(name, data=np.full((Z, Y, X), value, np.float32), **gz)
        f.create_dataset("tissue_mask", data=np.ones((Z, Y, X), bool), **gz)
        f.create_dataset("b1", data=np.ones((Z, Y, X), np.float32), **gz)
    os.replace(tmp, path)


def make_cohort(folder: Path, n: int) -> Path:
    """The manifest of ``n`` subjects in ``folder`` (files already there are kept)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        sid = f"sub-{i + 1:02d}"
        path = folder / f"{sid}.h5"
        if not path.exists():
            t0 = time.perf_counter()
            _write_subject(path, sid, rng)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s", flush=True)
        rows.append({"subject_id": sid, "path": str(path)})
    manifest = folder / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest)
    return manifest


CHILD = r"""
import json, resource, sys, time
from cohort.manifest import read_manifest, validate_entries
from refine_more.files.subject import validate_subject_file
how, manifest = sys.argv[1], sys.argv[2]
entries = read_manifest(manifest)
t0 = time.perf_counter()
if how == "full_read":
    problems = [validate_subject_file(e.path) for e in entries]
elif how == "headers":
    problems = [e.problems for e in validate_entries(entries)]
else:
    problems = [[] for _ in entries]
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "n_invalid": sum(bool(p) for p in problems), "problems": sum(problems, [])[:3]}))
"""


def measure(how: str, manifest: Path, tree: str = "") -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"PYTHONPATH": tree} if tree else {})}
    out = subprocess.run([sys.executable, "-c", CHILD, how, str(manifest)], capture_output=True, text=True,
                         env=env, check=True, cwd=tree or None)   # `-c` puts the cwd first on sys.path
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--data", default="/tmp/driver_headers")
    p.add_argument("--out", default=str(RESULT))
    p.add_argument("--old-tree", default="", help="the code before the change, measured as full_read_old")
    args = p.parse_args(argv)
    manifest = make_cohort(Path(args.data), args.subjects)
    files = sorted(Path(args.data).glob("sub-*.h5"))[:args.subjects]
    result = {"subjects": args.subjects, "shape_TCZYX": [T, C, Z, Y, X],
              "declared_gb_per_subject": 2 * T * C * Z * Y * X * 8 / 1e9 + C * Z * Y * X * 8 / 1e9,
              "disk_mb_total": sum(f.stat().st_size for f in files) / 1e6,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "command": "python benchmarks/driver_headers.py --subjects %d" % args.subjects,
              "load_average_1min_at_start": os.getloadavg()[0]}   # wall times scale with a shared machine's load
    for how in ("imports", "headers", "full_read"):
        result[how] = measure(how, manifest)
        print(how, result[how], flush=True)
    if args.old_tree:
        result["full_read_old"] = {**measure("headers", manifest, args.old_tree), "tree": args.old_tree}
        print("full_read_old", result["full_read_old"], flush=True)
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    result["speedup"] = result["full_read"]["wall_s"] / max(result["headers"]["wall_s"], 1e-9)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
