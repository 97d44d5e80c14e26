"""Output writers. Every file is written atomically (temporary file + rename)."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError
from .pets import PetsDataset


def atomic_write_text(path: str | Path, text: str, overwrite: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> None:
    """Write via a temporary file in the same folder, fsync, then rename: never a half-written file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(path, "output", "exists already; choose another name or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would give (mkstemp makes it private, 0600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:  # a full disk: name the file it stopped
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path, data: dict) -> None:
    """Strict JSON: NaN and infinities (an R over no observed reflection) are written as null."""
    atomic_write_text(path, json.dumps(_finite(data), indent=2, sort_keys=False, default=_json_default,
                                       allow_nan=False) + "\n")


def _finite(o):
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def write_csv(path, header: list[str], rows) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def format_pets(dataset: PetsDataset, hkl: np.ndarray, intensity: np.ndarray, sigma: np.ndarray,
                frame_id: np.ndarray, comments: list[str] = (), atoms: list[tuple] | None = None) -> str:
    """A ``.cif_pets`` text with the dataset's header and frames and the given reflections."""
    d = dataset
    out = ["data_pets"]
    for tag, v in zip(("a", "b", "c", "alpha", "beta", "gamma"), d.cell):
        kind = "length" if tag in "abc" else "angle"
        out.append(f"_cell_{kind}_{tag} {v:.5f}")
    out.append(f"_diffrn_radiation_wavelength {d.wavelength:.5f}")
    for i in range(3):
        for j in range(3):
            out.append(f"_diffrn_orient_matrix_UB_{i + 1}{j + 1} {d.ub[i, j]: .8f}")
    geo = "continuous rotation" if d.details.geometry == "continuous" else "precession"
    out += ["_diffrn_measurement_details", ";", f"data collection geometry: {geo}",
            f"dstarmax: {d.details.dstarmax:.4f}", f"RC width: {d.details.rc_width:.5f}",
            f"mosaicity: {d.details.mosaicity:.4f}",
            f"rotation axis position: {d.details.rotation_axis_deg:.6f}", ";", ""]
    out += [f"# {c}" for c in comments]
    f = d.frames
    out += ["", "loop_"] + [f"_diffrn_zone_axis_{t}" for t in
                            ("id", "u", "v", "w", "precession_angle", "alpha", "beta", "omega", "scale")]
    for i in range(len(f)):
        out.append(f"{f.ids[i]:5d} {f.uvw[i, 0]: .5f} {f.uvw[i, 1]: .5f} {f.uvw[i, 2]: .5f} "
                   f"{f.half_angle_deg[i]:.6f} {f.alpha_deg[i]:.6f} {f.beta_deg[i]:.6f} "
                   f"{f.omega_deg[i]:.6f} {f.scale[i]:.6f}")
    if atoms:
        out += ["", "loop_", "_atom_site_label", "_atom_site_type_symbol", "_atom_site_fract_x",
                "_atom_site_fract_y", "_atom_site_fract_z", "_atom_site_occupancy"]
        for lab, el, xyz, occ in atoms:
            out.append(f"{lab} {el} {xyz[0]:.6f} {xyz[1]:.6f} {xyz[2]:.6f} {occ:.4f}")
    out += ["", "loop_", "_refln_index_h", "_refln_index_k", "_refln_index_l", "_refln_intensity_meas",
            "_refln_intensity_sigma", "_refln_zone_axis_id"]
    for (h, k, l), i_, s_, fid in zip(hkl, intensity, sigma, frame_id):
        out.append(f"{h:4d} {k:4d} {l:4d} {float(i_)!r} {float(s_)!r} {fid:5d}")
    return "\n".join(out) + "\n"
