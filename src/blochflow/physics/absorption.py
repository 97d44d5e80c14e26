r"""Absorptive (imaginary) atomic form factors from thermal diffuse scattering (TDS).

Electrons scattered diffusely by thermal vibrations leave the Bragg beams; in dynamical theory this
is an imaginary optical potential. For independently vibrating atoms (Einstein model) with an
isotropic mean-square displacement U (A^2), Hall & Hirsch (1965, Proc. R. Soc. A 286, 158) give
its atomic form factor; Weickenmeier & Kohl (1991, Acta Cryst. A47, 590) evaluate the same
integral in closed form for Gaussian-fitted f, here it is integrated numerically instead.
We use it in the notation of Bird & King (1990, Acta Cryst. A46, 202) and Peng, Ren, Dudarev &
Whelan (1996, Acta Cryst. A52, 257 and 456), rewritten with g = |g| = 2 sin(theta)/lambda (1/A)
instead of s = g/2:

    f'(g) = (h / (2 m0 v)) \int d^2q f(|q|) f(|g - q|) [1 - exp(-2 pi^2 U (q^2 + |g - q|^2 - g^2))]

with the 2D integral over scattering vectors q (1/A) perpendicular to the beam, f the elastic
(non-relativistic) factors of :mod:`.scattering` (A) and h / (m0 v) = gamma lambda
= sqrt(lambda^2 + lambda_C^2) (A), lambda_C = h / (m0 c) the Compton wavelength. f' is in A.
(Bird & King's 2h/(m0 v) \int d^2s' is the same expression in s units: d^2q = 4 d^2s'.)

Convention, identical to the elastic factor: f' excludes the Debye-Waller factor, which is applied
on top, so that

    U_g  = gamma / (pi Omega) sum_j f_j(g)  T_j(g) exp(-2 pi i g.r_j),
    U'_g = gamma / (pi Omega) sum_j f'_j(g) T_j(g) exp(-2 pi i g.r_j),   T_j = exp(-2 pi^2 U_j g^2)

(Bird & King's V'_g uses f' exp(-M s^2) likewise; Peng et al. split T as exp(-B s^2/2) inside their
tabulated f' and exp(-B s^2/2) outside). Check of the prefactor: at g = 0, f'(0) = sigma_TDS /
(2 gamma lambda) with sigma_TDS = (gamma lambda)^2 \int d^2q f^2 (1 - exp(-4 pi^2 U q^2)) the
Einstein-model TDS cross-section, i.e. mu_0 = 2 pi lambda U'_0 = N sigma_TDS / volume.

f' -> 0 as U -> 0 and grows roughly like U log(1/U) for small U. The bracket is negative inside
the circle |q - g/2| < g/2, so f' T stays bounded while f' itself grows like exp(pi^2 U g^2) and
changes sign (f' T < 0) at large U g^2; this is the Einstein-model result (Peng-Dudarev program
output for Cu at 200 kV turns negative beyond s = g/2 ~ 2 1/A too). In float32, f' overflows for
U g^2 > ~9. Small-angle (flat Ewald sphere) approximation: the integral runs over the
whole plane; electronic (core-loss) absorption is not included.

Quadrature: by the symmetry q -> g - q the plane integral is twice that over the half-plane
q.g_hat < g/2, split into the left half-plane (polar grid, Gauss-Legendre in the azimuth and in
x = r / (r + r0)) and the strip 0 < q.g_hat < g/2 (Gauss-Legendre across, mapped Gauss-Legendre
along). The nodes are fixed, so f' is a smooth function of g and U with exact autograd.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .scattering import _table, lobato_from_g2

COMPTON_WAVELENGTH_A = 0.0242631023867  # h / (m0 c), CODATA 2018

# Nodes per piece: (azimuth, radial) for the left half-plane, (across, along) for the strip.
_N_ANGLE, _N_RADIAL, _N_ACROSS, _N_ALONG = 8, 24, 8, 24
_R0 = 0.5  # 1/A, scale of the radial map r = r0 x / (1 - x)


@functools.lru_cache(maxsize=None)
def _gauss_legendre(n: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return lo + (hi - lo) * (x + 1) / 2, w * (hi - lo) / 2


def _mapped_radial(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes r in [0, inf) and weights (dr) from Gauss-Legendre in x = r / (r + r0)."""
    x, w = _gauss_legendre(n, 0.0, 1.0)
    r = _R0 * x / (1 - x)
    return like.new_tensor(r), like.new_tensor(w * _R0 / (1 - x) ** 2)


def _tds_integral(coef, g, u, n_angle, n_radial, n_across, n_along):
    """Plane integral \\int d^2q f(|q|) f(|g-q|) [1 - exp(...)] (A^2 * 1/A^2 = dimensionless).

    coef (..., 2, 5) Lobato coefficients, g (1/A) and u (A^2): mutually broadcastable shapes; the
    nodes run along a new last axis, so f(|q|) on the fixed polar nodes is evaluated per atom only.
    """
    coef = coef.unsqueeze(-3)  # (..., 1, 2, 5): broadcast over the nodes
    g = g.unsqueeze(-1)
    k = (4 * math.pi ** 2) * u.unsqueeze(-1)

    def bracket(e):  # 1 - exp(-4 pi^2 U e),  e = (q^2 + |g - q|^2 - g^2) / 2
        return -torch.expm1(-k * e)

    # Left half-plane q.g_hat < 0: azimuth phi in (pi/2, pi) doubled by the mirror phi -> -phi.
    phi, w_phi = _gauss_legendre(n_angle, math.pi / 2, math.pi)
    r, w_r = _mapped_radial(n_radial, g)
    cos_phi = g.new_tensor(np.repeat(np.cos(phi), n_radial))
    w_left = 2 * g.new_tensor(np.repeat(w_phi, n_radial)) * (w_r * r).repeat(n_angle)
    r2 = (r * r).repeat(n_angle)
    rc = r.repeat(n_angle) * cos_phi
    f_q = lobato_from_g2(coef, r2)  # depends on the atom only
    f_gq = lobato_from_g2(coef, g * g - 2 * g * rc + r2)
    left = (f_q * f_gq * bracket(r2 - g * rc)) @ w_left

    # Strip 0 < q.g_hat < g/2: x = (g/2) t across, y >= 0 along, doubled by the mirror y -> -y.
    t, w_t = _gauss_legendre(n_across, 0.0, 1.0)
    y, w_y = _mapped_radial(n_along, g)
    x = g * (0.5 * g.new_tensor(np.repeat(t, n_along)))
    w_strip = 2 * g.new_tensor(np.repeat(w_t, n_along)) * w_y.repeat(n_across)
    y2 = (y * y).repeat(n_across)
    q2 = x * x + y2
    f_q = lobato_from_g2(coef, q2)
    f_gq = lobato_from_g2(coef, (g - x) ** 2 + y2)
    strip = (f_q * f_gq * bracket(q2 - g * x)) @ w_strip * (0.5 * g.squeeze(-1))
    return 2 * (left + strip)


def absorptive_scattering_factor(z: torch.Tensor, g: torch.Tensor, u_iso: torch.Tensor,
                                 wavelength_A: float) -> torch.Tensor:
    """TDS absorptive form factor f'(g) (A) of a neutral atom, Einstein model (Hall & Hirsch 1965).

    f'(g) = (gamma lambda / 2) \\int d^2q f(|q|) f(|g-q|) [1 - exp(-2 pi^2 U (q^2 + |g-q|^2 - g^2))],
    gamma lambda = h / (m0 v) = sqrt(lambda^2 + lambda_C^2) (A); see the module docstring for the
    derivation, sources (Bird & King 1990; Weickenmeier & Kohl 1991; Peng et al. 1996) and
    conventions. Like the elastic f, f' excludes the Debye-Waller factor: multiply by
    T(g) = exp(-2 pi^2 U g^2) and use the same gamma / (pi Omega) prefactor to get U'_g.

    z: atomic numbers (long, (...)); g: |g| (1/A, (...)); u_iso: mean-square displacement U (A^2,
    (...), B = 8 pi^2 U); shapes broadcast together. wavelength_A: relativistic wavelength (A).
    Fixed 384-node quadrature, relative error < 1e-3 for g <= 3 1/A and 0.001 <= U <= 0.1 A^2
    (cost ~ 2 x 384 Lobato evaluations per (z, g) pair). Differentiable in g and u_iso; the
    result has the floating dtype of g and u_iso.
    """
    g = torch.as_tensor(g)
    u_iso = torch.as_tensor(u_iso, device=g.device)
    dtype = torch.promote_types(g.dtype, u_iso.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    g, u_iso = g.to(dtype), u_iso.to(dtype)
    z = torch.as_tensor(z, dtype=torch.long, device=g.device)
    coef = _table().to(dtype=dtype, device=g.device)[z]
    gamma_lambda = math.hypot(wavelength_A, COMPTON_WAVELENGTH_A)
    integral = _tds_integral(coef, g, u_iso, _N_ANGLE, _N_RADIAL, _N_ACROSS, _N_ALONG)
    shape = torch.broadcast_shapes(z.shape, g.shape, u_iso.shape)
    return (0.5 * gamma_lambda * integral).expand(shape)


def proportional_absorption(u_g: torch.Tensor, kappa) -> torch.Tensor:
    """Phenomenological absorption U'_g = kappa U_g (kappa typically 0.02-0.1)."""
    return kappa * u_g
