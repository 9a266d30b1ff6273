"""Contrast synthesis (the paper's Fig. 7C): weighted images at imaging coordinates t that were never
acquired, from the INR of a finished reconstruction.

Hash 1 encodes the image coordinate t (image i of T sits at (i + 0.5)/T), so MLP1 can be asked for
any t in between. A reconstruction saves what that needs beside its maps as ``inr.safetensors``
(tensors only, no pickle; the INR's configuration, matrix, image coordinates and intensity scale in
the header). ``refine-more synthesize RESULT_DIR --t 2.5 3.5 --out DIR`` takes t in units of the
acquired images, counted from 1: t = 3 is the third image, 2.5 lies halfway between the second and
the third. What an in-between image means physically is only what the temporal encoding learned;
benchmarks/synthesis.py measures it against the simulator's image and against simpler guesses.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

INR_FILE = "inr.safetensors"
_FORMAT = "refine-more-inr/1"


def save_inr(path, result) -> Path:
    """Write the INR of `result` (recon.Result of a from-scratch or adapted run) to `path`."""
    from safetensors.torch import save_file

    from refine_more.files.atomic import atomic_write

    inr, config = result.state["inr"], result.state["config"]
    coords = inr.image_coordinates
    header = {"format": _FORMAT, "subject_id": result.subject_id, "inr_config": config.to_dict()["inr"],
              "shape": list(inr.shape), "n_images": int(inr.n_images),
              "image_coordinates": None if coords is None else [float(v) for v in coords],
              "data_scale": float(result.state.get("data_scale", 1.0))}
    tensors = {k: v.detach().cpu().contiguous() for k, v in inr.state_dict().items()}
    atomic_write(str(path), lambda tmp: save_file(tensors, tmp, metadata={"header": json.dumps(header)}))
    return Path(path)


def load_inr(path):
    """(INR, header) from a file written by :func:`save_inr`; a clear error for anything else."""
    from safetensors import safe_open

    from refine_more.config import INRConfig, _from_dict
    from refine_more.networks.inr import INR

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved INR (written beside maps.h5 by recon and cohort runs)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {}).get("header", "null"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own types on corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a saved REFINE-MORE INR (header format {_FORMAT!r} missing)")
    config = _from_dict(INRConfig, header["inr_config"], "inr")
    inr = INR(header["n_images"], header["shape"], config)
    inr.load_state_dict(tensors)
    if header.get("image_coordinates") is not None:
        inr.set_image_coordinates(header["image_coordinates"])
    return inr.eval(), header


def coordinates_from_image_units(t, n_images: int) -> np.ndarray:
    """t in units of acquired images (1 … T) → the INR's coordinate (t − 0.5)/T."""
    t = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(t)) or np.any(t < 0.5) or np.any(t > n_images + 0.5):
        raise ValueError(f"--t must lie within [0.5, {n_images + 0.5}] (images 1 … {n_images}), got {t.tolist()}")
    return (t - 0.5) / n_images


@torch.no_grad()
def synthesize(inr, coordinates, data_scale: float = 1.0) -> np.ndarray:
    """Complex weighted images (len(coordinates), Z, Y, X) at INR coordinates in [0, 1], in the
    units of the subject's k-space."""
    saved = inr.image_coordinates, inr.n_images
    try:
        inr.set_image_coordinates(coordinates)
        return (inr.images() * data_scale).cpu().numpy().astype(np.complex64)
    finally:
        inr.image_coordinates, inr.n_images, inr._points = saved[0], saved[1], None


def _synthesize_command(args) -> int:
    import h5py

    from refine_more.files.atomic import atomic_path
    from refine_more.evaluation.plots import montage_images_png

    inr, header = load_inr(Path(args.result_dir) / INR_FILE)
    if header.get("image_coordinates") is not None:
        raise ValueError(f"{args.result_dir}: this INR was trained on a subset of a series; give coordinates "
                         "with refine_more.reconstruction.synthesis.synthesize")
    coords = coordinates_from_image_units(args.t, header["n_images"])
    images = synthesize(inr, coords, header["data_scale"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "synthesized.h5") as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("images", data=images)
        fh.attrs["t_image_units"] = np.asarray(args.t, dtype=np.float64)
        fh.attrs["t_coordinate"] = coords
        fh.attrs["subject_id"] = header["subject_id"]
        fh.attrs["source"] = str(Path(args.result_dir).resolve())
    montage_images_png(out / "synthesized.png", np.abs(images), [f"t = {v:g}" for v in args.t],
                       title=f"{header['subject_id']}: synthesised images")
    print(json.dumps({"out": str(out / "synthesized.h5"), "t": list(args.t), "shape": list(images.shape)}))
    return 0


def add_commands(sub) -> None:
    """synthesize."""
    s = sub.add_parser("synthesize", help="weighted images at imaging coordinates never acquired (Fig. 7C)",
                       description=__doc__.split("\n\n")[1])
    s.add_argument("result_dir", help="a reconstruction's output folder (holds inr.safetensors)")
    s.add_argument("--t", type=float, nargs="+", required=True,
                   help="coordinates in units of acquired images, from 1 (2.5: halfway between images 2 and 3)")
    s.add_argument("--out", required=True, help="folder for synthesized.h5 and synthesized.png")
    s.set_defaults(func=_synthesize_command)
