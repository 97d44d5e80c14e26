"""Geometric and ADP restraints: extra least-squares rows (value - target) / sigma.

Restraints are given by atom labels. A distance restraint uses the symmetry image of the second
atom nearest to the first in the start structure (operator and lattice translation fixed there),
so the restrained bond is the one a crystallographer sees. Same-ADP restraints tie the Cartesian
U tensors (all six components) of two atoms. A same-distance restraint (SHELXL's SADI) holds two or
more distances equal, each row its distance's deviation from their mean. A rigid-bond restraint
(Hirshfeld's test, the first part of SHELXL's RIGU and DELU) holds the two atoms' mean-square
displacements along their bond equal, z.U_i.z = z.U_j.z with z the unit bond vector. A similar-ADP
restraint (SHELXL's SIMU) holds the Cartesian U tensors of two bonded atoms alike, the neighbour's
tensor turned by the operator that makes the bond. Both apply to a named pair, or to every bond between
two anisotropic non-H atoms when no atoms are named (bonds as in the geometry table: covalent radii +
0.4 A, none between alternatives of one disorder).

Config (TOML)::

    [[restraints]]
    type = "distance"      # or "same_adp"
    atoms = ["Si1", "O1"]
    target = 1.61          # A (distance only)
    sigma = 0.01           # A or A^2

    [[restraints]]
    type = "same_distance"
    atoms = [["C2A", "C1"], ["C2B", "C1"]]
    sigma = 0.02           # A (the default)

    [[restraints]]
    type = "rigid_bond"    # every bond between anisotropic atoms; or atoms = ["C1", "N1"]
    sigma = 0.004          # A^2 (the default, SHELXL's RIGU)

    [[restraints]]
    type = "similar_adp"   # likewise
    sigma = 0.04           # A^2 (the default, SHELXL's SIMU)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .bonds import bonded_pairs
from .cell import direct_basis
from .structure import Crystal

SIGMA_DEFAULTS = {"same_distance": 0.02, "rigid_bond": 0.004, "similar_adp": 0.04}  # SHELXL's SADI, RIGU, SIMU


@dataclass(frozen=True)
class DistanceRestraint:
    i: int
    j: int
    rotation: np.ndarray  # (3, 3) applied to atom j
    translation: np.ndarray  # (3,) incl. the lattice vector
    target: float
    sigma: float


@dataclass(frozen=True)
class SameAdpRestraint:
    i: int
    j: int
    sigma: float


@dataclass(frozen=True)
class SameDistanceRestraint:
    pairs: tuple  # ((i, j, rotation (3, 3) applied to j, translation (3,)), ...)
    sigma: float


@dataclass(frozen=True)
class RigidBondRestraint:
    i: int
    j: int
    rotation: np.ndarray  # (3, 3) applied to atom j (and to its U)
    translation: np.ndarray
    sigma: float


@dataclass(frozen=True)
class SimilarAdpRestraint:
    i: int
    j: int
    rotation: np.ndarray  # (3, 3) applied to atom j's U
    translation: np.ndarray
    sigma: float


def _index(labels: list[str], label, where: str) -> int:
    if label not in labels:
        raise ValueError(f"{where}: no atom labelled '{label}'")
    return labels.index(label)


def nearest_image(crystal: Crystal, i: int, j: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Operator (R, t + lattice) taking atom j nearest to atom i, and that distance (A)."""
    a = direct_basis(crystal.cell)
    xi = crystal.asu.xyz[i].detach().numpy()
    xj = crystal.asu.xyz[j].detach().numpy()
    best = (None, None, np.inf)
    for rot, tr in zip(crystal.symmetry.rotations, crystal.symmetry.translations):
        img = rot @ xj + tr
        shift = np.round(xi - img)
        d = float(np.linalg.norm(a @ (img + shift - xi)))
        if d > 1e-6 and d < best[2]:  # not the atom itself
            best = (np.asarray(rot, float), np.asarray(tr + shift, float), d)
    return best


def restraints_from_config(items, crystal: Crystal) -> list:
    """Parse the ``restraints`` setting (a list of tables); ValueError names the item and problem."""
    labels = list(crystal.asu.labels)
    out = []
    for n, item in enumerate(items or []):
        where = f"restraints[{n}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a table with type, atoms, sigma")
        kind, atoms = item.get("type"), item.get("atoms")
        sigma = item.get("sigma", SIGMA_DEFAULTS.get(kind))
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or sigma <= 0:
            raise ValueError(f"{where}: 'sigma' must be a positive number")
        if kind == "same_distance":
            if (not isinstance(atoms, (list, tuple)) or len(atoms) < 2
                    or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in atoms)):
                raise ValueError(f"{where}: 'atoms' must list two or more pairs, [[a, b], [c, d]]")
            pairs = []
            for a, b in atoms:
                i, j = _index(labels, a, where), _index(labels, b, where)
                rot, tr, _ = nearest_image(crystal, i, j)
                if rot is None:
                    raise ValueError(f"{where}: no image of {b} distinct from {a}")
                pairs.append((i, j, rot, tr))
            out.append(SameDistanceRestraint(tuple(pairs), float(sigma)))
            continue
        per_bond = {"rigid_bond": RigidBondRestraint, "similar_adp": SimilarAdpRestraint}.get(kind)
        if per_bond is not None and atoms in (None, "all"):
            out += [per_bond(i, j, rot, tr, float(sigma)) for i, j, rot, tr in bonded_pairs(crystal)
                    if crystal.asu.anisotropic[i] and crystal.asu.anisotropic[j]
                    and "H" not in (crystal.asu.elements[i].capitalize(), crystal.asu.elements[j].capitalize())]
            continue
        if not isinstance(atoms, (list, tuple)) or len(atoms) != 2:
            raise ValueError(f"{where}: 'atoms' must name two atoms")
        i, j = (_index(labels, a, where) for a in atoms)
        if per_bond is not None:
            rot, tr, _ = nearest_image(crystal, i, j)
            if rot is None:
                raise ValueError(f"{where}: no image of {atoms[1]} distinct from {atoms[0]}")
            out.append(per_bond(i, j, rot, tr, float(sigma)))
        elif kind == "distance":
            target = item.get("target")
            if not isinstance(target, (int, float)) or isinstance(target, bool) or target <= 0:
                raise ValueError(f"{where}: 'target' must be a positive distance in A")
            rot, tr, _ = nearest_image(crystal, i, j)
            if rot is None:
                raise ValueError(f"{where}: no image of {atoms[1]} distinct from {atoms[0]}")
            out.append(DistanceRestraint(i, j, rot, tr, float(target), float(sigma)))
        elif kind == "same_adp":
            out.append(SameAdpRestraint(i, j, float(sigma)))
        else:
            raise ValueError(f"{where}: type must be 'distance', 'same_distance', 'same_adp', 'rigid_bond' or "
                             f"'similar_adp', got {kind!r}")
    return out


def restraint_rows(restraints: list) -> int:
    """The number of restraints a CIF reports (_refine_ls_number_restraints): a distance or rigid bond one,
    a same-ADP or similar-ADP six, n equal distances n - 1 (their n rows about the mean hold n - 1 differences)."""
    return sum(6 if isinstance(r, (SameAdpRestraint, SimilarAdpRestraint)) else len(r.pairs) - 1
               if isinstance(r, SameDistanceRestraint) else 1 for r in restraints)


def restraint_residuals(restraints: list, cell, xyz: torch.Tensor, u_frac: torch.Tensor) -> torch.Tensor:
    """(n,) rows (value - target) / sigma; differentiable in xyz (A, 3) and u_frac (A, 3, 3)."""
    if not restraints:
        return torch.zeros(0, dtype=xyz.dtype)
    a = torch.as_tensor(direct_basis(cell), dtype=xyz.dtype)
    rows = []

    def bond(i, j, rot, tr):  # Cartesian vector from atom i to the image (rot, tr) of atom j
        img = torch.as_tensor(rot, dtype=xyz.dtype) @ xyz[j] + torch.as_tensor(tr, dtype=xyz.dtype)
        return a @ (img - xyz[i])

    for r in restraints:
        if isinstance(r, DistanceRestraint):
            d = torch.linalg.norm(bond(r.i, r.j, r.rotation, r.translation))
            rows.append(((d - r.target) / r.sigma)[None])
        elif isinstance(r, SameDistanceRestraint):
            d = torch.stack([torch.linalg.norm(bond(*p)) for p in r.pairs])
            rows.append((d - d.mean()) / r.sigma)
        elif isinstance(r, RigidBondRestraint):
            z = bond(r.i, r.j, r.rotation, r.translation)
            z = z / torch.linalg.norm(z)
            rot = torch.as_tensor(r.rotation, dtype=xyz.dtype)
            ui, uj = a @ u_frac[r.i] @ a.T, a @ (rot @ u_frac[r.j] @ rot.T) @ a.T
            rows.append(((z @ ui @ z - z @ uj @ z) / r.sigma)[None])
        elif isinstance(r, SimilarAdpRestraint):
            rot = torch.as_tensor(r.rotation, dtype=xyz.dtype)
            diff = a @ (u_frac[r.i] - rot @ u_frac[r.j] @ rot.T) @ a.T
            iu = torch.triu_indices(3, 3)
            rows.append(diff[iu[0], iu[1]] / r.sigma)
        else:
            ui, uj = a @ u_frac[r.i] @ a.T, a @ u_frac[r.j] @ a.T
            iu = torch.triu_indices(3, 3)
            rows.append((ui - uj)[iu[0], iu[1]] / r.sigma)
    return torch.cat(rows)


def rigid_bond_test(structure, theta: torch.Tensor, covariance: torch.Tensor | None) -> list[dict]:
    """Hirshfeld's rigid-bond test of a refined model (a StructureParameters at theta): per bond between two
    anisotropic non-H atoms, dU = z.U_i.z - z.U_j.z (A^2, the rigid_bond restraint's value) and its s.u.
    from the covariance of theta (None where zero or unknown). Bonded atoms vibrate alike along their bond:
    a dU of several s.u. and above about 0.001 A^2 points to disorder, a wrong element or a poor ADP."""
    theta = torch.as_tensor(theta, dtype=torch.float64).detach()
    crystal = structure.crystal_at(theta)
    light = ("H", "D")
    rs = [RigidBondRestraint(i, j, rot, tr, 1.0) for i, j, rot, tr in bonded_pairs(crystal)
          if structure.anisotropic[i] and structure.anisotropic[j]
          and crystal.asu.elements[i].capitalize() not in light and crystal.asu.elements[j].capitalize() not in light]
    if not rs:
        return []

    def values(th):
        xyz, _, u = structure.physical(th)
        return restraint_residuals(rs, crystal.cell, xyz, u)

    val = values(theta).detach().numpy()
    su = [None] * len(rs)
    if covariance is not None and len(theta):
        jac = torch.autograd.functional.jacobian(values, theta).numpy()
        cov = np.asarray(torch.as_tensor(covariance).detach().cpu(), dtype=float)
        var = np.einsum("mp,pq,mq->m", jac, cov, jac)
        su = [float(np.sqrt(v)) if v > 1e-24 else None for v in var]
    lab = crystal.asu.labels
    out, seen = [], set()
    for r, v, e in zip(rs, val, su):  # bonds equivalent by a site's symmetry have one value: listed once
        key = (r.i, r.j, round(float(v), 12))
        if key not in seen:
            seen.add(key)
            out.append(dict(label_1=lab[r.i], label_2=lab[r.j], delta=float(v), su=e))
    return out
