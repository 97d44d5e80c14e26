"""Restraints: nearest-image distances, same-ADP rows, gradients, config errors, effect on a fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blochflow.crystal.cell import direct_basis
from blochflow.crystal.restraints import nearest_image, restraint_residuals, restraints_from_config
from blochflow.crystal.structure import crystal_from_record
from blochflow.io.structure_cif import read_structure


@pytest.fixture(scope="module")
def quartz(quartz_paths):
    return crystal_from_record(read_structure(quartz_paths[0]))


def test_nearest_image_is_the_si_o_bond(quartz):
    rot, tr, d = nearest_image(quartz, 0, 1)
    assert 1.59 < d < 1.63  # Si-O in quartz
    a = direct_basis(quartz.cell)
    xi, xj = quartz.asu.xyz.numpy()
    # brute force over operators and a block of lattice translations
    best = min(np.linalg.norm(a @ (r @ xj + t + np.array(n) - xi))
               for r, t in zip(quartz.symmetry.rotations, quartz.symmetry.translations)
               for n in np.ndindex(5, 5, 5) for n in [np.array(n) - 2])
    assert abs(best - d) < 1e-9


def test_residuals_values_and_gradient(quartz):
    items = [{"type": "distance", "atoms": ["Si1", "O1"], "target": 1.5, "sigma": 0.01},
             {"type": "same_adp", "atoms": ["Si1", "O1"], "sigma": 0.002}]
    rs = restraints_from_config(items, quartz)
    xyz = quartz.asu.xyz.clone().requires_grad_(True)
    u = quartz.asu.u_frac.clone().requires_grad_(True)
    r = restraint_residuals(rs, quartz.cell, xyz, u)
    _, _, d = nearest_image(quartz, 0, 1)
    assert r.shape == (7,) and abs(float(r[0]) - (d - 1.5) / 0.01) < 1e-9
    a = torch.as_tensor(direct_basis(quartz.cell))
    diff = (a @ u[0] @ a.T - a @ u[1] @ a.T).detach()
    assert abs(float(r[1]) - float(diff[0, 0]) / 0.002) < 1e-9
    assert torch.autograd.gradcheck(lambda x, v: restraint_residuals(rs, quartz.cell, x, v), (xyz, u))


@pytest.mark.parametrize("item, message", [
    ({"type": "distance", "atoms": ["Si1", "Xx"], "target": 1.6, "sigma": 0.01}, "no atom labelled 'Xx'"),
    ({"type": "distance", "atoms": ["Si1", "O1"], "sigma": 0.01}, "'target'"),
    ({"type": "angle", "atoms": ["Si1", "O1"], "sigma": 0.01}, "type must be"),
    ({"type": "same_adp", "atoms": ["Si1", "O1"], "sigma": -1}, "'sigma'"),
])
def test_bad_restraints_are_named(quartz, item, message):
    with pytest.raises(ValueError, match=message):
        restraints_from_config([item], quartz)


def test_restraint_pulls_a_refinement(small_dataset, truth, quartz_paths, tmp_path, capsys):
    """A tight distance restraint to a wrong target moves the refined bond there; the refine
    command reads restraints from the config file and rejects an unknown atom in one line."""
    from blochflow.cli import main
    from blochflow.io.pets import select_frames
    from blochflow.refine.run import build_problem, refine
    from blochflow.refine.settings import RefineSettings

    ds, _, data = small_dataset
    keep = np.zeros(len(ds.frames), bool)
    keep[:4] = True
    base = dict(samples_per_fringe=0.0, n_samples=2, thickness=500.0, adam_steps=0, lm_iterations=4, refine_orientation=False,
                refine_thickness=False, refine_adp=False, free_fraction=0.0)
    _, _, d0 = nearest_image(truth, 0, 1)
    item = {"type": "distance", "atoms": ["Si1", "O1"], "target": round(d0 + 0.05, 4), "sigma": 0.0005}
    res = refine(build_problem(truth, select_frames(ds, keep), RefineSettings(**base, restraints=(item,))),
                 RefineSettings(**base, restraints=(item,)), log=lambda s: None)
    xyz, _, u = res.problem.structure.physical(res.theta[:len(res.problem.structure)])
    d1 = float(restraint_residuals(res.problem.restraints, truth.cell, xyz, u)[0]) * 0.0005 + item["target"]
    assert abs(d1 - (d0 + 0.05)) < 0.01  # the restrained bond (the same image as at the start) moved
    cfg = tmp_path / "r.toml"
    cfg.write_text('[[restraints]]\ntype = "distance"\natoms = ["Si1", "Q9"]\ntarget = 1.6\nsigma = 0.01\n')
    capsys.readouterr()
    assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(tmp_path / "o"), "--config", str(cfg),
                 "--samples", "1", "--thickness", "500"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Q9" in err and "r.toml" in err


def test_restraint_rows_are_counted_for_the_cif(quartz):
    """A distance restraint is one least-squares row, a same-ADP restraint six (all U_ij): the
    count refined.cif reports as _refine_ls_number_restraints."""
    from blochflow.crystal.restraints import restraint_rows

    items = [{"type": "distance", "atoms": ["Si1", "O1"], "target": 1.61, "sigma": 0.01},
             {"type": "same_adp", "atoms": ["Si1", "O1"], "sigma": 0.01}]
    assert restraint_rows(restraints_from_config(items, quartz)) == 7
    assert restraint_rows([]) == 0


def _msd_along(crystal, i, j):
    """Mean-square displacement of atom i along its bond to the nearest image of atom j (A^2), from atom
    i's own U and the bond as seen from i: no symmetry operator acts on a U tensor here."""
    a = direct_basis(crystal.cell)
    rot, tr, _ = nearest_image(crystal, i, j)
    z = a @ (rot @ crystal.asu.xyz[j].numpy() + tr - crystal.asu.xyz[i].numpy())
    z /= np.linalg.norm(z)
    return float(z @ (a @ crystal.asu.u_frac[i].numpy() @ a.T) @ z)


def test_same_distance_and_rigid_bond_values_and_gradient(quartz):
    """Same distance: each distance's deviation from the mean over sigma. Rigid bond: the two atoms'
    mean-square displacements along the bond, each computed from its own side (the neighbour's U
    rotated by the operator that makes the bond, here checked without one). Every Si-O bond between the
    two anisotropic atoms once when no atoms are named (the four of Si1, listed from it); gradients in float64."""
    assert all(quartz.asu.anisotropic)
    items = [{"type": "same_distance", "atoms": [["Si1", "O1"], ["O1", "O1"]], "sigma": 0.1},
             {"type": "rigid_bond", "atoms": ["Si1", "O1"]}, {"type": "rigid_bond"}]
    rs = restraints_from_config(items, quartz)
    xyz = quartz.asu.xyz.clone().requires_grad_(True)
    u = quartz.asu.u_frac.clone().requires_grad_(True)
    r = restraint_residuals(rs, quartz.cell, xyz, u).detach().numpy()
    d = [nearest_image(quartz, 0, 1)[2], nearest_image(quartz, 1, 1)[2]]
    assert r[:2] == pytest.approx((np.array(d) - np.mean(d)) / 0.1, abs=1e-9)
    assert rs[1].sigma == 0.004 and len(rs) == 6  # the pair, and Si1's four bonds to O1 images for 'all'
    assert r[2] == pytest.approx((_msd_along(quartz, 0, 1) - _msd_along(quartz, 1, 0)) / 0.004, abs=1e-9)
    assert abs(r[2]) > 0.05  # the kinematical model's U are not rigid-bond exact: the check has a value to match
    # the bonds equivalent by symmetry to the nearest one (one made by a 2-fold rotation) have its value
    a = direct_basis(quartz.cell)
    x = quartz.asu.xyz.numpy()
    length = [np.linalg.norm(a @ (q.rotation @ x[q.j] + q.translation - x[q.i])) for q in rs[2:]]
    same = [k for k, v in enumerate(length) if abs(v - d[0]) < 1e-6]
    assert len(same) == 2 and any(not np.allclose(rs[2 + k].rotation, np.eye(3)) for k in same)
    assert r[3 + np.array(same)] == pytest.approx([r[2], r[2]], abs=1e-9)
    assert torch.autograd.gradcheck(lambda x, v: restraint_residuals(rs, quartz.cell, x, v), (xyz, u))


@pytest.mark.parametrize("item, message", [
    ({"type": "same_distance", "atoms": [["Si1", "O1"]]}, "two or more pairs"),
    ({"type": "same_distance", "atoms": ["Si1", "O1"]}, "two or more pairs"),
    ({"type": "rigid_bond", "atoms": ["Si1"]}, "two atoms"),
    ({"type": "rigid_bond", "sigma": 0}, "'sigma'"),
])
def test_bad_new_restraints_are_named(quartz, item, message):
    with pytest.raises(ValueError, match=message):
        restraints_from_config([item], quartz)


def test_new_restraints_are_counted_for_the_cif(quartz):
    from blochflow.crystal.restraints import restraint_rows

    items = [{"type": "same_distance", "atoms": [["Si1", "O1"], ["O1", "O1"], ["Si1", "Si1"]]},
             {"type": "rigid_bond"}]
    assert restraint_rows(restraints_from_config(items, quartz)) == 2 + 4


def test_similar_adp_turns_the_neighbours_u_by_the_bonds_operator(quartz):
    """SIMU on every bond: Cartesian U_i - R U_j R^T over sigma, six rows a bond. The nearest Si-O bond
    (no operator) gives U_Si - U_O itself; its image by the two-fold axis through Si (a turned O) gives
    the same tensor turned, so the same eigenvalues, which U_O unturned would not."""
    from blochflow.crystal.restraints import restraint_rows

    rs = restraints_from_config([{"type": "similar_adp"}], quartz)
    assert len(rs) == 4 and rs[0].sigma == 0.04 and restraint_rows(rs) == 24
    u = quartz.asu.u_frac.clone().requires_grad_(True)
    rows = restraint_residuals(rs, quartz.cell, quartz.asu.xyz, u).detach().numpy().reshape(4, 6) * 0.04
    iu = np.triu_indices(3)

    def tensor(v):
        m = np.zeros((3, 3))
        m[iu] = v
        return m + np.triu(m, 1).T

    a = direct_basis(quartz.cell)
    x = quartz.asu.xyz.numpy()
    d0 = nearest_image(quartz, 0, 1)[2]
    same = [k for k, r in enumerate(rs) if abs(np.linalg.norm(a @ (r.rotation @ x[r.j] + r.translation - x[r.i])) - d0) < 1e-6]
    plain = [k for k in same if np.allclose(rs[k].rotation, np.eye(3))][0]
    turned = [k for k in same if k != plain][0]
    uc = [a @ m @ a.T for m in quartz.asu.u_frac.numpy()]
    assert tensor(rows[plain]) == pytest.approx(uc[0] - uc[1], abs=1e-12)
    assert np.linalg.eigvalsh(tensor(rows[turned])) == pytest.approx(np.linalg.eigvalsh(uc[0] - uc[1]), abs=1e-12)
    assert np.abs(tensor(rows[turned]) - (uc[0] - uc[1])).max() > 1e-3  # the same tensor, turned
    assert torch.autograd.gradcheck(lambda v: restraint_residuals(rs, quartz.cell, quartz.asu.xyz, v), (u,))


def test_rigid_bond_test_of_a_refined_model(quartz):
    """Hirshfeld's test on quartz: Si1's four bonds are two pairs alike by the two-fold axis, so two rows;
    the nearest bond's dU as each atom sees it from its own side; s.u. by finite differences."""
    from blochflow.crystal.parameters import StructureParameters
    from blochflow.crystal.restraints import rigid_bond_test

    sp = StructureParameters(quartz)
    rows = rigid_bond_test(sp, sp.theta0, None)
    assert len(rows) == 2 and all(r["su"] is None for r in rows)
    crystal = sp.crystal_at(sp.theta0)
    near = (_msd_along(crystal, 0, 1) - _msd_along(crystal, 1, 0))
    assert min(abs(r["delta"] - near) for r in rows) < 1e-12
    sigma = 1e-3
    cov = torch.eye(len(sp), dtype=torch.float64) * sigma ** 2
    rows = rigid_bond_test(sp, sp.theta0, cov)

    def deltas(theta):
        return np.array([r["delta"] for r in rigid_bond_test(sp, theta, None)])

    h = 1e-6
    grad = np.array([(deltas(sp.theta0 + h * e) - deltas(sp.theta0 - h * e)) / (2 * h)
                     for e in torch.eye(len(sp), dtype=torch.float64)])  # (P, rows)
    assert [r["su"] for r in rows] == pytest.approx(sigma * np.sqrt((grad ** 2).sum(0)), rel=1e-6)


def test_rigid_bond_lines_warn_above_the_limit():
    from blochflow.cli import rigid_bond_lines

    ok = [{"label_1": "Si1", "label_2": "O1", "delta": -0.000516, "su": 0.000211}]
    assert rigid_bond_lines(ok) == ["rigid-bond test (Hirshfeld): 1 bond between anisotropic atoms, largest "
                                    "|dU| 0.0005(2) A^2 (Si1-O1, 2.4 s.u.)"]
    loose = [{"label_1": "C1", "label_2": "C2", "delta": 0.004, "su": 0.002}]  # 2 s.u.: not significant
    strong = [{"label_1": "C1", "label_2": "C3", "delta": 0.004, "su": 0.0005}]
    assert len(rigid_bond_lines(loose)) == 1 and len(rigid_bond_lines(ok + strong)) == 2
    assert "C1-C3" in rigid_bond_lines(ok + strong)[1] and rigid_bond_lines([]) == []
