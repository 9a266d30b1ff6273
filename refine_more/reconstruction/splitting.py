"""Partitions of the acquired k-space for scan-specific self-supervision (SSDU / zero-shot SSDU).

The acquired set Ω (the mask, per image) is split into a validation part Γ, held out of
everything that trains and used only to decide when to stop, and the rest Ω\\Γ, which is split
again, several times, into Θ (the data consistency of the unrolled refinement) and Λ (its loss).
A network trained this way has to predict k-space it did not see, which the data term over all
of Ω cannot teach (its minimum is the classical solver's). Yaman et al., MRM 2020 (SSDU; ρ = |Λ|/|Ω\\Γ|
= 0.4 was best) and ICLR 2022 (zero-shot: Γ of 0.2, repeated (Θ, Λ) draws, stop on Γ).

Samples near the k-space centre are never held out (they carry most of the signal energy;
`central_box`); the rest is drawn uniformly. Everything is on the (Z, Y) phase-encode grid
of each image; the readout is fully sampled.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def central_box(shape_zy, fraction: float = 0.125) -> np.ndarray:
    """(Z, Y) bool: a centred box whose sides are `fraction` of the grid's (at least 1 sample),
    never held out."""
    box = np.zeros(tuple(shape_zy), dtype=bool)
    slices = []
    for n in shape_zy:
        half = max(1, int(round(n * fraction / 2)))
        slices.append(slice(max(0, n // 2 - half), min(n, n // 2 + half)))
    box[tuple(slices)] = True
    return box


def hold_out(acquired: np.ndarray, fraction: float, rng: np.random.Generator,
             protected: np.ndarray | None = None):
    """Split `acquired` (T, Z, Y) bool into (kept, held): disjoint, their union is `acquired`;
    per image, round(fraction · |acquired_t|) samples are held, drawn uniformly from the acquired
    samples outside `protected` (Z, Y) (fewer when not enough are left)."""
    acquired = np.asarray(acquired, dtype=bool)
    if acquired.ndim != 3:
        raise ValueError(f"mask must be (T, Z, Y), got shape {acquired.shape}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"hold-out fraction must be in [0, 1), got {fraction!r}")
    held = np.zeros_like(acquired)
    for t in range(acquired.shape[0]):
        candidates = acquired[t] if protected is None else acquired[t] & ~protected
        index = np.flatnonzero(candidates)
        n = min(len(index), int(round(fraction * acquired[t].sum())))
        held[t].flat[rng.choice(index, size=n, replace=False)] = True
    return acquired & ~held, held


@dataclass(frozen=True)
class SelfSupervisedPartition:
    """Γ (`validation`), Ω\\Γ (`rest`) and the (Θ, Λ) draws of Ω\\Γ (`splits`), all (T, Z, Y) bool."""
    validation: np.ndarray
    rest: np.ndarray
    splits: tuple


def self_supervised_partition(mask, validation_fraction: float = 0.15, loss_fraction: float = 0.4,
                              n_splits: int = 4, seed: int = 0, centre_fraction: float = 0.125
                              ) -> SelfSupervisedPartition:
    """Γ, then `n_splits` draws of (Θ, Λ) with |Λ| ≈ `loss_fraction`·|Ω\\Γ| per image, reproducible
    from `seed`; the central box (`central_box`) stays in every Θ."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (T, Z, Y), got shape {mask.shape}")
    if not (isinstance(n_splits, int) and n_splits >= 1):
        raise ValueError(f"n_splits must be an integer ≥ 1, got {n_splits!r}")
    rng = np.random.default_rng(seed)
    protected = central_box(mask.shape[1:], centre_fraction)
    rest, validation = hold_out(mask, validation_fraction, rng, protected)
    splits = tuple(hold_out(rest, loss_fraction, rng, protected) for _ in range(n_splits))
    return SelfSupervisedPartition(validation=validation, rest=rest, splits=splits)
