"""Refinement result files: a CIF 1.1 structure with s.u.s and an fcf-like reflection list."""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import gemmi
import numpy as np

from .. import __version__
from .writers import atomic_write_text

_ONE = Decimal(1)
SU_UNDETERMINED = 1e6  # an s.u. this many times the value (or 1) says nothing: written without one
SCATTERING_SOURCE = "electron scattering factors of neutral atoms: Lobato & Van Dyck, Acta Cryst. A70 (2014) 636-649"


def _finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def format_plain(value) -> str:
    """A number without s.u.: up to 6 decimals (6 significant digits below 1e-4, still without an
    exponent, as crystallographers write coordinates), trailing zeros dropped; '?' when unknown."""
    if not _finite(value):
        return "?"
    v = float(value)
    decimals = 6 if v == 0 or abs(v) >= 1e-4 else 5 - math.floor(math.log10(abs(v)))
    s = f"{v:.{decimals}f}".rstrip("0")
    s = s + "0" if s.endswith(".") else s
    return "0.0" if s == "-0.0" else s


def format_su(value, su) -> str:
    """``value(su)`` in IUCr notation: 2 s.u. digits when they are <= 19, else 1; value rounded alike.

    Values are never rounded above the units place (``123(25)``). Without a positive finite s.u.,
    or with one above SU_UNDETERMINED x max(1, |value|) (the data do not determine the value: an
    atom of zero occupancy), the value is written plain (:func:`format_plain`).
    """
    if not _finite(value):
        return "?"
    if not _finite(su) or float(su) <= 0 or float(su) > SU_UNDETERMINED * max(1.0, abs(float(value))):
        return format_plain(value)
    s, v = Decimal(repr(float(su))), Decimal(repr(float(value)))
    e = s.adjusted()  # power of ten of the leading digit
    two = s.scaleb(1 - e).quantize(_ONE, ROUND_HALF_UP)
    p = min(e - 1 if two <= 19 else e, 0)
    s_int = int(s.scaleb(-p).quantize(_ONE, ROUND_HALF_UP))
    vr = v.quantize(_ONE.scaleb(p), ROUND_HALF_UP)
    if vr == 0:
        vr = abs(vr)  # no '-0.000'
    return f"{vr:f}({s_int})"


@dataclass
class AtomResult:
    """One refined atom; s.u.s are None (or 0/nan) for fixed or riding parameters."""

    label: str
    element: str
    xyz: tuple[float, float, float]
    xyz_su: tuple[float, float, float] | None = None
    occupancy: float = 1.0
    occupancy_su: float | None = None
    adp_type: str = "Uiso"  # 'Uiso' | 'Uani'
    u_iso: float = float("nan")  # A^2; U_eq for Uani (computed from u_aniso when nan)
    u_iso_su: float | None = None
    u_aniso: tuple[float, ...] | None = None  # U11 U22 U33 U12 U13 U23
    u_aniso_su: tuple[float, ...] | None = None
    calc_flag: str = ""  # '' (refined: calc_flag d) or 'R' (riding: calc_flag calc, refinement_flags_posn R)
    symmetry_order: int = 1  # operators fixing the site (a special position: > 1, refinement_flags_posn S)
    disorder_assembly: str = ""  # '' where the atom is in no disorder group
    disorder_group: str = ""

    def __post_init__(self):
        if self.adp_type not in ("Uiso", "Uani"):
            raise ValueError(f"atom {self.label}: adp_type must be 'Uiso' or 'Uani', not {self.adp_type!r}")
        if self.adp_type == "Uani" and (self.u_aniso is None or len(self.u_aniso) != 6):
            raise ValueError(f"atom {self.label}: Uani needs six u_aniso values")


@dataclass
class RefinementSummary:
    """Cell, symmetry and figures of merit of a refinement (R values as fractions, not %)."""

    cell: tuple[float, float, float, float, float, float]
    space_group: str  # Hermann-Mauguin, e.g. 'P 32 2 1'
    symops: tuple[str, ...]  # operator triplets
    wavelength: float  # A
    r_obs: float  # R1 on Io > 3 sigma
    wr2: float
    gof: float
    n_reflections: int  # all
    n_obs: int  # Io > 3 sigma
    n_params: int
    n_restraints: int = 0
    max_shift_su: float = float("nan")
    r_free: float | None = None
    thickness: float | None = None  # mean crystal thickness, A
    r_all: float | None = None  # R1 on all reflections
    program: str = f"blochflow {__version__}"
    weighting: str = "w = 1/sigma^2^(Io)"
    special_details: str = ""  # _refine_special_details: how the model was constrained (e.g. its H)
    formula: dict | None = None  # element -> count of one formula unit (Hill order), for _chemical_formula_*
    z: int | None = None  # formula units per cell
    measurement: str = ""  # _diffrn_measurement_method
    theta_range: tuple | None = None  # (min, max) Bragg angle of the reflections, degrees
    hkl_limits: tuple | None = None  # ((h_min, h_max), (k_min, k_max), (l_min, l_max))
    wr2_gt: float | None = None  # wR2 of the observed (I > 3 sigma) reflections
    n_measured: int | None = None  # every scored reflection (work, free and held-out frames), all frames
    n_measured_gt: int | None = None  # of those, Io > 3 sigma (with n_measured: _reflns_number_total / _gt)
    abs_structure: str = ""  # _refine_ls_abs_structure_details: how the hand was decided (--enantiomer)
    restrained_s: float | None = None  # _refine_ls_restrained_S_all: GoF with the restraint and prior rows
    d_min: float | None = None  # A, the highest resolution of the scored reflections
    refinement_details: str = ""  # opens _refine_special_details: what the observations and parameters are
    # residual potential (max, min, rms) of the F_o - F_c Fourier map, A^-2 (report.difference_map)
    diff_density: tuple | None = None


def u_equiv(cell, u_aniso) -> float:
    """U_eq = trace(U_cart)/3 from U11 U22 U33 U12 U13 U23 (CIF convention)."""
    uc = gemmi.UnitCell(*cell)
    a = np.array(uc.orth.mat.tolist())
    rc = uc.reciprocal()
    n = np.diag([rc.a, rc.b, rc.c])
    u11, u22, u33, u12, u13, u23 = u_aniso
    u = np.array([[u11, u12, u13], [u12, u22, u23], [u13, u23, u33]])
    return float(np.trace(a @ n @ u @ n @ a.T) / 3)


def _cell_items(cell) -> list[str]:
    """_cell_length_a ... _cell_angle_gamma lines, for refined.cif and the fcf."""
    return [f"_cell_{tag} {format_plain(v)}" for tag, v in zip(
        ("length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma"), cell)]


def _q(text: str) -> str:
    return gemmi.cif.quote(str(text)) if str(text) else "."


def _su(values, i):
    return None if values is None else values[i]


def _hydrogen_treatment(atoms: list[AtomResult]) -> list[str]:
    """The CIF's _refine_ls_hydrogen_treatment: constr (riding), refall, noref, or mixed; none without H."""
    kinds = {"constr" if a.calc_flag == "R" else
             "refall" if a.xyz_su is not None and any(v > 0 for v in a.xyz_su) else "noref"
             for a in atoms if a.element.upper() in ("H", "D")}
    if not kinds:
        return []
    return [f"_refine_ls_hydrogen_treatment {kinds.pop() if len(kinds) == 1 else 'mixed'}"]


def _geometry_loops(bonds: list[dict] | None, angles: list[dict] | None, hbonds: list[dict] | None) -> list[str]:
    """_geom_bond, _geom_angle and _geom_hbond loops (rows as from crystal.bonds.geometry_table)."""
    out = []
    if bonds or angles or hbonds:
        out += ["", "_geom_special_details",
                ";", "s.u. from the full covariance matrix of the refined parameters (scaled by GoF^2);",
                "the cell is not refined and its s.u. are not included.", ";"]
    if bonds:
        out += ["", "loop_"] + [f"_geom_bond_{t}" for t in (
            "atom_site_label_1", "atom_site_label_2", "distance", "site_symmetry_2", "publ_flag")]
        out += [f"{_q(b['label_1'])} {_q(b['label_2'])} {format_su(b['distance'], b['su'])} {b['code_2']} ?"
                for b in bonds]
    if angles:
        out += ["", "loop_", "_geom_angle_atom_site_label_1", "_geom_angle_atom_site_label_2",
                "_geom_angle_atom_site_label_3", "_geom_angle", "_geom_angle_site_symmetry_1",
                "_geom_angle_site_symmetry_3", "_geom_angle_publ_flag"]
        out += [f"{_q(a['label_1'])} {_q(a['label_2'])} {_q(a['label_3'])} {format_su(a['angle'], a['su'])} "
                f"{a['code_1']} {a['code_3']} ?" for a in angles]
    if hbonds:
        out += ["", "loop_"] + [f"_geom_hbond_{t}" for t in (
            "atom_site_label_D", "atom_site_label_H", "atom_site_label_A", "distance_DH", "distance_HA",
            "distance_DA", "angle_DHA", "site_symmetry_D", "site_symmetry_H", "site_symmetry_A", "publ_flag")]
        out += [f"{_q(h['label_d'])} {_q(h['label_h'])} {_q(h['label_a'])} "
                + " ".join(format_su(h[k], h[f"{k}_su"]) for k in ("dh", "ha", "da", "angle"))
                + f" {h['code_d']} . {h['code_a']} ?" for h in hbonds]
    return out


_AMU_G = 1.66053907  # g cm^-3 per (g/mol) / A^3: 1e24 / N_A


def format_refined_cif(block_name: str, summary: RefinementSummary, atoms: list[AtomResult],
                       bonds: list[dict] | None = None, angles: list[dict] | None = None,
                       hbonds: list[dict] | None = None) -> str:
    """The text written by :func:`write_refined_cif`."""
    s = summary
    name = "".join(c if c.isalnum() or c in "_-." else "_" for c in block_name) or "blochflow"
    uc = gemmi.UnitCell(*s.cell)
    sg = gemmi.find_spacegroup_by_name(s.space_group) if s.space_group else None
    out = [f"data_{name}", "", f"_audit_creation_method {_q(s.program)}",
           f"_audit_creation_date {datetime.date.today().isoformat()}",
           f"_computing_structure_refinement {_q(s.program)}", ""]
    out += _cell_items(s.cell) + [f"_cell_volume {uc.volume:.3f}"]
    if s.formula:
        weight = sum(n * gemmi.Element(e).weight for e, n in s.formula.items())
        out += [f"_cell_formula_units_Z {int(s.z)}", "",
                f"_chemical_formula_sum {_q(' '.join(e if abs(n - 1) < 1e-6 else f'{e}{n:.4g}' for e, n in s.formula.items()))}",
                f"_chemical_formula_weight {weight:.2f}",
                f"_exptl_crystal_density_diffrn {s.z * weight * _AMU_G / uc.volume:.3f}"]
    out += ["", f"_space_group_name_H-M_alt {_q(s.space_group or '?')}"]
    if sg is not None:
        out += [f"_space_group_crystal_system {sg.crystal_system_str()}", f"_space_group_IT_number {sg.number}",
                f"_space_group_name_Hall {_q(sg.hall.strip())}"]
    out += ["loop_", "_space_group_symop_id", "_space_group_symop_operation_xyz"]
    out += [f"{i + 1} {_q(op)}" for i, op in enumerate(s.symops or ("x,y,z",))]
    out += ["", "_diffrn_radiation_type electron", "_diffrn_radiation_probe electron",
            f"_diffrn_radiation_wavelength {format_plain(s.wavelength)}",
            "_diffrn_ambient_temperature ?", "_cell_measurement_temperature ?",
            *([f"_diffrn_measurement_method {_q(s.measurement)}"] if s.measurement else []),
            f"_diffrn_reflns_number {int(s.n_reflections if s.n_measured is None else s.n_measured)}",
            *([f"_diffrn_reflns_theta_min {s.theta_range[0]:.4f}", f"_diffrn_reflns_theta_max {s.theta_range[1]:.4f}"]
              if s.theta_range else []),
            *([f"_diffrn_reflns_limit_{ax}_{end} {int(lim[e])}" for ax, lim in zip("hkl", s.hkl_limits)
               for e, end in enumerate(("min", "max"))] if s.hkl_limits else []), "",
            f"_reflns_number_total {int(s.n_reflections if s.n_measured is None else s.n_measured)}",
            f"_reflns_number_gt {int(s.n_obs if s.n_measured_gt is None else s.n_measured_gt)}",
            "_reflns_threshold_expression 'I>3sigma(I)'",
            *([] if s.d_min is None else [f"_reflns_d_resolution_high {s.d_min:.4f}"]), "",
            "_refine_ls_structure_factor_coef Fsqd", "_refine_ls_matrix_type full",
            "_refine_ls_weighting_scheme calc", f"_refine_ls_weighting_details {_q(s.weighting)}",
            f"_refine_ls_number_reflns {int(s.n_reflections)}",
            f"_refine_ls_number_parameters {int(s.n_params)}",
            f"_refine_ls_number_restraints {int(s.n_restraints)}", *_hydrogen_treatment(atoms),
            f"_refine_ls_R_factor_gt {format_plain(s.r_obs)}",
            *([] if s.r_all is None else [f"_refine_ls_R_factor_all {format_plain(s.r_all)}"]),
            f"_refine_ls_wR_factor_ref {format_plain(s.wr2)}",
            *([] if s.wr2_gt is None else [f"_refine_ls_wR_factor_gt {format_plain(s.wr2_gt)}"]),
            f"_refine_ls_goodness_of_fit_ref {format_plain(s.gof)}",
            *([] if s.restrained_s is None else [f"_refine_ls_restrained_S_all {format_plain(s.restrained_s)}"]),
            f"_refine_ls_shift/su_max {format_plain(s.max_shift_su)}", "_refine_ls_extinction_method none",
            *([f"_refine_diff_density_{n} {v:.3f}" for n, v in zip(("max", "min", "rms"), s.diff_density)]
              if s.diff_density else ["_refine_diff_density_max ?", "_refine_diff_density_min ?"])]
    if s.abs_structure:
        out += ["_refine_ls_abs_structure_details", ";", *s.abs_structure.splitlines(), ";"]
    details = "\n".join(t for t in (s.refinement_details, s.special_details) if t)
    if details:
        out += ["_refine_special_details", ";", *details.splitlines(), ";"]
    if s.formula:  # the scattering factors used, per element (checkCIF asks for their source)
        out += ["", "loop_", "_atom_type_symbol", "_atom_type_scat_source"]
        out += [f"{e} {_q(SCATTERING_SOURCE)}" for e in s.formula]
    if s.r_free is not None or s.thickness is not None:
        out += ["", "# local items (blochflow): R1 of the free (unrefined) reflections; mean thickness in A"]
        if s.r_free is not None:
            out.append(f"_blochflow_refine_R_free {format_plain(s.r_free)}")
        if s.thickness is not None:
            out.append(f"_blochflow_refine_thickness_mean {format_plain(s.thickness)}")

    disorder = any(a.disorder_group for a in atoms)
    out += ["", "loop_"] + [f"_atom_site_{t}" for t in (
        "label", "type_symbol", "fract_x", "fract_y", "fract_z", "U_iso_or_equiv", "adp_type",
        "occupancy", "site_symmetry_order", "calc_flag", "refinement_flags_posn", "refinement_flags_adp")
        + (("disorder_assembly", "disorder_group") if disorder else ())]
    for a in atoms:
        u = a.u_iso
        if a.adp_type == "Uani" and not _finite(u):
            u = u_equiv(s.cell, a.u_aniso)
        xyz = " ".join(format_su(a.xyz[i], _su(a.xyz_su, i)) for i in range(3))
        # riding: calc, and R in the position's flags (as SHELXL); S on a special position
        flags = ("R" if a.calc_flag == "R" else "") + ("S" if a.symmetry_order > 1 else "")
        out.append(f"{_q(a.label)} {_q(a.element)} {xyz} {format_su(u, a.u_iso_su)} {a.adp_type} "
                   f"{format_su(a.occupancy, a.occupancy_su)} {int(a.symmetry_order)} "
                   f"{'calc' if a.calc_flag == 'R' else 'd'} {flags or '.'} "
                   f"{'T' if a.symmetry_order > 1 and a.adp_type == 'Uani' else '.'}"
                   + (f" {_q(a.disorder_assembly or '.')} {_q(a.disorder_group or '.')}" if disorder else ""))
    aniso = [a for a in atoms if a.adp_type == "Uani"]
    if aniso:
        order = (0, 1, 2, 5, 4, 3)  # U11 U22 U33 U23 U13 U12, the SHELX order
        tags = ("U_11", "U_22", "U_33", "U_12", "U_13", "U_23")
        out += ["", "loop_", "_atom_site_aniso_label", "_atom_site_aniso_type_symbol"]
        out += [f"_atom_site_aniso_{tags[j]}" for j in order]
        for a in aniso:
            us = " ".join(format_su(a.u_aniso[j], _su(a.u_aniso_su, j)) for j in order)
            out.append(f"{_q(a.label)} {_q(a.element)} {us}")
    out += _geometry_loops(bonds, angles, hbonds)
    return "\n".join(out) + "\n"


def write_refined_cif(path: str | Path, block_name: str, summary: RefinementSummary,
                      atoms: list[AtomResult], overwrite: bool = True, bonds: list[dict] | None = None,
                      angles: list[dict] | None = None, hbonds: list[dict] | None = None) -> None:
    """Write the refined structure as CIF 1.1 (atomically; InputError if it exists and not overwrite),
    with bond distances, angles and hydrogen bonds when given."""
    atomic_write_text(path, format_refined_cif(block_name, summary, atoms, bonds, angles, hbonds), overwrite=overwrite)


_FCF_KEYS = ("frame", "h", "k", "l", "ic", "io", "sigma")


def _fcf_columns(rows):
    """Rows (dicts with frame h k l ic io sigma [obs], or 7/8-column sequences) -> column arrays."""
    rows = list(rows) if not isinstance(rows, np.ndarray) else rows
    if len(rows) and isinstance(rows[0], dict):
        cols = {k: np.array([r[k] for r in rows]) for k in _FCF_KEYS}
        obs = np.array([r["obs"] for r in rows], bool) if all("obs" in r for r in rows) else None
    else:
        arr = np.asarray(rows, dtype=float).reshape(len(rows), -1)
        if len(rows) and arr.shape[1] not in (7, 8):
            raise ValueError(f"fcf rows need 7 or 8 columns, got {arr.shape[1]}")
        cols = {k: arr[:, i] if len(rows) else np.zeros(0) for i, k in enumerate(_FCF_KEYS)}
        obs = arr[:, 7].astype(bool) if len(rows) and arr.shape[1] == 8 else None
    io, sig = cols["io"].astype(float), cols["sigma"].astype(float)
    if obs is None:
        obs = io > 3 * sig
    return cols, obs


def _num(x: float) -> str:
    return f"{x:.7g}" if math.isfinite(x) else "?"


def write_fcf(path: str | Path, rows, summary: RefinementSummary | None = None,
              block_name: str = "blochflow_fcf", overwrite: bool = True, included=None) -> None:
    """SHELX LIST 4-like reflection list (F^2 calc, F^2 meas, sigma, status 'o'/'<') plus the refinement
    status (incl: in the fit; excl: the free set or held-out frames) and a frame column.

    For dynamical 3D-ED data each reflection is listed per frame (not merged); Ic is the scaled
    calculated intensity. Status is the row's ``obs`` when given, else 'o' for Io > 3 sigma;
    ``included`` (R,) bool, default all.
    """
    cols, obs = _fcf_columns(rows)
    incl = np.ones(len(obs), bool) if included is None else np.asarray(included, bool)
    out = [f"data_{block_name}", "",
           "# SHELX LIST 4 columns, not merged: one row per reflection and frame (_refln_blochflow_frame, the",
           "# frame id); _refln_refinement_status excl marks the free set and held-out frames",
           "_shelx_refln_list_code 4", ""]
    if summary is not None:
        out += _cell_items(summary.cell) + [f"_space_group_name_H-M_alt {_q(summary.space_group or '?')}",
                f"_diffrn_radiation_wavelength {format_plain(summary.wavelength)}"]
        out += ["loop_", "_space_group_symop_operation_xyz"] + [_q(op) for op in summary.symops] + [""]
    out += ["loop_", "_refln_index_h", "_refln_index_k", "_refln_index_l", "_refln_F_squared_calc",
            "_refln_F_squared_meas", "_refln_F_squared_sigma", "_refln_observed_status",
            "_refln_refinement_status", "_refln_blochflow_frame"]
    for i in range(len(obs)):
        h, k, l, fr = (int(cols[c][i]) for c in ("h", "k", "l", "frame"))
        ic, io, sg = (float(cols[c][i]) for c in ("ic", "io", "sigma"))
        out.append(f"{h:4d}{k:4d}{l:4d} {_num(ic):>12} {_num(io):>12} {_num(sg):>12} "
                   f"{'o' if obs[i] else '<'} {'incl' if incl[i] else 'excl'} {fr:5d}")
    atomic_write_text(path, "\n".join(out) + "\n", overwrite=overwrite)
