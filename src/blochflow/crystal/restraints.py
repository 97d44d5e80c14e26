"""Geometric and ADP restraints: extra least-squares rows (value - target) / sigma.

Restraints are given by atom labels. A distance restraint uses the symmetry image of the second
atom nearest to the first in the start structure (operator and lattice translation fixed there),
so the restrained bond is the one a crystallographer sees. Same-ADP restraints tie the Cartesian
U tensors (all six components) of two atoms.

Config (TOML)::

    [[restraints]]
    type = "distance"      # or "same_adp"
    atoms = ["Si1", "O1"]
    target = 1.61          # A (distance only)
    sigma = 0.01           # A or A^2
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .cell import direct_basis
from .structure import Crystal


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
        kind, atoms, sigma = item.get("type"), item.get("atoms"), item.get("sigma")
        if not isinstance(atoms, (list, tuple)) or len(atoms) != 2:
            raise ValueError(f"{where}: 'atoms' must name two atoms")
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or sigma <= 0:
            raise ValueError(f"{where}: 'sigma' must be a positive number")
        i, j = (_index(labels, a, where) for a in atoms)
        if kind == "distance":
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
            raise ValueError(f"{where}: type must be 'distance' or 'same_adp', got {kind!r}")
    return out


def restraint_rows(restraints: list) -> int:
    """How many least-squares rows the restraints add (a distance one, a same-ADP six): the
    number of restraints a CIF reports (_refine_ls_number_restraints)."""
    return sum(1 if isinstance(r, DistanceRestraint) else 6 for r in restraints)


def restraint_residuals(restraints: list, cell, xyz: torch.Tensor, u_frac: torch.Tensor) -> torch.Tensor:
    """(n,) rows (value - target) / sigma; differentiable in xyz (A, 3) and u_frac (A, 3, 3)."""
    if not restraints:
        return torch.zeros(0, dtype=xyz.dtype)
    a = torch.as_tensor(direct_basis(cell), dtype=xyz.dtype)
    rows = []
    for r in restraints:
        if isinstance(r, DistanceRestraint):
            img = torch.as_tensor(r.rotation, dtype=xyz.dtype) @ xyz[r.j] + torch.as_tensor(r.translation, dtype=xyz.dtype)
            d = torch.linalg.norm(a @ (img - xyz[r.i]))
            rows.append(((d - r.target) / r.sigma)[None])
        else:
            ui, uj = a @ u_frac[r.i] @ a.T, a @ u_frac[r.j] @ a.T
            iu = torch.triu_indices(3, 3)
            rows.append((ui - uj)[iu[0], iu[1]] / r.sigma)
    return torch.cat(rows)
