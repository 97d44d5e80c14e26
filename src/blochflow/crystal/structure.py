"""Crystal structure as tensors: asymmetric unit, symmetry operators, expansion to the cell."""

from __future__ import annotations

from dataclasses import dataclass

import gemmi
import numpy as np
import torch

from ..io.structure_cif import StructureRecord
from . import cell as cellmod


@dataclass(frozen=True)
class SymmetryOps:
    """Space-group operators x' = R x + t on fractional coordinates."""

    rotations: np.ndarray  # (S, 3, 3) int
    translations: np.ndarray  # (S, 3) float

    @classmethod
    def from_triplets(cls, triplets) -> "SymmetryOps":
        rots, trans = [], []
        for trip in triplets:
            op = gemmi.Op(trip)
            rots.append(np.array(op.rot) / gemmi.Op.DEN)
            trans.append(np.array(op.tran) / gemmi.Op.DEN)
        return cls(np.rint(np.array(rots)).astype(int), np.array(trans))

    def __len__(self) -> int:
        return len(self.rotations)


@dataclass
class AsymmetricUnit:
    """Refinable atom parameters of the asymmetric unit (tensors, may require grad).

    ``u_frac`` is the fractional covariance N U N (see :mod:`.cell`), so that the Debye-Waller
    factor is exp(-2 pi^2 h^T u_frac h) with no cell conversion in the hot path.
    """

    labels: list[str]
    elements: list[str]
    xyz: torch.Tensor  # (A, 3) fractional
    occupancy: torch.Tensor  # (A,)
    u_frac: torch.Tensor  # (A, 3, 3)
    anisotropic: list[bool]

    def clone(self) -> "AsymmetricUnit":
        return AsymmetricUnit(list(self.labels), list(self.elements), self.xyz.detach().clone(),
                              self.occupancy.detach().clone(), self.u_frac.detach().clone(),
                              list(self.anisotropic))


@dataclass
class Crystal:
    """Cell, symmetry and asymmetric unit: everything the potential needs."""

    cell: tuple
    symmetry: SymmetryOps
    asu: AsymmetricUnit
    name: str = ""

    @property
    def volume(self) -> float:
        return cellmod.cell_volume(self.cell)

    def site_multiplicity_weights(self, tol: float = 1e-3) -> torch.Tensor:
        """Per-atom weight 1/(number of operators mapping the site onto itself).

        The expansion keeps every operator's copy; on a special position copies coincide, and the
        weight makes the sum count each distinct site once.
        """
        x = self.asu.xyz.detach().cpu().numpy()
        w = []
        for xa in x:
            images = np.einsum("sij,j->si", self.symmetry.rotations, xa) + self.symmetry.translations
            d = images - xa
            d -= np.round(d)
            n_self = int(np.sum(np.linalg.norm(d, axis=1) < tol))
            w.append(1.0 / max(n_self, 1))
        return torch.tensor(w, dtype=self.asu.xyz.dtype)


def crystal_from_record(rec: StructureRecord, dtype=torch.float64) -> Crystal:
    """Build a :class:`Crystal` from a CIF record (Uani kept where given, else Uiso)."""
    xyz, occ, uf, aniso = [], [], [], []
    for a in rec.atoms:
        xyz.append(a.xyz)
        occ.append(a.occupancy)
        if a.u_aniso is not None:
            uf.append(cellmod.u_cif_to_frac(a.u_aniso, rec.cell))
            aniso.append(True)
        else:
            uf.append(cellmod.u_iso_to_frac(a.u_iso, rec.cell))
            aniso.append(False)
    asu = AsymmetricUnit(
        labels=[a.label for a in rec.atoms], elements=[a.element for a in rec.atoms],
        xyz=torch.tensor(np.array(xyz), dtype=dtype), occupancy=torch.tensor(occ, dtype=dtype),
        u_frac=torch.tensor(np.array(uf), dtype=dtype), anisotropic=aniso)
    return Crystal(cell=tuple(rec.cell), symmetry=SymmetryOps.from_triplets(rec.symops), asu=asu,
                   name=rec.name)


def inverted(crystal: Crystal) -> Crystal:
    """The inverted model (x -> -x, operators conjugated by inversion): the other hand."""
    rots = crystal.symmetry.rotations
    trans = -crystal.symmetry.translations
    asu = crystal.asu.clone()
    asu.xyz = -asu.xyz
    return Crystal(cell=crystal.cell, symmetry=SymmetryOps(rots, trans), asu=asu, name=crystal.name + "_inv")
