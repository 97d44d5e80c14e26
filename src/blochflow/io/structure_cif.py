"""Structure CIF reader (gemmi) into a plain record: cell, symmetry operators, atoms."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np

from .cif_tokens import decoded_text
from .errors import InputError


@dataclass(frozen=True)
class AtomRecord:
    label: str
    element: str  # element symbol, e.g. 'Si'
    xyz: tuple[float, float, float]  # fractional
    occupancy: float
    u_iso: float  # A^2 (U_eq when anisotropic)
    u_aniso: tuple[float, float, float, float, float, float] | None  # U11 U22 U33 U12 U13 U23 (CIF frame)
    disorder_assembly: str = ""  # _atom_site_disorder_assembly ('' where none)
    disorder_group: str = ""  # _atom_site_disorder_group ('' where none or 0; SHELXL's PART)


@dataclass(frozen=True)
class StructureRecord:
    path: str
    name: str
    cell: tuple[float, float, float, float, float, float]
    symops: tuple[str, ...]  # operator triplets, 'x,y,z' first
    spacegroup: str
    atoms: tuple[AtomRecord, ...]
    notes: tuple[str, ...] = ()  # what a reader should be warned of (e.g. elements guessed from labels)


_SYMOP_TAGS = ("_space_group_symop_operation_xyz", "_symmetry_equiv_pos_as_xyz",
               "_space_group_symop.operation_xyz", "_symmetry_equiv.pos_as_xyz")
_HALL_TAGS = ("_space_group_name_Hall", "_symmetry_space_group_name_Hall", "_space_group.name_Hall",
              "_symmetry.space_group_name_Hall")
_HM_TAGS = ("_space_group_name_H-M_alt", "_symmetry_space_group_name_H-M", "_space_group.name_H-M_alt",
            "_symmetry.space_group_name_H-M")
_NUMBER_TAGS = ("_space_group_IT_number", "_symmetry_Int_Tables_number", "_space_group.IT_number",
                "_symmetry.Int_Tables_number")
_ADP_TYPES = ("Uani", "Uiso", "Uovl", "Umpe", "Bani", "Biso", "Bovl")  # the CIF dictionary's values
_ANISO_U = tuple(f"_atom_site_aniso_U_{ij}" for ij in ("11", "22", "33", "12", "13", "23"))
_ANISO_B = tuple(f"_atom_site_aniso_B_{ij}" for ij in ("11", "22", "33", "12", "13", "23"))


def _data_block(doc, path: str):
    """The one data block that holds atoms (a file may add a global or other block without them)."""
    with_atoms = [b for b in doc if len(b.find_values("_atom_site_fract_x"))]
    if not with_atoms:
        if not any(b.find_value("_cell_length_a") is not None for b in doc):
            raise InputError(path, "_cell_length_a", "missing (no data block with a cell)")
        raise InputError(path, "_atom_site loop", "missing (no data block with fractional coordinates)")
    if len(with_atoms) > 1:
        names = ", ".join(f"data_{b.name}" for b in with_atoms)
        raise InputError(path, "data blocks", f"{len(with_atoms)} blocks hold atoms ({names}); give a file with one")
    return with_atoms[0]


def _first_value(block, tags) -> tuple[str, str] | None:
    for tag in tags:
        v = block.find_value(tag)
        if v is not None and gemmi.cif.as_string(v).strip() not in ("", "?", "."):
            return tag, gemmi.cif.as_string(v).strip()
    return None


def _setting(name: str, cell: tuple, where: str, tag: str):
    """The space group a symbol names in this cell: rhombohedral groups in the setting the cell's angles
    say (R axes where a = b = c and alpha = beta = gamma != 90, else hexagonal); a symbol with two
    origin choices and no ':1' or ':2' is refused, as the two place the same coordinates at different
    sites (Si at 1/8,1/8,1/8 is a diamond in F d -3 m :2, another structure in :1)."""
    sg = gemmi.find_spacegroup_by_name(name, cell[3], cell[5])
    if sg is None:
        return None
    other = gemmi.find_spacegroup_by_name(sg.hm, cell[3], cell[5], prefer="2" if sg.ext == "1" else "1")
    if ":" not in name and other is not None and other.hall != sg.hall and {sg.ext, other.ext} == {"1", "2"}:
        raise InputError(where, tag, f"space group '{name}' has two origin choices: give the operators "
                                     f"(_space_group_symop_operation_xyz) or the choice ('{sg.hm} :1' or '{sg.hm} :2')")
    return sg


def _symmetry(block, where: str, cell: tuple) -> tuple[list[str], str]:
    """Operator triplets (identity first) and a space-group name, from the operator loop, else the
    Hall symbol, the H-M symbol or the IT number (in that order); an operator list must be a group."""
    hm = _first_value(block, _HM_TAGS)
    name = hm[1] if hm else ""
    for tag in _SYMOP_TAGS:
        col = block.find_values(tag)
        if len(col):
            ops = [gemmi.cif.as_string(v) for v in col]
            parsed = []
            for i, op in enumerate(ops):
                try:
                    parsed.append(gemmi.Op(op))
                except (RuntimeError, ValueError):
                    raise InputError(where, f"symmetry operator {i + 1}", f"cannot parse '{op}'") from None
            _check_group(parsed, where, tag)
            identity = gemmi.Op("x,y,z")
            parsed.sort(key=lambda o: o.wrap() != identity)  # identity first, the file's order otherwise
            return [o.triplet() for o in parsed], name
    hall = _first_value(block, _HALL_TAGS)
    if hall is not None:
        try:
            group = gemmi.symops_from_hall(hall[1])
        except (RuntimeError, ValueError):
            raise InputError(where, hall[0], f"unknown Hall symbol '{hall[1]}'") from None
        sg = gemmi.find_spacegroup_by_ops(group)
        return [op.triplet() for op in group], name or (sg.xhm() if sg else hall[1])
    if hm is not None:
        sg = _setting(hm[1], cell, where, hm[0])
        if sg is None:
            raise InputError(where, hm[0], f"unknown space group '{hm[1]}'")
        return [op.triplet() for op in sg.operations()], name
    number = _first_value(block, _NUMBER_TAGS)
    if number is not None:
        try:
            sg = gemmi.find_spacegroup_by_number(int(float(number[1])))
        except (RuntimeError, ValueError):
            sg = None
        if sg is None:
            raise InputError(where, number[0], f"'{number[1]}' is not a space-group number (1-230)")
        sg = _setting(sg.hm, cell, where, number[0])
        return [op.triplet() for op in sg.operations()], sg.xhm()
    raise InputError(where, "symmetry", "none given (an operator loop, a Hall or H-M symbol, or an IT number; "
                                        "write _space_group_name_H-M_alt 'P 1' for no symmetry)")


def _symmetry_notes(block, ops: list[str], cell: tuple) -> list[str]:
    """Warnings on the symmetry items: one that disagrees with the operators used (taken from the first
    of the operator loop, Hall symbol, H-M symbol and IT number), or an IT number alone for a group with
    several settings (the standard one is used: P 1 21/c 1 for 14, whatever the atoms were meant for)."""
    def op_set(group) -> frozenset:
        return frozenset(op.wrap().triplet() for op in group)

    used = op_set(gemmi.Op(o) for o in ops)
    found = gemmi.find_spacegroup_by_ops(gemmi.GroupOps([gemmi.Op(o) for o in ops]))
    used_name = found.xhm() if found else f"{len(ops)} operators"
    items = [("operator loop", None)] if any(len(block.find_values(t)) for t in _SYMOP_TAGS) else []
    items += [(tag, value) for tag, value in (_first_value(block, tags) or (None, None)
                                              for tags in (_HALL_TAGS, _HM_TAGS, _NUMBER_TAGS)) if tag]
    notes = []
    for tag, value in items[1:]:
        try:
            if tag in _HALL_TAGS:
                same = op_set(gemmi.symops_from_hall(value)) == used
            elif tag in _HM_TAGS:
                sg = _setting(value, cell, "", tag)
                same = sg is None or op_set(sg.operations()) == used
            else:
                same = found is None or int(float(value)) == found.number
        except (InputError, RuntimeError, ValueError):
            continue  # an item that names no group is the used one's business (or unused)
        if not same:
            notes.append(f"{tag} '{value}' disagrees with the symmetry used, {used_name} (from the "
                         f"{items[0][0] if items[0][1] is None else items[0][0] + ' ' + repr(items[0][1])})")
    if len(items) == 1 and items[0][0] in _NUMBER_TAGS and found is not None:
        settings = [g.xhm() for g in gemmi.spacegroup_table() if g.number == found.number]
        if len(settings) > 1:
            notes.append(f"symmetry from the IT number alone ({found.number}): read in its standard setting "
                         f"'{found.xhm()}'; give the H-M symbol or the operators for another setting "
                         f"(e.g. '{next(x for x in settings if x != found.xhm())}')")
    return notes


def _check_metric(cell: tuple, ops: list[str], where: str, tol: float = 0.03) -> None:
    """Every operator's rotation must keep the cell's metric (R^T G R = G): operators of another setting
    (hexagonal on rhombohedral axes, b-unique on a c-unique cell, tetragonal with a != b) would put the
    atoms' images at wrong distances. The tolerance, 3 % of the longest axis squared, passes a cell
    refined without symmetry constraints (lengths off by a few 0.1 %) and catches another setting
    (differences of tens of %)."""
    a, b, c = cell[:3]
    ca, cb, cg = (np.cos(np.radians(x)) for x in cell[3:])
    g = np.array([[a * a, a * b * cg, a * c * cb], [a * b * cg, b * b, b * c * ca], [a * c * cb, b * c * ca, c * c]])
    for op in ops:
        r = np.array(gemmi.Op(op).rot, float) / gemmi.Op.DEN
        if np.max(np.abs(r.T @ g @ r - g)) > tol * np.max(np.diag(g)):
            raise InputError(where, "_cell_* and symmetry", f"the cell {tuple(round(x, 4) for x in cell)} does not have "
                                                            f"the symmetry of operator '{op}' (another setting?)")


def _check_group(ops: list, where: str, tag: str) -> None:
    """The operators (translations modulo lattice vectors) must be closed under composition."""
    seen = {o.wrap().triplet() for o in ops}
    if gemmi.Op("x,y,z").triplet() not in seen:
        raise InputError(where, tag, "the operators do not include the identity x,y,z")
    for a in ops:
        for b in ops:
            c = (a * b).wrap().triplet()
            if c not in seen:
                raise InputError(where, tag, f"the operators are not a group: {a.triplet()} then {b.triplet()} "
                                             f"gives {c}, which is not listed")


def read_structure(path: str | Path) -> StructureRecord:
    """Read the data block of a structure CIF that holds atoms; raise :class:`InputError` on bad content."""
    path = str(path)
    if Path(path).is_dir():
        raise InputError(path, "file", "is a directory, not a CIF file")
    if not Path(path).is_file():
        raise InputError(path, "file", "does not exist")
    try:
        doc = gemmi.cif.read_string(decoded_text(Path(path).read_bytes()))
    except OSError as exc:
        raise InputError(path, "file", f"cannot read ({exc.strerror})") from None
    except (RuntimeError, ValueError) as exc:
        raise InputError(path, "file", f"not a readable CIF ({str(exc).splitlines()[0]})") from None
    block = _data_block(doc, path)
    where = path if len(doc) == 1 else f"{path} (data_{block.name})"

    def number(tag: str) -> float:
        v = block.find_value(tag)
        if v is None:
            raise InputError(where, tag, "missing")
        try:
            return gemmi.cif.as_number(v, default=float("nan"))
        except Exception:  # pragma: no cover - gemmi raises on odd input
            raise InputError(where, tag, f"value '{v}' is not a number") from None

    cell = tuple(number(t) for t in ("_cell_length_a", "_cell_length_b", "_cell_length_c",
                                     "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma"))
    if not all(np.isfinite(cell)) or min(cell[:3]) <= 0:
        raise InputError(where, "_cell_*", f"impossible or non-numeric cell {cell}")
    ops, hm = _symmetry(block, where, cell)
    symmetry_notes = _symmetry_notes(block, ops, cell)
    _check_metric(cell, ops, where)

    labels = block.find_values("_atom_site_label")
    if not len(labels):
        raise InputError(where, "_atom_site loop", "missing (no _atom_site_label)")
    for tag in ("_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z"):
        if len(block.find_values(tag)) != len(labels):
            raise InputError(where, tag, "missing" if not len(block.find_values(tag)) else
                             "not in the loop of _atom_site_label (Cartesian coordinates are not read)")
    table = block.find(["_atom_site_label", "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z"])
    types = block.find_values("_atom_site_type_symbol")
    occs = block.find_values("_atom_site_occupancy")
    uisos = block.find_values("_atom_site_U_iso_or_equiv")
    bisos = block.find_values("_atom_site_B_iso_or_equiv")
    adp_types = block.find_values("_atom_site_adp_type")
    assemblies = block.find_values("_atom_site_disorder_assembly")
    groups = block.find_values("_atom_site_disorder_group")
    names = [gemmi.cif.as_string(row[0]) for row in table]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(where, f"atom '{repeated[0]}'", "label used by more than one _atom_site row")
    aniso_by_label = {}
    for tags, factor in ((_ANISO_U, 1.0), (_ANISO_B, 1.0 / (8 * np.pi ** 2))):
        aniso = block.find(["_atom_site_aniso_label", *tags])
        for row in aniso:
            label = gemmi.cif.as_string(row[0])
            vals = []
            for j in range(1, 7):
                v = gemmi.cif.as_number(row[j], default=float("nan"))
                if not np.isfinite(v):
                    raise InputError(where, f"_atom_site_aniso row '{label}'", f"value '{row[j]}' is not a number")
                vals.append(v * factor)
            if label not in names:
                raise InputError(where, f"_atom_site_aniso row '{label}'", "no _atom_site row has this label")
            if label in aniso_by_label:
                raise InputError(where, f"_atom_site_aniso row '{label}'", "label given more than once")
            aniso_by_label[label] = tuple(vals)

    atoms, notes, guessed, odd_adp, ionic, large_u = [], list(symmetry_notes), [], [], [], []
    for i, row in enumerate(table):
        label = names[i]
        xyz = []
        for j in (1, 2, 3):
            v = gemmi.cif.as_number(row[j], default=float("nan"))
            if not np.isfinite(v):
                raise InputError(where, f"atom '{label}'", f"coordinate '{row[j]}' is not a number")
            xyz.append(v)
        raw_type = gemmi.cif.as_string(types[i]) if len(types) else label
        if not raw_type.strip() or raw_type in ("?", "."):  # an unknown type symbol: the label's element, noted
            raw_type = label
            guessed.append(f"{label} as {_element_symbol(label)}")
        element = _element_symbol(raw_type)
        if element is None:
            raise InputError(where, f"atom '{label}'", f"unknown element '{raw_type}'")
        if len(types) and re.fullmatch(r"[A-Za-z]+\d*[+-]\d*", raw_type.strip()):
            ionic.append(f"{label} {raw_type.strip()}")
        if not len(types) and len(element) == 2 and label[1:2].isupper() and _element_symbol(label[:1]):
            guessed.append(f"{label} as {element}")  # HO1: holmium, or the H of O1?
        occ = gemmi.cif.as_number(occs[i], default=1.0) if len(occs) else 1.0
        # a refined occupancy may exceed 1 within its s.u. (e.g. 1.004(3), as refined.cif writes it)
        if not np.isfinite(occ) or not 0 <= occ <= 1 + max(3 * _standard_uncertainty(occs[i]) if len(occs) else 0, 1e-6):
            raise InputError(where, f"atom '{label}'", f"occupancy '{occs[i]}' is not a number between 0 and 1")
        u_iso = float("nan")
        if len(uisos):
            u_iso = gemmi.cif.as_number(uisos[i], default=float("nan"))
        elif len(bisos):
            u_iso = gemmi.cif.as_number(bisos[i], default=float("nan")) / (8 * np.pi ** 2)
        u_aniso = aniso_by_label.get(label)
        if u_aniso is not None and not np.isfinite(u_iso):
            u_iso = float(np.mean(u_aniso[:3]))  # approximate U_eq for display only
        if not np.isfinite(u_iso):
            raise InputError(where, f"atom '{label}'", "no displacement parameter (U_iso or U_aniso)")
        if u_aniso is None and u_iso < 0:
            raise InputError(where, f"atom '{label}'", f"U_iso {u_iso:g} is negative")
        u_largest = u_iso if u_aniso is None else max(u_aniso[:3])
        if u_largest > LARGE_U:
            large_u.append(f"{label} {u_largest:.3g}")
        adp_type = gemmi.cif.as_string(adp_types[i]) if len(adp_types) else "?"
        if adp_type not in _ADP_TYPES + ("?", "."):
            odd_adp.append(f"{label} '{adp_type}'")
        elif adp_type in ("Uani", "Bani") and u_aniso is None:
            odd_adp.append(f"{label} '{adp_type}' without an _atom_site_aniso row (isotropic)")
        assembly, group = (_code(v[i]) if len(v) else "" for v in (assemblies, groups))
        atoms.append(AtomRecord(label, element, tuple(xyz), float(min(occ, 1.0)), float(u_iso), u_aniso,
                                assembly if group else "", group))
    aniso_types = block.find(["_atom_site_aniso_label", "_atom_site_aniso_type_symbol"])
    own = {a.label: a.element for a in atoms}
    odd_type = [f"{lab} '{typ}' (atom: {own[lab]})" for lab, typ in
                ((gemmi.cif.as_string(r[0]), gemmi.cif.as_string(r[1])) for r in aniso_types)
                if lab in own and typ not in ("", "?", ".") and _element_symbol(typ) not in (None, own[lab])]
    if odd_type:  # rows from another model, or a column shifted by a script
        notes.append(f"_atom_site_aniso_type_symbol disagrees with the atom's type: {_first_few(odd_type)}; each "
                     f"atom's own type was used")
    if odd_adp:  # the ADPs are read from the U/B items alone; a column shifted by a script shows here
        notes.append(f"_atom_site_adp_type not as the ADPs read: {_first_few(odd_adp)}; the U_iso / aniso items were used")
    if ionic:
        notes.append(f"ionic type symbols read as neutral atoms (their electron scattering factors): {_first_few(ionic)}")
    if large_u:
        notes.append(f"U above {LARGE_U:g} A^2 (rms displacement {LARGE_U ** 0.5:.2f} A): {_first_few(large_u)}"
                     "; a B value in a U item? (U = B / 8 pi^2)")
    if guessed:
        notes.append(f"{'no' if not len(types) else 'unknown (?)'} _atom_site_type_symbol: elements read from labels, "
                     f"{', '.join(guessed)}; add the type symbols if that is wrong")
    atoms = _onto_special_positions(atoms, ops, cell, notes)
    return StructureRecord(path=path, name=block.name, cell=cell, symops=tuple(ops), spacegroup=hm, notes=tuple(notes),
                           atoms=tuple(atoms))


def _first_few(items: list[str], shown: int = 5) -> str:
    """The first ``shown`` items, comma-separated, and how many more there are."""
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


LARGE_U = 0.5  # A^2: above this a U is more likely a B value (B = 8 pi^2 U) than an atom's vibration

SPECIAL_POSITION_TOL = 0.2  # A: images of an atom closer than this to it are one site (SHELXL's SPEC default)


def _onto_special_positions(atoms: list, ops: list[str], cell: tuple, notes: list) -> list:
    """Atoms whose symmetry images lie within SPECIAL_POSITION_TOL of them, with an occupancy too high
    for the images to be distinct partial atoms (disorder about the site), are moved exactly onto the
    special position: the mean of those images. Coordinates printed to 2-3 decimals (0.33, 0.67) would
    otherwise count the site's atom once per image (3x its scattering on a 3-fold axis). Each move is
    noted."""
    rot = np.array([gemmi.Op(o).rot for o in ops], float) / gemmi.Op.DEN
    tran = np.array([gemmi.Op(o).tran for o in ops], float) / gemmi.Op.DEN
    orth = np.array(gemmi.UnitCell(*cell).orth.mat)
    out = []
    for atom in atoms:
        x0 = x = np.array(atom.xyz, float)
        order = 1
        for _ in range(4):  # the mean of the near images; again, in case the first set was not a group
            img = np.einsum("sij,j->si", rot, x) + tran
            img -= np.rint(img - x)
            close = np.linalg.norm((img - x) @ orth.T, axis=1) < SPECIAL_POSITION_TOL
            order = int(close.sum())
            if order == 1 or atom.occupancy * order <= 1 + 1e-3:
                break
            new = img[close].mean(0)
            if np.linalg.norm((new - x) @ orth.T) < 1e-9:
                break
            x = new
        moved = float(np.linalg.norm((x - x0) @ orth.T))
        if moved > 1e-9:
            atom = dataclasses.replace(atom, xyz=tuple(float(v) for v in x))
        if moved > 1e-3:  # not the rounding of 0.3333 for 1/3
            notes.append(f"atom '{atom.label}' lies {moved:.3f} A from a special position (site symmetry of order "
                         f"{order}): moved onto it, ({x[0]:.6f}, {x[1]:.6f}, {x[2]:.6f})")
        out.append(atom)
    return out


def non_positive_definite(record: StructureRecord) -> list[str]:
    """Labels of the atoms whose U_ij (CIF frame) are not positive definite: such an ellipsoid has no
    physical meaning (its Debye-Waller factor grows with g in some direction)."""
    bad = []
    for a in record.atoms:
        if a.u_aniso is not None:
            u11, u22, u33, u12, u13, u23 = a.u_aniso
            if np.linalg.eigvalsh(np.array([[u11, u12, u13], [u12, u22, u23], [u13, u23, u33]])).min() <= 0:
                bad.append(a.label)
    return bad


def _code(value: str) -> str:
    """A disorder assembly or group code as a string; '' for none ('.', '?', 0, as SHELXL's PART 0)."""
    code = gemmi.cif.as_string(value).strip()
    return "" if code in (".", "?") or code.lstrip("+-") == "0" else code.lstrip("+")


def _standard_uncertainty(value: str) -> float:
    """The s.u. a CIF number carries in parentheses ('1.004(3)' -> 0.003), 0 if none (or an exponent)."""
    m = re.fullmatch(r"[+-]?\d*(?:\.(\d*))?\((\d+)\)", value.strip())
    return 0.0 if m is None else int(m.group(2)) * 10.0 ** -len(m.group(1) or "")


def _element_symbol(raw: str) -> str | None:
    """Element symbol from a CIF type symbol or label such as 'Si', 'O2-', 'SI4+', 'D', 'C1A', 'Ca1':
    the leading letters only (a label's later letters are suffixes: C1A is carbon, not calcium)."""
    match = re.match(r"[A-Za-z]+", raw.strip())
    letters = match.group(0)[:2] if match else ""
    for cand in (letters, letters[:1]):
        if not cand:
            continue
        if cand.upper() == "D":
            return "H"
        el = gemmi.Element(cand)
        if el.atomic_number > 0 and el.name.upper() == cand.upper():
            return el.name
    return None
