"""The hash-grid encoding's settings, in tiny-cuda-nn's terms (``to_tcnn``/``from_tcnn``). They live
with the configs so that every layer can name them; ``networks.encoding`` computes the encoding."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HashEncodingConfig:
    n_levels: int = 16
    """Number of resolution levels."""
    n_features_per_level: int = 2
    """Features per level (the encoding's width is n_levels × this)."""
    log2_hashmap_size: int = 19
    """log2 of the hash table size per level."""
    base_resolution: int = 16
    """Grid resolution of the coarsest level."""
    per_level_scale: float = 1.5
    """Resolution growth factor from one level to the next."""
    interpolation: str = "Linear"
    """Interpolation between grid corners (tcnn's name; 'Linear')."""

    _TCNN_KEYS = (
        "otype",
        "type",
        "n_levels",
        "n_features_per_level",
        "log2_hashmap_size",
        "base_resolution",
        "per_level_scale",
        "interpolation",
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.interpolation != "Linear":
            raise ValueError(
                f"HashEncodingConfig: interpolation {self.interpolation!r} is not supported "
                "(only 'Linear')"
            )
        if int(self.n_levels) < 1 or int(self.n_levels) > 32:
            raise ValueError(f"n_levels must be in [1, 32] (tcnn limit), got {self.n_levels}")
        if int(self.n_features_per_level) not in (1, 2, 4, 8):
            raise ValueError(
                f"n_features_per_level must be 1, 2, 4 or 8 (tcnn), got {self.n_features_per_level}"
            )
        if not 1 <= int(self.log2_hashmap_size) <= 30:
            raise ValueError(f"log2_hashmap_size must be in [1, 30], got {self.log2_hashmap_size}")
        if int(self.base_resolution) < 1:
            raise ValueError(f"base_resolution must be >= 1, got {self.base_resolution}")
        if not float(self.per_level_scale) > 0:
            raise ValueError(f"per_level_scale must be > 0, got {self.per_level_scale}")

    def to_tcnn(self) -> dict:
        """The tiny-cuda-nn encoding config dict (``tinycudann.Encoding(d, cfg.to_tcnn())``)."""
        return {
            "otype": "Grid",
            "type": "Hash",
            "n_levels": int(self.n_levels),
            "n_features_per_level": int(self.n_features_per_level),
            "log2_hashmap_size": int(self.log2_hashmap_size),
            "base_resolution": int(self.base_resolution),
            "per_level_scale": float(self.per_level_scale),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_tcnn(cls, d: dict) -> "HashEncodingConfig":
        """Inverse of :meth:`to_tcnn`. Accepts ``otype`` "Grid" (with ``type`` "Hash", the default)
        or the alias "HashGrid"; missing keys take tcnn's own defaults (note: tcnn's default
        ``per_level_scale`` is 2.0). Anything this implementation does not reproduce is rejected."""
        d = dict(d)
        unknown = set(d) - set(cls._TCNN_KEYS)
        if unknown:
            raise ValueError(f"unsupported tcnn encoding keys: {sorted(unknown)}")
        otype = d.get("otype", "Grid")
        if not isinstance(otype, str) or otype.lower() not in ("grid", "hashgrid"):
            raise ValueError(f"unsupported tcnn otype {otype!r} (expected 'Grid' or 'HashGrid')")
        gtype = d.get("type", "Hash")
        if not isinstance(gtype, str) or gtype.lower() != "hash":
            raise ValueError(f"unsupported grid type {gtype!r} (only 'Hash')")
        interp = d.get("interpolation", "Linear")
        if not isinstance(interp, str) or interp.lower() != "linear":
            raise ValueError(f"unsupported interpolation {interp!r} (only 'Linear')")
        return cls(
            n_levels=int(d.get("n_levels", 16)),
            n_features_per_level=int(d.get("n_features_per_level", 2)),
            log2_hashmap_size=int(d.get("log2_hashmap_size", 19)),
            base_resolution=int(d.get("base_resolution", 16)),
            per_level_scale=float(d.get("per_level_scale", 2.0)),
            interpolation="Linear",
        )
