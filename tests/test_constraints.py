"""Site-symmetry constraints and the refinement parameter map."""

from pathlib import Path

import gemmi
import numpy as np
import pytest
import torch

from blochflow.crystal import cell as cellmod
from blochflow.crystal.constraints import (adp_constraint, position_constraint, site_stabilizer,
                                           symmetrize_adp)
from blochflow.crystal.parameters import StructureParameters
from blochflow.crystal.structure import AsymmetricUnit, Crystal, SymmetryOps, crystal_from_record
from blochflow.io.structure_cif import read_structure

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# the bundled copy of the shared quartz_reference.cif (the same bytes): these tests run without the shared data
QUARTZ = Path(__file__).resolve().parents[1] / "src" / "blochflow" / "data" / "examples" / "quartz" / "quartz_reference.cif"
PARA = SHARED / "paracetamol" / "paracetamol_reference.cif"


def _load(path):
    if not path.exists():
        pytest.skip("shared data not present")
    return crystal_from_record(read_structure(path))


def _crystal(cell, triplets, atoms):
    """atoms: (label, element, xyz, occupancy, u6 CIF or Uiso float)."""
    uf = [cellmod.u_cif_to_frac(u, cell) if isinstance(u, tuple) else cellmod.u_iso_to_frac(u, cell)
          for *_, u in atoms]
    asu = AsymmetricUnit([a[0] for a in atoms], [a[1] for a in atoms],
                         torch.tensor([a[2] for a in atoms], dtype=torch.float64),
                         torch.tensor([a[3] for a in atoms], dtype=torch.float64),
                         torch.tensor(np.array(uf)), [isinstance(a[4], tuple) for a in atoms])
    return Crystal(cell=cell, symmetry=SymmetryOps.from_triplets(triplets), asu=asu)


FM3M = [op.triplet() for op in gemmi.SpaceGroup("F m -3 m").operations()]
CUBIC = _crystal((5.0, 5.0, 5.0, 90, 90, 90), FM3M, [
    ("Na1", "Na", (0.0, 0.0, 0.0), 1.0, (0.02, 0.01, 0.015, 0.003, 0.0, 0.001)),  # m-3m: 0 + 1
    ("X8c", "F", (0.25, 0.25, 0.25), 1.0, 0.01),  # -43m: 0 + 1
    ("X24e", "O", (0.2, 0.0, 0.0), 1.0, 0.01),  # 4mm: 1 + 2
    ("X32f", "O", (0.3, 0.3, 0.3), 1.0, 0.01),  # .3m: 1 + 2
    ("X48h", "O", (0.0, 0.2, 0.2), 1.0, 0.01),  # m.m2: 1 + 3
    ("X96k", "O", (0.1, 0.1, 0.3), 1.0, 0.01),  # ..m: 2 + 4
])


def _random_theta(sp, seed=0):
    g = torch.Generator().manual_seed(seed)
    th = sp.theta0.clone()
    for key, scale in (("xyz", 0.2), ("adp", 0.004), ("occupancy", 0.1)):
        idx = sp.groups[key]
        th[idx] += scale * (2 * torch.rand(len(idx), generator=g, dtype=torch.float64) - 1)
    return th


def _assert_site_symmetry(crystal, sp, theta):
    xyz, _, u = (t.detach().numpy() for t in sp.physical(theta))
    for i in range(len(xyz)):
        stab = site_stabilizer(crystal.symmetry, crystal.asu.xyz[i].numpy(), 0.05, crystal.cell)
        img = np.einsum("sij,j->si", stab.rotations, xyz[i]) + stab.translations - stab.shifts
        np.testing.assert_allclose(img, np.broadcast_to(xyz[i], img.shape), atol=1e-12)
        ru = np.einsum("sij,jk,slk->sil", stab.rotations, u[i], stab.rotations)
        np.testing.assert_allclose(ru, np.broadcast_to(u[i], ru.shape), atol=1e-14)


def test_quartz_special_position_counts_and_invariance():
    cr = _load(QUARTZ)
    sp = StructureParameters(cr)
    per_atom = {lab: [n for n in sp.names if n.startswith(lab + ".")] for lab in cr.asu.labels}
    assert per_atom["Si1"] == ["Si1.y", "Si1.U11", "Si1.U22", "Si1.U33", "Si1.U13"]
    assert len(per_atom["O1"]) == 9 and len(sp) == 14
    assert len(sp.groups["xyz"]) == 4 and len(sp.groups["adp"]) == 10
    # start structure reproduced (input is on the 2-fold to the CIF's 6 decimals)
    xyz, occ, u = sp.physical(sp.theta0)
    assert torch.allclose(xyz, cr.asu.xyz, atol=1e-6)
    assert torch.allclose(u, cr.asu.u_frac, atol=1e-12)
    assert torch.equal(occ, cr.asu.occupancy)
    for seed in range(3):
        _assert_site_symmetry(cr, sp, _random_theta(sp, seed))
    # the refined coordinate moves Si along b only
    th = sp.theta0.clone()
    th[0] += 0.1
    d = (sp.physical(th)[0] - sp.physical(sp.theta0)[0])[0].numpy()
    np.testing.assert_allclose(d, [0, 0.1 / cr.cell[1], 0], atol=1e-15)  # 0.1 A along b


def test_cubic_sites():
    sp = StructureParameters(CUBIC, adp="aniso")
    count = {lab: tuple(sum(sp.names[i].startswith(lab + ".") for i in sp.groups[k].tolist()) for k in ("xyz", "adp"))
             for lab in CUBIC.asu.labels}
    assert count == {"Na1": (0, 1), "X8c": (0, 1), "X24e": (1, 2), "X32f": (1, 2), "X48h": (1, 3),
                     "X96k": (2, 4)}
    # Na1 starts anisotropic but not cubic: projected onto the isotropic tensor with the same trace
    u_na = sp.physical(sp.theta0)[2][0].numpy()
    np.testing.assert_allclose(cellmod.u_frac_to_cart(u_na, CUBIC.cell), 0.015 * np.eye(3), atol=1e-15)
    for seed in range(3):
        _assert_site_symmetry(CUBIC, sp, _random_theta(sp, seed))


def test_constraint_functions():
    stab = site_stabilizer(CUBIC.symmetry, (0.0, 0.0, 0.0), 0.05, CUBIC.cell)
    assert len(stab) == 48
    assert adp_constraint(stab).shape == (1, 3, 3)
    x0, b = position_constraint(stab, (0.001, -0.002, 0.0))
    np.testing.assert_allclose(x0, 0.0, atol=1e-15)
    assert b.shape == (3, 0)
    # off-site input within tolerance is projected; the basis is orthonormal in Cartesian metric
    stab = site_stabilizer(CUBIC.symmetry, (0.301, 0.299, 0.3005), 0.05, CUBIC.cell)
    x0, b = position_constraint(stab, (0.301, 0.299, 0.3005), CUBIC.cell)
    np.testing.assert_allclose(x0, (0.301 + 0.299 + 0.3005) / 3, atol=1e-15)
    ab = cellmod.direct_basis(CUBIC.cell) @ b
    np.testing.assert_allclose(ab.T @ ab, np.eye(1), atol=1e-14)
    np.testing.assert_allclose(abs(b[:, 0]), np.full(3, 1 / (5 * np.sqrt(3))), atol=1e-15)
    basis = adp_constraint(stab)
    for m in basis:
        np.testing.assert_allclose(symmetrize_adp(stab, m), m, atol=1e-15)
    # a general position in P1: nothing to constrain
    stab = site_stabilizer(SymmetryOps.from_triplets(["x,y,z"]), (0.1, 0.2, 0.3))
    assert position_constraint(stab, (0.1, 0.2, 0.3))[1].shape == (3, 3)
    assert adp_constraint(stab).shape == (6, 3, 3)


def test_general_position_p1():
    cell = (5.1, 6.2, 7.3, 81.0, 95.0, 103.0)
    u6 = (0.02, 0.015, 0.025, 0.002, -0.001, 0.003)
    cr = _crystal(cell, ["x,y,z"], [("C1", "C", (0.1, 0.2, 0.3), 1.0, u6)])
    sp = StructureParameters(cr)
    assert sp.names == ["C1.x", "C1.y", "C1.z", "C1.U11", "C1.U22", "C1.U33", "C1.U12", "C1.U13", "C1.U23"]
    np.testing.assert_allclose(sp.theta0[:3].numpy(), [0.51, 1.24, 2.19], atol=1e-12)  # Angstrom along a, b, c
    np.testing.assert_allclose(sp.theta0[3:].numpy(), u6, atol=1e-15)
    xyz, _, u = sp.physical(sp.theta0)
    assert torch.allclose(xyz, cr.asu.xyz, atol=1e-15) and torch.allclose(u, cr.asu.u_frac, atol=1e-15)
    # adp options
    iso = StructureParameters(cr, adp="iso")
    assert iso.names[3:] == ["C1.Uiso"] and iso.anisotropic == [False]
    assert abs(iso.theta0[3].item() - cellmod.u_equivalent(cr.asu.u_frac[0].numpy(), cell)) < 1e-15
    fixed = StructureParameters(cr, refine_xyz=False, refine_adp=False)
    assert len(fixed) == 0 and torch.allclose(fixed.physical(fixed.theta0)[2], cr.asu.u_frac)


def test_riding_hydrogens_paracetamol():
    cr = _load(PARA)
    sp = StructureParameters(cr, riding_geometry="offset")  # hydrogens riding on their starting offsets
    is_h = [e == "H" for e in cr.asu.elements]
    n_heavy = len(is_h) - sum(is_h)
    assert len(sp) == 4 * n_heavy == 44  # x, y, z, Uiso per non-H atom; riding H add nothing
    assert not any(n.startswith("H") for n in sp.names)
    labels = cr.asu.labels
    parents = {labels[h]: labels[j] for h, (j, _, _) in sp.riding.items()}
    assert parents == {"H1": "C5", "H2": "C4", "H3": "O1", "H4": "C2", "H5": "C1", "H6": "N1",
                       "H7": "C8", "H8": "C8", "H9": "C8"}
    x0, _, u0 = sp.physical(sp.theta0)
    assert torch.allclose(x0, cr.asu.xyz, atol=1e-14)  # start positions reproduced exactly
    th = _random_theta(sp, 3)
    x1, _, u1 = sp.physical(th)
    ueq = np.array([cellmod.u_equivalent(u.numpy(), cr.cell) for u in u1])
    for h, (j, rot, _) in sp.riding.items():
        np.testing.assert_allclose((x1[h] - x0[h]).numpy(), rot @ (x1[j] - x0[j]).numpy(), atol=1e-14)
        factor = 1.5 if labels[j] in ("O1", "C8") else 1.2
        assert sp.u_factor[h] == factor
        np.testing.assert_allclose(cellmod.u_frac_to_cart(u1[h].numpy(), cr.cell), factor * ueq[j] * np.eye(3),
                                   atol=1e-15)
    ideal = StructureParameters(cr)  # idealised: placed from the parents' neighbours
    assert sorted((g.kind, len(g.hydrogens)) for g in ideal.riding_groups) == [("bisector", 1)] * 5 + [
        ("rotor", 1), ("rotor", 3)]  # aromatic C-H and amide N-H; O-H; methyl
    dev = np.linalg.norm((ideal.physical(ideal.theta0)[0] - cr.asu.xyz).numpy() @ ideal._a.T, axis=1)
    assert dev[~np.array(is_h)].max() < 1e-12 and 0.01 < dev[np.array(is_h)].max() < 0.1  # this model's H are near ideal
    assert StructureParameters(cr, hydrogens="free").names.count("H3.Uiso") == 1
    free = StructureParameters(cr, hydrogens="free")
    assert len(free) == 44 + 4 * 9
    fixed = StructureParameters(cr, hydrogens="fixed")
    assert len(fixed) == 44 and torch.equal(fixed.physical(_random_theta(fixed))[0][is_h], cr.asu.xyz[is_h])


def test_riding_hydrogen_without_parent_is_an_error():
    cr = _crystal((10.0, 10.0, 10.0, 90, 90, 90), ["x,y,z"],
                  [("C1", "C", (0.1, 0.1, 0.1), 1.0, 0.01), ("H1", "H", (0.3, 0.1, 0.1), 1.0, 0.02)])
    with pytest.raises(ValueError, match="H1"):
        StructureParameters(cr)
    # via a lattice translation the parent is in reach
    cr.asu.xyz[1] = torch.tensor([0.1, 0.1, 1.2], dtype=torch.float64)
    sp = StructureParameters(cr)
    assert sp.riding[1][0] == 0 and np.allclose(sp.riding[1][2], [0, 0, 1])


def test_occupancy_site_groups():
    cr = _crystal((6.0, 6.0, 6.0, 90, 90, 90), ["x,y,z", "-x,-y,-z"], [
        ("Fe1", "Fe", (0.1, 0.2, 0.3), 0.6, 0.01), ("Co1", "Co", (0.1, 0.2, 0.3), 0.4, 0.01),
        ("Fe2", "Fe", (0.4, 0.2, 0.1), 0.5, 0.01), ("Co2", "Co", (-0.4, -0.2, -0.11), 0.3, 0.01),
        ("O1", "O", (0.3, 0.3, 0.3), 0.9, 0.01)])
    sp = StructureParameters(cr, refine_occupancy=True)
    assert [sp.names[i] for i in sp.groups["occupancy"]] == ["Fe1.occ", "Fe2.occ", "O1.occ"]
    th = _random_theta(sp, 5)
    occ = sp.physical(th)[1]
    assert abs(occ[0] + occ[1] - 1.0) < 1e-14 and abs(occ[2] + occ[3] - 0.8) < 1e-14
    assert abs(occ[4] - 0.9) > 1e-6  # O1 on its own is refined freely


def test_atoms_sharing_a_site_share_position_and_adp():
    """A mixed site (Fe1/Co1 at one point; Fe2 and Co2 0.06 A apart by the inversion) refines one
    position and one ADP (EXYZ/EADP): the second atom is the first's image, its U the image's U.
    Atoms on one site with occupancies above 1 in sum, or 0.5 A apart (a split site), stay apart."""
    cr = _crystal((6.0, 6.0, 6.0, 90, 90, 90), ["x,y,z", "-x,-y,-z"], [
        ("Fe1", "Fe", (0.1, 0.2, 0.3), 0.6, (0.01, 0.012, 0.014, 0.001, 0.002, 0.003)),
        ("Co1", "Co", (0.1, 0.2, 0.3), 0.4, 0.02),
        ("Fe2", "Fe", (0.4, 0.2, 0.1), 0.5, 0.01), ("Co2", "Co", (-0.4, -0.2, -0.11), 0.3, 0.01),
        ("N1", "N", (0.3, 0.3, 0.3), 0.5, 0.01), ("N2", "N", (0.3, 0.3, 0.3833), 0.5, 0.01)])
    sp = StructureParameters(cr, refine_occupancy=True)
    assert sorted(sp.shared) == [1, 3]
    assert not any(n.startswith(("Co1.", "Co2.")) and not n.endswith(".occ") for n in sp.names)
    assert any(n.startswith("N2.") and not n.endswith(".occ") for n in sp.names)  # split site (0.5 A): its own
    th = _random_theta(sp, 3)
    xyz, occ, u = sp.physical(th)
    torch.testing.assert_close(xyz[1], xyz[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(u[1], u[0], rtol=0, atol=1e-14)  # Co1 takes Fe1's anisotropic U
    torch.testing.assert_close(xyz[3], -xyz[2], rtol=0, atol=1e-14)  # the inversion image
    torch.testing.assert_close(u[3], u[2], rtol=0, atol=1e-14)
    assert sp.anisotropic[1] and abs(float(occ[0] + occ[1]) - 1) < 1e-14


def test_bounded_step_cuts_only_the_offending_atom():
    cr = _load(QUARTZ)
    sp = StructureParameters(cr)
    th = sp.theta0
    assert sp.adp_positive_definite(th)
    small = torch.zeros_like(th)
    small[sp.groups["adp"]] = 1e-4
    small[sp.groups["xyz"]] = 0.05
    step, cut = sp.bounded_step(th, small)
    assert not cut and torch.equal(step, small)
    big = torch.zeros_like(th)
    big[sp.names.index("O1.U22")] = -0.05
    big[sp.names.index("Si1.U11")] = 0.001
    big[sp.groups["xyz"]] = 0.02
    assert not sp.adp_positive_definite(th + big)
    step, cut = sp.bounded_step(th, big)
    assert cut and sp.adp_positive_definite(th + step)
    o1 = [i for i, n in enumerate(sp.names) if n.startswith("O1.U")]
    s = float(step[sp.names.index("O1.U22")] / big[sp.names.index("O1.U22")])
    assert 0 < s < 1 and torch.allclose(step[o1], s * big[o1])
    assert abs(np.linalg.eigvalsh(sp._u_cart(th + step))[1].min() - 1e-4) < 1e-9  # O1 stops at the floor
    keep = torch.ones_like(th, dtype=torch.bool)
    keep[o1] = False
    assert torch.equal(step[keep], big[keep])  # Si1's ADP and every position take the full step
    # from the floor itself, a further step the same way is still bounded (no singular factor)
    at_floor = th + step
    step2, cut2 = sp.bounded_step(at_floor, big)
    assert cut2 and np.linalg.eigvalsh(sp._u_cart(at_floor + step2)).min() > 0.4e-4
    # an atom left on the bound is named as such (reported in summary.json and warned about)
    assert sp.adp_at_bound(th) == [] and sp.adp_at_bound(at_floor) == [1]
    assert StructureParameters(cr, refine_adp=False).adp_at_bound(at_floor) == []  # not refined: not held up


def test_standard_uncertainties():
    cr = _load(QUARTZ)
    sp = StructureParameters(cr, adp="iso")
    var = torch.linspace(1e-6, 2e-6, len(sp), dtype=torch.float64)
    su = sp.standard_uncertainties(sp.theta0, torch.diag(var))
    si, o = su
    a = cr.cell[0]
    assert si["adp_type"] == "Uiso" and si["u_aniso"] is None and si["calc_flag"] == ""
    assert si["symmetry_order"] == 2 and o["symmetry_order"] == 1  # Si on a two-fold axis, O general
    assert si["u_iso_su"] == pytest.approx(np.sqrt(var[sp.names.index("Si1.Uiso")].item()), rel=1e-12)
    assert si["xyz_su"][0] == 0 and si["xyz_su"][2] == 0  # fixed by the 2-fold
    assert si["xyz_su"][1] == pytest.approx(np.sqrt(var[0].item()) / a, rel=1e-12)
    assert o["occupancy_su"] == 0.0 and o["u_iso"] == pytest.approx(sp.theta0[-1].item())
    # general check: propagation through the autograd Jacobian
    sp = StructureParameters(cr)
    g = torch.Generator().manual_seed(2)
    m = torch.randn(len(sp), len(sp), generator=g, dtype=torch.float64) * 1e-3
    cov = m @ m.T
    th = _random_theta(sp)
    jac = torch.autograd.functional.jacobian(lambda t: torch.cat([p.reshape(-1) for p in sp.physical(t)]), th)
    np.testing.assert_allclose(jac.numpy()[:6], sp.jacobian()[[0, 1, 2, 13, 14, 15]], atol=1e-15)
    res = sp.standard_uncertainties(th, cov)
    n = cellmod.reciprocal_lengths(cr.cell)
    for i, r in enumerate(res):
        ju = jac[2 * 3 + 2 + 9 * i:2 * 3 + 2 + 9 * (i + 1)].numpy()  # u_frac rows of atom i
        jx = jac[3 * i:3 * i + 3].numpy()
        np.testing.assert_allclose(r["xyz_su"], np.sqrt(np.diag(jx @ cov.numpy() @ jx.T)), rtol=1e-10)
        t6 = np.array([ju[3 * p + q] / (n[p] * n[q]) for p, q in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))])
        np.testing.assert_allclose(r["u_aniso_su"], np.sqrt(np.diag(t6 @ cov.numpy() @ t6.T)), rtol=1e-10)
        assert r["adp_type"] == "Uani" and len(r["u_aniso"]) == 6
    res = sp.standard_uncertainties(sp.theta0, cov)
    np.testing.assert_allclose(res[0]["u_aniso"], [0.012306, 0.011452, 0.00523, 0.006153, -0.001064, -0.000532],
                               atol=1e-15)
    assert res[0]["u_aniso_su"][3] == pytest.approx(res[0]["u_aniso_su"][0] / 2, rel=1e-12)  # U12 = U11 / 2
    # a parameter whose s.u. exceeds its whole range (an atom of zero occupancy: its columns vanish and the
    # inverse normal matrix gives it ~1e300) is named undetermined and given no s.u.; the others keep theirs
    sp = StructureParameters(cr, adp="iso")
    big = torch.diag(var).clone()
    o_rows = [i for i, name in enumerate(sp.names) if name.startswith("O1")]
    big[o_rows, o_rows] = 1e300
    si, o = sp.standard_uncertainties(sp.theta0, big)
    assert si["undetermined"] == [] and si["u_iso_su"] > 0 and si["xyz_su"][1] > 0
    assert o["undetermined"] == ["O1.x", "O1.y", "O1.z", "O1.U"]
    assert np.isnan(o["xyz_su"]).all() and np.isnan(o["u_iso_su"])
    assert su[1]["undetermined"] == []  # at the small variances above, nothing is


def test_riding_hydrogens_carry_no_standard_uncertainties():
    para = StructureParameters(_load(PARA))
    res = para.standard_uncertainties(para.theta0, torch.eye(len(para), dtype=torch.float64) * 1e-6)
    h = [r for r in res if r["label"].startswith("H")]
    assert all(r["calc_flag"] == "R" and r["xyz_su"] == [0, 0, 0] and r["u_iso_su"] == 0 for r in h)
    assert all(r["calc_flag"] == "" and min(r["xyz_su"]) > 0 for r in res if not r["label"].startswith("H"))


def test_gradient_matches_finite_differences():
    cr = _load(PARA)
    sp = StructureParameters(cr, refine_occupancy=True, adp="aniso")
    w = torch.linspace(0.5, 1.5, 3 * len(cr.asu.labels), dtype=torch.float64).view(-1, 3)

    def f(t):
        xyz, occ, u = sp.physical(t)
        return (torch.sin(2 * torch.pi * xyz) * w).sum() + (occ ** 2).sum() + 1e3 * (u ** 2).sum()

    th = _random_theta(sp, 7).requires_grad_(True)
    (grad,) = torch.autograd.grad(f(th), th)
    h = 1e-6
    fd = torch.stack([(f(th.detach() + h * e) - f(th.detach() - h * e)) / (2 * h)
                      for e in torch.eye(len(sp), dtype=torch.float64)])
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    crys = sp.crystal_at(th)
    assert not crys.asu.xyz.requires_grad and crys.asu.anisotropic.count(True) == 11
