"""Idealised riding hydrogens: each H placed from its parent and the parent's bonded neighbours.

The rules are those of the usual riding models of small-molecule refinement (SHELXL's AFIX m = 1,
2, 3, 4, 8, 9, 13): the X-H direction follows from the current positions of the parent P and its
non-hydrogen neighbours, so the hydrogens move and turn with their group as it refines, with no
parameters of their own.

- P with three neighbours, one H (tertiary C-H): at equal angles to the three bonds, on the open side.
- two neighbours, one H (aromatic C-H, amide N-H): on the external bisector, in the plane.
- two neighbours, two H (CH2): in the plane through the bisector normal to the X-P-Y plane,
  H-P-H 109.47 degrees.
- one neighbour X, with a reference atom R bonded to X: m H at angle X-P-H (109.47 for CH3, NH3,
  OH, SH; 120 for planar NH2, =CH2 and N-H; 180 for C-H on a triple bond), at torsions R-X-P-H fixed
  at the start's (CH3 and NH3 120 degrees apart, as one rotor; NH2 and =CH2 in the R-X-P plane).
- water (O with two H, whatever its neighbours), and two to four H on a parent with no non-H neighbour
  (NH4+, H3O+; not four on an O, a disordered water's two orientations): a rigid group of ideal shape
  (H-O-H 104.5 degrees; otherwise H-X-H 109.47, a tetrahedron for four) at the orientation that best
  fits the start's hydrogens (their symmetry images included), which three refined angles may turn
  about the parent (SHELXL's AFIX 6/7 rigid groups, without a translation); on a two-fold axis or a
  mirror one angle, about the axis or the mirror's normal, and none on a site that fixes the group.
- a lone X-H (OH-, HF: one H on a parent with no non-H neighbour): its start direction, turned by two
  refined angles about axes normal to it.
Anything else (symmetry images among a group's H where the group has no rule above, or an unusual
count) rides with its starting offset.

With disorder groups (crystal/disorder.py) a parent's H of one group form their own riding group (a
methyl disordered over two sets of three H is two rotors), and only the neighbours that can be present
with them count; where those are alternatives of each other (a CH2 next to a carbon split over two
sites) the H ride with their starting offset, their geometry having no single answer.

X-H distances are rounded neutron averages (C-H 1.09, N-H 1.01, O-H 0.97, B-H 1.19, S-H 1.34 A):
electron diffraction sees the nuclei's potential, not the shortened X-ray X-H distance. Hydrogens
on other parents keep their starting distance.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from .constraints import site_stabilizer
from .disorder import Disorder

# single-bond covalent radii (A), Cordero et al., Dalton Trans. (2008) 2832; sp3 carbon
COVALENT_RADII = {
    "H": 0.31, "B": 0.84, "C": 0.76, "N": 0.71, "O": 0.66, "F": 0.57, "Si": 1.11, "P": 1.07, "S": 1.05,
    "Cl": 1.02, "Se": 1.20, "Br": 1.20, "I": 1.39, "Li": 1.28, "Na": 1.66, "Mg": 1.41, "Al": 1.21,
    "K": 2.03, "Ca": 1.76, "Ti": 1.60, "V": 1.53, "Cr": 1.39, "Mn": 1.39, "Fe": 1.32, "Co": 1.26,
    "Ni": 1.24, "Cu": 1.32, "Zn": 1.22, "Ga": 1.22, "Ge": 1.20, "As": 1.19, "Sn": 1.39, "Sb": 1.39,
}
BOND_TOLERANCE_A = 0.4  # bonded when d < r_a + r_b + tolerance (the usual connectivity rule)
XH_DISTANCE_A = {"C": 1.09, "N": 1.01, "O": 0.97, "B": 1.19, "S": 1.34}
TETRAHEDRAL = float(np.arccos(-1.0 / 3.0))  # 109.47 degrees
WATER_ANGLE = float(np.radians(104.5))  # H-O-H of water in crystals (neutron studies: 104-107 degrees)
# a reference atom whose bond to X lies within asin(0.3) = 17 degrees of the rotor's bond P-X (the chain
# C-C#N, H-C#C-C) defines no torsion: the noise in its sideways position would turn the group
LINEAR_SIN = 0.3


@dataclass
class RidingGroup:
    """The hydrogens on one parent image and the atoms (as images R x + t) that place them."""

    kind: str  # tertiary | bisector | methylene | rotor | rigid
    parent: tuple[int, np.ndarray, np.ndarray]  # (atom, R, t) of the parent image next to the H
    neighbours: list[tuple[int, np.ndarray, np.ndarray]]  # bonded non-H atoms of that image
    hydrogens: list[int]
    distance: list[float]  # P-H (A), one per hydrogen
    reference: tuple[int, np.ndarray, np.ndarray] | None = None  # rotor: an atom bonded to the neighbour
    fixed_reference: np.ndarray | None = None  # rotor on a linear chain: a Cartesian direction in its place
    angle: float = TETRAHEDRAL  # rotor: X-P-H (rad)
    phase: list[float] = field(default_factory=list)  # rotor: torsion per H (rad); methylene: sign per H
    directions: list[np.ndarray] = field(default_factory=list)  # rigid: Cartesian unit P->H at zero turn
    # rigid: the turns its parent's site allows, (k, 3) Cartesian axes: k = 3 (x, y, z) on a general
    # position, one axis on a two-fold axis or a mirror, none where the site fixes the group
    turn_axes: np.ndarray = field(default_factory=lambda: np.eye(3))


def covalent_radius(element: str) -> float:
    return COVALENT_RADII.get(element.capitalize(), 1.5)


def _cart(a_mat, rot, tr, x):
    return a_mat @ (rot @ x + tr)


def _unit(v):
    return v / np.linalg.norm(v)


def images_within(symmetry, a_mat, x_all, centre, candidates, limit,
                  keep=None) -> list[tuple[int, int, np.ndarray]]:
    """(atom, operator index, full translation t + n) of the images R x + t + n of the ``candidates``
    closer than ``limit(atom)`` A to the fractional point ``centre`` (and not on it), images coinciding on
    a special position once; ``keep(atom, operator index)``, where given, chooses among them (disorder)."""
    out = []
    for j in candidates:
        dist, trans = symmetry.images_around(x_all[j], centre, a_mat)
        seen = []
        for s, k in zip(*np.nonzero((dist < limit(j)) & (dist > 0.2))):
            if keep is not None and not keep(j, int(s)):
                continue
            pos = symmetry.rotations[s] @ x_all[j] + trans[s, k]
            if any(np.allclose(pos, q, atol=1e-6) for q in seen):  # images coinciding (special positions)
                continue
            seen.append(pos)
            out.append((j, int(s), np.asarray(trans[s, k], float)))
    return out


def bonded_images(symmetry, a_mat, x_all, elements, centre_atom, centre_rot, centre_tr, heavy,
                  disorder: Disorder | None = None):
    """Atoms of ``heavy`` (the non-H atoms, as a rule) bonded to the image (R, t) of ``centre_atom``:
    list of (atom, R', t') images, coinciding images once; with ``disorder``, only the images that can be
    present with the centre (no alternative of it)."""
    rc = covalent_radius(elements[centre_atom])
    keep = disorder.image_filter(symmetry, centre_atom, centre_rot) if disorder else None
    found = images_within(symmetry, a_mat, x_all, centre_rot @ x_all[centre_atom] + centre_tr, heavy,
                          lambda j: rc + covalent_radius(elements[j]) + BOND_TOLERANCE_A, keep)
    return [(j, np.asarray(symmetry.rotations[s], float), t) for j, s, t in found]


def build_groups(symmetry, a_mat, x_all, elements, riding: dict, heavy: list[int],
                 occupancy: np.ndarray | None = None, disorder: Disorder | None = None):
    """Riding groups for the hydrogens in ``riding`` ({h: (parent, R, t)}); those no rule fits are left out.
    The rules count a parent's H with their symmetry images (a methyl on a three-fold axis holds one H
    of the three in the asymmetric unit, which would otherwise read as a C-H on a triple bond). A rigid
    group needs its H as occupied as its parent (``occupancy``, per atom): H of lower occupancy are
    disorder (a hydroxyl H over two sites), not a water. ``disorder``: the atoms' disorder groups."""
    disorder = disorder if disorder else None
    by_parent: dict[tuple, list[int]] = {}
    for h, (j, rot, tr) in riding.items():
        key = (j, tuple(np.round(rot, 6).ravel()), tuple(np.round(tr, 6)), disorder and disorder.group[h])
        by_parent.setdefault(key, []).append(h)
    groups = []
    for hs in by_parent.values():
        j, rot, tr = riding[hs[0]]
        p_el = elements[j].capitalize()

        def with_h(found, h0=hs[0]):  # the images that can be present with the group's H
            return found if disorder is None else [
                f for f in found if disorder.together(h0, f[0], bool(np.allclose(f[1], np.eye(3))))]

        neigh = with_h(bonded_images(symmetry, a_mat, x_all, elements, j, rot, tr, heavy, disorder))
        if disorder is not None and not disorder.all_together([(k, r) for k, r, _ in neigh]):
            continue  # neighbours that are alternatives of each other: no one geometry
        n, m = len(neigh), len(hs)
        # a parent whose H are partly symmetry images of the others: a methyl (NH3) on a three-fold axis or
        # a mirror is a rotor of three with each asymmetric-unit H at its own start torsion (the images
        # follow by symmetry); anything else is left to its starting offset
        # (only H riding on this parent, and in the group's disorder group, count: an H-bonded neighbour's H
        # can come within bonding distance)
        mates = [h for h, (parent, _, _) in riding.items()
                 if parent == j and (disorder is None or disorder.group[h] == disorder.group[hs[0]])]
        images = with_h(bonded_images(symmetry, a_mat, x_all, elements, j, rot, tr, mates, disorder))
        by_symmetry = len(images) > m
        p = _cart(a_mat, rot, tr, x_all[j])
        start = {h: a_mat @ x_all[h] - p for h in hs}
        dist = [XH_DISTANCE_A.get(p_el, float(np.linalg.norm(start[h]))) for h in hs]
        # (four H on an O are a disordered water's two orientations, not one rigid group: they keep their offset)
        whole = occupancy is None or all(abs(occupancy[h] - occupancy[j]) < 0.01 for h in hs)
        if whole and (1 if n == 0 else 2) <= len(images) <= (3 if p_el == "O" else 4) and (
                n == 0 or (p_el == "O" and len(images) == 2)):
            # water, NH4+, H3O+ (and a lone X-H: OH-, HF): the ideal shape fitted to all its H, images
            # included; the asymmetric unit's H take their vertices, and the group turns only as the
            # parent's site allows, and not about the line of a lone X-H
            every = [_cart(a_mat, r, t, x_all[i]) - p for i, r, t in images]
            fitted = ([_unit(every[0])] if len(every) == 1 else
                      _fitted_shape(_ideal_shape(len(images), p_el), [_unit(v) for v in every]))
            own = [int(np.argmin([np.linalg.norm(v - start[h]) for v in every])) for h in hs]
            axes = _site_turn_axes(symmetry, a_mat, rot @ x_all[j] + tr, line=fitted[0] if len(fitted) == 1 else None)
            groups.append(RidingGroup("rigid", (j, rot, tr), neigh, hs, dist, directions=[fitted[i] for i in own],
                                      turn_axes=axes))
            continue
        if by_symmetry and not (n == 1 and len(images) == 3 and p_el in ("C", "N")):
            continue
        u = [_unit(_cart(a_mat, r, t, x_all[k]) - p) for k, r, t in neigh]
        if n == 3 and m == 1:
            groups.append(RidingGroup("tertiary", (j, rot, tr), neigh, hs, dist))
        elif n == 2 and m == 1:
            groups.append(RidingGroup("bisector", (j, rot, tr), neigh, hs, dist))
        elif n == 2 and m == 2:
            w = np.cross(u[0], u[1])
            signs = [1.0 if start[h] @ w >= 0 else -1.0 for h in hs]
            if signs[0] == signs[1]:  # both on one side in the start: order them by their projection
                order = np.argsort([-(start[h] @ w) for h in hs])
                signs = [1.0 if i == order[0] else -1.0 for i in range(2)]
            groups.append(RidingGroup("methylene", (j, rot, tr), neigh, hs, dist, phase=signs))
        elif n == 1 and 1 <= m <= 3:
            k, rk, tk = neigh[0]
            refs = [r for r in with_h(bonded_images(symmetry, a_mat, x_all, elements, k, rk, tk, heavy, disorder))
                    if not (r[0] == j and np.allclose(_cart(a_mat, r[1], r[2], x_all[j]), p, atol=1e-4))]
            if not refs or (m == 2 and p_el not in ("C", "N")):
                continue
            if by_symmetry:
                angle = TETRAHEDRAL  # CH3, NH3 of three H, some of them symmetry images
            elif m == 2 or (m == 1 and p_el == "N"):
                angle = np.radians(120.0)  # planar =CH2, NH2, N-H
            elif m == 1 and p_el == "C":
                angle = np.pi  # C-H on a triple bond
            else:
                angle = TETRAHEDRAL  # CH3, NH3, OH, SH
            x_k = _cart(a_mat, rk, tk, x_all[k])
            bent = [r for r in refs if np.linalg.norm(np.cross(u[0], _unit(_cart(a_mat, r[1], r[2], x_all[r[0]]) - x_k)))
                    > LINEAR_SIN]
            ref, fixed = (bent[0], None) if bent else (None, _fixed_reference(u[0], [start[h] for h in hs]))
            r_dir = fixed if ref is None else _cart(a_mat, ref[1], ref[2], x_all[ref[0]]) - x_k
            e, p1, p2 = _rotor_frame(u[0], r_dir)
            phi = [float(np.arctan2(start[h] @ p2, start[h] @ p1)) for h in hs]
            if by_symmetry:  # the three evenly spaced (images included); each H takes the nearest of them
                fitted = _evenly_spaced([float(np.arctan2(v @ p2, v @ p1)) for v in
                                         (_cart(a_mat, r, t, x_all[i]) - p for i, r, t in images)])
                phase = [min(fitted, key=lambda g: abs(np.angle(np.exp(1j * (g - f))))) for f in phi]
            elif m == 1:
                phase = phi
            elif m == 2:  # planar: in the R-X-P plane, trans and cis
                phase = [0.0 if np.cos(f) >= 0 else np.pi for f in phi]
                if phase[0] == phase[1]:
                    phase = [0.0, np.pi] if np.cos(phi[0]) >= np.cos(phi[1]) else [np.pi, 0.0]
            else:  # a rotor with m H evenly spaced
                phase = _evenly_spaced(phi)
            groups.append(RidingGroup("rotor", (j, rot, tr), neigh, hs, dist, reference=ref, fixed_reference=fixed,
                                      angle=float(angle), phase=phase))
    return groups


def _site_turn_axes(symmetry, a_mat: np.ndarray, site: np.ndarray, tol_A: float = 0.01,
                    line: np.ndarray | None = None) -> np.ndarray:
    """(k, 3) Cartesian unit axes spanning the turns of a group about ``site`` (fractional) that its
    site symmetry keeps: rotation vectors w with det(R) R w = w for every operator R fixing the site
    (w is an axial vector). A general position gives x, y, z; a two-fold axis or a mirror one axis
    (the two-fold, the mirror's normal); higher symmetry none or one. A group on one ``line`` (a lone
    X-H) does not turn about it: that axis is taken out where the site allows it."""
    a_inv = np.linalg.inv(a_mat)
    rows = []
    for r in site_stabilizer(symmetry, site, tol_A, basis=a_mat).rotations:
        rc = a_mat @ r @ a_inv
        rows.append(np.linalg.det(rc) * rc - np.eye(3))
    _, sv, vt = np.linalg.svd(np.vstack(rows))
    free = vt[np.abs(sv) < 1e-6]
    if line is not None and len(free) and np.linalg.norm(free @ line) > 1 - 1e-6:  # the line is an allowed axis
        _, sv, vt = np.linalg.svd(free - np.outer(free @ line, line))
        return vt[:int(np.sum(sv > 1e-6))]
    return np.eye(3) if len(free) == 3 else free


def _ideal_shape(m: int, parent: str) -> np.ndarray:
    """(m, 3) unit P->H directions of a rigid group: water's two at 104.5 degrees (two H on another
    parent at 109.47), three or four at the vertices of a regular tetrahedron."""
    if m == 2:
        half = (WATER_ANGLE if parent == "O" else TETRAHEDRAL) / 2
        return np.array([[np.sin(half), 0.0, np.cos(half)], [-np.sin(half), 0.0, np.cos(half)]])
    tetra = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float) / np.sqrt(3)
    return tetra[:m]


def _fitted_shape(shape: np.ndarray, start: list[np.ndarray]) -> list[np.ndarray]:
    """``shape``'s directions turned by the proper rotation that best fits them to the start's unit
    directions (Kabsch), each to the start H it fits best: every assignment of the shape's vertices to
    the H is tried, as the H of a tetrahedron labelled in an odd order fit no proper turn of it in the
    shape's order. A start with its H on one line leaves a free turn about it."""
    target = np.asarray(start)
    best = (np.inf, [])
    for order in itertools.permutations(range(len(shape))):
        u, _, vt = np.linalg.svd(target.T @ shape[list(order)])
        rot = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt)) or 1.0]) @ vt
        fitted = shape[list(order)] @ rot.T
        misfit = float(np.sum((fitted - target) ** 2))
        if misfit < best[0] - 1e-12:
            best = (misfit, list(fitted))
    return best[1]


def _evenly_spaced(phi: list[float]) -> list[float]:
    """Torsions of m hydrogens 2 pi / m apart nearest the start's ``phi``, in their order: the common
    phase is the circular mean of each phi less its rank's multiple of 2 pi / m."""
    m = len(phi)
    step = 2 * np.pi / m
    order = np.argsort(np.mod(phi, 2 * np.pi))
    rel = np.array([phi[i] - step * rank for rank, i in enumerate(order)])
    phi0 = float(np.angle(np.mean(np.exp(1j * rel))))
    phase = [0.0] * m
    for rank, i in enumerate(order):
        phase[i] = phi0 + step * rank
    return phase


def _fixed_reference(axis: np.ndarray, hydrogens: list[np.ndarray]) -> np.ndarray:
    """A unit direction normal to ``axis`` for a rotor whose neighbour's other bonds all run along it: the
    first start H's own sideways direction (its start torsion is then zero), or, for an H on the axis
    (a C-H on a triple bond, whose torsion means nothing), any normal."""
    for v in [h - (h @ axis) * axis for h in hydrogens] + [np.cross(axis, b) for b in np.eye(3)]:
        if np.linalg.norm(v) > LINEAR_SIN:
            return _unit(v)
    raise AssertionError("no direction normal to the axis")  # (one of three crosses always is)


def _rotor_frame(e_to_x, r_dir):
    """Orthonormal (e, p1, p2): e along P->X; p1 the part of X->R normal to e; p2 = e x p1."""
    e = e_to_x / np.linalg.norm(e_to_x)
    q = r_dir - (r_dir @ e) * e
    p1 = q / np.linalg.norm(q)
    return e, p1, np.cross(e, p1)


def _t_unit(v):
    return v / torch.linalg.norm(v)


def _axis_turn(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """The rotation by ``angle`` (radians, 0-d) about the unit ``axis`` (Rodrigues)."""
    zero = torch.zeros_like(angle)
    k = torch.stack([zero, -axis[2] + zero, axis[1] + zero, axis[2] + zero, zero, -axis[0] + zero,
                     -axis[1] + zero, axis[0] + zero, zero]).view(3, 3)
    return torch.eye(3, dtype=k.dtype, device=k.device) + torch.sin(angle) * k + (1 - torch.cos(angle)) * (k @ k)


def turn_matrix(axes, angles: torch.Tensor) -> torch.Tensor:
    """R_k(angle_k) ... R_1(angle_1): turns about fixed unit ``axes`` (k, 3), the first applied first;
    about x, y, z this is R_z R_y R_x. Smooth, the identity at zero, k independent turns near it."""
    axes = torch.as_tensor(np.asarray(axes), dtype=angles.dtype, device=angles.device)
    out = torch.eye(3, dtype=angles.dtype, device=angles.device)
    for axis, angle in zip(axes, angles.reshape(-1)):
        out = _axis_turn(axis, angle) @ out
    return out


def place_hydrogens(xyz: torch.Tensor, groups: list[RidingGroup], a_mat: torch.Tensor,
                    a_inv: torch.Tensor, torsions: list | None = None) -> torch.Tensor:
    """Fractional positions (A, 3) with each group's hydrogens placed from its parent's neighbours.

    The riding map stores the parent image next to each H, so H = (R x_P + t) + A^-1 (d u).
    ``torsions``: per group, None or a (0-d tensor) turn in radians of a rotor about its bond, added
    to each of its hydrogens' torsions R-X-P-H (X the neighbour the rotor turns about), or for a rigid
    group a tensor of turns about its ``turn_axes`` (:func:`turn_matrix`)."""
    rows, values = [], []

    def image(atom, rot, tr):
        return torch.as_tensor(rot, dtype=xyz.dtype) @ xyz[atom] + torch.as_tensor(tr, dtype=xyz.dtype)

    for n, g in enumerate(groups):
        turn = None if torsions is None else torsions[n]
        p_frac = image(*g.parent)
        p = a_mat @ p_frac
        u = [_t_unit(a_mat @ image(*nb) - p) for nb in g.neighbours]
        if g.kind == "rigid":
            dirs = [torch.as_tensor(d, dtype=xyz.dtype, device=xyz.device) for d in g.directions]
            if turn is not None:
                turned = turn_matrix(g.turn_axes, turn)
                dirs = [turned @ d for d in dirs]
        elif g.kind == "tertiary":  # the normal of the plane through the three bond-vector tips
            nrm = torch.linalg.cross(u[1] - u[0], u[2] - u[0])
            dirs = [-torch.sign(nrm @ (u[0] + u[1] + u[2])) * _t_unit(nrm)]
        elif g.kind == "bisector":
            dirs = [-_t_unit(u[0] + u[1])]
        elif g.kind == "methylene":
            b = -_t_unit(u[0] + u[1])
            w = _t_unit(torch.linalg.cross(u[0], u[1]))
            half = TETRAHEDRAL / 2
            dirs = [b * np.cos(half) + s * w * np.sin(half) for s in g.phase]
        else:
            e = u[0]
            q = (torch.as_tensor(g.fixed_reference, dtype=xyz.dtype) if g.reference is None
                 else a_mat @ (image(*g.reference) - image(*g.neighbours[0])))
            p1 = _t_unit(q - (q @ e) * e)
            p2 = torch.linalg.cross(e, p1)
            trig = [(np.cos(f), np.sin(f)) if turn is None else (torch.cos(f - turn), torch.sin(f - turn))
                    for f in g.phase]
            dirs = [e * np.cos(g.angle) + np.sin(g.angle) * (c * p1 + s * p2) for c, s in trig]
        for h, d, r in zip(g.hydrogens, dirs, g.distance):
            rows.append(h)
            values.append(p_frac + a_inv @ (r * d))
    if not rows:
        return xyz
    return xyz.index_put((torch.tensor(rows),), torch.stack(values))
