"""Centrosymmetric crystals: real structure matrices are solved as real symmetric (faster), with
the same intensities, gradients and Jacobian as the complex solver."""

from __future__ import annotations

import gemmi
import numpy as np
import torch

from blochflow.crystal.structure import AsymmetricUnit, Crystal, SymmetryOps
from blochflow.physics import bloch
from blochflow.refine.run import build_problem
from blochflow.refine.settings import RefineSettings

from conftest import N_SAMPLES


def centrosymmetric_crystal(cell) -> Crystal:
    """A made-up P-3 crystal on the quartz cell (general positions, anisotropic ADPs): its inversion
    centre is at the origin, so every U_g is real."""
    ops = gemmi.SpaceGroup("P -3").operations()
    symmetry = SymmetryOps.from_triplets([op.triplet() for op in ops])
    xyz = torch.tensor([[0.31, 0.12, 0.21], [0.14, 0.43, 0.33], [0.61, 0.22, 0.07]], dtype=torch.float64)
    u = torch.diag(torch.tensor([0.004, 0.004, 0.003], dtype=torch.float64)).expand(3, 3, 3).clone()
    asu = AsymmetricUnit(["Si1", "O1", "O2"], ["Si", "O", "O"], xyz, torch.ones(3, dtype=torch.float64), u,
                         [True, True, True])
    return Crystal(cell, symmetry, asu)


DOUBLE_JACOBIAN = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, adp="aniso", thickness=500.0,
                                 free_fraction=0.0, jacobian_precision="double")


def _assert_same(values, reference, rtol: float) -> None:
    """Each tensor within rtol of its reference's largest element (which is not 0)."""
    for x, y in zip(values, reference):
        scale = float(y.abs().max())
        assert scale > 0 and float((x - y).abs().max()) < rtol * scale


def _eigh_calls(monkeypatch) -> list[bool]:
    """From now on, for each torch.linalg.eigh call, whether its matrices were complex."""
    calls = []
    real_eigh = torch.linalg.eigh

    def spy(a, *args, **kw):
        calls.append(a.is_complex())
        return real_eigh(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    return calls


def _passes(problem, theta):
    """Intensities (no gradient), an objective's gradient and the Jacobian, all in double."""
    problem._last_decompositions = None
    with torch.no_grad():
        ic = problem.intensities(theta)
    th = theta.clone().requires_grad_(True)
    problem.objective(th).backward()
    problem._last_decompositions = None
    return ic, th.grad, problem.jacobian(theta)[2]


def test_real_structure_matrices_give_the_complex_solvers_results(small_dataset, truth, monkeypatch):
    ds, _, _ = small_dataset
    crystal = centrosymmetric_crystal(truth.cell)
    settings = DOUBLE_JACOBIAN
    problem = build_problem(crystal, ds, settings)
    theta = problem.theta0.clone()
    calls = _eigh_calls(monkeypatch)
    fast = _passes(problem, theta)
    assert calls and not any(calls)  # every solve took the real path
    calls.clear()
    monkeypatch.setattr(bloch, "REAL_TOLERANCE_EPS", -1.0)  # nothing counts as real
    plain = _passes(problem, theta)
    assert calls and all(calls)
    _assert_same(fast, plain, 1e-10)


def test_quartz_stays_complex_in_single_precision(small_dataset, truth, monkeypatch):
    """Quartz (P3_221) in an Adam pass's complex64 solves: padded beams put 1e4 on the diagonal, which
    must not set the scale against which imaginary parts count as rounding (it once did: the Adam
    gradients lost Im U_g and the paper's synthetic quartz stopped at 0.012 A instead of 0.0002 A)."""
    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, thickness=500.0, free_fraction=0.0)
    problem = build_problem(truth, ds, settings)
    assert any(bool((~ch.mask).any()) for ch in problem.model.plan.chunks)  # some beams are padding
    calls = _eigh_calls(monkeypatch)
    problem.forward_dtype = torch.float32
    th = problem.theta0.clone().requires_grad_(True)
    problem.objective(th, "amplitude").backward()
    assert calls and all(calls)


def test_non_centrosymmetric_matrices_stay_complex():
    a = torch.randn(4, 6, 6, dtype=torch.complex128)
    a = a + a.mH
    assert not bloch._effectively_real(a)
    padded = (0.01 * a).to(torch.complex64)
    padded.diagonal(dim1=-2, dim2=-1).fill_(1e4)
    assert not bloch._effectively_real(padded)  # the diagonal sets no scale
    real = (a.real + 0j).contiguous()
    assert bloch._effectively_real(real)
    real[3, 1, 2] += 1e-9j  # one element of one matrix: the whole batch stays complex
    assert not bloch._effectively_real(real)
    lam, vec = bloch.hermitian_eigh((a.real + 0j).contiguous())
    assert vec.dtype == torch.complex128
    ref = torch.linalg.eigvalsh(a.real)
    assert torch.allclose(lam, ref, atol=1e-12)
    assert np.allclose((vec @ torch.diag_embed(lam + 0j) @ vec.mH).numpy(), (a.real + 0j).numpy(), atol=1e-12)


def test_inversion_centre_off_the_origin_gives_the_same_intensities_and_real_matrices(small_dataset, truth,
                                                                                        monkeypatch):
    """The same P-3 crystal described with its origin moved off the inversion centre (atoms and
    operators shifted by c0): the potential is taken about the centre, so the solves are real and
    intensities and Jacobian equal those of the centred description."""
    ds, _, _ = small_dataset
    centred = centrosymmetric_crystal(truth.cell)
    c0 = np.array([0.13, 0.27, 0.05])
    rot, tr = centred.symmetry.rotations, centred.symmetry.translations
    shifted_ops = SymmetryOps(rot, (tr + (np.eye(3) - rot) @ c0) % 1.0)
    assert np.allclose(shifted_ops.inversion_centre() % 1.0, c0)
    a = centred.asu
    shifted = Crystal(centred.cell, shifted_ops, AsymmetricUnit(a.labels, a.elements, a.xyz + torch.as_tensor(c0),
                                                                a.occupancy, a.u_frac, a.anisotropic))
    settings = DOUBLE_JACOBIAN
    calls = _eigh_calls(monkeypatch)
    out = []
    for crystal in (centred, shifted):
        problem = build_problem(crystal, ds, settings)
        out.append(_passes(problem, problem.theta0.clone()))
    assert calls and not any(calls)
    _assert_same(*out, 1e-9)


def test_friedel_mates_share_a_coefficient_in_the_potential_contraction(small_dataset, truth, monkeypatch):
    """With real potential tangents (dU_h = dU_-h) the contraction bins each beam pair with its
    reverse: about half the coefficients to contract, the same Jacobian; also with the origin off the
    inversion centre, where the potential is taken about the centre."""
    import blochflow.physics.diffraction as diffraction

    ds, _, _ = small_dataset
    centred = centrosymmetric_crystal(truth.cell)
    c0 = np.array([0.13, 0.27, 0.05])
    rot, tr = centred.symmetry.rotations, centred.symmetry.translations
    a = centred.asu
    shifted = Crystal(centred.cell, SymmetryOps(rot, (tr + (np.eye(3) - rot) @ c0) % 1.0),
                      AsymmetricUnit(a.labels, a.elements, a.xyz + torch.as_tensor(c0), a.occupancy, a.u_frac,
                                     a.anisotropic))
    monkeypatch.setattr(diffraction, "CONTRACTION_MIN_TANGENTS", 1)  # every Jacobian contracts
    real_contraction = diffraction._potential_contraction
    sizes = []

    def spy(left, right, idx, *args, **kw):
        g, uniq = real_contraction(left, right, idx, *args, **kw)
        sizes.append(g.shape[-1])
        return g, uniq

    monkeypatch.setattr(diffraction, "_potential_contraction", spy)
    for crystal in (centred, shifted):
        problem = build_problem(crystal, ds, DOUBLE_JACOBIAN)
        plan = problem.model.plan
        rows = diffraction.friedel_rows(plan)
        hkl = torch.as_tensor(plan.potential_hkl).long()
        mate = {tuple(h): i for i, h in enumerate(hkl.tolist())}
        expected = [min(i, mate.get(tuple((-h).tolist()), i)) for i, h in enumerate(hkl)]
        assert rows.tolist() == expected + [len(hkl)]
        jac, counts = {}, {}
        for on in (False, True):
            monkeypatch.setattr(diffraction, "FRIEDEL_BINS", on)
            sizes.clear()
            problem._last_decompositions = None
            jac[on] = problem.jacobian(problem.theta0)[2]
            counts[on] = sum(sizes)
        assert counts[True] < 0.6 * counts[False]
        scale = float(jac[False].abs().max())
        assert scale > 0 and float((jac[True] - jac[False]).abs().max()) < 1e-10 * scale
