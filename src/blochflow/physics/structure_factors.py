"""Fourier coefficients of the crystal potential U_g (1/A^2), elastic and absorptive.

U_g = gamma/(pi Omega) sum_atoms occ f(|g|) T(g) exp(-2 pi i h.x), summed over every symmetry
copy of each asymmetric-unit atom (copies on special positions weighted so each site counts once).
In a centrosymmetric group the origin is taken on an inversion centre c (U_h exp(2 pi i h.c)): the
structure matrix changes by the diagonal similarity diag(exp(2 pi i g.c)), which leaves every
intensity as it is, and every U_h is real, which the Bloch solver uses (bloch.hermitian_eigh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..crystal.cell import reciprocal_basis
from ..crystal.structure import Crystal, lattice_allowed
from .constants import interaction_prefactor
from .scattering import atomic_number, electron_scattering_factor

AbsorptionModel = Literal["none", "proportional", "tds"]


@dataclass(frozen=True)
class PotentialPlan:
    """Geometry of a set of reflections for the potential: fixed integers and lengths, no atoms."""

    hkl: torch.Tensor  # (M, 3) float
    g_length: torch.Tensor  # (M,) 1/A
    hkl_rot: torch.Tensor  # (S, M, 3): R_s^T h for one operator of each coset of the centring translations
    phase_shift: torch.Tensor  # (S, M): h . t_s
    lattice_factor: torch.Tensor  # (M,) sum over centring translations c (0 included) of exp(-2 pi i h.c): L or 0
    element_z: torch.Tensor  # (E,) atomic numbers of the distinct elements
    atom_element: torch.Tensor  # (A,) index into element_z
    site_weight: torch.Tensor  # (A,)
    prefactor: float  # gamma / (pi Omega), 1/A^3
    wavelength: float


def potential_plan(hkl: np.ndarray, crystal: Crystal, wavelength: float, dtype=torch.float64) -> PotentialPlan:
    hkl_t = torch.as_tensor(np.asarray(hkl), dtype=dtype)
    b = torch.as_tensor(reciprocal_basis(crystal.cell), dtype=dtype)
    g_len = torch.linalg.norm(hkl_t @ b.T, dim=-1)
    centring = crystal.symmetry.centring_translations()
    reps = _coset_representatives(crystal.symmetry.rotations, crystal.symmetry.translations, centring)
    rots = torch.as_tensor(crystal.symmetry.rotations[reps], dtype=dtype)
    trans = torch.as_tensor(crystal.symmetry.translations[reps], dtype=dtype)
    allowed = lattice_allowed(np.asarray(hkl), centring)
    hkl_rot = torch.einsum("sji,mj->smi", rots, hkl_t)
    phase_shift = torch.einsum("mi,si->sm", hkl_t, trans)
    centre = crystal.symmetry.inversion_centre()
    if centre is not None:  # U_h exp(2 pi i h.c): the origin on an inversion centre c makes every U_h real
        phase_shift = phase_shift - (hkl_t @ torch.as_tensor(centre, dtype=dtype))[None, :]
    elements = sorted(set(crystal.asu.elements), key=crystal.asu.elements.index)
    return PotentialPlan(
        hkl=hkl_t, g_length=g_len, hkl_rot=hkl_rot, phase_shift=phase_shift,
        lattice_factor=torch.as_tensor(allowed * float(len(centring) + 1), dtype=dtype),
        element_z=torch.tensor([atomic_number(e) for e in elements]),
        atom_element=torch.tensor([elements.index(e) for e in crystal.asu.elements]),
        site_weight=crystal.site_multiplicity_weights().to(dtype),
        prefactor=interaction_prefactor(wavelength, crystal.volume), wavelength=wavelength)


def _coset_representatives(rotations: np.ndarray, translations: np.ndarray, centring: np.ndarray) -> np.ndarray:
    """Indices of one operator per coset of the centring translations: every operator is (R, t + c) for
    a representative (R, t) and a centring translation c (or 0)."""
    shifts = np.concatenate([np.zeros((1, 3)), centring])
    reps: list[int] = []
    for i, (r, t) in enumerate(zip(rotations, translations)):
        if not any(np.array_equal(r, rotations[j]) and _is_lattice_shift(t - translations[j], shifts) for j in reps):
            reps.append(i)
    return np.array(reps, int)


def _is_lattice_shift(d: np.ndarray, shifts: np.ndarray) -> bool:
    """Whether d equals one of ``shifts`` modulo whole cell translations."""
    x = d[None, :] - shifts
    return bool(np.any(np.all(np.abs(x - np.rint(x)) < 1e-6, axis=1)))


# (A, S, M) operator terms are evaluated in blocks of reflections of at most this many elements: an
# F-centred cubic cell (48 operators per coset, 6 atoms, 60 000 potential rows) held 4.4 GB at once
TERM_BLOCK_ELEMENTS = 2_000_000


def _reflection_blocks(plan: PotentialPlan, n_atoms: int) -> list[slice]:
    m = plan.hkl.shape[0]
    step = max(1, TERM_BLOCK_ELEMENTS // max(1, n_atoms * plan.hkl_rot.shape[0]))
    return [slice(i, min(i + step, m)) for i in range(0, m, step)]


def _operator_terms(plan: PotentialPlan, xyz, u_frac, block: slice = slice(None)) -> torch.Tensor:
    """T(R^T h) exp(-2 pi i (R^T h . x + h . t)) per atom and coset operator: (A, S, M) complex, for
    the reflections of ``block``."""
    hr = plan.hkl_rot[:, block]  # (S, M, 3)
    phase = 2 * math.pi * (torch.einsum("smi,ai->asm", hr, xyz) + plan.phase_shift[None, :, block])
    dw = torch.exp(-2 * math.pi ** 2 * torch.einsum("smi,aij,smj->asm", hr, u_frac, hr))
    return torch.complex(dw * torch.cos(phase), -dw * torch.sin(phase))  # torch.polar is 2x slower on CPU


def _atom_sums(plan: PotentialPlan, xyz, u_frac) -> torch.Tensor:
    """sum over all operators of T(R^T h) exp(-2 pi i (R^T h . x + h . t)) per atom: (A, M) complex
    (the coset representatives' sum times the lattice factor)."""
    sums = [torch.sum(_operator_terms(plan, xyz, u_frac, b), dim=1) for b in _reflection_blocks(plan, len(xyz))]
    return torch.cat(sums, 1) * plan.lattice_factor


def _atom_factors(plan: PotentialPlan) -> torch.Tensor:
    """Electron scattering factor of each atom at each |g|: (A, M)."""
    return electron_scattering_factor(plan.element_z[:, None], plan.g_length[None, :])[plan.atom_element]


def crystal_potential(plan: PotentialPlan, xyz: torch.Tensor, occupancy: torch.Tensor, u_frac: torch.Tensor,
                      absorption: AbsorptionModel = "none", kappa: torch.Tensor | float = 0.0,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Elastic U_g and absorptive U'_g (1/A^2) for the plan's reflections.

    xyz (A, 3) fractional, occupancy (A,), u_frac (A, 3, 3) as in :class:`AsymmetricUnit`.
    Returns (U, U_abs) with U_abs None when ``absorption == 'none'``.
    """
    sums = _atom_sums(plan, xyz, u_frac)  # (A, M)
    f_atom = _atom_factors(plan)  # (A, M)
    w = (occupancy * plan.site_weight)[:, None]
    u_g = plan.prefactor * torch.sum(w * f_atom * sums, dim=0)
    if absorption == "none":
        return u_g, None
    if absorption == "proportional":
        return u_g, kappa * u_g
    if absorption == "tds":
        from .absorption import absorptive_scattering_factor
        u_iso = _u_iso_equivalent(plan, u_frac)
        f_abs = absorptive_scattering_factor(plan.element_z[plan.atom_element][:, None],
                                             plan.g_length[None, :], u_iso[:, None], plan.wavelength)
        return u_g, plan.prefactor * torch.sum(w * f_abs * sums, dim=0)
    raise ValueError(f"unknown absorption model '{absorption}'")


def _u_iso_equivalent(plan: PotentialPlan, u_frac: torch.Tensor) -> torch.Tensor:
    """U_eq-like isotropic value (A^2) per atom for the absorptive factor: mean over directions.

    With u_frac = N U N, h^T u_frac h = g^T U_cart g; the isotropic equivalent is taken as the
    ratio of mean DW exponents over the plan's reflections, which equals U_iso exactly for
    isotropic atoms.
    """
    hr = plan.hkl[None]  # (1, M, 3)
    num = torch.einsum("smi,aij,smj->am", hr, u_frac, hr).sum(-1)
    den = (plan.g_length ** 2).sum().clamp_min(1e-30)
    return num / den


def crystal_potential_jvp(plan: PotentialPlan, xyz: torch.Tensor, occupancy: torch.Tensor, u_frac: torch.Tensor,
                          d_xyz: torch.Tensor, d_occupancy: torch.Tensor, d_u_frac: torch.Tensor,
                          absorption: AbsorptionModel = "none", kappa: torch.Tensor | float = 0.0,
                          d_kappa: torch.Tensor | None = None):
    """(U, U_abs) and their tangents (T, M) along T tangents of the atomic parameters
    (d_xyz (T, A, 3), d_occupancy (T, A), d_u_frac (T, A, 3, 3); d_kappa (T,) or None).

    A tangent of atom a changes its operator sum by sum_s term_s (-2 pi i R^T h . dx - 2 pi^2
    (R^T h)^T dU (R^T h)), so every tangent is a combination of 13 per-atom tables (the sum, its
    first and second moments in R^T h): T tangents cost one matrix product T x 13A x M instead of T
    structure-factor evaluations. The thermal-diffuse absorptive model (whose factor depends on U
    through U_iso) falls back to forward-mode differentiation.
    """
    if absorption == "tds":
        from torch.func import jvp, vmap

        def pot(x, o, u):
            return crystal_potential(plan, x, o, u, absorption, kappa)

        (u_g, u_abs), (du, du_abs) = vmap(lambda a, b, c: jvp(pot, (xyz, occupancy, u_frac), (a, b, c)),
                                          out_dims=(None, 0))(d_xyz, d_occupancy, d_u_frac)
        return u_g, u_abs, du, du_abs
    moments = []
    for b in _reflection_blocks(plan, len(xyz)):
        term = _operator_terms(plan, xyz, u_frac, b)  # (A, S, m)
        hr = plan.hkl_rot[:, b].to(term.dtype)  # (S, m, 3)
        moments.append((term.sum(1), torch.einsum("asm,smi->ami", term, hr),
                        torch.einsum("asm,smi,smj->amij", term, hr, hr)))
    s0, s1, s2 = (torch.cat(x, 1) for x in zip(*moments))
    f_atom = _atom_factors(plan) * plan.lattice_factor  # (A, M), the centring cosets' sum folded in
    sw = plan.site_weight
    w = occupancy * sw
    u_g = plan.prefactor * torch.sum(w[:, None] * f_atom * s0, dim=0)
    fw = plan.prefactor * f_atom * w[:, None]  # (A, M)
    a, m = f_atom.shape
    table = torch.cat([(plan.prefactor * f_atom * sw[:, None] * s0)[..., None],
                       (-2j * math.pi) * fw[..., None] * s1,
                       (-2 * math.pi ** 2) * fw[..., None] * s2.reshape(a, m, 9)], -1)  # (A, M, 13)
    coef = torch.cat([d_occupancy[..., None], d_xyz, d_u_frac.reshape(*d_u_frac.shape[:2], 9)], -1)  # (T, A, 13)
    table = table.permute(0, 2, 1).reshape(a * 13, m)
    coef = coef.reshape(coef.shape[0], a * 13).to(table.real.dtype)
    du = torch.complex(coef @ table.real, coef @ table.imag)  # (T, M)
    if absorption == "none":
        return u_g, None, du, None
    if absorption == "proportional":
        du_abs = kappa * du
        if d_kappa is not None:
            du_abs = du_abs + d_kappa[:, None] * u_g
        return u_g, kappa * u_g, du, du_abs
    raise ValueError(f"unknown absorption model '{absorption}'")
