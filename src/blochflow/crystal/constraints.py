"""Site-symmetry constraints: special positions and symmetry-restricted ADPs.

An atom on a special position is mapped onto itself (up to a lattice vector) by a subgroup of the
space group, its stabilizer. Its coordinates may then only move within the subspace fixed by every
stabilizer rotation, and its ADP tensor must be invariant under them (u = R u R^T, since u_frac is the
covariance of fractional displacements). Refining such atoms freely makes the normal equations
singular, so these functions give the reduced parameterisations.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import cell as cellmod

# CIF order of the six independent U components and their (i, j) positions in the 3x3 tensor
U6_NAMES = ("U11", "U22", "U33", "U12", "U13", "U23")
U6_INDEX = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


class Stabilizer(NamedTuple):
    """Operators with R x + t = x + n for one site (n the lattice shift that brings the image back)."""

    rotations: np.ndarray  # (k, 3, 3) int
    translations: np.ndarray  # (k, 3) fractional
    shifts: np.ndarray  # (k, 3) int lattice vectors n

    def __len__(self) -> int:
        return len(self.rotations)


def site_stabilizer(symmetry, xyz_frac, tol_A: float = 0.05, cell=None, basis=None) -> Stabilizer:
    """Operators mapping the site onto itself within ``tol_A`` (Angstrom; fractional units if neither the
    cell nor its direct ``basis`` is given).

    0.05 A is well above the rounding of CIF coordinates but below the separation of split
    (disordered) sites, which must not be merged onto a special position.
    """
    x = np.asarray(xyz_frac, float)  # (3,) fractional
    a = (np.eye(3) if cell is None else cellmod.direct_basis(cell)) if basis is None else np.asarray(basis)  # A/frac
    img = np.einsum("sij,j->si", symmetry.rotations, x) + symmetry.translations  # (S, 3)
    n = np.rint(img - x)  # (S, 3) lattice shift
    dist = np.linalg.norm((img - n - x) @ a.T, axis=1)  # (S,) A
    keep = dist < tol_A
    return Stabilizer(np.asarray(symmetry.rotations)[keep].astype(int),
                      np.asarray(symmetry.translations, float)[keep], n[keep].astype(int))


def _nullspace_reduced(m: np.ndarray, pivot_order, tol: float = 1e-8):
    """Basis (n, k) of {v : m v = 0} in reduced echelon form, and its free components (k,).

    Each basis vector is 1 in its own free component and 0 in the others, so the coefficients of a
    vector in this basis are simply its free components. Pivots are taken in ``pivot_order``, so
    components late in that order are preferred as free (i.e. as the refined parameters).
    """
    n = m.shape[1]
    order = list(pivot_order)
    a = np.array(m, float)[:, order] if len(m) else np.zeros((0, n))
    pivots, r = [], 0
    for c in range(n):
        if r == len(a):
            break
        i = r + int(np.argmax(np.abs(a[r:, c])))
        if abs(a[i, c]) < tol:
            continue
        a[[r, i]] = a[[i, r]]
        a[r] /= a[r, c]
        other = np.arange(len(a)) != r
        a[other] -= np.outer(a[other, c], a[r])
        pivots.append(c)
        r += 1
    free = [c for c in range(n) if c not in pivots]
    free.sort(key=lambda f: order[f])  # parameters in natural component order
    basis = np.zeros((n, len(free)))
    for k, f in enumerate(free):
        basis[f, k] = 1.0
        for i, p in enumerate(pivots):
            basis[p, k] = -a[i, f]
    basis[np.abs(basis) < 1e-12] = 0.0
    out = np.zeros_like(basis)
    out[order] = basis  # undo the column permutation
    return out, [order[f] for f in free]


def position_basis(stabilizer: Stabilizer):
    """Reduced basis (3, k) of the invariant subspace {v : R v = v} and its free axes (k,) (0=x, 1=y, 2=z).

    Columns are 1 along their free axis (x preferred, then y, z), e.g. (1,1,0) for an x,x,z site.
    """
    m = (stabilizer.rotations - np.eye(3)).reshape(-1, 3)
    return _nullspace_reduced(m, pivot_order=(2, 1, 0))


def position_constraint(stabilizer: Stabilizer, x, cell=None, orthonormal: bool = True):
    """Nearest exact special-position point x0 (3,) and a basis B (3, k) of its allowed shifts.

    x0 is the average of the images R x + t - n over the stabilizer (a group, so the average is
    fixed by all of it); every x0 + B p is on the special position. B is orthonormal in Cartesian
    metric when ``cell`` is given (then B is fractional per Angstrom), else in fractional metric;
    ``orthonormal=False`` keeps the reduced axis-aligned basis with unit-length columns instead.
    """
    x = np.asarray(x, float)  # (3,) fractional
    img = np.einsum("sij,j->si", stabilizer.rotations, x) + stabilizer.translations - stabilizer.shifts
    x0 = img.mean(axis=0) if len(stabilizer) else x
    v, _ = position_basis(stabilizer)  # (3, k)
    a = np.eye(3) if cell is None else cellmod.direct_basis(cell)
    if orthonormal and v.shape[1]:
        q, _ = np.linalg.qr(a @ v)  # orthonormal columns in the chosen metric
        q = q * np.sign(np.sum(q * (a @ v), axis=0))  # keep the sense of the reduced basis
        return x0, np.linalg.solve(a, q)
    return x0, v / np.linalg.norm(a @ v, axis=0)


def _sym_from6(v6) -> np.ndarray:
    """(..., 6) U11 U22 U33 U12 U13 U23 -> (..., 3, 3) symmetric."""
    v6 = np.asarray(v6, float)
    u = np.zeros(v6.shape[:-1] + (3, 3))
    for k, (i, j) in enumerate(U6_INDEX):
        u[..., i, j] = u[..., j, i] = v6[..., k]
    return u


def _adp_basis6(stabilizer: Stabilizer, cell=None):
    """Reduced basis (6, m) of invariant ADPs as CIF-frame 6-vectors (u_frac 6-vectors if no cell), free components (m,).

    In the CIF frame U = N^-1 u_frac N^-1, so u_frac invariance under R means invariance of U under
    R' = N^-1 R N. Free components are preferred in the order U11 U22 U33 U12 U13 U23.
    """
    nvec = np.ones(3) if cell is None else cellmod.reciprocal_lengths(cell)
    rows = []
    for r in stabilizer.rotations:
        rp = r * nvec[None, :] / nvec[:, None]  # N^-1 R N
        lin = np.stack([(lambda t: [t[i, j] for i, j in U6_INDEX])(rp @ e @ rp.T)
                        for e in _sym_from6(np.eye(6))], axis=1)  # (6, 6) action on 6-vectors
        rows.append(lin - np.eye(6))
    m = np.concatenate(rows) if rows else np.zeros((0, 6))
    return _nullspace_reduced(m, pivot_order=(5, 4, 3, 2, 1, 0))


def adp_constraint(stabilizer: Stabilizer, cell=None) -> np.ndarray:
    """Basis (m, 3, 3) of symmetric u_frac tensors with R u R^T = u for every stabilizer R.

    m = 6 on a general position, 4 on a trigonal 2-fold axis, 1 on a cubic site, ... With ``cell``
    the basis is reduced in the CIF frame, so each coefficient is one CIF U_ij (A^2).
    """
    b6, _ = _adp_basis6(stabilizer, cell)
    nvec = np.ones(3) if cell is None else cellmod.reciprocal_lengths(cell)
    n = np.diag(nvec)
    return n @ _sym_from6(b6.T) @ n


def symmetrize_adp(stabilizer: Stabilizer, u_frac) -> np.ndarray:
    """Projection (3, 3) of u_frac onto the invariant tensors: the average of R u R^T over the stabilizer."""
    u = np.asarray(u_frac, float)
    if not len(stabilizer):
        return u
    r = stabilizer.rotations.astype(float)
    return np.einsum("sij,jk,slk->il", r, u, r) / len(r)


def floating_origin_directions(rotations: np.ndarray, cell=None) -> np.ndarray:
    """(k, 3) fractional directions along which the origin is not fixed by symmetry (k = 0-3).

    A shift d of every atom leaves all intensities unchanged, and keeps the structure symmetric when
    R d = d for every rotation R of the space group: the polar axes (b in P2_1, c in P6_3mc or
    Pna2_1, all three in P1). Along them the data cannot place the structure, the normal matrix is
    singular, and a refinement must fix the origin (e.g. its centroid). Orthonormal in Cartesian
    space when ``cell`` is given, else in fractional units.
    """
    m = np.concatenate([np.asarray(r, float) - np.eye(3) for r in rotations])
    _, sv, vt = np.linalg.svd(m)
    free = vt[sv < 1e-8]  # m has at least the identity's 3 rows, so 3 singular values
    if len(free) == 0:
        return np.zeros((0, 3))
    a = cellmod.direct_basis(cell) if cell is not None else np.eye(3)
    q, _ = np.linalg.qr(a @ free.T)  # Cartesian orthonormal basis of the same space
    return np.linalg.solve(a, q).T
