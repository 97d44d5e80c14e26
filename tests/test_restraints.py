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
    from blochflow.refine.run import RefineSettings, build_problem, refine

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
