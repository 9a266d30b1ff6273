"""Deliberately broken subjects: what real scans bring and no simulator does, for checking that the
quality control (reconstruction/qc.py, docs/decisions/017) flags them. Each returns a copy; the
original is not changed. Every one still passes `refine-more validate`: the file is well formed,
its content is wrong."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np

#: name -> what is broken (benchmarks/qc_thresholds.py, tests)
BREAKAGES = {
    "image-scaled": "one image's k-space scaled ×3 (a corrupt image, a wrong receiver gain)",
    "flip-angles-swapped": "the flip angles of two images swapped in the protocol",
    "coils-of-another-subject": "the coil maps of another subject",
}


def scale_image(subject, image: int = 3, factor: float = 3.0):
    """`subject` with image `image`'s k-space multiplied by `factor`."""
    out = copy.copy(subject)
    out.kspace = np.array(subject.kspace, copy=True)
    out.kspace[image] *= np.complex64(factor)
    return out


def swap_flip_angles(subject, first: int = 1, second: int = 2):
    """`subject` whose protocol names the flip angles of images `first` and `second` the other way
    round (the data are those of the true protocol)."""
    angles = list(subject.protocol.flip_angles_deg)
    if angles[first] == angles[second]:
        raise ValueError(f"images {first} and {second} have the same flip angle: swapping changes nothing")
    angles[first], angles[second] = angles[second], angles[first]
    out = copy.copy(subject)
    out.protocol = dataclasses.replace(subject.protocol, flip_angles_deg=tuple(angles))
    return out


def coils_of(subject, other):
    """`subject` with the coil maps of `other` (same matrix and number of coils)."""
    if other.coil_sens is None or subject.coil_sens is None or other.coil_sens.shape != subject.coil_sens.shape:
        raise ValueError("coils_of: both subjects need coil maps of the same shape")
    out = copy.copy(subject)
    out.coil_sens = np.array(other.coil_sens, copy=True)
    return out


def broken(subject, breakage: str, other=None):
    """`subject` broken as `breakage` (a key of BREAKAGES); `other` gives the foreign coil maps."""
    if breakage == "image-scaled":
        return scale_image(subject)
    if breakage == "flip-angles-swapped":
        return swap_flip_angles(subject)
    if breakage == "coils-of-another-subject":
        return coils_of(subject, other)
    raise ValueError(f"unknown breakage {breakage!r} (known: {', '.join(BREAKAGES)})")
