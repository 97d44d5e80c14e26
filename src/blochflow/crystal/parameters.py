"""Refinement parameters: the map from a flat vector theta to the asymmetric-unit tensors.

Every constraint used here (special positions, site-symmetric ADPs, riding hydrogens with a fixed
offset, occupancy sums) is linear, so the map is affine, c + J theta, stored as a sparse coefficient
list and evaluated with torch: autograd carries gradients from the potential back to theta and the
constant Jacobian J propagates covariances to standard uncertainties. Idealised riding hydrogens
(crystal/riding.py) are then placed from their parents' neighbours, a smooth non-linear step.

Raw units are chosen for conditioning: positions in Angstrom along the allowed directions, ADPs as
CIF-frame U_ij or U_iso in A^2, occupancies as fractions.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch

from . import cell as cellmod
from .constraints import (U6_INDEX, U6_NAMES, _adp_basis6, _sym_from6, position_basis,
                          site_stabilizer, symmetrize_adp)
from .riding import TETRAHEDRAL, RidingGroup, bonded_images, build_groups, place_hydrogens
from .structure import AsymmetricUnit, Crystal

_W = 13  # per-atom row layout of the flat physical vector: xyz (3), occupancy (1), u_frac (9, row-major)
_XYZ, _OCC, _U = slice(0, 3), 3, slice(4, 13)
_AXES = "xyz"


# A^2: the smallest ADP eigenvalue a refinement step may leave (see StructureParameters.bounded_step)
ADP_FLOOR = 1e-4


class StructureParameters:
    """Flat parameter vector <-> (xyz, occupancy, u_frac) of the asymmetric unit, with constraints.

    Parameters are named '<label>.<what>': '.x' '.y' '.z' (Angstrom along a, b, c, or the free axis
    of a special position), '.p1' for a special-position direction not along an axis, '.U11'...
    (CIF frame, A^2; only the independent ones on special positions), '.Uiso', '.occ'.
    """

    def __init__(self, crystal: Crystal, *, refine_xyz: bool = True, refine_adp: bool = True,
                 adp: str = "keep", hydrogens: str = "riding", refine_occupancy: bool = False,
                 refine_disorder: bool = True,
                 special_tol_A: float = 0.05, site_tol_A: float = 0.1, riding_max_A: float = 1.3,
                 riding_geometry: str = "idealised", refine_torsions: bool = False):
        if adp not in ("keep", "iso", "aniso"):
            raise ValueError(f"adp must be 'keep', 'iso' or 'aniso', not {adp!r}")
        if hydrogens not in ("riding", "free", "fixed"):
            raise ValueError(f"hydrogens must be 'riding', 'free' or 'fixed', not {hydrogens!r}")
        if riding_geometry not in ("idealised", "offset"):
            raise ValueError(f"riding_geometry must be 'idealised' or 'offset', not {riding_geometry!r}")
        self.crystal = crystal
        cell = crystal.cell
        asu = crystal.asu
        self.labels, self.elements = list(asu.labels), list(asu.elements)
        a_mat = cellmod.direct_basis(cell)  # (3, 3) A per fractional unit
        self._a = a_mat
        g_dir = a_mat.T @ a_mat  # direct metric: U_eq = tr(G u_frac) / 3
        g_rec = np.linalg.inv(g_dir)  # G*: u_frac of an isotropic U = 1 A^2
        self._nvec = cellmod.reciprocal_lengths(cell)
        x_in = asu.xyz.detach().cpu().numpy().astype(float)  # (A, 3)
        occ_in = asu.occupancy.detach().cpu().numpy().astype(float)  # (A,)
        u_in = asu.u_frac.detach().cpu().numpy().astype(float)  # (A, 3, 3)
        nat = len(self.labels)
        is_h = [e.upper() in ("H", "D") for e in self.elements]
        self.mode = ["riding" if h and hydrogens == "riding" else "fixed" if h and hydrogens == "fixed"
                     else "free" for h in is_h]
        keep = list(asu.anisotropic)
        self.anisotropic = [False if m == "riding" or adp == "iso" else keep[i] if adp == "keep" or is_h[i]
                            else True for i, m in enumerate(self.mode)]
        # atoms sharing a site (a mixed or substitutional site: one position within site_tol_A, partial
        # occupancies summing to at most 1) take the position and ADP of the site's first atom, as
        # SHELXL's EXYZ and EADP: refined apart, they split and trade U for occupancy (correlations -0.99)
        self.shared: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # atom -> (first, R, t): x = R x_first + t
        candidates = [i for i in range(nat) if self.mode[i] == "free" and not is_h[i]]  # may share a site
        for j in candidates:
            for i in candidates[:candidates.index(j)]:
                if i in self.shared:
                    continue
                d, rot, tr = _nearest_image(crystal.symmetry, x_in[i], x_in[j], a_mat)
                if d < site_tol_A and occ_in[i] + occ_in[j] <= 1 + 1e-3:
                    self.shared[j] = (i, rot, tr)
                    self.anisotropic[j] = self.anisotropic[i]
                    break

        const = np.zeros(nat * _W)
        coef = [defaultdict(float) for _ in range(nat * _W)]  # row -> {parameter index: coefficient}
        self.names: list[str] = []
        start: list[float] = []
        group: list[str] = []

        def new(name, value, kind):
            self.names.append(name)
            start.append(float(value))
            group.append(kind)
            return len(self.names) - 1

        for i in range(nat):
            if self.mode[i] == "riding" or i in self.shared:
                continue
            lab, base = self.labels[i], i * _W
            free = self.mode[i] == "free"
            stab = site_stabilizer(crystal.symmetry, x_in[i], special_tol_A, cell)
            img = np.einsum("sij,j->si", stab.rotations, x_in[i]) + stab.translations - stab.shifts
            x0 = img.mean(axis=0)  # exact special-position point nearest the input
            if free and refine_xyz:
                v, fr = position_basis(stab)  # (3, k) reduced, free axes (k,)
                scale = 1.0 / np.linalg.norm(a_mat @ v, axis=0)  # fractional per Angstrom
                const[base:base + 3] = x0 - v @ x0[fr]
                for k, f in enumerate(fr):
                    name = _AXES[f] if np.count_nonzero(v[:, k]) == 1 else f"p{k + 1}"
                    p = new(f"{lab}.{name}", x0[f] / scale[k], "xyz")
                    for r in range(3):
                        if v[r, k]:
                            coef[base + r][p] = v[r, k] * scale[k]
            else:
                const[base:base + 3] = x0
            u0 = u_in[i]
            if self.anisotropic[i]:
                if not asu.anisotropic[i]:
                    u0 = np.trace(g_dir @ u0) / 3 * g_rec  # isotropic start Uiso G*
                u0 = symmetrize_adp(stab, u0)
                if free and refine_adp:
                    b6, fr = _adp_basis6(stab, cell)  # (6, m) CIF-frame basis
                    u6 = cellmod.u_frac_to_cif(u0, cell)
                    nn = np.outer(self._nvec, self._nvec)
                    for k, f in enumerate(fr):
                        p = new(f"{lab}.{U6_NAMES[f]}", u6[f], "adp")
                        for r, val in enumerate((_sym_from6(b6[:, k]) * nn).ravel()):
                            if val:
                                coef[base + 4 + r][p] = val
                else:
                    const[base + 4:base + 13] = u0.ravel()
            else:
                ueq = np.trace(g_dir @ u0) / 3
                if free and refine_adp:
                    p = new(f"{lab}.Uiso", ueq, "adp")
                    for r, val in enumerate(g_rec.ravel()):
                        coef[base + 4 + r][p] = val
                else:
                    const[base + 4:base + 13] = ueq * g_rec.ravel()

        for j, (i, rot, tr) in self.shared.items():  # x_j = R x_i + t, u_j = R u_i R^T
            jb, ib = j * _W, i * _W
            for r in range(3):
                const[jb + r] = tr[r]
                for c in range(3):
                    _add(const, coef, jb + r, ib + c, rot[r, c])
            for r, c, a, b in np.ndindex(3, 3, 3, 3):
                if rot[r, a] * rot[c, b]:
                    _add(const, coef, jb + 4 + 3 * r + c, ib + 4 + 3 * a + b, rot[r, a] * rot[c, b])

        # occupancies: atoms sharing a site (within site_tol_A, any image) keep their starting sum;
        # with refine_disorder, those of a disorder group are one parameter instead (below)
        dis = asu.disorder
        # (a negative group's occupancy is the symmetry's, 1/2 about a two-fold element, and is kept)
        in_part = {i for i in range(nat) if refine_disorder and dis.group[i] and not dis.group[i].startswith("-")}
        refined = [i for i in range(nat) if refine_occupancy and self.mode[i] == "free" and i not in in_part]
        for i in range(nat):
            const[i * _W + _OCC] = occ_in[i]
        parent_of = list(range(nat))

        def root(i):
            while parent_of[i] != i:
                i = parent_of[i]
            return i

        for n1, i in enumerate(refined):
            for j in refined[n1 + 1:]:
                if _nearest_image(crystal.symmetry, x_in[j], x_in[i], a_mat)[0] < site_tol_A:
                    parent_of[root(j)] = root(i)
        for r in sorted({root(i) for i in refined}):
            members = [i for i in refined if root(i) == r]
            total = occ_in[members].sum()
            last = members[-1] if len(members) > 1 else None
            if last is not None:
                const[last * _W + _OCC] = total
            for i in members:
                if i == last:
                    continue
                p = new(f"{self.labels[i]}.occ", occ_in[i], "occupancy")
                const[i * _W + _OCC] = 0.0
                coef[i * _W + _OCC][p] = 1.0
                if last is not None:
                    coef[last * _W + _OCC][p] = -1.0

        # disorder groups (SHELXL's PART with a free variable): one occupancy per group (per class of one
        # start occupancy where an assembly holds several disorders), scaling each of its atoms' start
        # occupancy; the classes of a set keep their starting sum (0.6 + 0.4 stays 1)
        self.disorder_parts: list[tuple[str, str, list[int], int | None, int]] = []  # + parameter, set
        sets = dis.occupancy_sets(occ_in, in_part)
        per_group = Counter((a, g) for a, classes in sets for g, _ in classes)
        for k, (assembly, classes) in enumerate(sets):
            level = [float(np.mean(occ_in[atoms])) for _, atoms in classes]
            params = []
            for n, (g, atoms) in enumerate(classes):
                p = None
                if n < len(classes) - 1 or len(classes) == 1:
                    tag = "" if per_group[assembly, g] == 1 else f"_{self.labels[atoms[0]]}"
                    p = new(f"part{assembly}{g}{tag}.occ", level[n], "occupancy")
                    params.append(p)
                self.disorder_parts.append((assembly, g, atoms, p, k))
                for i in atoms:
                    ratio = occ_in[i] / level[n] if level[n] > 0 else 1.0
                    if p is not None:
                        const[i * _W + _OCC] = 0.0
                        coef[i * _W + _OCC][p] = ratio
                    else:  # the last of a set: its sum less the others
                        const[i * _W + _OCC] = ratio * sum(level)
                        for q in params:
                            coef[i * _W + _OCC][q] = -ratio

        # riding hydrogens: parent image + fixed offset (the affine part; idealised groups replace the
        # offset by a direction from the parent's neighbours in physical()); U_iso = 1.2 U_eq(parent), 1.5 on O
        # and for three or more H on one parent (CH3, NH3, NH4+: rotating groups), as with SHELXL's HFIX 137
        theta0 = np.array(start)

        def value(row):
            return const[row] + sum(c * theta0[p] for p, c in coef[row].items())

        heavy = {i: np.array([value(i * _W + r) for r in range(3)]) for i in range(nat) if not is_h[i]}
        self.riding: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        for h in (i for i in range(nat) if self.mode[i] == "riding"):
            best = (np.inf, None, None, None)
            for j, xj in heavy.items():
                d, rot, tr = _nearest_image(crystal.symmetry, xj, x_in[h], a_mat)
                if d < best[0] and dis.together(h, j, bool(np.allclose(rot, np.eye(3)))):
                    best = (d, j, rot, tr)
            if best[0] > riding_max_A:
                near = "" if best[1] is None else f" (the nearest, {self.labels[best[1]]}, is {best[0]:.2f} A away)"
                raise ValueError(f"hydrogen {self.labels[h]}: no non-H atom within {riding_max_A} A to ride on{near}; "
                                 f"raise riding_max_distance (--set riding_max_distance=...) or refine hydrogens free "
                                 f"(--hydrogens free)")
            _, j, rot, tr = best
            self.riding[h] = (j, rot, tr)  # parent image = rot @ x_parent + tr
        # H per parent and disorder group, symmetry images included (a methyl on a three-fold axis: 3, not 1);
        # only H riding on it (a neighbour's H in a strong hydrogen bond can come within bonding distance)
        on_parent = defaultdict(list)
        for h, (j, _, _) in self.riding.items():
            on_parent[j, dis.group[h]].append(h)
        n_h = {key: max(len(hs), len(bonded_images(crystal.symmetry, a_mat, x_in, self.elements, key[0], np.eye(3),
                                                   np.zeros(3), hs, dis if dis else None)))
               for key, hs in on_parent.items()}
        self.parent = [self.riding[i][0] if i in self.riding else None for i in range(nat)]
        self.u_factor: dict[int, float] = {}  # riding H: U_iso / U_eq(parent)
        for h, (j, rot, tr) in self.riding.items():
            hb, jb = h * _W, j * _W
            offset = x_in[h] - (rot @ heavy[j] + tr)  # fixed (fractional = Cartesian, the cell is fixed)
            for r in range(3):
                const[hb + r] = tr[r] + offset[r]
                for s in range(3):
                    _add(const, coef, hb + r, jb + s, rot[r, s])
            factor = self.u_factor[h] = 1.5 if self.elements[j] == "O" or n_h[j, dis.group[h]] >= 3 else 1.2
            for r, gr in enumerate(g_rec.ravel()):
                for s, gd in enumerate(g_dir.ravel()):
                    _add(const, coef, hb + 4 + r, jb + 4 + s, factor * gr * gd / 3)
            occ_j = value(jb + _OCC)
            if occ_j > 0 and h not in in_part:  # (one in a disorder group has the group's occupancy)
                const[hb + _OCC] = 0.0
                _add(const, coef, hb + _OCC, jb + _OCC, occ_in[h] / occ_j)

        self.riding_groups: list[RidingGroup] = []
        if riding_geometry == "idealised" and self.riding:
            x_start = x_in.copy()
            for j, xj in heavy.items():
                x_start[j] = xj
            self.riding_groups = build_groups(crystal.symmetry, a_mat, x_start, self.elements, self.riding,
                                              list(heavy), occupancy=occ_in, disorder=dis)
        # an idealised H on a special position is projected back onto it after placement (the mean of its
        # site's images): a rule that places it from neighbours off that position (an O-H on a mirror whose
        # C has its other bonds off the mirror) would take it off as the neighbours move
        on_site = [(h, site_stabilizer(crystal.symmetry, x_in[h], special_tol_A, cell))
                   for g in self.riding_groups for h in g.hydrogens]
        on_site = [(h, st) for h, st in on_site if len(st.rotations) > 1]
        self._site_projection = (
            [h for h, _ in on_site], np.array([st.rotations.mean(0) for _, st in on_site]).reshape(-1, 3, 3),
            np.array([(st.translations - st.shifts).mean(0) for _, st in on_site]).reshape(-1, 3))
        # tetrahedral rotor groups (OH, SH, CH3, NH3) turn about their bond by one refined torsion each
        # (SHELXL's AFIX 137 and 147), added to the start's torsions; otherwise the start's torsions stay:
        # planar NH2, =CH2 and N-H lie in their plane, a C-H on a triple bond on its axis (AFIX 93, 43,
        # 163 do not turn), and a group with a hydrogen on a special position is held there by symmetry
        # rigid groups (water, NH4+) turn about their parent by three refined angles (about the Cartesian
        # axes, SHELXL's AFIX 6/7 without a translation), or by one where the parent's site allows one axis
        # (a two-fold axis, a mirror's normal: H in the mirror stay there)
        special = {h for h, _ in on_site}
        turns = [0 < len(g.turn_axes) < 3 or len(g.turn_axes) == 3 and not special.intersection(g.hydrogens)
                 if g.kind == "rigid" else
                 g.kind == "rotor" and abs(g.angle - TETRAHEDRAL) < 1e-9 and not special.intersection(g.hydrogens)
                 for g in self.riding_groups]
        self.rotor_groups = [g for g, t in zip(self.riding_groups, turns) if t and g.kind == "rotor"]
        self.rigid_groups = [g for g, t in zip(self.riding_groups, turns) if t and g.kind == "rigid"]
        self._turn_param: list[slice | int | None] = []  # per group: its torsion, its angles' slice, or None
        for g, t in zip(self.riding_groups, turns):
            label = self.labels[g.hydrogens[0]]
            if not (refine_torsions and refine_xyz and t):
                self._turn_param.append(None)
            elif g.kind == "rotor":
                self._turn_param.append(new(f"{label}.torsion", 0.0, "xyz"))
            elif len(g.turn_axes) == 1:
                self._turn_param.append(new(f"{label}.turn", 0.0, "xyz"))
            else:  # about x, y, z, or two axes normal to a lone X-H
                cart = np.array_equal(g.turn_axes, np.eye(3))
                first = len(self.names)
                for k in range(len(g.turn_axes)):
                    new(f"{label}.turn_{'xyz'[k] if cart else k + 1}", 0.0, "xyz")
                self._turn_param.append(slice(first, first + len(g.turn_axes)))

        rows, cols, vals = [], [], []
        for r, d in enumerate(coef):
            for p, c in d.items():
                if c != 0.0:
                    rows.append(r), cols.append(p), vals.append(c)
        order = np.argsort(np.array(rows, dtype=np.int64), kind="stable")
        self._rows = np.array(rows, dtype=np.int64)[order]
        self._cols = np.array(cols, dtype=np.int64)[order]
        self._vals = np.array(vals, dtype=float)[order]
        self._const = const
        self._torch = {}
        self.theta0 = torch.tensor(start, dtype=torch.float64)
        self.groups = {k: torch.tensor([i for i, g in enumerate(group) if g == k], dtype=torch.long)
                       for k in ("xyz", "adp", "occupancy")}
        # the atom whose own U each ADP parameter sets (riding hydrogens inherit it, never own it)
        self._adp_owner = np.full(len(start), -1, dtype=np.int64)
        for r, c in zip(self._rows, self._cols):
            atom = r // _W
            if (r % _W) >= _U.start and atom not in self.riding and group[c] == "adp":
                self._adp_owner[c] = atom

    def __len__(self) -> int:
        return len(self.names)

    def disorder_details(self) -> str:
        """The disorder groups and how their occupancies were refined, in words ('' without groups)."""
        sets: dict[int, list] = {}
        for assembly, group, atoms, _, k in self.disorder_parts:
            sets.setdefault(k, []).append((assembly, group, atoms))
        lines = []
        for parts in sets.values():
            assembly = parts[0][0]
            name = f"Disorder assembly {assembly}" if assembly else "Disorder"
            def first(atoms):  # a non-H atom names the group
                return self.labels[next((a for a in atoms if self.elements[a].capitalize() not in ("H", "D")), atoms[0])]

            each = ", ".join(f"group {g} ({len(atoms)} atoms{', ' + first(atoms) + '...' if len(sets) > 1 else ''})"
                             for _, g, atoms in parts)
            how = ("one occupancy refined for all its atoms" if len(parts) == 1 else
                   f"one occupancy per group, {len(parts) - 1} refined, the groups summing to their start")
            lines.append(f"{name}: {each}; {how}.")
        return "\n".join(lines)

    def hydrogen_details(self) -> str:
        """How the hydrogens were treated, in words for the CIF's _refine_special_details ('' without H)."""
        hs = [i for i, e in enumerate(self.elements) if e.capitalize() == "H"]
        if not hs:
            return ""
        placed = {h for g in self.riding_groups for h in g.hydrogens}
        turned = {id(g) for g, p in zip(self.riding_groups, self._turn_param) if p is not None}
        lines = []
        n_free = sum(self.mode[h] == "free" for h in hs)
        n_fixed = sum(self.mode[h] == "fixed" for h in hs)
        if n_free:
            lines.append(f"{n_free} H refined freely (positions and U_iso).")
        if n_fixed:
            lines.append(f"{n_fixed} H fixed at the start model's positions.")
        if self.riding:
            kinds: dict[str, int] = {}
            for g in self.riding_groups:
                if g.kind == "rotor":
                    what = ("OH, CH3, NH3 rotors" if abs(g.angle - TETRAHEDRAL) < 1e-9 else
                            "planar NH2, =CH2, N-H" if abs(g.angle - np.pi) > 1e-9 else "C-H on a triple bond")
                else:
                    what = {"tertiary": "tertiary C-H", "bisector": "on the external bisector (aromatic C-H, N-H)",
                            "methylene": "CH2", "rigid": "rigid water, NH4+, H3O+ groups"}[g.kind]
                if id(g) in turned:
                    what += " (turns refined)"
                kinds[what] = kinds.get(what, 0) + len(g.hydrogens)
            offset = sum(h not in placed for h in self.riding)
            if offset:
                kinds["on the start's offset from the parent"] = offset
            lines.append(f"{len(self.riding)} H riding: " + "; ".join(f"{k} {n}" for k, n in kinds.items()) + ".")
            if placed:
                lines.append("Idealised X-H distances: C-H 1.09, N-H 1.01, O-H 0.97 A.")
            lines.append("U_iso(H) = 1.2 U_eq of the parent, 1.5 on O and for three or more H on one parent.")
        return "\n".join(lines)

    # -- the map -------------------------------------------------------------------------------

    def _tensors(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._torch:
            self._torch[key] = (torch.tensor(self._const, dtype=like.dtype, device=like.device),
                                torch.tensor(self._rows, device=like.device),
                                torch.tensor(self._cols, device=like.device),
                                torch.tensor(self._vals, dtype=like.dtype, device=like.device))
        return self._torch[key]

    def physical(self, theta: torch.Tensor):
        """(xyz (A, 3) fractional, occupancy (A,), u_frac (A, 3, 3)) from theta (P,); differentiable."""
        const, rows, cols, vals = self._tensors(theta)
        flat = const.index_add(0, rows, vals * theta[cols]).view(-1, _W)
        xyz = flat[:, _XYZ]
        if self.riding_groups:
            turn = [None if p is None else theta[p] for p in self._turn_param]
            xyz = place_hydrogens(xyz, self.riding_groups, *self._basis(theta), torsions=turn)
            hs, rot, tr = self._site_projection
            if hs:
                rows = torch.as_tensor(hs, device=xyz.device)
                on = torch.einsum("kij,kj->ki", torch.as_tensor(rot, dtype=xyz.dtype, device=xyz.device), xyz[rows])
                xyz = xyz.index_copy(0, rows, on + torch.as_tensor(tr, dtype=xyz.dtype, device=xyz.device))
        return xyz, flat[:, _OCC], flat[:, _U].reshape(-1, 3, 3)

    def _basis(self, like: torch.Tensor):
        """(A, A^-1): the direct basis and its inverse as tensors like ``like`` (cached)."""
        key = ("basis", like.device, like.dtype)
        if key not in self._torch:
            a = torch.as_tensor(self._a, dtype=like.dtype, device=like.device)
            self._torch[key] = (a, torch.linalg.inv(a))
        return self._torch[key]

    def crystal_at(self, theta: torch.Tensor) -> Crystal:
        """A detached :class:`Crystal` at theta (e.g. for writing the refined model)."""
        xyz, occ, u = (t.detach().clone() for t in self.physical(theta))
        asu = AsymmetricUnit(list(self.labels), list(self.elements), xyz, occ, u, list(self.anisotropic),
                             self.crystal.asu.disorder)
        return Crystal(cell=self.crystal.cell, symmetry=self.crystal.symmetry, asu=asu, name=self.crystal.name)

    # -- ADP positivity ------------------------------------------------------------------------

    def _u_cart(self, theta) -> np.ndarray:
        u = self.physical(torch.as_tensor(theta, dtype=torch.float64).detach())[2].cpu().numpy()
        return np.einsum("ij,ajk,lk->ail", self._a, u, self._a)  # (A, 3, 3) A^2

    def adp_positive_definite(self, theta, floor: float = 0.0) -> bool:
        """True when every Cartesian ADP tensor has all eigenvalues above ``floor`` (A^2)."""
        return bool(np.all(np.linalg.eigvalsh(self._u_cart(theta)) > floor))

    def adp_at_bound(self, theta, limit: float = 2 * ADP_FLOOR) -> list[int]:
        """Atoms with refined ADPs whose smallest Cartesian ADP eigenvalue is at most ``limit`` (A^2):
        held up by the positivity bound of :meth:`bounded_step` (ADP_FLOOR), not by the data."""
        owners = np.unique(self._adp_owner[self._adp_owner >= 0])
        if not len(owners):
            return []
        lam = np.linalg.eigvalsh(self._u_cart(theta))[:, 0]
        return [int(a) for a in owners if lam[a] <= limit]

    def adp_step_scales(self, theta, delta, floor: float = ADP_FLOOR) -> np.ndarray:
        """Per atom, the largest s in (0, 1] keeping its ADP eigenvalues >= floor (A^2) along theta + s delta.

        U(s) = U0 + s D is affine, so per atom with W = U0 - f I = L L^T the bound is
        s <= -1/mu for the negative eigenvalues mu of L^-1 D L^-T. Atoms at or below twice the floor
        use f = lambda_min / 2 (they may not get worse than that; an atom sitting on the floor would
        make W singular); atoms not positive definite at theta are left unrestricted (see
        :meth:`adp_positive_definite`).
        """
        u0 = self._u_cart(theta)
        d = self._u_cart(torch.as_tensor(theta) + torch.as_tensor(delta)) - u0
        lam0 = np.linalg.eigvalsh(u0)[:, 0]
        out = np.ones(len(u0))
        ok = (lam0 > 0) & (np.abs(d).max(axis=(1, 2)) > 0)
        if not ok.any():
            return out
        f = np.where(lam0 > 2 * floor, floor, 0.5 * lam0)[ok]
        li = np.linalg.inv(np.linalg.cholesky(u0[ok] - f[:, None, None] * np.eye(3)))
        mu = np.linalg.eigvalsh(li @ d[ok] @ np.swapaxes(li, 1, 2))[:, 0]
        out[ok] = np.where(mu < 0, np.minimum(1.0, -1.0 / np.where(mu < 0, mu, -1.0)), 1.0)
        return out

    def bounded_step(self, theta, delta, floor: float = ADP_FLOOR) -> tuple[torch.Tensor, bool]:
        """``delta`` with each atom's ADP components shortened to keep that atom positive definite.

        Only the offending atom's ADP step is cut (a projection onto the feasible set), so one ADP
        at its bound does not stall every other parameter. Returns (step, whether it was cut).
        Riding hydrogens follow their parent's U_eq and need no bound of their own.
        """
        delta = torch.as_tensor(delta)
        scales = self.adp_step_scales(theta, delta, floor)
        if np.all(scales >= 1.0):
            return delta, False
        factor = torch.ones_like(delta)
        adp = self.groups["adp"].numpy()
        factor[adp] = torch.as_tensor(scales[self._adp_owner[adp]], dtype=delta.dtype)
        return delta * factor, True

    # -- standard uncertainties ----------------------------------------------------------------

    def jacobian(self) -> np.ndarray:
        """Dense d physical / d theta (A * 13, P) of the affine map: rows per atom xyz (3), occupancy,
        u_frac (9). Positions of idealised riding hydrogens are not affine and not covered (they carry no s.u.)."""
        j = np.zeros((len(self._const), len(self.names)))
        np.add.at(j, (self._rows, self._cols), self._vals)
        return j

    def standard_uncertainties(self, theta, covariance) -> list[dict]:
        """Per-atom values and s.u.s (CIF frame) from the covariance (P, P) of theta.

        The covariance is propagated through the Jacobian of :meth:`physical`; riding hydrogens get
        zero s.u. (calc_flag 'R'), as do coordinates and ADPs fixed by symmetry or by choice.
        """
        cov = np.asarray(torch.as_tensor(covariance).detach().cpu(), dtype=float)
        xyz, occ, u = (t.detach().cpu().numpy() for t in self.physical(torch.as_tensor(theta, dtype=torch.float64)))
        ninv = 1.0 / self._nvec
        t6 = np.zeros((6, 9))  # u_frac (9) -> CIF U11 U22 U33 U12 U13 U23
        for k, (i, j) in enumerate(U6_INDEX):
            t6[k, 3 * i + j] = ninv[i] * ninv[j]
        w_eq = (self._a.T @ self._a).ravel() / 3  # u_frac (9) -> U_eq
        bounds = np.searchsorted(self._rows, np.arange(len(self.labels) + 1) * _W)
        out = []
        for a, lab in enumerate(self.labels):
            sl = slice(bounds[a], bounds[a + 1])
            cols = np.unique(self._cols[sl])
            jac = np.zeros((_W, len(cols)))
            np.add.at(jac, (self._rows[sl] - a * _W, np.searchsorted(cols, self._cols[sl])), self._vals[sl])
            c = jac @ cov[np.ix_(cols, cols)] @ jac.T
            if a in self.riding:  # calculated: no s.u., bar an occupancy it shares (a disorder group's)
                c = np.diag(np.eye(_W)[_OCC] * c[_OCC, _OCC])
            cu = c[4:, 4:]
            aniso = self.anisotropic[a]

            def su(m):
                return np.sqrt(np.clip(np.diag(m), 0, None))

            # an s.u. beyond the parameter's whole range: the data do not determine it (an atom of zero
            # occupancy, a parameter no scored reflection depends on); reported as such, written without s.u.
            xyz_su = determined(su(c[:3, :3]), "xyz")
            occ_su = float(determined(np.sqrt(max(c[3, 3], 0.0)), "occupancy"))
            uiso_su = float(determined(np.sqrt(max(w_eq @ cu @ w_eq, 0.0)), "adp"))
            uani_su = determined(su(t6 @ cu @ t6.T), "adp")
            undetermined = [f"{lab}.{n}" for n, v in zip("xyz", xyz_su) if np.isnan(v)]
            if np.isnan(occ_su):
                undetermined.append(f"{lab}.occ")
            if np.isnan(uani_su).any() if aniso else np.isnan(uiso_su):
                undetermined.append(f"{lab}.U")
            out.append(dict(
                label=lab, xyz=xyz[a].tolist(), xyz_su=xyz_su.tolist(),
                occupancy=float(occ[a]), occupancy_su=occ_su,
                adp_type="Uani" if aniso else "Uiso",
                u_iso=float(w_eq @ u[a].ravel()), u_iso_su=uiso_su,
                u_aniso=(t6 @ u[a].ravel()).tolist() if aniso else None,
                u_aniso_su=uani_su.tolist() if aniso else None,
                undetermined=undetermined,
                calc_flag="R" if a in self.riding else "",
                symmetry_order=len(site_stabilizer(self.crystal.symmetry, xyz[a], 0.01, self.crystal.cell).rotations),
                disorder_assembly=self.crystal.asu.disorder.assembly[a], disorder_group=self.crystal.asu.disorder.group[a]))
        return out


# s.u. beyond which a parameter is not determined by the data: half the cell in a fractional coordinate,
# the whole range of an occupancy, 1 A^2 in a U (atoms vibrate by 0.01-0.1 A^2)
UNDETERMINED_SU = {"xyz": 0.5, "occupancy": 1.0, "adp": 1.0}


def determined(su, kind: str):
    """The s.u. (a number or an array) with NaN where it exceeds UNDETERMINED_SU[kind]."""
    su = np.asarray(su, dtype=float)
    return np.where(su > UNDETERMINED_SU[kind], np.nan, su)


def _add(const, coef, row, src, factor):
    """row += factor * src for rows of the affine map."""
    const[row] += factor * const[src]
    for p, c in coef[src].items():
        coef[row][p] += factor * c


def _nearest_image(symmetry, x_from, x_to, a_mat):
    """Shortest distance (A) from x_to to any image R x_from + t + n, and that image's (R, t + n)."""
    dist, trans = symmetry.images_around(x_from, x_to, a_mat)
    s, k = np.unravel_index(np.argmin(dist), dist.shape)
    return float(dist[s, k]), np.asarray(symmetry.rotations[s], float), trans[s, k]
