"""Rapid model adaptation (paper §2.4): the seed state and how an adapted run uses it.

`SeedState` is what a fully reconstructed seed subject hands to the others: hash 1 (temporal),
MLP1, MLP2, the base U-Net, the learned step sizes (and their scale), hash 2/3 tables for an
optional warm start, plus the config and its hash. It is a flat dict of numpy arrays and a JSON
header: saved as safetensors (no pickle), and held zero-copy in Ray's object store.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refine_more.config import ReconConfig
from refine_more.networks.unet import add_lora, lora_parameters

FORMAT = "refine-more-seed-state"
FORMAT_VERSION = 1
_HEADER_KEY = "__header__"

# what adaptation reuses from the seed (frozen, or trained on from the seed) and what it may warm-start
REUSED_PREFIXES = ("inr.hash_time.", "inr.mlp_images.", "inr.mlp_maps.")
SPATIAL_PREFIXES = ("inr.hash_images.", "inr.hash_maps.")
UNROLLED_PREFIX = "unrolled."


class SeedStateError(ValueError):
    pass


def _compat_view(config: ReconConfig) -> dict:
    """The matrix-independent parts of a config that a seed and its adapted runs must share."""
    d = config.to_dict()
    return {"inr": d["inr"], "unroll": {k: d["unroll"][k] for k in ("iterations", "unet_width", "unet_levels", "unet_out_kernel", "refine_k", "preconditioner", "warm_start_steps",
                                                      "warm_start_solver", "map_smoothness", "map_edge_scale")
                                                      + tuple(k for k in ("fixed_step", "mask_outside_tissue") if d["unroll"][k])},
            "k_band": list(d["k_band"])}


@dataclass
class SeedState:
    arrays: dict          # name → np.ndarray (float32)
    config: dict          # ReconConfig.to_dict() of the seed run
    config_hash: str
    meta: dict            # seed subject id, protocol summary, …

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_result(cls, result) -> "SeedState":
        if result.method != "refine-more" or not result.state:
            raise SeedStateError("a seed state comes from a from-scratch reconstruction (method 'refine-more')")
        inr, unrolled, config = result.state["inr"], result.state["unrolled"], result.state["config"]
        arrays = {}
        for prefix, module in (("inr.", inr), (UNROLLED_PREFIX, unrolled)):
            for name, t in module.state_dict().items():
                full = prefix + name
                if full.startswith(REUSED_PREFIXES + SPATIAL_PREFIXES) or full.startswith(UNROLLED_PREFIX):
                    arrays[full] = t.detach().cpu().numpy().astype(np.float32, copy=True)
        return cls(arrays=arrays, config=config.to_dict(), config_hash=config.hash(),
                   meta={"seed_subject": result.subject_id, "n_images": inr.n_images})

    # -- numpy dict (Ray object store) -------------------------------------------------------------
    def to_numpy_dict(self) -> dict:
        header = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "config": self.config,
                             "config_hash": self.config_hash, "meta": self.meta})
        out = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
        out[_HEADER_KEY] = np.frombuffer(header.encode(), dtype=np.uint8).copy()
        return out

    @classmethod
    def from_numpy_dict(cls, d: dict) -> "SeedState":
        if _HEADER_KEY not in d:
            raise SeedStateError("not a seed state: the header is missing")
        header = json.loads(bytes(np.asarray(d[_HEADER_KEY], dtype=np.uint8)).decode())
        if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
            raise SeedStateError(f"unsupported seed state format {header.get('format')!r} v{header.get('format_version')}")
        arrays = {k: np.array(v, copy=True) for k, v in d.items() if k != _HEADER_KEY}
        return cls(arrays=arrays, config=header["config"], config_hash=header["config_hash"], meta=header["meta"])

    # -- files (safetensors: no pickle) ----------------------------------------------------------
    def save(self, path) -> Path:
        from safetensors.numpy import save_file

        from refine_more.files.atomic import atomic_write
        d = self.to_numpy_dict()
        header = bytes(d.pop(_HEADER_KEY)).decode()
        atomic_write(str(path), lambda tmp: save_file(d, tmp, metadata={"header": header}))
        return Path(path)

    @classmethod
    def load(cls, path) -> "SeedState":
        from safetensors import safe_open
        from safetensors.numpy import load_file
        path = Path(path)
        if not path.exists():
            raise SeedStateError(f"seed state {path} does not exist")
        try:
            with safe_open(str(path), framework="np") as fh:
                header = (fh.metadata() or {}).get("header")
            arrays = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise SeedStateError(f"seed state {path}: not a readable safetensors file ({exc})") from None
        if header is None:
            raise SeedStateError(f"seed state {path}: the header is missing")
        arrays[_HEADER_KEY] = np.frombuffer(header.encode(), dtype=np.uint8)
        return cls.from_numpy_dict(arrays)

    # -- compatibility ---------------------------------------------------------------------------
    def check_compatible(self, config: ReconConfig, n_images: int | None = None):
        mine = _compat_view(ReconConfig.from_dict(self.config))
        theirs = _compat_view(config)
        diffs = []
        for k in mine:
            if isinstance(mine[k], dict):
                diffs += [f"{k}.{sub} (seed {mine[k][sub]!r}, here {theirs[k].get(sub)!r})" for sub in mine[k]
                          if mine[k][sub] != theirs[k].get(sub)]
            elif mine[k] != theirs[k]:
                diffs.append(f"{k} (seed {mine[k]!r}, here {theirs[k]!r})")
        if diffs:
            raise SeedStateError(
                f"seed state (config {self.config_hash}, seed {self.meta.get('seed_subject')}) is incompatible "
                f"with this config ({config.hash()}): {', '.join(diffs)} differ")
        if n_images is not None and self.meta.get("n_images") not in (None, n_images):
            raise SeedStateError(f"seed state has {self.meta.get('n_images')} images per subject, this subject {n_images}")


def _load_prefixed(module, arrays, prefix, device, strict=True):
    """Load the arrays named `prefix…` into `module` (copied: object-store arrays are read-only)."""
    state = {k[len(prefix):]: torch.from_numpy(np.array(v, copy=True)).to(device)
             for k, v in arrays.items() if k.startswith(prefix)}
    module.load_state_dict(state, strict=strict)


def prepare_adapted_models(seed_state, config: ReconConfig, inr, unrolled):
    """Load the seed into `inr`/`unrolled`, freeze what §2.4 freezes, add LoRA; return the
    trainable parameters of stage 1 and stage 2."""
    if isinstance(seed_state, dict):
        seed_state = SeedState.from_numpy_dict(seed_state)
    seed_state.check_compatible(config, inr.n_images)
    device = next(inr.parameters()).device
    a = seed_state.arrays
    for name, module in (("hash_time", inr.hash_time), ("mlp_images", inr.mlp_images), ("mlp_maps", inr.mlp_maps)):
        _load_prefixed(module, a, f"inr.{name}.", device)
        for p in module.parameters():
            p.requires_grad_(False)
    if config.adapt.warm_spatial_hashes:
        _load_prefixed(inr.hash_images, a, "inr.hash_images.", device)
        _load_prefixed(inr.hash_maps, a, "inr.hash_maps.", device)
    _load_prefixed(unrolled, a, UNROLLED_PREFIX, device)
    add_lora(unrolled.unet, config.adapt.lora_rank, config.adapt.lora_beta)
    unrolled.to(device)
    unrolled.log_step.requires_grad_(config.adapt.train_step_sizes)
    spatial = list(inr.hash_images.parameters()) + list(inr.hash_maps.parameters())
    for flag, module in ((config.adapt.train_image_mlp, inr.mlp_images), (config.adapt.train_map_mlp, inr.mlp_maps)):
        if flag:
            for p in module.parameters():
                p.requires_grad_(True)
            spatial += list(module.parameters())
    stage2 = spatial + lora_parameters(unrolled.unet) + ([unrolled.log_step] if config.adapt.train_step_sizes else [])
    return spatial, stage2


def frozen_tensors(inr, config: ReconConfig) -> dict:
    """The tensors adaptation must leave bit-identical (for tests and audits)."""
    out = {}
    names = ["hash_time"] + [n for n, trained in (("mlp_images", config.adapt.train_image_mlp),
                                                  ("mlp_maps", config.adapt.train_map_mlp)) if not trained]
    for name in names:
        for k, v in getattr(inr, name).state_dict().items():
            out[f"inr.{name}.{k}"] = v.detach().cpu().numpy().copy()
    return out
