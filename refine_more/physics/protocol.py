"""The BTS acquisition protocol and the pulse quantities derived from it.

Everything here is plain numpy in float64: these numbers are computed once per subject and
then enter the (torch) signal model as constants. Defaults and formulas follow
`shared/spec/subject-format.md`, section "Signal model (BTS)".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

GAMMA_RAD_PER_S_PER_T = 2.0 * np.pi * 42.577e6

# Defaults every reader applies when a file does not override them (spec, Signal model).
DEFAULT_T2R_S = 12e-6
DEFAULT_T1R_S = 1.0
DEFAULT_FERMI_T0_S = 2.78e-3
DEFAULT_FERMI_A_S = 0.18e-3
# On-resonance lineshape for the hard excitation pulse. The super-Lorentzian diverges at 0 Hz,
# so (as qMRLab does) it is replaced by its value extrapolated from 1140 Hz: G_SL(1140 Hz) at
# T2R = 12 us is 1.40e-5 s (checked in tests/test_physics.py).
DEFAULT_G0_S = 1.4e-5


def super_lorentzian(offset_hz: float, T2R_s: float, n: int = 200_001) -> float:
    """Super-Lorentzian absorption lineshape G(Δ) in seconds (spec eq. 15).

    G(Δ) = ∫₀¹ √(2/π) T2R / |3u² − 1| · exp(−2 (2πΔ T2R / (3u² − 1))²) du, by the midpoint rule
    in float64; the integrand vanishes at the magic angle for Δ ≠ 0, so no special care is needed
    there. Δ = 0 diverges: use `G0_s` for on-resonance pulses.
    """
    if offset_hz == 0:
        raise ValueError("the super-Lorentzian diverges on resonance; use G0_s for on-resonance pulses")
    u = (np.arange(n, dtype=np.float64) + 0.5) / n
    d = 3.0 * u**2 - 1.0
    integrand = np.sqrt(2.0 / np.pi) * T2R_s / np.abs(d) * np.exp(-2.0 * (2.0 * np.pi * offset_hz * T2R_s / d) ** 2)
    return float(integrand.mean())


def fermi_envelope(t_s: np.ndarray, tau_s: float, t0_s: float, a_s: float) -> np.ndarray:
    """Normalised Fermi envelope B1(t)/B1max on [0, τ]."""
    return 1.0 / (1.0 + np.exp((np.abs(t_s - tau_s / 2.0) - t0_s) / a_s))


def fermi_energy_integral(tau_s: float, t0_s: float, a_s: float, n: int = 20_001) -> float:
    """∫₀^τ (B1(t)/B1max)² dt in seconds (trapezoid rule)."""
    t = np.linspace(0.0, tau_s, n)
    return float(np.trapezoid(fermi_envelope(t, tau_s, t0_s, a_s) ** 2, t))


@dataclass(frozen=True)
class Protocol:
    """BTS acquisition parameters (one entry per image where the spec says float[T])."""

    flip_angles_deg: tuple
    saturation: tuple
    TR_s: tuple
    TE_s: float = 12e-3
    tau_exc_s: float = 500e-6
    tau_sat_s: float = 8e-3
    sat_pulse: str = "fermi"
    sat_b1max_uT: float = 7.3
    sat_offset_hz: float = 4000.0
    T2R_s: float = DEFAULT_T2R_S
    T1R_s: float = DEFAULT_T1R_S
    sat_fermi_t0_s: float = DEFAULT_FERMI_T0_S
    sat_fermi_a_s: float = DEFAULT_FERMI_A_S
    G0_s: float = DEFAULT_G0_S

    def __post_init__(self):
        fa = tuple(float(v) for v in np.atleast_1d(self.flip_angles_deg))
        sat = tuple(int(v) for v in np.atleast_1d(self.saturation))
        tr = np.atleast_1d(np.asarray(self.TR_s, dtype=np.float64))
        if tr.size == 1:
            tr = np.full(len(fa), tr.item())
        object.__setattr__(self, "flip_angles_deg", fa)
        object.__setattr__(self, "saturation", sat)
        object.__setattr__(self, "TR_s", tuple(float(v) for v in tr))
        if not (len(fa) == len(sat) == len(self.TR_s)):
            raise ValueError(
                f"protocol: flip_angles_deg ({len(fa)}), saturation ({len(sat)}) and TR_s ({len(self.TR_s)}) "
                "must have one entry per image")
        if self.sat_pulse != "fermi":
            raise ValueError(f"protocol: sat_pulse {self.sat_pulse!r} is not supported (format version 1 knows 'fermi')")
        if any(s not in (0, 1) for s in sat):
            raise ValueError("protocol: saturation must be 0 or 1 per image")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def paper_in_vivo(cls, flip_angles_deg=(5.0, 10.0, 20.0, 40.0)) -> "Protocol":
        """The paper's in-vivo protocol: each flip angle without, then with saturation."""
        fa = tuple(flip_angles_deg) * 2
        sat = (0,) * len(flip_angles_deg) + (1,) * len(flip_angles_deg)
        return cls(flip_angles_deg=fa, saturation=sat, TR_s=40e-3)

    @classmethod
    def paper_phantom(cls, flip_angles_deg=(5.0, 10.0, 20.0, 40.0, 60.0)) -> "Protocol":
        """The paper's phantom protocol (§3.2): TE/TR 12/80 ms, 500 µs hard pulses, an 8 ms Fermi
        pulse of 9.128 µT at 4 kHz; each flip angle without, then with saturation."""
        fa = tuple(flip_angles_deg) * 2
        sat = (0,) * len(flip_angles_deg) + (1,) * len(flip_angles_deg)
        return cls(flip_angles_deg=fa, saturation=sat, TR_s=80e-3, sat_b1max_uT=9.128)

    @classmethod
    def named(cls, name: str) -> "Protocol":
        """One of `PROTOCOLS` by name ("in-vivo", "phantom")."""
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r} (known: {', '.join(PROTOCOLS)})")
        return getattr(cls, PROTOCOLS[name])()

    @classmethod
    def from_attrs(cls, attrs) -> "Protocol":
        """Build from a subject file's root attributes (a mapping); optional ones take defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for name in names:
            if name in attrs:
                value = attrs[name]
                if isinstance(value, bytes):
                    value = value.decode()
                if isinstance(value, np.ndarray) and value.ndim == 0:
                    value = value.item()
                if isinstance(value, np.generic):
                    value = value.item()
                kwargs[name] = value
        return cls(**kwargs)

    def to_attrs(self) -> dict:
        """Root attributes for a subject file (numpy types, spec dtypes)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "flip_angles_deg":
                v = np.asarray(v, dtype=np.float64)
            elif f.name == "saturation":
                v = np.asarray(v, dtype=np.uint8)
            elif f.name == "TR_s":
                v = np.asarray(v, dtype=np.float64)
                if np.all(v == v[0]):
                    v = float(v[0])
            out[f.name] = v
        return out

    # -- derived quantities -------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return len(self.flip_angles_deg)

    @property
    def sat_energy_s(self) -> float:
        """∫ (B1(t)/B1max)² dt of the saturation pulse."""
        return fermi_energy_integral(self.tau_sat_s, self.sat_fermi_t0_s, self.sat_fermi_a_s)

    @property
    def lineshape_sat_s(self) -> float:
        return super_lorentzian(self.sat_offset_hz, self.T2R_s)

    @property
    def W_sat_nominal(self) -> float:
        """Mean bound-pool saturation rate (1/s) of the saturation pulse at B1+ = 1 (spec eq. 14)."""
        b1max_T = self.sat_b1max_uT * 1e-6
        mean_w1_sq = GAMMA_RAD_PER_S_PER_T**2 * b1max_T**2 * self.sat_energy_s / self.tau_sat_s
        return float(np.pi * mean_w1_sq * self.lineshape_sat_s)

    @property
    def K_BS_rad_per_G2(self) -> float:
        """Bloch–Siegert constant of the saturation pulse in rad/G² (74.0 for the defaults)."""
        return float(GAMMA_RAD_PER_S_PER_T**2 * 1e-8 * self.sat_energy_s / (2.0 * 2.0 * np.pi * self.sat_offset_hz))

    @property
    def phi_bs_nominal(self) -> float:
        """Bloch–Siegert phase (rad) of a saturated image at B1+ = 1; scales with b1²."""
        b1max_G = self.sat_b1max_uT * 1e-2
        return self.K_BS_rad_per_G2 * b1max_G**2

    def W0_nominal(self) -> np.ndarray:
        """Bound-pool saturation rate (1/s) of each hard excitation pulse at B1+ = 1."""
        w1 = np.deg2rad(np.asarray(self.flip_angles_deg)) / self.tau_exc_s
        return np.pi * w1**2 * self.G0_s

    def constants(self) -> dict:
        """Per-image float64 arrays the signal model needs (computed once)."""
        return {
            "alpha_rad": np.deg2rad(np.asarray(self.flip_angles_deg, dtype=np.float64)),
            "saturation": np.asarray(self.saturation, dtype=np.float64),
            "TR_s": np.asarray(self.TR_s, dtype=np.float64),
            "W0": self.W0_nominal(),
            "W_sat": self.W_sat_nominal,
            "tau_exc_s": self.tau_exc_s,
            "tau_sat_s": self.tau_sat_s,
            "T1R_s": self.T1R_s,
            "phi_bs": self.phi_bs_nominal,
        }


#: the paper's protocols by name: the classmethod of `Protocol` that builds each
PROTOCOLS = {"in-vivo": "paper_in_vivo", "phantom": "paper_phantom"}
