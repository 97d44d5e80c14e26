"""Crystal structure as tensors: asymmetric unit, symmetry operators, expansion to the cell."""

from __future__ import annotations

from dataclasses import dataclass, field

import gemmi
import numpy as np
import torch

from ..io.structure_cif import StructureRecord
from . import cell as cellmod
from .disorder import Disorder


def lattice_allowed(hkl: np.ndarray, centring) -> np.ndarray:
    """(N,) True where h.t is an integer for every centring translation t (L, 3) (the reflections a
    centred lattice allows, the coset of 000)."""
    if len(centring) == 0:
        return np.ones(len(hkl), bool)
    # in integers of 1/gemmi.Op.DEN: a centring's 1/3 or 2/3 (R, H) carries no rounding that grows with h
    den = gemmi.Op.DEN
    tran = np.rint(np.asarray(centring, float) * den).astype(np.int64)
    return np.all((np.asarray(hkl, np.int64) @ tran.T) % den == 0, axis=1)


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

    def centring_translations(self) -> np.ndarray:
        """(L, 3) the lattice-centring translations (operators x + t, t not a lattice vector), in [0, 1)."""
        ident = np.eye(3, dtype=int)
        den = gemmi.Op.DEN  # translations are multiples of 1/DEN: compared exactly, as integers
        out = {tuple(int(v) for v in np.rint(t * den).astype(np.int64) % den)
               for r, t in zip(self.rotations, self.translations) if np.array_equal(r, ident)}
        out.discard((0, 0, 0))
        return np.array(sorted(out), float).reshape(-1, 3) / den

    def inversion_centre(self) -> np.ndarray | None:
        """(3,) fractional position of an inversion centre (t / 2 of an operator -x + t, the smallest
        such t), or None for a non-centrosymmetric group."""
        inv = [t % 1.0 for r, t in zip(self.rotations, self.translations) if np.array_equal(r, -np.eye(3, dtype=int))]
        if not inv:
            return None
        return min(inv, key=lambda t: float(np.sum(np.minimum(t, 1.0 - t) ** 2))) / 2

    def images_around(self, x_from: np.ndarray, x_to: np.ndarray, a_mat: np.ndarray):
        """Images R x_from + t + n of one fractional position near x_to, every operator with the
        lattice shift nearest x_to and its 26 neighbours: distances (S, 27) in A and the full
        translations t + n (S, 27, 3)."""
        img = np.einsum("sij,j->si", self.rotations, x_from) + self.translations  # (S, 3)
        n0 = -np.rint(img - x_to)
        shifts = np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3)  # (27, 3)
        trans = (self.translations + n0)[:, None, :] + shifts[None]  # (S, 27, 3)
        dist = np.linalg.norm(((img + n0 - x_to)[:, None, :] + shifts[None]) @ a_mat.T, axis=-1)
        return dist, trans


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
    disorder: Disorder | None = field(default=None)  # disorder groups; None: no atom in a group

    def __post_init__(self):
        if self.disorder is None:
            self.disorder = Disorder.none(len(self.labels))

    def clone(self) -> "AsymmetricUnit":
        return AsymmetricUnit(list(self.labels), list(self.elements), self.xyz.detach().clone(),
                              self.occupancy.detach().clone(), self.u_frac.detach().clone(),
                              list(self.anisotropic), self.disorder)


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


def formula_units(crystal: Crystal, tol: float = 0.01) -> tuple[dict[str, float], int]:
    """The formula of one formula unit (element -> count, Hill order: C, H, then the rest alphabetically;
    without C all alphabetically) and Z, the units per cell. The cell holds each atom's occupancy once
    per distinct image (the operators over those fixing its site); a unit is m times the asymmetric
    unit's content, m the least divisor of the operator count that makes each element's count of sites
    whole (quartz: Si O2, Z 3). Occupancies then scale the counts: a partly occupied site gives a
    fractional count (O1.8), two disorder groups summing to 1 a whole one."""
    n_ops = len(crystal.symmetry)
    weights = crystal.site_multiplicity_weights().numpy()
    occ = crystal.asu.occupancy.detach().cpu().numpy()
    per_asu: dict[str, float] = {}
    sites: dict[str, float] = {}
    for el, o, w in zip(crystal.asu.elements, occ, weights):
        e = el.capitalize()
        per_asu[e] = per_asu.get(e, 0.0) + float(o * w)
        sites[e] = sites.get(e, 0.0) + float(w)
    m = next((d for d in range(1, n_ops + 1) if n_ops % d == 0
              and all(abs(d * c - round(d * c)) <= tol for c in sites.values())), 1)
    order = sorted(per_asu, key=lambda e: ((0 if e == "C" else 1 if e == "H" else 2) if "C" in per_asu else 2, e))
    return {e: m * per_asu[e] for e in order if m * per_asu[e] > 0}, n_ops // m


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
        u_frac=torch.tensor(np.array(uf), dtype=dtype), anisotropic=aniso,
        disorder=Disorder(tuple(a.disorder_assembly for a in rec.atoms), tuple(a.disorder_group for a in rec.atoms)))
    crystal = Crystal(cell=tuple(rec.cell), symmetry=SymmetryOps.from_triplets(rec.symops), asu=asu,
                      name=rec.name)
    _check_distinct_sites(crystal)
    return crystal


def _check_distinct_sites(crystal: Crystal, tol_A: float = 0.1) -> None:
    """ValueError if two atoms sit on one site (one on a symmetry image of the other, within ``tol_A``)
    with occupancies summing above 1: a cell's whole content listed under its space group (every atom
    then counted once per operator), or a site given twice. Shared sites with partial occupancies
    (mixed or disordered) pass."""
    x = crystal.asu.xyz.detach().numpy()
    occ = crystal.asu.occupancy.detach().numpy()
    a = cellmod.direct_basis(crystal.cell)
    sym = crystal.symmetry
    images = np.einsum("sij,aj->asi", sym.rotations, x) + sym.translations  # (A, S, 3)
    for i in range(len(x)):
        d = images[i + 1:] - x[i]
        d -= np.round(d)
        dist = np.linalg.norm(d @ a.T, axis=-1).min(-1)  # (A - i - 1,) nearest image of each later atom
        for k in np.flatnonzero((dist < tol_A) & (occ[i + 1:] + occ[i] > 1 + 1e-3)):
            j = i + 1 + int(k)
            raise ValueError(f"atoms '{crystal.asu.labels[i]}' and '{crystal.asu.labels[j]}' sit on the same site "
                             f"({dist[k]:.2f} A apart by symmetry) with occupancies summing to {occ[i] + occ[j]:.3g}: "
                             f"list each site of the asymmetric unit once, or give a shared site's partial occupancies")


def inverted(crystal: Crystal) -> Crystal:
    """The inverted model (x -> -x, operators conjugated by inversion): the other hand."""
    rots = crystal.symmetry.rotations
    trans = -crystal.symmetry.translations
    asu = crystal.asu.clone()
    asu.xyz = -asu.xyz
    return Crystal(cell=crystal.cell, symmetry=SymmetryOps(rots, trans), asu=asu, name=crystal.name + "_inv")


def displaced(crystal: Crystal, shift_a: float, u_iso: float, seed: int = 0) -> Crystal:
    """A start for recovery tests: every atom moved by ``shift_a`` (A) in a random direction and given
    an isotropic U of ``u_iso`` (A^2)."""
    asu = crystal.asu.clone()
    d = np.random.default_rng(seed).normal(size=(len(asu.labels), 3))
    d *= shift_a / np.linalg.norm(d, axis=1, keepdims=True)
    asu.xyz = asu.xyz + torch.as_tensor(np.linalg.solve(cellmod.direct_basis(crystal.cell), d.T).T)
    asu.u_frac = torch.stack([torch.as_tensor(cellmod.u_iso_to_frac(u_iso, crystal.cell)) for _ in asu.labels])
    asu.anisotropic = [False] * len(asu.labels)
    return Crystal(crystal.cell, crystal.symmetry, asu)


def structure_deviation(model: Crystal, truth: Crystal, skip_elements: tuple[str, ...] = ()) -> dict:
    """Position RMSD (A) and ADP errors of ``model`` against ``truth``, atoms matched by label.

    Each model atom is compared with the nearest symmetry and lattice image of the truth site, so
    an equivalent choice of atom is not an error. ``mean_abs_dU`` is the mean |U_ij| difference
    over the six Cartesian components (A^2), ``mean_abs_dUeq`` the mean |dU_eq| (A^2) and
    ``max_rel_dUeq`` the largest |dU_eq| / U_eq.
    """
    index = {lab: i for i, lab in enumerate(truth.asu.labels)}
    basis = cellmod.direct_basis(truth.cell)
    rot, trans = truth.symmetry.rotations, truth.symmetry.translations
    dists, du, dueq, rel = [], [], [], []
    xm, xt = model.asu.xyz.detach().cpu().numpy(), truth.asu.xyz.detach().cpu().numpy()
    um, ut = model.asu.u_frac.detach().cpu().numpy(), truth.asu.u_frac.detach().cpu().numpy()
    for i, (lab, el) in enumerate(zip(model.asu.labels, model.asu.elements)):
        if lab not in index or el in skip_elements:
            continue
        j = index[lab]
        d = np.einsum("sij,j->si", rot, xm[i]) + trans - xt[j]
        d -= np.round(d)
        dists.append(float(np.min(np.linalg.norm(d @ basis.T, axis=1))))
        ca, cb = cellmod.u_frac_to_cart(um[i], truth.cell), cellmod.u_frac_to_cart(ut[j], truth.cell)
        du.extend(np.abs((ca - cb)[np.triu_indices(3)]))
        dueq.append(abs(np.trace(ca) - np.trace(cb)) / 3)
        rel.append(abs(np.trace(ca) - np.trace(cb)) / max(abs(np.trace(cb)), 1e-12))
    if not dists:
        raise ValueError("no atom labels in common between the model and the truth")
    return {"rmsd_A": float(np.sqrt(np.mean(np.square(dists)))), "max_dev_A": float(np.max(dists)),
            "mean_abs_dU": float(np.mean(du)), "mean_abs_dUeq": float(np.mean(dueq)),
            "max_rel_dUeq": float(np.max(rel)), "n_atoms": len(dists)}
