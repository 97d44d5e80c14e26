"""Reader for PETS2 dynamical-refinement files (``.cif_pets``) into plain records."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from .cif_tokens import CifBlock, CifLoop, read_cif_block
from .errors import InputError

# |I| or sigma beyond this is refused: the fit sums their squares (and the weights' squares of those), and
# no detector counts near it; data in such units are to be rescaled
MAX_INTENSITY = 1e15

Geometry = Literal["continuous", "precession"]


@dataclass(frozen=True)
class MeasurementDetails:
    """Header of a PETS2 file: acquisition geometry and integration settings."""

    geometry: Geometry
    dstarmax: float  # 1/A
    rc_width: float  # 1/A, rocking-curve width PETS used
    mosaicity: float  # degrees
    rotation_axis_deg: float  # azimuth of the rotation (tilt) axis in the detector plane, degrees


@dataclass(frozen=True)
class FrameTable:
    """Per-frame (virtual frame / zone) settings, arrays of length n_frames."""

    ids: np.ndarray  # (F,) int
    uvw: np.ndarray  # (F, 3)
    half_angle_deg: np.ndarray  # (F,) wedge half-width or precession semi-angle, degrees
    alpha_deg: np.ndarray
    beta_deg: np.ndarray
    omega_deg: np.ndarray
    scale: np.ndarray
    # several datasets merged (merge_datasets): each frame's own UB (F, 3, 3), the index of the dataset it
    # came from and its id there; None for one dataset
    ub: np.ndarray | None = None
    dataset: np.ndarray | None = None
    dataset_frame: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ReflectionTable:
    """Observed reflections, arrays of length n_reflections."""

    hkl: np.ndarray  # (R, 3) int
    intensity: np.ndarray  # (R,)
    sigma: np.ndarray  # (R,)
    frame_id: np.ndarray  # (R,) int, refers to FrameTable.ids

    def __len__(self) -> int:
        return len(self.hkl)


@dataclass(frozen=True)
class EmbeddedAtoms:
    """An ``_atom_site`` loop some synthetic files carry (the structure they were made from)."""

    labels: list[str]
    types: list[str]
    xyz: np.ndarray  # (A, 3) fractional
    occupancy: np.ndarray


@dataclass(frozen=True)
class PetsDataset:
    path: str
    cell: tuple[float, float, float, float, float, float]  # a, b, c (A), alpha, beta, gamma (deg)
    wavelength: float  # A
    ub: np.ndarray  # (3, 3), 1/A
    details: MeasurementDetails
    frames: FrameTable
    reflections: ReflectionTable
    atoms: EmbeddedAtoms | None = None
    extra: dict = field(default_factory=dict)


def _num(block: CifBlock, tag: str, *, required: bool = True, default: float | None = None) -> float:
    """The number of a scalar item (tags are looked up lower-cased, named as written in the dictionary)."""
    name, tag = tag, tag.lower()
    val = block.values.get(tag)
    if val is None:
        if required:
            raise InputError(block.path, name, "missing")
        return default  # type: ignore[return-value]
    try:
        out = float(re.sub(r"\(\d+\)$", "", val))
    except ValueError:
        raise InputError(block.path, f"{name} (line {block.value_lines[tag]})",
                         f"value '{val}' is not a number") from None
    if not math.isfinite(out):
        raise InputError(block.path, f"{name} (line {block.value_lines[tag]})", "value is not finite")
    return out


def _columns(block: CifBlock, loop: CifLoop, spec: dict[str, tuple[str, ...]], what: str,
             defaults: dict[str, float] | None = None):
    """Numeric columns of a loop, with the row's line named when a value is bad; a column in
    ``defaults`` may be missing (then every row takes its default)."""
    out = {}
    for key, candidates in spec.items():
        col = None
        for tag in candidates:
            col = loop.column(tag)
            if col is not None:
                break
        if col is None and defaults and key in defaults:
            out[key] = np.full(len(loop.lines), float(defaults[key]))
            continue
        if col is None:
            raise InputError(block.path, f"{what} loop", f"missing column {candidates[0]}")
        arr = np.empty(len(col))
        for r, v in enumerate(col):
            try:
                arr[r] = float(v)
            except ValueError:
                raise InputError(block.path, f"{what} loop, line {loop.lines[r]}, column {candidates[0]}",
                                 f"value '{v}' is not a number") from None
            if not math.isfinite(arr[r]):
                raise InputError(block.path, f"{what} loop, line {loop.lines[r]}, column {candidates[0]}",
                                 "value is not finite")
        out[key] = arr
    return out


def parse_measurement_details(text: str, path: str) -> MeasurementDetails:
    """Parse the free-text ``_diffrn_measurement_details`` field of PETS2."""
    fields = {}
    for line in text.splitlines():
        if ":" in line:
            key, _, val = line.partition(":")
            fields[key.strip().lower()] = val.strip()
    geo_text = fields.get("data collection geometry", "continuous rotation").lower()
    if "precession" in geo_text:
        geometry: Geometry = "precession"
    elif "continuous" in geo_text or "rotation" in geo_text or "stepwise" in geo_text:
        geometry = "continuous"
    else:
        raise InputError(path, "_diffrn_measurement_details", f"unknown geometry '{geo_text}'")

    def val(key, default):
        if key not in fields:
            return default
        try:
            return float(fields[key].split()[0])
        except (ValueError, IndexError):
            raise InputError(path, f"_diffrn_measurement_details '{key}'",
                             f"value '{fields[key]}' is not a number") from None

    return MeasurementDetails(
        geometry=geometry,
        dstarmax=val("dstarmax", 2.0),
        rc_width=val("rc width", 0.001),
        mosaicity=val("mosaicity", 0.0),
        rotation_axis_deg=val("rotation axis position", 0.0),
    )


def is_electron_wavelength(wavelength: float) -> bool:
    """Whether a wavelength (A) is one of electrons in a diffraction experiment (about 1-200 mA)."""
    return 0.001 < wavelength < 0.2


def with_wavelength(dataset: PetsDataset, wavelength: float | None) -> PetsDataset:
    """The dataset with its wavelength (A) replaced, for a header that states the wrong one; None keeps it."""
    if wavelength is None or wavelength == dataset.wavelength:
        return dataset
    if not is_electron_wavelength(wavelength):
        raise ValueError(f"{wavelength} A is not an electron wavelength")
    return replace(dataset, wavelength=float(wavelength))


# |UB e_i| against the header cell's reciprocal lengths: beyond UB_CELL_NOTE a note (quartz: 1.01), beyond
# UB_CELL_MISMATCH an error (the UB of another crystal or a units slip)
UB_CELL_NOTE = 0.03
UB_CELL_MISMATCH = 0.2


def _reciprocal_lengths(cell, path) -> np.ndarray:
    """a*, b*, c* (1/A) of a cell (a, b, c, alpha, beta, gamma); InputError for angles that span no volume."""
    a, b, c = cell[:3]
    ca, cb, cg = (math.cos(math.radians(x)) for x in cell[3:])
    v2 = 1 - ca * ca - cb * cb - cg * cg + 2 * ca * cb * cg
    if v2 <= 0:
        raise InputError(path, "_cell_angle_*", f"angles {cell[3:]} span no volume")
    vol = a * b * c * math.sqrt(v2)
    sines = [math.sin(math.radians(x)) for x in cell[3:]]
    return np.array([b * c * sines[0], a * c * sines[1], a * b * sines[2]]) / vol


def read_pets(path: str | Path) -> PetsDataset:
    """Read a ``.cif_pets`` file; raise :class:`InputError` on malformed content."""
    path = str(path)
    block = read_cif_block(path)
    cell = tuple(_num(block, t) for t in (
        "_cell_length_a", "_cell_length_b", "_cell_length_c",
        "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma"))
    if min(cell[:3]) <= 0 or not all(0 < x < 180 for x in cell[3:]):
        raise InputError(path, "_cell_*", f"impossible cell {cell}")
    wavelength = _num(block, "_diffrn_radiation_wavelength")
    if not is_electron_wavelength(wavelength):
        raise InputError(path, "_diffrn_radiation_wavelength", f"{wavelength} A is not an electron wavelength")
    ub = np.array([[_num(block, f"_diffrn_orient_matrix_UB_{i}{j}") for j in (1, 2, 3)] for i in (1, 2, 3)])
    if abs(np.linalg.det(ub)) < 1e-12:
        raise InputError(path, "_diffrn_orient_matrix_UB", "matrix is singular")
    ratio = np.linalg.norm(ub, axis=0) / _reciprocal_lengths(cell, path)  # |UB e_i| against a*, b*, c*
    if np.abs(ratio - 1).max() > UB_CELL_MISMATCH:
        raise InputError(path, "_diffrn_orient_matrix_UB", f"its reciprocal axes are {np.round(ratio, 3).tolist()} x "
                         f"those of the cell (a*, b*, c*): the UB matrix and the cell do not belong together")
    ub_note = (f"{path}: the UB matrix's reciprocal axes are {np.round(ratio, 3).tolist()} x those of the header's "
               f"cell; the UB sets the geometry, the cell the scattering factors"
               if np.abs(ratio - 1).max() > UB_CELL_NOTE else None)

    details_text = block.values.get("_diffrn_measurement_details") or block.values.get(
        "_diffrn_reflns_reduction_process")
    if details_text is None:
        raise InputError(path, "_diffrn_measurement_details", "missing (geometry, rotation axis position)")
    details = parse_measurement_details(details_text, path)

    floop = block.find_loop("_diffrn_zone_axis_id")
    if floop is None:
        raise InputError(path, "frame loop", "missing (_diffrn_zone_axis_* loop)")
    fcols = _columns(block, floop, {
        "id": ("_diffrn_zone_axis_id",),
        "u": ("_diffrn_zone_axis_u",), "v": ("_diffrn_zone_axis_v",), "w": ("_diffrn_zone_axis_w",),
        "prec": ("_diffrn_zone_axis_precession_angle",),
        "alpha": ("_diffrn_zone_axis_alpha",), "beta": ("_diffrn_zone_axis_beta",),
        "omega": ("_diffrn_zone_axis_omega",), "scale": ("_diffrn_zone_axis_scale",),
    }, "frame", defaults={"u": 0.0, "v": 0.0, "w": 0.0, "scale": 1.0})  # (the zone axis and PETS's scale: not used)
    r = _first_non_integer(fcols["id"])
    if r is not None:
        raise InputError(path, f"frame loop, line {floop.lines[r]}", f"frame id {fcols['id'][r]:g} is not an integer")
    ids = fcols["id"].astype(int)
    if len(ids) == 0:
        raise InputError(path, "frame loop", "no frames (the loop has no rows)")
    if len(set(ids.tolist())) != len(ids):
        dup = [i for i in ids.tolist() if list(ids).count(i) > 1][0]
        raise InputError(path, "frame loop", f"frame id {dup} appears twice")
    if np.any(fcols["prec"] < 0):
        r = int(np.argmax(fcols["prec"] < 0))
        raise InputError(path, f"frame loop, line {floop.lines[r]}", "negative precession/wedge angle")
    frames = FrameTable(ids=ids, uvw=np.stack([fcols["u"], fcols["v"], fcols["w"]], 1),
                        half_angle_deg=fcols["prec"], alpha_deg=fcols["alpha"], beta_deg=fcols["beta"],
                        omega_deg=fcols["omega"], scale=fcols["scale"])

    rloop = block.find_loop("_refln_index_h")
    if rloop is None:
        raise InputError(path, "reflection loop", "missing (_refln_index_h ... loop)")
    rcols = _columns(block, rloop, {
        "h": ("_refln_index_h",), "k": ("_refln_index_k",), "l": ("_refln_index_l",),
        "i": ("_refln_intensity_meas", "_refln_f_squared_meas"),
        "s": ("_refln_intensity_sigma", "_refln_f_squared_sigma"),
        "f": ("_refln_zone_axis_id",),
    }, "reflection")
    if len(rcols["h"]) == 0:
        raise InputError(path, "reflection loop", "no reflections (the loop has no rows)")
    # Zero-count Poisson observations (I = 0, sigma = 0) carry no weight information: drop them
    # and count them; any other sigma <= 0 is an error.
    zero_count = (rcols["s"] == 0) & (rcols["i"] == 0)
    n_zero_count = int(zero_count.sum())
    row_lines = [ln for ln, z in zip(rloop.lines, zero_count) if not z]
    if n_zero_count:
        rcols = {k: v[~zero_count] for k, v in rcols.items()}
    hkl = np.stack([rcols["h"], rcols["k"], rcols["l"]], 1)
    r = _first_non_integer(hkl)
    if r is not None:
        raise InputError(path, f"reflection loop, line {row_lines[r]}", "Miller index is not an integer")
    bad = np.flatnonzero(rcols["s"] <= 0)
    if len(bad):
        r = int(bad[0])
        raise InputError(path, f"reflection loop, line {row_lines[r]}",
                         f"sigma {rcols['s'][r]} <= 0 ({len(bad)} such rows)")
    huge = np.flatnonzero((np.abs(rcols["i"]) > MAX_INTENSITY) | (rcols["s"] > MAX_INTENSITY))
    if len(huge):
        r = int(huge[0])
        raise InputError(path, f"reflection loop, line {row_lines[r]}",
                         f"I {rcols['i'][r]:g}, sigma {rcols['s'][r]:g}: beyond {MAX_INTENSITY:g}, where the squares "
                         f"the fit sums overflow ({len(huge)} such rows); rescale the intensities")
    r = _first_non_integer(rcols["f"])
    if r is not None:
        raise InputError(path, f"reflection loop, line {row_lines[r]}", f"frame id {rcols['f'][r]:g} is not an integer")
    fid = rcols["f"].astype(int)
    known = set(ids.tolist())
    missing = [r for r, f in enumerate(fid.tolist()) if f not in known]
    if missing:
        r = missing[0]
        raise InputError(path, f"reflection loop, line {row_lines[r]}",
                         f"frame id {fid[r]} has no entry in the frame loop")
    if len(hkl) == 0:
        raise InputError(path, "reflection loop", f"no reflections: all {n_zero_count} rows have I = 0 and sigma = 0")
    if not np.any(rcols["i"] > 0):
        raise InputError(path, "reflection loop", f"no intensity is positive ({len(hkl)} rows): nothing to compare with")
    refl = ReflectionTable(hkl=hkl.astype(int), intensity=rcols["i"], sigma=rcols["s"], frame_id=fid)

    atoms = None
    aloop = block.find_loop("_atom_site_fract_x")
    if aloop is not None:
        acols = _columns(block, aloop, {"x": ("_atom_site_fract_x",), "y": ("_atom_site_fract_y",),
                                        "z": ("_atom_site_fract_z",)}, "atom_site")
        occ = aloop.column("_atom_site_occupancy")
        types = aloop.column("_atom_site_type_symbol") or aloop.column("_atom_site_label")
        atoms = EmbeddedAtoms(labels=aloop.column("_atom_site_label") or types, types=types,
                              xyz=np.stack([acols["x"], acols["y"], acols["z"]], 1),
                              occupancy=np.array([float(o) for o in occ]) if occ else np.ones(len(types)))
    return PetsDataset(path=path, cell=cell, wavelength=wavelength, ub=ub, details=details,
                       frames=frames, reflections=refl, atoms=atoms,
                       extra={"n_zero_count_dropped": n_zero_count,
                              "notes": _reading_notes(path, details_text, refl, n_zero_count) + ([ub_note] if ub_note else [])})


def _reading_notes(path: str, details_text: str, refl: ReflectionTable, n_zero_count: int) -> list[str]:
    """What the reader assumed or dropped that the user should know (logged by the refinement): a
    missing rotation-axis azimuth taken as 0, zero-count rows dropped, rows repeating another's hkl
    and frame (each is scored as given: two observations of one reflection count twice)."""
    notes = []
    if "rotation axis position" not in details_text.lower():
        notes.append(f"{path}: no 'rotation axis position' in _diffrn_measurement_details; the rotation axis is "
                     "taken at 0 deg (along lab x)")
    if n_zero_count:
        notes.append(f"{path}: {n_zero_count} reflection rows with I = 0 and sigma = 0 dropped (no weight)")
    rows = np.concatenate([refl.hkl, refl.frame_id[:, None]], 1)
    n_repeat = len(rows) - len(np.unique(rows, axis=0))
    if n_repeat:
        notes.append(f"{path}: {n_repeat} reflection rows repeat another row's hkl and frame; each is scored")
    return notes


def select_frames(dataset: PetsDataset, keep: np.ndarray) -> PetsDataset:
    """The dataset restricted to the frames where ``keep`` (F,) bool is True, with their reflections."""
    import dataclasses
    keep = np.asarray(keep, bool)
    f = dataset.frames
    frames = FrameTable(*(None if getattr(f, n.name) is None else getattr(f, n.name)[keep]
                          for n in dataclasses.fields(FrameTable)))
    r = dataset.reflections
    rows = np.isin(r.frame_id, f.ids[keep])
    refl = ReflectionTable(r.hkl[rows], r.intensity[rows], r.sigma[rows], r.frame_id[rows])
    return dataclasses.replace(dataset, frames=frames, reflections=refl)


def _first_non_integer(values: np.ndarray) -> int | None:
    """The first row of ``values`` (R,) or (R, C) holding a value that is not a whole number, or None."""
    if len(values) == 0:
        return None
    bad = np.flatnonzero((values != np.round(values)).reshape(len(values), -1).any(1))
    return int(bad[0]) if len(bad) else None


def every_nth_frame_mask(n_frames: int, step: int) -> np.ndarray:
    """(F,) bool: every ``step``-th frame by position in the frame loop, from the first (a quick subset
    of a large dataset; :func:`frame_selection` names frames by id instead)."""
    keep = np.zeros(n_frames, bool)
    keep[::max(1, int(step))] = True
    return keep


def frame_selection(ids: np.ndarray, spec: str) -> np.ndarray:
    """(F,) bool: the frames a selection names by the ids of the frame loop. ``spec`` is a comma list
    of ids and ranges ``a-b`` (both ends included), each optionally ``:n`` for every n-th frame of it
    counted from its first, e.g. "1-40,52" or "1-99:10"; "" selects every frame. A ValueError names
    the item that is malformed or selects no frame of the data."""
    ids = np.asarray(ids)
    if not spec.strip():
        return np.ones(len(ids), bool)
    keep = np.zeros(len(ids), bool)
    for item in spec.split(","):
        text = item.strip()
        try:
            span, _, step = text.partition(":")
            first, dash, last = span.strip().partition("-")
            a = int(first)
            b = int(last) if dash else a
            n = int(step) if step else 1
        except ValueError:
            raise ValueError(f"'{text}' is not a frame id, a range a-b, or either with :n") from None
        if a > b or n < 1:
            raise ValueError(f"'{text}': a range runs from the lower id up, with a step of at least 1")
        inside = np.nonzero((ids >= a) & (ids <= b))[0]
        if not len(inside):
            raise ValueError(f"'{text}' selects no frame (the data's frame ids run {ids.min()}-{ids.max()})")
        keep[inside[::n]] = True
    return keep


def merge_datasets(datasets: list[PetsDataset]) -> PetsDataset:
    """Several datasets of one phase (crystals, or runs of one crystal) as one: frames and reflections
    concatenated, each frame with its own dataset's UB. Frame ids are kept where they do not collide;
    otherwise dataset k's are k * 10^d + id (10^d above every id: frame 2017 is dataset 3's 17). A
    dataset's rotation-axis azimuth differs from the first's by an angle that adds to omega exactly
    (the orientation is R_z(omega - phi) R_x(alpha) R_y(beta) UB, the goniometer axis R_z(omega - phi) x),
    so each frame's omega carries it and the header keeps the first's. ValueError where the datasets
    cannot be one: another acquisition geometry or wavelength."""
    if len(datasets) == 1:
        return datasets[0]
    first = datasets[0]
    for d in datasets[1:]:
        if d.details.geometry != first.details.geometry:
            raise ValueError(f"{d.path}: a {d.details.geometry} dataset cannot be refined with {first.path}'s "
                             f"{first.details.geometry} frames")
        if abs(d.wavelength - first.wavelength) > 1e-4 * first.wavelength:
            raise ValueError(f"{d.path}: wavelength {d.wavelength:g} A differs from {first.path}'s "
                             f"{first.wavelength:g} A (set the right one in the file, or give every file's with --wavelength)")
    all_ids = np.concatenate([d.frames.ids for d in datasets])
    collide = len(np.unique(all_ids)) < len(all_ids)
    base = 10 ** len(str(int(np.abs(all_ids).max()))) if collide else 0
    frames, refl = [], []
    for k, d in enumerate(datasets):
        f, r = d.frames, d.reflections
        ids = f.ids + k * base
        dphi = d.details.rotation_axis_deg - first.details.rotation_axis_deg
        frames.append(FrameTable(ids, f.uvw, f.half_angle_deg, f.alpha_deg, f.beta_deg, f.omega_deg - dphi, f.scale,
                                 np.repeat(np.asarray(d.ub, float)[None], len(f), 0), np.full(len(f), k),
                                 np.asarray(f.ids)))
        refl.append(ReflectionTable(r.hkl, r.intensity, r.sigma, r.frame_id + k * base))
    frames = FrameTable(*(np.concatenate([getattr(f, n) for f in frames])
                          for n in FrameTable.__dataclass_fields__))
    refl = ReflectionTable(*(np.concatenate([getattr(r, n) for r in refl])
                             for n in ReflectionTable.__dataclass_fields__))
    details = replace(first.details, dstarmax=max(d.details.dstarmax for d in datasets))
    return replace(first, path=" + ".join(d.path for d in datasets), details=details, frames=frames,
                   reflections=refl, extra={**first.extra, "datasets": [d.path for d in datasets], "frame_id_offset": base,
                          "notes": [n for d in datasets for n in d.extra.get("notes", [])]})
