"""Disorder groups (the CIF's _atom_site_disorder_assembly and _atom_site_disorder_group, SHELXL's PART).

An atom with no group ('' or '.') is present in every alternative. Atoms in different groups of one
assembly are alternatives (one or the other is there, never both): they are never bonded to each other
and never neighbours in a riding group or a hydrogen bond. Groups of different assemblies are
independent disorders and coexist. A negative group (SHELXL's PART -n: a molecule disordered about a
symmetry element) is also an alternative to its own symmetry images (another rotation), though not to
its lattice translations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Disorder:
    """Per asymmetric-unit atom, its (assembly, group) codes; '' where the CIF gives none."""

    assembly: tuple[str, ...]
    group: tuple[str, ...]

    @classmethod
    def none(cls, n: int) -> "Disorder":
        return cls(("",) * n, ("",) * n)

    def __bool__(self) -> bool:
        return any(self.group)

    def together(self, i: int, j: int, same_rotation: bool = True) -> bool:
        """Whether atom i and an image of atom j can be present together; ``same_rotation``: the image's
        operator has the rotation of i's (a lattice translation apart), which a negative group needs."""
        gi, gj = self.group[i], self.group[j]
        if not gi or not gj or self.assembly[i] != self.assembly[j]:
            return True
        return gi == gj and (same_rotation or not gi.startswith("-"))

    def image_filter(self, symmetry, atom: int, rotation=None):
        """``images_within``'s ``keep(j, operator index)``: the images that can be present with ``atom``
        (whose own image has ``rotation``, the identity by default); None without disorder groups."""
        if not self:
            return None
        rot = np.eye(3) if rotation is None else np.asarray(rotation, float)
        return lambda j, s: self.together(atom, j, bool(np.allclose(symmetry.rotations[s], rot)))

    def all_together(self, atoms: list[tuple[int, np.ndarray]]) -> bool:
        """Whether every pair of the images (atom, rotation) can be present together."""
        return all(self.together(i, j, bool(np.allclose(ri, rj)))
                   for n, (i, ri) in enumerate(atoms) for j, rj in atoms[n + 1:])

    def parts(self) -> dict[str, dict[str, list[int]]]:
        """{assembly: {group: atoms}} of the atoms that belong to a group, in the asymmetric unit's order."""
        out: dict[str, dict[str, list[int]]] = {}
        for i, (a, g) in enumerate(zip(self.assembly, self.group)):
            if g:
                out.setdefault(a, {}).setdefault(g, []).append(i)
        return out

    def occupancy_sets(self, occupancy, members, tol: float = 0.005) -> list[tuple[str, list[tuple[str, list[int]]]]]:
        """The disorder's free variables, as [(assembly, [(group, atoms), ...]), ...]: per assembly, the
        ``members`` of its groups split into classes of one group and one start occupancy (within ``tol``),
        and the classes into sets refined together with their sum held. Where each group has a single
        occupancy, all are one set (one disorder: 0.65 + 0.35, or three groups). Otherwise the assembly
        holds independent disorders written with one group numbering (SHELXL's PART 1 and 2 with the free
        variables 21/-21 and 31/-31): classes of different groups whose occupancies sum to 1 pair up, and
        the rest are alone (one occupancy each, no sum)."""
        out = []
        for assembly, groups in self.parts().items():
            classes = []
            for g, atoms in groups.items():
                levels: list[list[int]] = []
                for i in (i for i in atoms if i in members):
                    near = next((c for c in levels if abs(occupancy[i] - occupancy[c[0]]) <= tol), None)
                    near.append(i) if near is not None else levels.append([i])
                classes += [(g, c) for c in levels]
            if len({g for g, _ in classes}) == len(classes):
                if classes:
                    out.append((assembly, classes))
                continue
            left = list(classes)
            while left:
                g, c = left.pop(0)
                mate = next((k for k, (g2, c2) in enumerate(left)
                             if g2 != g and abs(occupancy[c[0]] + occupancy[c2[0]] - 1) <= 2 * tol), None)
                out.append((assembly, [(g, c)] + ([left.pop(mate)] if mate is not None else [])))
        return out
