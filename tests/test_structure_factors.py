"""Structure factors against gemmi's independent calculation (same scattering factors)."""

import math

import gemmi
import numpy as np
import pytest
import torch

import blochflow.physics.structure_factors as sfmod
from blochflow.crystal.structure import crystal_from_record, inverted
from blochflow.io.structure_cif import read_structure
from blochflow.physics.constants import lorentz_factor


def _it92_factor(z, g):
    """IT92 form factors (gemmi's X-ray table, s = g / 2): the ones gemmi's X-ray calculator uses.

    Swapping them in tests the symmetry expansion, phases, occupancies and ADPs against gemmi's
    independent implementation; the scattering-factor table itself is tested elsewhere.
    """
    s2 = (g / 2) ** 2
    out = torch.zeros(torch.broadcast_shapes(z.shape, g.shape), dtype=g.dtype)
    for zz in torch.unique(z).tolist():
        c = gemmi.Element(int(zz)).it92
        f = sum(a * torch.exp(-b * s2) for a, b in zip(c.a, c.b)) + c.c
        out = torch.where(z == zz, f, out)
    return out


@pytest.mark.parametrize("name", ["quartz_reference.cif", "quartz_kinematical.cif"])
def test_potential_matches_gemmi(monkeypatch, quartz_paths, name):
    path = quartz_paths[0].parent / name
    monkeypatch.setattr(sfmod, "electron_scattering_factor", _it92_factor)
    crystal = crystal_from_record(read_structure(path))
    rng = np.random.default_rng(1)
    hkl = rng.integers(-6, 7, size=(60, 3))
    plan = sfmod.potential_plan(hkl, crystal, 0.0251)
    u, _ = sfmod.crystal_potential(plan, crystal.asu.xyz, crystal.asu.occupancy, crystal.asu.u_frac)
    small = gemmi.read_small_structure(str(path))
    small.setup_cell_images()
    small.change_occupancies_to_crystallographic()  # gemmi sums every operator's image of a site
    calc = gemmi.StructureFactorCalculatorX(small.cell)
    f_gemmi = np.array([calc.calculate_sf_from_small_structure(small, tuple(map(int, h))) for h in hkl])
    f_ours = u.numpy() * math.pi * crystal.volume / lorentz_factor(0.0251)
    # U_g uses exp(-2 pi i h.x); crystallographic F uses exp(+2 pi i h.x)
    np.testing.assert_allclose(f_ours, np.conj(f_gemmi), rtol=1e-6, atol=1e-6)


def test_inverted_model_gives_friedel_mates(quartz_paths):
    crystal = crystal_from_record(read_structure(quartz_paths[0]))
    hkl = np.array([[1, 0, 1], [2, -1, 3], [0, 1, 2]])
    both = np.concatenate([hkl, -hkl])
    u, _ = sfmod.crystal_potential(sfmod.potential_plan(both, crystal, 0.0251), crystal.asu.xyz,
                                   crystal.asu.occupancy, crystal.asu.u_frac)
    inv = inverted(crystal)
    ui, _ = sfmod.crystal_potential(sfmod.potential_plan(both, inv, 0.0251), inv.asu.xyz, inv.asu.occupancy,
                                    inv.asu.u_frac)
    assert torch.allclose(ui[:3], u[3:], atol=1e-12)
    assert not torch.allclose(u[:3], u[3:], atol=1e-6)  # quartz is acentric: Friedel mates differ in phase


def test_gradcheck_structure_factors(quartz_paths):
    crystal = crystal_from_record(read_structure(quartz_paths[0]))
    hkl = np.array([[1, 0, 1], [2, -1, 3], [0, 1, 2], [3, 0, -2]])
    plan = sfmod.potential_plan(hkl, crystal, 0.0251)
    xyz = crystal.asu.xyz.clone().requires_grad_()
    occ = crystal.asu.occupancy.clone().requires_grad_()
    uf = crystal.asu.u_frac.clone().requires_grad_()

    def f(xyz, occ, uf):
        u, _ = sfmod.crystal_potential(plan, xyz, occ, uf)
        return torch.view_as_real(u)

    assert torch.autograd.gradcheck(f, (xyz, occ, uf))


def test_proportional_absorption(quartz_paths):
    crystal = crystal_from_record(read_structure(quartz_paths[0]))
    plan = sfmod.potential_plan(np.array([[0, 0, 0], [1, 0, 1]]), crystal, 0.0251)
    u, ua = sfmod.crystal_potential(plan, crystal.asu.xyz, crystal.asu.occupancy, crystal.asu.u_frac,
                                    absorption="proportional", kappa=0.07)
    assert torch.allclose(ua, 0.07 * u)


@pytest.mark.parametrize("absorption", ["none", "proportional", "tds"])
def test_potential_tangents_from_atom_tables_match_forward_mode(quartz_paths, absorption):
    """The per-atom-table rule for many tangents of the potential equals forward-mode
    differentiation of the potential itself, tangent by tangent (anisotropic ADPs, every operator)."""
    from torch.func import jvp

    crystal = crystal_from_record(read_structure(quartz_paths[0]))
    rng = np.random.default_rng(4)
    hkl = rng.integers(-4, 5, size=(40, 3))
    plan = sfmod.potential_plan(hkl, crystal, 0.0251)
    xyz, occ = crystal.asu.xyz, crystal.asu.occupancy * 0.9
    u = crystal.asu.u_frac + 1e-4 * torch.eye(3)
    n_t, a = 5, len(xyz)
    g = torch.Generator().manual_seed(1)
    dx = torch.randn(n_t, a, 3, generator=g, dtype=torch.float64)
    do = torch.randn(n_t, a, generator=g, dtype=torch.float64)
    du = torch.randn(n_t, a, 3, 3, generator=g, dtype=torch.float64) * 1e-3
    du = du + du.mT
    dk = torch.randn(n_t, generator=g, dtype=torch.float64)
    kappa = torch.tensor(0.07, dtype=torch.float64)
    u_g, u_abs, d_u, d_abs = sfmod.crystal_potential_jvp(plan, xyz, occ, u, dx, do, du, absorption, kappa,
                                                         dk if absorption == "proportional" else None)
    ref_u, ref_abs = sfmod.crystal_potential(plan, xyz, occ, u, absorption, kappa)
    assert torch.allclose(u_g, ref_u, rtol=1e-12, atol=1e-15)
    for t in range(n_t):
        def f(x, o, uu, k):
            pot, pot_abs = sfmod.crystal_potential(plan, x, o, uu, absorption, k)
            return pot, (torch.zeros_like(pot) if pot_abs is None else pot_abs)

        _, (t_u, t_abs) = jvp(f, (xyz, occ, u, kappa), (dx[t], do[t], du[t], dk[t]))
        assert torch.allclose(d_u[t], t_u, rtol=1e-10, atol=1e-12 * float(t_u.abs().max()))
        if absorption == "none":
            assert d_abs is None
        else:
            assert torch.allclose(d_abs[t], t_abs, rtol=1e-10, atol=1e-12 * float(t_abs.abs().max()))
