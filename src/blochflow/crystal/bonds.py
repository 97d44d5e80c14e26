"""Bond distances, angles and hydrogen bonds of a refined structure with their s.u. (the CIF's
_geom_bond, _geom_angle, _geom_hbond).

Two atoms are bonded when closer than the sum of their covalent radii + 0.4 A (the connectivity rule of
the riding model, crystal/riding.py), H...H excluded. Each bond is listed once; the angles are those
at every asymmetric-unit atom between its bonds. An s.u. is propagated from the covariance of the
structure parameters through the Jacobian of the distance or angle, riding and symmetry constraints
included (a distance the constraints fix has none); the cell is exact here, as it is not refined.
A neighbour is named by its symmetry code, operator number (1-based, in the order of the CIF's
symop loop) and lattice translation plus 5: '3_565'; '.' is the atom itself. Atoms in different groups of
one disorder assembly (crystal/disorder.py) are never bonded, nor the two ends of an angle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cell import direct_basis
from .riding import BOND_TOLERANCE_A, covalent_radius, images_within

# hydrogen bonds D-H...A as PLATON finds them: H...A below the sum of the van der Waals radii (Bondi) less
# 0.12 A, angle D-H...A above 100 degrees; acceptors N, O, F, S and the heavier halogens
VDW_RADII = {"H": 1.20, "N": 1.55, "O": 1.52, "F": 1.47, "S": 1.80, "Cl": 1.75, "Br": 1.85, "I": 1.98}
HBOND_MARGIN_A = 0.12
HBOND_MIN_ANGLE = 100.0


@dataclass(frozen=True)
class Neighbour:
    """The image R_op x_atom + t_op + shift of an asymmetric-unit atom."""

    atom: int
    op: int  # index into the symmetry's operators
    shift: tuple[int, int, int]

    def code(self, identity: int) -> str:
        if self.op == identity and self.shift == (0, 0, 0):
            return "."
        return f"{self.op + 1}_" + "".join(str(5 + s) for s in self.shift)


def _translation(symmetry, op: int) -> np.ndarray:
    """The operator's translation reduced to [0, 1), as the CIF's symop loop writes it."""
    t = np.mod(np.asarray(symmetry.translations[op], float), 1.0)
    return np.where(np.isclose(t, 1.0), 0.0, t)


def _neighbour(symmetry, atom: int, op: int, trans: np.ndarray) -> Neighbour:
    """The image of ``atom`` by operator ``op`` and full translation ``trans``, as a Neighbour."""
    shift = np.rint(trans - _translation(symmetry, op)).astype(int)
    return Neighbour(atom, op, tuple(int(v) for v in shift))


def _nearest_first(symmetry, a_mat, xyz, centre, found):
    """``images_within``'s images of each atom in order of their distance from ``centre``."""
    def key(f):
        j, s, t = f
        return j, float(np.linalg.norm(a_mat @ (symmetry.rotations[s] @ xyz[j] + t - centre)))
    return sorted(found, key=key)


def _together(symmetry, disorder, a: Neighbour, b: Neighbour) -> bool:
    """Whether two images can be present together (not alternatives of one disorder)."""
    return disorder is None or disorder.together(
        a.atom, b.atom, bool(np.allclose(symmetry.rotations[a.op], symmetry.rotations[b.op])))


def neighbours(symmetry, a_mat: np.ndarray, xyz: np.ndarray, elements: list[str],
               disorder=None) -> list[list[Neighbour]]:
    """Per asymmetric-unit atom, its bonded neighbours (images coinciding on a special position once; with
    ``disorder``, no alternative of the atom)."""
    out = []
    for i, el in enumerate(elements):
        candidates = [j for j, ej in enumerate(elements) if not (el.capitalize() == ej.capitalize() == "H")]
        found = images_within(symmetry, a_mat, xyz, xyz[i], candidates,
                              lambda j: covalent_radius(el) + covalent_radius(elements[j]) + BOND_TOLERANCE_A,
                              disorder.image_filter(symmetry, i) if disorder else None)
        found = _nearest_first(symmetry, a_mat, xyz, xyz[i], found)
        out.append([_neighbour(symmetry, j, s, t) for j, s, t in found])
    return out


def _position(symmetry, xyz: np.ndarray, nb: Neighbour) -> np.ndarray:
    """The neighbour's fractional position."""
    return symmetry.rotations[nb.op] @ xyz[nb.atom] + _translation(symmetry, nb.op) + np.array(nb.shift)


def _image(symmetry, xyz, nb: Neighbour):
    """:func:`_position` on a tensor of positions (differentiable)."""
    rot = torch.as_tensor(symmetry.rotations[nb.op], dtype=xyz.dtype)
    return rot @ xyz[nb.atom] + torch.as_tensor(_translation(symmetry, nb.op) + np.array(nb.shift), dtype=xyz.dtype)


def _angle_deg(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The angle between two vectors (degrees), by atan2: smooth where arccos is not, near 0 and 180."""
    return torch.rad2deg(torch.atan2(torch.linalg.norm(torch.linalg.cross(u, v)), u @ v))


def _inverse_image(symmetry, x: np.ndarray, nb: Neighbour) -> np.ndarray:
    """Where the inverse of the neighbour's operation takes ``x``."""
    rot = np.asarray(symmetry.rotations[nb.op], float)
    return np.linalg.solve(rot, x - _translation(symmetry, nb.op) - np.array(nb.shift))


def bond_list(symmetry, xyz: np.ndarray, near: list[list[Neighbour]]) -> list[tuple[int, Neighbour]]:
    """Each bond once: from the first atom of the pair in the asymmetric unit's order; a bond between
    images of one atom (i to g i, the same as g^-1 i to i) from the image nearer in a fixed order."""
    out = []
    for i, nbs in enumerate(near):
        for nb in nbs:
            if nb.atom > i:
                out.append((i, nb))
            elif nb.atom == i:
                here = _position(symmetry, xyz, nb)
                if tuple(np.round(here, 6)) <= tuple(np.round(_inverse_image(symmetry, xyz[i], nb), 6)):
                    out.append((i, nb))
    return out


def bonded_pairs(crystal) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Each bond of a crystal once, as (i, j, R, t): atom i to the image R x_j + t of atom j."""
    sym = crystal.symmetry
    xyz = crystal.asu.xyz.detach().cpu().numpy().astype(float)
    near = neighbours(sym, direct_basis(crystal.cell), xyz, crystal.asu.elements, crystal.asu.disorder or None)
    return [(i, nb.atom, np.asarray(sym.rotations[nb.op], float), _translation(sym, nb.op) + np.array(nb.shift))
            for i, nb in bond_list(sym, xyz, near)]


def hydrogen_bonds(symmetry, a_mat: np.ndarray, xyz: np.ndarray, elements: list[str],
                   near: list[list[Neighbour]], disorder=None) -> list[tuple[int, Neighbour, Neighbour]]:
    """(H, its donor D, an acceptor A) for each asymmetric-unit H bonded to one non-H atom and each
    acceptor image within the PLATON criteria (VDW_RADII, HBOND_MARGIN_A, HBOND_MIN_ANGLE); with
    ``disorder``, acceptors that can be present with the H and its donor."""
    out = []
    acceptors = [j for j, e in enumerate(elements) if e.capitalize() in VDW_RADII and e.capitalize() != "H"]
    for h, el in enumerate(elements):
        if el.capitalize() != "H" or len(near[h]) != 1:
            continue
        donor = near[h][0]
        d_pos = _position(symmetry, xyz, donor)
        found = images_within(symmetry, a_mat, xyz, xyz[h], acceptors,
                              lambda j: VDW_RADII["H"] + VDW_RADII[elements[j].capitalize()] - HBOND_MARGIN_A,
                              disorder.image_filter(symmetry, h) if disorder else None)
        for j, s, t in _nearest_first(symmetry, a_mat, xyz, xyz[h], found):
            acc = _neighbour(symmetry, j, s, t)
            if not _together(symmetry, disorder, donor, acc):
                continue
            pos = _position(symmetry, xyz, acc)
            u, v = (torch.as_tensor(a_mat @ (x - xyz[h])) for x in (d_pos, pos))
            if not np.allclose(pos, d_pos, atol=1e-6) and float(_angle_deg(u, v)) > HBOND_MIN_ANGLE:
                out.append((h, donor, acc))
    return out


def geometry_table(structure, theta: torch.Tensor, covariance: torch.Tensor | None):
    """(bonds, angles, hydrogen bonds) of the structure at theta (its parameters: a StructureParameters)
    as dicts with labels, symmetry codes, the values (A or degrees) and their s.u. (None where zero or
    unknown). A hydrogen bond is listed from its H in the asymmetric unit: the codes are those of its
    donor (the H's bonded atom) and its acceptor."""
    sym = structure.crystal.symmetry
    a = torch.as_tensor(structure._a, dtype=torch.float64)
    theta = torch.as_tensor(theta, dtype=torch.float64).detach()
    xyz0 = structure.physical(theta)[0].detach().numpy()
    disorder = structure.crystal.asu.disorder or None
    near = neighbours(sym, structure._a, xyz0, structure.elements, disorder)
    bonds = bond_list(sym, xyz0, near)
    angles = [(i, p, q) for i, nbs in enumerate(near) for k, p in enumerate(nbs) for q in nbs[k + 1:]
              if _together(sym, disorder, p, q)]
    hbonds = hydrogen_bonds(sym, structure._a, xyz0, structure.elements, near, disorder)
    identity = next(s for s, (r, t) in enumerate(zip(sym.rotations, sym.translations))
                    if np.array_equal(r, np.eye(3)) and not np.any(np.abs(t - np.rint(t)) > 1e-9))

    def values(th):
        xyz = structure.physical(th)[0]
        out = [torch.linalg.norm(a @ (_image(sym, xyz, nb) - xyz[i])) for i, nb in bonds]
        for i, p, q in angles:
            out.append(_angle_deg(a @ (_image(sym, xyz, p) - xyz[i]), a @ (_image(sym, xyz, q) - xyz[i])))
        for h, d, acc in hbonds:
            u, v = a @ (_image(sym, xyz, d) - xyz[h]), a @ (_image(sym, xyz, acc) - xyz[h])
            w = a @ (_image(sym, xyz, acc) - _image(sym, xyz, d))
            out += [torch.linalg.norm(u), torch.linalg.norm(v), torch.linalg.norm(w), _angle_deg(u, v)]
        return torch.stack(out) if out else torch.zeros(0, dtype=th.dtype)

    val = values(theta).detach().numpy()
    su = np.full(len(val), np.nan)
    if covariance is not None and len(val) and len(theta):
        jac = torch.autograd.functional.jacobian(values, theta).numpy()
        cov = np.asarray(torch.as_tensor(covariance).detach().cpu(), dtype=float)
        su = np.sqrt(np.clip(np.einsum("mp,pq,mq->m", jac, cov, jac), 0, None))
    su = [None if not np.isfinite(s) or s < 1e-12 else float(s) for s in su]
    lab = structure.labels
    bond_rows = [dict(label_1=lab[i], label_2=lab[nb.atom], code_2=nb.code(identity), distance=float(val[n]),
                      su=su[n]) for n, (i, nb) in enumerate(bonds)]
    off = len(bonds)
    angle_rows = [dict(label_1=lab[p.atom], label_2=lab[i], label_3=lab[q.atom], code_1=p.code(identity),
                       code_3=q.code(identity), angle=float(val[off + n]), su=su[off + n])
                  for n, (i, p, q) in enumerate(angles)]
    off += len(angles)
    hbond_rows = []
    for n, (h, d, acc) in enumerate(hbonds):
        k = off + 4 * n
        hbond_rows.append(dict(label_d=lab[d.atom], label_h=lab[h], label_a=lab[acc.atom], code_d=d.code(identity),
                               code_a=acc.code(identity),
                               **{name: float(val[k + m]) for m, name in enumerate(("dh", "ha", "da", "angle"))},
                               **{f"{name}_su": su[k + m] for m, name in enumerate(("dh", "ha", "da", "angle"))}))
    return bond_rows, angle_rows, hbond_rows
