"""The floating origin of polar space groups: found from the operators, held at the centroid."""

from __future__ import annotations

import gemmi
import numpy as np
import pytest
import torch

from blochflow.crystal import cell as cellmod
from blochflow.crystal.constraints import floating_origin_directions
from blochflow.crystal.structure import AsymmetricUnit, Crystal, SymmetryOps, displaced
from blochflow.refine.run import build_problem, refine
from blochflow.refine.settings import RefineSettings

from conftest import N_SAMPLES


def _rotations(hm: str) -> np.ndarray:
    return np.array([np.array(op.rot) / gemmi.Op.DEN for op in gemmi.SpaceGroup(hm).operations()])


@pytest.mark.parametrize("hm, free", [("P 1", [[1, 0, 0], [0, 1, 0], [0, 0, 1]]), ("P 1 21 1", [[0, 1, 0]]),
                                      ("P 63 m c", [[0, 0, 1]]), ("P n a 21", [[0, 0, 1]]),
                                      ("C 1 c 1", [[1, 0, 0], [0, 0, 1]]), ("P 32 2 1", []), ("P 1 21/c 1", []),
                                      ("P 21 21 21", []), ("F m -3 m", []), ("P -1", [])])
def test_polar_directions_of_space_groups(hm, free):
    dirs = floating_origin_directions(_rotations(hm))
    assert len(dirs) == len(free)
    if free:  # the same space
        expect = np.array(free, float)
        assert np.linalg.matrix_rank(np.vstack([dirs, expect]), tol=1e-8) == len(free)


def polar_quartz(truth: Crystal) -> Crystal:
    """The quartz truth described in P3_2 (its 3-fold screw operators only, polar along c): Si and
    one O as before, and the second O the 2-fold image of the first. The same crystal, so the same
    intensities, but the origin is now free along c."""
    rot, tr = truth.symmetry.rotations, truth.symmetry.translations
    keep = rot[:, 2, 2] == 1  # x,y,z and the screw axis; the 2-folds reverse z
    two = int(np.flatnonzero(~keep)[0])
    o = truth.asu.labels.index("O1")
    r = torch.as_tensor(rot[two], dtype=torch.float64)
    xyz = torch.cat([truth.asu.xyz, (r @ truth.asu.xyz[o] + torch.as_tensor(tr[two]))[None]])
    u = torch.cat([truth.asu.u_frac, (r @ truth.asu.u_frac[o] @ r.T)[None]])
    asu = AsymmetricUnit(truth.asu.labels + ["O2"], truth.asu.elements + ["O"], xyz,
                         torch.cat([truth.asu.occupancy, truth.asu.occupancy[o:o + 1]]), u,
                         list(truth.asu.anisotropic) + [truth.asu.anisotropic[o]])
    return Crystal(truth.cell, SymmetryOps(rot[keep], tr[keep]), asu)


def _centroid_z(crystal: Crystal, xyz: torch.Tensor) -> float:
    z = {"Si": 14.0, "O": 8.0}
    w = np.array([z[e] for e in crystal.asu.elements])  # every site general in P3_2: equal multiplicity
    cart = xyz.detach().numpy() @ cellmod.direct_basis(crystal.cell).T
    return float(np.sum(w * cart[:, 2]) / w.sum())


def test_polar_refinement_holds_the_centroid_and_recovers_the_structure(small_dataset, truth):
    """P3_2 quartz from a start displaced along c too: the weighted centroid stays where it started (the
    data cannot place it), the structure is recovered up to one common shift along c, the run
    converges, and the s.u. of z is finite and of the size of those of x and y."""
    ds, _, _ = small_dataset
    polar = polar_quartz(truth)
    start = displaced(polar, 0.03, 0.02, seed=5)
    start.asu.xyz = start.asu.xyz + torch.tensor([0.0, 0.0, 0.02 / truth.cell[2]])  # and all 0.02 A along c
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, adp="aniso", adam_steps=10, lm_iterations=15,
                              free_fraction=0.0)
    problem = build_problem(start, ds, settings)
    assert problem.origin is not None
    res = refine(problem, settings, log=lambda s: None)
    assert res.lm.converged, res.lm.reason
    n = len(problem.structure)
    xyz = problem.structure.physical(res.theta[:n])[0]
    assert abs(_centroid_z(polar, xyz) - _centroid_z(polar, start.asu.xyz)) < 1e-9
    a = cellmod.direct_basis(truth.cell)
    d = (xyz.detach().numpy() - polar.asu.xyz.numpy()) @ a.T  # A
    common = d[:, 2].mean()
    assert abs(common) > 0.01  # the start's centroid was off the truth's along c
    d[:, 2] -= common
    assert np.sqrt(np.mean(np.sum(d ** 2, 1))) < 0.003
    sus = problem.structure.standard_uncertainties(res.theta[:n], res.covariance[:n, :n])
    su = np.array([np.asarray(s["xyz_su"]) for s in sus]) * np.array([np.linalg.norm(a[:, k]) for k in range(3)])
    assert np.all(su > 0) and np.all(np.isfinite(su))
    assert su[:, 2].max() < 5 * su[:, :2].max()
