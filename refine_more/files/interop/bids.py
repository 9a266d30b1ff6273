"""BIDS derivatives from reconstruction outputs (maps.h5, spec "Reconstruction output").

Layout (names and why: docs/interop.md)::

    DIR/dataset_description.json      DatasetType "derivative", GeneratedBy: version + config hash(es)
    DIR/README, DIR/.bidsignore
    DIR/sub-<label>/anat/sub-<label>[_rec-<mode>]_M0map.nii.gz                      I0 (arbitrary units)
                                      ..._desc-freepool_T1map.nii.gz              T1F (s)
                                      ..._desc-boundpoolfraction_MPFmap.nii.gz    f   (fraction)
                                      ..._desc-freetobound_kFmap.nii.gz           kF  (1/s)
                                      ..._desc-tissue_mask.nii.gz                 voxels reconstructed
    each .nii.gz with a .json sidecar (Units, EstimationAlgorithm, EstimationReference, Sources,
    the acquisition: FlipAngle, RepetitionTimeExcitation, MTOffsetFrequency, MTPulseDuration, ...)

``<label>`` is the subject id without a leading ``sub-`` and without the characters BIDS labels
exclude (anything but letters and digits), so it can never leave the output folder; two ids with
one label are an error. ``rec-<mode>`` (``scratch``/``adapted``) appears for cohort runs.
BIDS has suffixes for M0 and T1 maps but none for a bound-pool fraction or an exchange rate: f and
kF get their own suffixes (``MPFmap``, ``kFmap``), listed in ``.bidsignore`` so validators skip them.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

PAPER_DOI = "https://doi.org/10.1002/mrm.70227"
BIDS_VERSION = "1.10.0"
# map name -> (desc, suffix, Units, description)
MAPS = {
    "I0": (None, "M0map", "arbitrary", "I0 = rho*M0: equilibrium magnetization of both pools, scaled (BTS two-pool model)"),
    "T1F": ("freepool", "T1map", "s", "T1 of the free (water) pool, T1F"),
    "f": ("boundpoolfraction", "MPFmap", "1", "bound (macromolecular) pool fraction f = M0R / (M0F + M0R); "
          "qMRLab's F = f / (1 - f)"),
    "kF": ("freetobound", "kFmap", "1/s", "exchange rate from the free to the bound pool, kF = k*f "
           "(qMRLab's kf); k = kF / f held in a band, see the config's k_band"),
}
NONSTANDARD_SUFFIXES = ("MPFmap", "kFmap")
README = """REFINE-MORE quantitative magnetization transfer maps (BTS sequence), BIDS derivatives.

Maps per subject (anat/): M0map (I0), desc-freepool_T1map (T1F, s),
desc-boundpoolfraction_MPFmap (f, fraction), desc-freetobound_kFmap (kF, 1/s) and
desc-tissue_mask (voxels reconstructed; maps are 0 outside). BIDS has no suffix for a bound-pool
fraction or an exchange rate: MPFmap and kFmap are this dataset's own, listed in .bidsignore.
rec-scratch / rec-adapted: reconstructed from scratch or adapted from a cohort's seed subject.
Method: Feng et al., Magn Reson Med 2025, doi:10.1002/mrm.70227. Conventions: docs/interop.md of
the refine-more repository.
"""


@dataclass
class BidsEntry:
    """One reconstruction to export: its maps.h5, optionally the subject file (for the acquisition
    fields of the sidecars) and the cohort mode (the ``rec-`` entity)."""
    maps_path: str
    subject_path: Optional[str] = None
    mode: Optional[str] = None
    label: Optional[str] = None


def bids_label(subject_id: str) -> str:
    """BIDS subject label from a subject id: no leading 'sub-', letters and digits only."""
    label = re.sub(r"^sub-", "", str(subject_id), flags=re.IGNORECASE)
    label = re.sub(r"[^A-Za-z0-9]", "", label)
    if not label:
        raise ValueError(f"subject id {subject_id!r} has no letters or digits for a BIDS label")
    return label


def acquisition_fields(protocol) -> dict:
    """The BIDS acquisition metadata of a BTS protocol (spec units: s, Hz, degrees)."""
    tr = list(protocol.TR_s)
    return {
        "FlipAngle": list(protocol.flip_angles_deg),
        "RepetitionTimeExcitation": tr[0] if len(set(tr)) == 1 else tr,
        "EchoTime": protocol.TE_s,
        "MTStatePerImage": [bool(s) for s in protocol.saturation],
        "MTOffsetFrequency": protocol.sat_offset_hz,
        "MTPulseDuration": protocol.tau_sat_s,
        "MTPulseShape": protocol.sat_pulse.upper(),
        "ExcitationPulseDuration": protocol.tau_exc_s,
        "MTPulsePeakAmplitude_uT": protocol.sat_b1max_uT,
    }


def _nifti(path: Path, data: np.ndarray, voxel_size_mm):
    import nibabel as nib

    from refine_more.files.maps_io import atomic_write, nifti_affine

    img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), nifti_affine(voxel_size_mm))
    img.header.set_xyzt_units("mm", "sec")
    atomic_write(str(path), lambda tmp: nib.save(img, tmp))


def _json(path: Path, obj):
    from refine_more.files.maps_io import atomic_write

    atomic_write(str(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=float) + "\n"))


def _write_entry(out: Path, entry: BidsEntry, label: str) -> tuple:
    from refine_more.files.maps_io import read_maps
    from refine_more.files.subject import read_subject

    maps, attrs = read_maps(entry.maps_path)
    vox = np.asarray(attrs.get("voxel_size_mm", (1.0, 1.0, 1.0)), dtype=np.float64).reshape(3)
    acq = {}
    sources = []
    if entry.subject_path:
        acq = acquisition_fields(read_subject(entry.subject_path, load_reference=False).protocol)
        sources = [os.path.basename(str(entry.subject_path))]
    anat = out / f"sub-{label}" / "anat"
    stem = f"sub-{label}" + (f"_rec-{entry.mode}" if entry.mode else "")
    mask_name = f"{stem}_desc-tissue_mask.nii.gz"
    written = []
    for name, (desc, suffix, units, what) in MAPS.items():
        base = f"{stem}{f'_desc-{desc}' if desc else ''}_{suffix}"
        _nifti(anat / f"{base}.nii.gz", maps[name], vox)
        _json(anat / f"{base}.json", {
            "Description": f"{what}; subject_id {attrs['subject_id']}",
            "Units": units, "SkullStripped": False, "SpatialReference": "orig",
            "EstimationAlgorithm": f"REFINE-MORE ({attrs['method']}): implicit neural representation "
                                   "initialisation + unrolled physics refinement of the BTS two-pool model",
            "EstimationReference": PAPER_DOI,
            "Sources": sources + [f"bids::sub-{label}/anat/{mask_name}"],
            "ConfigHash": attrs["config_hash"], "SoftwareVersion": attrs["software_version"], **acq})
        written.append(anat / f"{base}.nii.gz")
    _nifti(anat / mask_name, maps["tissue_mask"].astype(np.uint8), vox)
    _json(anat / mask_name.replace(".nii.gz", ".json"),
          {"Description": "voxels reconstructed (maps are 0 outside)", "Type": "Brain", "Sources": sources,
           "SpatialReference": "orig"})
    return written, attrs


def write_bids(out_dir, entries: list) -> list:
    """Write (or add to) the derivatives dataset ``out_dir`` from ``entries`` (:class:`BidsEntry`);
    returns the map files written."""
    from refine_more.files.maps_io import read_maps

    out = Path(out_dir)
    labels = {}
    for e in entries:
        sid = read_maps(e.maps_path)[1]["subject_id"]
        label = bids_label(sid)
        if labels.setdefault(label, sid) != sid:
            raise ValueError(f"subject ids {labels[label]!r} and {sid!r} give the same BIDS label {label!r}")
        e.label = label
    out.mkdir(parents=True, exist_ok=True)
    written, generated = [], {}
    for e in entries:
        files, attrs = _write_entry(out, e, e.label)
        written += files
        generated.setdefault(attrs["software_version"], set()).add(attrs["config_hash"])
    _write_dataset_files(out, generated)
    return written


def _write_dataset_files(out: Path, generated: dict):
    desc_path = out / "dataset_description.json"
    old = json.loads(desc_path.read_text()) if desc_path.exists() else {}
    for g in old.get("GeneratedBy", []):
        if g.get("Name") == "refine-more":
            generated.setdefault(g.get("Version", "?"), set()).update(g.get("ConfigHashes", []))
    _json(desc_path, {
        "Name": "REFINE-MORE qMT maps", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "refine-more", "Version": v, "ConfigHashes": sorted(h),
                         "Description": f"REFINE-MORE reconstruction, config hash(es) {', '.join(sorted(h))}"}
                        for v, h in sorted(generated.items())],
        "HowToAcknowledge": f"Cite Feng et al., Magn Reson Med 2025, {PAPER_DOI}"})
    from refine_more.files.maps_io import atomic_write
    atomic_write(str(out / "README"), lambda tmp: Path(tmp).write_text(README))
    atomic_write(str(out / ".bidsignore"),
                 lambda tmp: Path(tmp).write_text("".join(f"*_{s}.*\n" for s in NONSTANDARD_SUFFIXES)))


def entries_from_results(results_dir, subject_path=None) -> list:
    """Entries of a finished output folder: a cohort run (``results.parquet``, rows with status
    'ok') or one ``recon`` output (``maps.h5``; ``subject_path``, its subject file, gives the
    sidecars' acquisition fields)."""
    results_dir = Path(results_dir)
    table = results_dir / "results.parquet"
    if table.is_file():
        import pandas as pd

        df = pd.read_parquet(table)
        rows = df[df["status"] == "ok"]
        entries = []
        for _, r in rows.iterrows():
            maps = Path(str(r["maps_path"]))
            if not maps.is_file():  # the folder was moved: the layout DIR/<subject_id>/<mode>/maps.h5
                maps = results_dir / str(r["subject_id"]) / str(r["mode"]) / "maps.h5"
            subject = r.get("subject_path")
            entries.append(BidsEntry(str(maps), subject if subject and os.path.isfile(str(subject)) else None,
                                     str(r["mode"])))
        return entries
    if (results_dir / "maps.h5").is_file():
        return [BidsEntry(str(results_dir / "maps.h5"), None if subject_path is None else str(subject_path))]
    raise FileNotFoundError(f"{results_dir}: neither results.parquet (a cohort run) nor maps.h5 (a recon output)")
