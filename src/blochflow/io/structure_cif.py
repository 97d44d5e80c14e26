"""Structure CIF reader (gemmi) into a plain record: cell, symmetry operators, atoms."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class AtomRecord:
    label: str
    element: str  # element symbol, e.g. 'Si'
    xyz: tuple[float, float, float]  # fractional
    occupancy: float
    u_iso: float  # A^2 (U_eq when anisotropic)
    u_aniso: tuple[float, float, float, float, float, float] | None  # U11 U22 U33 U12 U13 U23 (CIF frame)


@dataclass(frozen=True)
class StructureRecord:
    path: str
    name: str
    cell: tuple[float, float, float, float, float, float]
    symops: tuple[str, ...]  # operator triplets, 'x,y,z' first
    spacegroup: str
    atoms: tuple[AtomRecord, ...]


_SYMOP_TAGS = ("_space_group_symop_operation_xyz", "_symmetry_equiv_pos_as_xyz",
               "_space_group_symop.operation_xyz")
_HM_TAGS = ("_space_group_name_h-m_alt", "_symmetry_space_group_name_h-m")


def read_structure(path: str | Path) -> StructureRecord:
    """Read the first data block of a structure CIF; raise :class:`InputError` on bad content."""
    path = str(path)
    if not Path(path).is_file():
        raise InputError(path, "file", "does not exist")
    try:
        doc = gemmi.cif.read(path)
    except (RuntimeError, ValueError) as exc:
        raise InputError(path, "file", f"not a readable CIF ({str(exc).splitlines()[0]})") from None
    block = next((b for b in doc if b.find_value("_cell_length_a") is not None), None)
    if block is None:
        raise InputError(path, "_cell_length_a", "missing (no data block with a cell)")

    def number(tag: str) -> float:
        v = block.find_value(tag)
        if v is None:
            raise InputError(path, tag, "missing")
        try:
            return gemmi.cif.as_number(v, default=float("nan"))
        except Exception:  # pragma: no cover - gemmi raises on odd input
            raise InputError(path, tag, f"value '{v}' is not a number") from None

    cell = tuple(number(t) for t in ("_cell_length_a", "_cell_length_b", "_cell_length_c",
                                     "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma"))
    if not all(np.isfinite(cell)) or min(cell[:3]) <= 0:
        raise InputError(path, "_cell_*", f"impossible or non-numeric cell {cell}")

    ops: list[str] = []
    for tag in _SYMOP_TAGS:
        col = block.find_values(tag)
        if len(col):
            ops = [gemmi.cif.as_string(v) for v in col]
            break
    hm = ""
    for tag in _HM_TAGS:
        v = block.find_value(tag)
        if v is not None:
            hm = gemmi.cif.as_string(v).strip()
            break
    if ops:
        for i, op in enumerate(ops):
            try:
                gemmi.Op(op)
            except (RuntimeError, ValueError):
                raise InputError(path, f"symmetry operator {i + 1}", f"cannot parse '{op}'") from None
    elif hm:
        sg = gemmi.find_spacegroup_by_name(hm)
        if sg is None:
            raise InputError(path, "_symmetry_space_group_name_H-M", f"unknown space group '{hm}'")
        ops = [op.triplet() for op in sg.operations()]
    else:
        ops = ["x,y,z"]

    labels = block.find_values("_atom_site_label")
    if not len(labels):
        raise InputError(path, "_atom_site loop", "missing")
    table = block.find(["_atom_site_label", "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z"])
    types = block.find_values("_atom_site_type_symbol")
    occs = block.find_values("_atom_site_occupancy")
    uisos = block.find_values("_atom_site_U_iso_or_equiv")
    bisos = block.find_values("_atom_site_B_iso_or_equiv")
    aniso = block.find(["_atom_site_aniso_label", "_atom_site_aniso_U_11", "_atom_site_aniso_U_22",
                        "_atom_site_aniso_U_33", "_atom_site_aniso_U_12", "_atom_site_aniso_U_13",
                        "_atom_site_aniso_U_23"])
    aniso_by_label = {}
    for row in aniso:
        vals = []
        for j in range(1, 7):
            v = gemmi.cif.as_number(row[j], default=float("nan"))
            if not np.isfinite(v):
                raise InputError(path, f"_atom_site_aniso row '{row[0]}'", f"value '{row[j]}' is not a number")
            vals.append(v)
        aniso_by_label[gemmi.cif.as_string(row[0])] = tuple(vals)

    atoms = []
    for i, row in enumerate(table):
        label = gemmi.cif.as_string(row[0])
        xyz = []
        for j in (1, 2, 3):
            v = gemmi.cif.as_number(row[j], default=float("nan"))
            if not np.isfinite(v):
                raise InputError(path, f"atom '{label}'", f"coordinate '{row[j]}' is not a number")
            xyz.append(v)
        raw_type = gemmi.cif.as_string(types[i]) if len(types) else label
        element = _element_symbol(raw_type)
        if element is None:
            raise InputError(path, f"atom '{label}'", f"unknown element '{raw_type}'")
        occ = gemmi.cif.as_number(occs[i], default=1.0) if len(occs) else 1.0
        if not np.isfinite(occ) or occ < 0:
            raise InputError(path, f"atom '{label}'", f"occupancy '{occs[i]}' is not a non-negative number")
        u_iso = float("nan")
        if len(uisos):
            u_iso = gemmi.cif.as_number(uisos[i], default=float("nan"))
        elif len(bisos):
            u_iso = gemmi.cif.as_number(bisos[i], default=float("nan")) / (8 * np.pi ** 2)
        u_aniso = aniso_by_label.get(label)
        if u_aniso is not None and not np.isfinite(u_iso):
            u_iso = float(np.mean(u_aniso[:3]))  # approximate U_eq for display only
        if not np.isfinite(u_iso):
            raise InputError(path, f"atom '{label}'", "no displacement parameter (U_iso or U_aniso)")
        atoms.append(AtomRecord(label, element, tuple(xyz), float(occ), float(u_iso), u_aniso))
    name = block.name
    return StructureRecord(path=path, name=name, cell=cell, symops=tuple(ops), spacegroup=hm,
                           atoms=tuple(atoms))


def _element_symbol(raw: str) -> str | None:
    """Element symbol from a CIF type symbol such as 'Si', 'O2-', 'SI4+', 'D'."""
    letters = "".join(c for c in raw.strip() if c.isalpha())[:2]
    for cand in (letters, letters[:1]):
        if not cand:
            continue
        if cand.upper() == "D":
            return "H"
        el = gemmi.Element(cand)
        if el.atomic_number > 0 and el.name.upper() == cand.upper():
            return el.name
    return None
