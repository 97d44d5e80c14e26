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


def _ours_and_gemmi(path, crystal, plan, hkl):
    """Our potential as structure factors F = U pi V / gamma (conjugated: U_g uses exp(-2 pi i h.x),
    crystallographic F exp(+2 pi i h.x)) and gemmi's F from every operator's image of each site, at hkl."""
    u, _ = sfmod.crystal_potential(plan, crystal.asu.xyz, crystal.asu.occupancy, crystal.asu.u_frac)
    small = gemmi.read_small_structure(str(path))
    small.setup_cell_images()
    small.change_occupancies_to_crystallographic()  # gemmi sums every operator's image of a site
    calc = gemmi.StructureFactorCalculatorX(small.cell)
    f_gemmi = np.array([calc.calculate_sf_from_small_structure(small, tuple(map(int, h))) for h in hkl])
    return np.conj(u.numpy() * math.pi * crystal.volume / lorentz_factor(0.0251)), f_gemmi


@pytest.mark.parametrize("name", ["quartz_reference.cif", "quartz_kinematical.cif"])
def test_potential_matches_gemmi(monkeypatch, quartz_paths, name):
    path = quartz_paths[0].parent / name
    monkeypatch.setattr(sfmod, "electron_scattering_factor", _it92_factor)
    crystal = crystal_from_record(read_structure(path))
    rng = np.random.default_rng(1)
    hkl = rng.integers(-6, 7, size=(60, 3))
    f_ours, f_gemmi = _ours_and_gemmi(path, crystal, sfmod.potential_plan(hkl, crystal, 0.0251), hkl)
    np.testing.assert_allclose(f_ours, f_gemmi, rtol=1e-6, atol=1e-6)


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


LTA_LIKE = """data_lta
_cell_length_a 24.61
_cell_length_b 24.61
_cell_length_c 24.61
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'F m -3 c'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_U_iso_or_equiv
Si1 Si 0 0.0921 0.1857 0.008
Al1 Al 0 0.1876 0.0892 0.009
O3 O 0.0535 0.0566 0.1716 0.015
Na1 Na 0.0995 0.0995 0.0995 0.02
"""


def test_centred_group_sums_one_operator_per_centring_coset(monkeypatch, tmp_path):
    """An F-centred cubic group (192 operators): the potential sums 48 coset representatives times the
    lattice factor (4, or 0 for h, k, l of mixed parity), in blocks of reflections, and equals
    gemmi's sum over every operator; its tangents equal forward-mode differentiation."""
    from torch.func import jvp

    path = tmp_path / "lta.cif"
    path.write_text(LTA_LIKE)
    monkeypatch.setattr(sfmod, "electron_scattering_factor", _it92_factor)
    monkeypatch.setattr(sfmod, "TERM_BLOCK_ELEMENTS", 4 * 48 * 7)  # 7 reflections per block
    crystal = crystal_from_record(read_structure(path))
    assert len(crystal.symmetry) == 192
    rng = np.random.default_rng(2)
    hkl = rng.integers(-9, 10, size=(50, 3))
    plan = sfmod.potential_plan(hkl, crystal, 0.0251)
    assert plan.hkl_rot.shape[0] == 48
    allowed = np.all(hkl % 2 == hkl[:, :1] % 2, axis=1)
    assert allowed.any() and not allowed.all()
    np.testing.assert_array_equal(plan.lattice_factor.numpy(), 4.0 * allowed)
    f_ours, f_gemmi = _ours_and_gemmi(path, crystal, plan, hkl)
    assert np.abs(f_gemmi[allowed]).max() > 1 and np.abs(f_gemmi[~allowed]).max() < 1e-9  # (glides zero a few more)
    # gemmi's tables are single precision: the weak F that cancel (|F| 12 of 1000) differ by 2e-6
    np.testing.assert_allclose(f_ours, f_gemmi, rtol=1e-6, atol=1e-6 * np.abs(f_gemmi).max())
    xyz, occ, uf = crystal.asu.xyz, crystal.asu.occupancy, crystal.asu.u_frac
    g = torch.Generator().manual_seed(3)
    dx = torch.randn(2, len(xyz), 3, generator=g, dtype=torch.float64)
    du = 1e-3 * torch.randn(2, len(xyz), 3, 3, generator=g, dtype=torch.float64)
    du = du + du.mT
    do = torch.zeros(2, len(xyz), dtype=torch.float64)
    _, _, d_u, _ = sfmod.crystal_potential_jvp(plan, xyz, occ, uf, dx, do, du)
    for t in range(2):
        _, ref = jvp(lambda x, uu: sfmod.crystal_potential(plan, x, occ, uu)[0], (xyz, uf), (dx[t], du[t]))
        assert torch.allclose(d_u[t], ref, rtol=1e-10, atol=1e-12 * float(ref.abs().max()))


ILMENITE_LIKE = """data_ilmenite
_cell_length_a 5.0884
_cell_length_b 5.0884
_cell_length_c 14.0885
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 120
_space_group_name_H-M_alt 'R -3'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_U_iso_or_equiv
Fe1 Fe 0 0 0.35537 0.006
Ti1 Ti 0 0 0.14640 0.005
O1 O 0.3169 0.0234 0.2448 0.007
"""


def test_rhombohedral_centring_on_hexagonal_axes_keeps_every_allowed_reflection(monkeypatch, tmp_path):
    """R-3 on hexagonal axes: centring translations of 1/3 and 2/3 allow exactly -h+k+l = 3n, at high
    indices too (a rounded 2/3 once lost 93 % of them), and the potential equals gemmi's sum."""
    from blochflow.crystal.structure import lattice_allowed

    path = tmp_path / "ilmenite.cif"
    path.write_text(ILMENITE_LIKE)
    monkeypatch.setattr(sfmod, "electron_scattering_factor", _it92_factor)
    crystal = crystal_from_record(read_structure(path))
    centring = crystal.symmetry.centring_translations()
    assert len(centring) == 2
    grid = np.stack(np.meshgrid(*[np.arange(-30, 31)] * 3, indexing="ij"), -1).reshape(-1, 3)
    np.testing.assert_array_equal(lattice_allowed(grid, centring), (-grid[:, 0] + grid[:, 1] + grid[:, 2]) % 3 == 0)
    rng = np.random.default_rng(5)
    hkl = rng.integers(-12, 13, size=(60, 3))
    allowed = (-hkl[:, 0] + hkl[:, 1] + hkl[:, 2]) % 3 == 0
    assert allowed.sum() > 10 and not allowed.all()
    f_ours, f_gemmi = _ours_and_gemmi(path, crystal, sfmod.potential_plan(hkl, crystal, 0.0251), hkl)  # Fe, Ti on 3
    assert np.abs(f_gemmi[allowed]).min() > 1e-3 and np.abs(f_gemmi[~allowed]).max() < 1e-9
    np.testing.assert_allclose(f_ours, f_gemmi, rtol=1e-6, atol=1e-6 * np.abs(f_gemmi).max())
