"""Unit-cell metrics: Busing-Levy reciprocal basis, orthogonalisation, ADP frame conversions."""

from __future__ import annotations

import math

import numpy as np


def reciprocal_basis(cell) -> np.ndarray:
    """Busing-Levy B matrix (1/A): columns are a*, b*, c* in Cartesian axes with a* along x.

    ``g_cart = B @ hkl``. This is the B of PETS2's UB, so that U = UB B^-1.
    """
    a, b, c, al, be, ga = cell
    al, be, ga = (math.radians(x) for x in (al, be, ga))
    vol = a * b * c * math.sqrt(1 - math.cos(al) ** 2 - math.cos(be) ** 2 - math.cos(ga) ** 2
                                + 2 * math.cos(al) * math.cos(be) * math.cos(ga))
    astar = b * c * math.sin(al) / vol
    bstar = a * c * math.sin(be) / vol
    cstar = a * b * math.sin(ga) / vol
    cos_bestar = (math.cos(al) * math.cos(ga) - math.cos(be)) / (math.sin(al) * math.sin(ga))
    cos_gastar = (math.cos(al) * math.cos(be) - math.cos(ga)) / (math.sin(al) * math.sin(be))
    sin_bestar = math.sqrt(1 - cos_bestar ** 2)
    sin_gastar = math.sqrt(1 - cos_gastar ** 2)
    return np.array([
        [astar, bstar * cos_gastar, cstar * cos_bestar],
        [0.0, bstar * sin_gastar, -cstar * sin_bestar * math.cos(al)],
        [0.0, 0.0, 1.0 / c],
    ])


def direct_basis(cell) -> np.ndarray:
    """Orthogonalisation matrix A (A): columns a, b, c in the Cartesian axes of :func:`reciprocal_basis`."""
    return np.linalg.inv(reciprocal_basis(cell)).T


def cell_volume(cell) -> float:
    """Cell volume Omega (A^3)."""
    return float(abs(np.linalg.det(direct_basis(cell))))


def reciprocal_lengths(cell) -> np.ndarray:
    """(a*, b*, c*) in 1/A."""
    return np.linalg.norm(reciprocal_basis(cell), axis=0)


def u_cif_to_frac(u_cif6, cell) -> np.ndarray:
    """CIF Uij (U11 U22 U33 U12 U13 U23, A^2) to the fractional covariance N U N (dimensionless).

    The Debye-Waller exponent is then -2 pi^2 h^T U_frac h.
    """
    u11, u22, u33, u12, u13, u23 = u_cif6
    u = np.array([[u11, u12, u13], [u12, u22, u23], [u13, u23, u33]])
    n = np.diag(reciprocal_lengths(cell))
    return n @ u @ n


def u_iso_to_frac(u_iso: float, cell) -> np.ndarray:
    """Isotropic U (A^2) to U_frac = U_iso G* (G* the reciprocal metric tensor)."""
    b = reciprocal_basis(cell)
    return u_iso * (b.T @ b)


def u_frac_to_cif(u_frac: np.ndarray, cell) -> np.ndarray:
    """Inverse of :func:`u_cif_to_frac`: returns U11 U22 U33 U12 U13 U23 (A^2)."""
    ninv = np.diag(1.0 / reciprocal_lengths(cell))
    u = ninv @ u_frac @ ninv
    return np.array([u[0, 0], u[1, 1], u[2, 2], u[0, 1], u[0, 2], u[1, 2]])


def u_frac_to_cart(u_frac: np.ndarray, cell) -> np.ndarray:
    """Cartesian ADP tensor (A^2) from U_frac: U_cart = A U_frac A^T."""
    a = direct_basis(cell)
    return a @ u_frac @ a.T


def u_equivalent(u_frac: np.ndarray, cell) -> float:
    """U_eq = trace(U_cart) / 3 (A^2)."""
    return float(np.trace(u_frac_to_cart(u_frac, cell)) / 3)
