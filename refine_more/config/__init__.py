"""Reconstruction configuration: typed dataclasses (a docstring per field), a preset registry,
one loader for files and ``KEY=VALUE`` overrides, and a stable hash.

Every value that enters a config through :meth:`ReconConfig.from_dict` (files, overrides, the
dicts Ray tasks receive) is checked against its field's type, ``Literal`` choices included, so
``iters_stage1 = "100"`` fails at load, naming the key; :mod:`refine_more.config.checks` then
checks the ranges (``iters_stage1 = -5`` fails too) and reads the files (syntax errors: one line)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Literal

from refine_more.config.checks import check_ranges, read_config_file
from refine_more.config.hash_grid import HashEncodingConfig
from refine_more.config.qc import QCConfig
from refine_more.config.unroll import HASH_NEUTRAL, UnrollConfig


def check_k_band(band) -> None:
    """k_band is (low, high) with 0 < low ≤ high; equal ends hold k fixed."""
    if not (isinstance(band, (tuple, list)) and len(band) == 2 and 0 < float(band[0]) <= float(band[1])):
        raise ValueError(f"k_band must be (low, high) with 0 < low ≤ high (equal: k held fixed), got {band!r}")


@dataclass
class INRConfig:
    hash_time: HashEncodingConfig = field(default_factory=lambda: HashEncodingConfig(
        n_levels=4, n_features_per_level=2, log2_hashmap_size=8, base_resolution=2, per_level_scale=2.0))
    """Hash 1: the image coordinate t (1-D, one value per image); tiny, dense at every level."""
    hash_images: HashEncodingConfig = field(default_factory=lambda: HashEncodingConfig(
        n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16, per_level_scale=1.5))
    """Hash 2: (x, y, z) → features of the weighted images (MLP1's input)."""
    hash_maps: HashEncodingConfig = field(default_factory=lambda: HashEncodingConfig(
        n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16, per_level_scale=1.5))
    """Hash 3: (x, y, z) → features of the maps (MLP2's input)."""
    mlp_hidden: int = 64
    """Width of the hidden layers of MLP1 and MLP2."""
    mlp_layers: int = 3
    """Number of layers of MLP1 and MLP2."""
    time_input_dims: int = 1
    """Input dimensions of hash 1: 1, t alone; 2, the point (t, 0), as the public code feeds its 2-D grid."""
    hash_backend: Literal["auto", "torch", "tcnn"] = "auto"
    """Hash encoding implementation: 'tcnn' (tiny-cuda-nn, CUDA), 'torch', or 'auto' (tcnn when importable on CUDA)."""


@dataclass
class AdaptConfig:
    lora_rank: int = 16             # paper width: 513,664 trainable of 7,760,484 (paper: ~0.5 M of 7.8 M)
    """Rank of the LoRA factors of the U-Net in an adapted run."""
    lora_beta: float = 1.0          # β of eq. 11 (the update is β·A·B)
    """β of eq. 11 (the LoRA update is β·A·B)."""
    iters_stage1: int = 500
    """Iterations of the adapted stage 1 (INR)."""
    iters_stage2: int = 200
    """Iterations of the adapted stage 2 (refinement)."""
    # Only hash tables (initialised at ±1e-4) and LoRA factors train: at lr 1e-3 the tables need hundreds
    # of steps to grow to O(1); the frozen MLPs make 1e-2 (instant-NGP's rate for hash tables) safe.
    lr: float = 1e-2
    """Adam learning rate of the adapted stage 1 (fresh hash tables need a larger one than 1e-3)."""
    lr_stage2: float = 1e-3         # LoRA factors and the joint stage at the paper's rate (1e-2 oscillates)
    """Adam learning rate of the adapted stage 2 (LoRA factors; the paper's rate)."""
    train_step_sizes: bool = True
    """Also train the learned step sizes of the refinement in an adapted run."""
    train_map_mlp: bool = False     # paper: MLP2 frozen; True also adapts MLP2 (ablation)
    """Also adapt MLP2 (the paper freezes it; an ablation)."""
    # The paper freezes MLP1 too. Here it is adapted by default: MLP1 outputs the *complex* weighted
    # images, and the background phase differs between subjects; with MLP1 frozen, the spatial hash
    # alone fits the new subject's images slowly (loss 1 at 100 iterations 0.077 vs 0.012, and the
    # maps stall at ~11-24 % nRMSE; benchmarks/adaptation.py, README). MLP1 is 4-9 k parameters.
    train_image_mlp: bool = True
    """Adapt MLP1 (the paper freezes it; here adapted: docs/decisions/006)."""
    warm_spatial_hashes: bool = False  # start hash 2/3 from the seed's tables (True) or fresh (False)
    """Start hashes 2 and 3 from the seed's tables (True) or fresh (False)."""
    plateau_patience: int = 0       # >0: stop a stage when the loss has not improved by plateau_rel for this many iterations
    """>0: stop a stage when the loss has not improved by plateau_rel for this many iterations."""
    plateau_rel: float = 1e-3
    """Relative improvement that resets the plateau counter."""


@dataclass
class ReconConfig:
    seed: int = 0
    """Seed of the random initialisation (the same seed gives bit-identical CPU results)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda'."""
    lr: float = 1e-3
    """Adam learning rate of stages 1 and 2 from scratch."""
    iters_stage1: int = 1500
    """Iterations of stage 1 (INR: losses 1 and 2)."""
    iters_stage2: int = 1500
    """Iterations of stage 2 (refinement: loss 3)."""
    tv_weight: float = 0.01
    """λ of eq. 4 (total variation of the INR's images)."""
    k_band: tuple = (20.0, 26.0)
    """Band (low, high) in 1/s in which k = kF/f is held; equal ends hold k fixed (docs/decisions/001)."""
    inr: INRConfig = field(default_factory=INRConfig)
    """The INR initialisation (hashes and MLPs)."""
    unroll: UnrollConfig = field(default_factory=UnrollConfig)
    """The unrolled refinement."""
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    """Rapid adaptation from a seed (LoRA and fresh spatial hashes)."""
    coil_compression: float = 0.0
    """Fraction of the k-space energy that SVD-compressed virtual coils keep (e.g. 0.99: BART's `cc -S`;
    physics/coil_compression.py); every A and Aᴴ then costs n_virtual/n_coils; 0: the acquired coils."""
    stage1_images: int = 0
    """Images per stage-1 iteration: losses 1 and 2 on a random subset of this many images, each term
    scaled to the whole stack (the public code uses one); 0: all images every iteration."""
    qc: QCConfig = field(default_factory=QCConfig)
    """Thresholds of the quality control of every result (docs/decisions/017); not part of the hash."""
    image_chunk: int = 0
    """Images per chunk in the INR's losses (1 + 2), for memory at full size: MLP1's activations and A's
    coil images exist for one chunk at a time (losses.inr_losses_chunked); 0: all at once. Same result
    to float32 rounding, one more forward pass of MLP1; not part of the config hash."""
    log_every: int = 10
    """Record losses (and nRMSE when a reference exists) every n iterations and at the last."""
    progress: bool = True
    """Show a progress bar."""

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON types (tuples become lists), so a dict survives JSON/TOML round trips unchanged."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "ReconConfig":
        return _from_dict(cls, d, "config")

    def hash(self) -> str:
        """Stable hash of what changes the result (not progress/logging, nor the QC thresholds that
        judge it)."""
        d = self.to_dict()
        for k in ("progress", "log_every", "device", "image_chunk", "qc"):
            d.pop(k, None)
        for k, neutral in HASH_NEUTRAL.items():      # options newer than recorded results, when unused
            if d["unroll"].get(k) == neutral:
                d["unroll"].pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]

    def __post_init__(self):
        check_k_band(self.k_band)
        if not (isinstance(self.image_chunk, int) and not isinstance(self.image_chunk, bool) and self.image_chunk >= 0):
            raise ValueError(f"image_chunk must be an integer ≥ 0 (0: all images at once), got {self.image_chunk!r}")
        check_ranges(self)   # every value in its range (config_checks.RANGES), one line per problem

    def replace(self, **changes) -> "ReconConfig":
        return dataclasses.replace(self, **changes)


_NESTED = {"INRConfig", "UnrollConfig", "AdaptConfig", "HashEncodingConfig", "QCConfig"}


def _typed(where: str, value, hint):
    """``value`` if it fits the type ``hint`` (an int is fine for a float), else a ValueError."""
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{where}: expected one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {bool: isinstance(value, bool), int: number and isinstance(value, int), float: number,
          str: isinstance(value, str)}.get(hint, True)
    if not ok:
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _from_dict(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a table, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(fields)})")
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if getattr(hint, "__name__", "") in _NESTED:
            kwargs[name] = _from_dict(hint, value, f"{where}.{name}")
        elif isinstance(fields[name].default, tuple):  # k_band, map_smoothness: fixed-length number tuples
            default = fields[name].default
            if not (isinstance(value, (list, tuple)) and len(value) == len(default) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"{where}.{name}: expected a list of {len(default)} numbers, got {value!r}")
            kwargs[name] = tuple(float(v) for v in value)
        else:
            kwargs[name] = _typed(f"{where}.{name}", value, hint)
    try:
        return cls(**kwargs)
    except ValueError as exc:   # a nested table's own checks (HashEncodingConfig): name where it is
        raise ValueError(f"{where}: {exc}" if where != "config" else str(exc)) from None


def _small_hash(levels=8, log2=14, base=4, scale=1.5):
    return HashEncodingConfig(n_levels=levels, n_features_per_level=2, log2_hashmap_size=log2,
                              base_resolution=base, per_level_scale=scale)


#: the presets, each with one line on what it is for (``refine-more ... --preset NAME``)
PRESETS = {
    "tiny": "seconds on a CPU, for tests",
    "small": "a 6×32×32 subject in about a minute on a CPU (the demo)",
    "large": "`small` for real-size subjects on CPU nodes: virtual coils, one image per stage-1 iteration, a short schedule from the LLR fit",
    "paper": "the paper's sizes and schedule (GPU)",
}


def preset(name: str) -> ReconConfig:
    """`paper`: the paper's sizes (GPU). `small`: CPU-sized. `tiny`: for tests (seconds)."""
    if name == "paper":  # docs/paper-departures.md lists what still differs, and why
        grid = HashEncodingConfig(n_levels=16, n_features_per_level=2, log2_hashmap_size=19,
                                  base_resolution=16, per_level_scale=2.0)
        return ReconConfig(
            k_band=(22.0, 24.0),                # the code's k = 23 + tanh(·)
            inr=INRConfig(hash_time=grid, hash_images=grid, hash_maps=grid, time_input_dims=2),
            # stage 2 stops on held-out k-space (Γ, 15 %, out of both stages), not after 1500 iterations:
            # the fixed schedule made the maps worse than the INR's own (decision 024)
            unroll=UnrollConfig(preconditioner="none", refine_phase=False, refine_k=False, unet_out_kernel=3,
                                training="held-out-stop", ssdu_validate_every=10, ssdu_patience=30),
            # adaptation trains MLP1 at lr 1e-2 (decision 006's, as `small`): with the paper's lr 1e-3 and MLP1
            # frozen, 500 + 200 ended at T1F 11.1 % against 6.7 % (sub-002; decision 024)
            adapt=AdaptConfig(lr=1e-2, train_image_mlp=True))
    if name == "small":
        return ReconConfig(
            # stage 2 is short: after the converged warm start the learned iterations change nothing
            # measurable (README), and their exact backprop (below) costs ~3× the first-order one
            iters_stage1=400, iters_stage2=50,
            # k held at 23 1/s (spec, Identifiability: with k fixed f is determined; the INR and
            # the refinement otherwise wander inside the band and kF inherits the error)
            k_band=(23.0, 23.0),
            inr=INRConfig(hash_images=_small_hash(), hash_maps=_small_hash()),
            # L-BFGS warm start + smoothness prior (decisions 004, 005: weights tuned for the
            # converged solver); 4 phase steps per map step; exact unrolled backprop (from a
            # converged warm start the first-order one diverged: decision 002); a quartic phase
            # per image (B0 drift; decision 011); the better of the INR and LLR starts (021); the prior
            # grows with the noise above SNR-200 levels (022); T1F, f keep edges above a noise-following δ (023)
            unroll=UnrollConfig(iterations=4, unet_width=8, unet_levels=2, warm_start_steps=256, warm_start_solver="lbfgs",
                                phase_steps=4, map_smoothness=(3e-4, 1e-4, 3e-3, 0.0), create_graph=True,
                                image_phase_order=4, start="best", prior_noise_reference=3e-5, map_edge_scale=(0., .34, .34, 0.)),
            # the warm start converges from the adapted INR as from the scratch one once the adapted
            # stage 1 has fitted the images roughly: with the L-BFGS warm start 60 iterations end
            # within the scratch-vs-scratch noise on cohorts A and B (README); with the earlier
            # descent warm start 50 ended in a false minimum (objective +2.9 %, T1F +2.3 %)
            adapt=AdaptConfig(lora_rank=4, iters_stage1=60, iters_stage2=25, plateau_patience=5),
        )
    if name == "large":
        # decision 019: virtual coils, one image per stage-1 iteration. 020: from the LLR fit, 32 L-BFGS
        # iterations (phase and maps jointly) make one phase step and K = 1 enough (12×64×64, 20 coils:
        # T1F / f 3.54 / 4.21 %, the probe's 3.28 / 4.19 %); 021: one start, the LLR fit (`best` kept it)
        small = preset("small")
        return small.replace(
            coil_compression=0.99, stage1_images=1, iters_stage1=40, iters_stage2=5,
            unroll=dataclasses.replace(small.unroll, iterations=1, phase_steps=1, warm_start_steps=32, start="llr",
                                       map_edge_scale=(0.,) * 4),  # 023 not yet measured at real size
            adapt=dataclasses.replace(small.adapt, iters_stage1=20, iters_stage2=5))
    if name == "tiny":
        return ReconConfig(
            iters_stage1=30, iters_stage2=10, progress=False,
            inr=INRConfig(hash_images=_small_hash(4, 10), hash_maps=_small_hash(4, 10), mlp_hidden=16, mlp_layers=2),
            unroll=UnrollConfig(iterations=2, unet_width=4, unet_levels=1),
            adapt=AdaptConfig(lora_rank=2, iters_stage1=10, iters_stage2=5),
            # 40 iterations leave the maps far from the objective's minimum (g 0.01–0.2 against the LLR
            # images' 1e-4) and the images' residuals uneven (up to 2.6× the median): the checks against
            # the objective are off, the single-image one is looser (docs/decisions/017)
            qc=QCConfig(max_objective_ratio=0.0, max_model_excess=0.0, max_image_residual_ratio=4.0),
        )
    raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")


def load_config(path=None, preset_name: str = "small", overrides=()) -> ReconConfig:
    """The one loader: a preset, then a TOML/YAML/JSON file's keys (nested tables for
    inr/unroll/adapt; its own ``preset`` key replaces ``preset_name``), then ``KEY=VALUE``
    overrides (:func:`apply_overrides`). A file written as ``config.json`` beside a result
    (``{"config": {...}}``) loads back to the same config."""
    data = {} if path is None else read_config_file(path)
    if set(data) == {"config_hash", "config"}:     # a resolved config written beside a result
        data = data["config"]
    preset_name = data.pop("preset", preset_name)
    cfg = ReconConfig.from_dict(_merge(preset(preset_name).to_dict(), data)) if data else preset(preset_name)
    return apply_overrides(cfg, overrides) if overrides else cfg


def apply_overrides(config: ReconConfig, overrides) -> ReconConfig:
    """A copy of `config` with dotted `key=value` overrides applied ("unroll.warm_start_steps=32",
    "k_band=[22, 24]", "adapt.lr=3e-3"); values are JSON (a bare word is a string). Unknown keys
    and wrong nesting fail like a config file's."""
    d = config.to_dict()
    for item in overrides or ():
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.split(".")
        node = d
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {item!r}: {part!r} is not a table of the config")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {item!r}: unknown key {leaf!r} (known: {sorted(node)})")
        node[leaf] = _checked_value(item, node[leaf], value)
    return ReconConfig.from_dict(d)


def _checked_value(item: str, current, value):
    """`value` if it has the type of the key's current value (an int is fine for a float; a table
    is merged into the current one; a list must keep its length), else a ValueError."""
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise ValueError(f"override {item!r}: expected a table")
        return _merge(current, value)
    if isinstance(current, list):
        ok = isinstance(value, list) and len(value) == len(current) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    elif isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(current)) and value != ""
    if not ok:
        raise ValueError(f"override {item!r}: expected {type(current).__name__}"
                         + (f" of length {len(current)}" if isinstance(current, list) else "") + f", got {value!r}")
    return value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
