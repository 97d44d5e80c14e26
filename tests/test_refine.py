"""Refinement: Jacobian, recovery of a known structure, resume, R_free groups, the refine command."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from contextlib import contextmanager

import gemmi
import numpy as np
import pytest
import torch

from blochflow.cli import main
from blochflow.crystal import cell as cellmod
from blochflow.crystal.structure import crystal_from_record, displaced
from blochflow.io.pets import read_pets, select_frames
from blochflow.io.structure_cif import read_structure
from blochflow.physics.workers import fixed_workers
from blochflow.refine.problem import equivalence_keys, free_set_mask
from blochflow.refine.run import Interrupted, build_problem, refine
from blochflow.refine.settings import RefineSettings, settings_from_mapping
from blochflow.report.outputs import frame_standard_uncertainties

from conftest import N_SAMPLES, _rmsd, every_nth_frame, simulated


@pytest.mark.parametrize("kind", ["intensity", "amplitude", "intensity-bethe"])
def test_jacobian_matches_finite_differences(small_dataset, truth, kind):
    ds, _, _ = small_dataset
    keep = np.zeros(len(ds.frames), bool)
    keep[[1, 4]] = True
    beams = dict(s_max=0.01, s_bethe=0.04) if kind.endswith("-bethe") else {}
    kind = kind.removesuffix("-bethe")
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=2, adp="aniso", absorption="proportional", refine_absorption=True,
                              thickness=500.0, free_fraction=0.2, jacobian_precision="double", orientation_sigma=0.0,
                              **beams)  # observation rows only: the prior rows are tested below
    problem = build_problem(displaced(truth, 0.03, 0.02), select_frames(ds, keep), settings)
    theta = problem.theta0.clone()
    theta[problem.group_index("orientation")] = 0.4  # away from zero, where all angles matter
    _, r, jac = problem.jacobian(theta, kind=kind)

    def res(th):
        return problem.residuals(problem.intensities(th), kind)

    assert torch.allclose(r, res(theta), rtol=1e-12, atol=1e-12)
    assert abs(float(r @ r) - float(problem.objective(theta, kind))) < 1e-10 * float(r @ r)
    for i in range(problem.n_params):
        e = torch.zeros_like(theta)
        e[i] = 1e-6
        fd = (res(theta + e) - res(theta - e)) / 2e-6
        scale = max(float(fd.abs().max()), 1e-3)
        assert float((jac[:, i] - fd).abs().max()) < 1e-5 * scale, problem.names[i]
    assert float(jac.abs().max(0).values.min()) > 0  # every parameter reaches the residuals


def test_a_frame_anticorrelated_with_the_model_is_held_at_scale_zero(small_dataset, truth):
    """A frame whose Io anticorrelate with the model (here: negated) gets scale 0, not a negative one: its data
    stay unexplained, its residuals are constant (zero Jacobian rows), and the analytic Jacobian agrees with
    finite differences of the profiled residuals also there; the other frame is fitted as before."""
    ds, _, _ = small_dataset
    keep = np.zeros(len(ds.frames), bool)
    keep[[1, 4]] = True
    sub = select_frames(ds, keep)
    flip = sub.reflections.frame_id == sub.frames.ids[0]
    sub = dataclasses.replace(sub, reflections=dataclasses.replace(
        sub.reflections, intensity=np.where(flip, -np.abs(sub.reflections.intensity) - 1.0, sub.reflections.intensity)))
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=2, thickness=500.0, free_fraction=0.0,
                              jacobian_precision="double", orientation_sigma=0.0)
    problem = build_problem(displaced(truth, 0.03, 0.02), sub, settings)
    theta = problem.theta0.clone()
    k = problem.scales(problem.intensities(theta))
    assert float(k[0]) == 0.0 and float(k[1]) > 0
    _, r, jac = problem.jacobian(theta)
    rows0 = (problem.model.frame == 0)[problem.work]
    assert bool(rows0.any()) and float(jac[rows0].abs().max()) == 0.0
    for i in range(problem.n_params):
        e = torch.zeros_like(theta)
        e[i] = 1e-6
        fd = (problem.residuals(problem.intensities(theta + e)) - problem.residuals(problem.intensities(theta - e))) / 2e-6
        assert float((jac[:, i] - fd).abs().max()) < 1e-5 * max(float(fd.abs().max()), 1e-3), problem.names[i]


def test_per_frame_steps_are_capped_frame_by_frame(small_dataset, truth):
    """A frame's thickness and orientation step is scaled to PER_FRAME_MAX_STEP on its own; other
    frames and the structure keep their full step."""
    from blochflow.refine.problem import PER_FRAME_MAX_STEP

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=2, thickness=500.0, free_fraction=0.0)
    problem = build_problem(truth, ds, settings)
    theta = problem.theta0.clone()
    delta = 1e-3 * torch.ones_like(theta)
    th, orient = problem.slots["thickness"], problem.slots["orientation"]
    delta[th.start + 2] = 0.5  # frame 2: log-thickness step of 0.5
    delta[orient.start + 2 * 3: orient.start + 2 * 3 + 2] = torch.tensor([4.0, -2.0])  # frame 3
    step, cut = problem.bounded_step(theta, delta)
    assert cut
    assert float(step[th.start + 2]) == pytest.approx(PER_FRAME_MAX_STEP["thickness"])
    o3 = step[orient.start + 6: orient.start + 8]
    assert torch.allclose(o3, torch.tensor([4.0, -2.0], dtype=o3.dtype) * PER_FRAME_MAX_STEP["orientation"] / 4.0)
    untouched = torch.ones_like(theta, dtype=torch.bool)
    untouched[[th.start + 2, orient.start + 6, orient.start + 7]] = False
    assert torch.equal(step[untouched], delta[untouched])


@pytest.mark.parametrize("orientation_sigma, offset", [(0.0, 4.0), (2.0, 2.0)])
def test_lm_takes_each_frames_best_fraction_of_its_step(small_dataset, truth, monkeypatch, orientation_sigma, offset):
    """Each frame keeps the fraction of its own step that fits it best. Frame costs are separable
    once the global step is fixed, so the objective the step reports (put together from several
    trials) is the objective at the new point; frames that fitted short of their full step are
    damped in the next solve; the LM state carries the damping (and checkpoints it)."""
    from blochflow.refine.optimise import LMState, lm_step
    from blochflow.refine.problem import PER_FRAME_MAX_STEP
    from blochflow.refine.run import _lm_from_dict, _lm_to_dict, refined_index

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=2, thickness=500.0, free_fraction=0.0,
                              orientation_sigma=orientation_sigma)
    problem = build_problem(displaced(truth, 0.02, 0.02), ds, settings)
    theta = problem.theta0.clone()
    # a frame's own prior rows (its orientation prior) are its share of the prior
    assert float(problem.frame_prior_costs(theta + 1.0).sum()) == pytest.approx(float(problem.prior_cost(theta + 1.0)))
    # mrad from the truth, with caps wide enough that a frame's full Gauss-Newton step can overshoot
    theta[problem.group_index("orientation")] = offset
    monkeypatch.setitem(PER_FRAME_MAX_STEP, "orientation", 8.0)
    monkeypatch.setitem(PER_FRAME_MAX_STEP, "thickness", 1.0)
    index = refined_index(problem, settings)
    state = LMState(damping=1e-6)
    start = float(problem.objective(theta))
    composed = 0
    for _ in range(6):
        theta, _ = lm_step(problem, theta, state, index)
        kept = problem.decompositions_at(theta)
        if state.history[-1]["frames_partial_step"] > 0 and kept is not None:
            # eigendecompositions put together frame by frame: those a pass at the new point makes
            with torch.no_grad():
                problem.intensities(theta.clone())
            fresh = problem.decompositions_at(theta)
            assert fresh is not kept
            assert all(torch.equal(x, y) for a, b in zip(kept.chunks, fresh.chunks) for x, y in zip(a, b)
                       if x is not None)
            composed += 1
        problem._last_intensities = None  # the reported cost must not lean on the composed cache
        assert float(problem.objective(theta)) == pytest.approx(state.cost, rel=1e-9)
    assert state.cost < start
    assert any(h["frames_partial_step"] > 0 for h in state.history)  # the per-frame search ran
    assert composed  # and the next Jacobian's decompositions were composed from its trials
    damping = torch.as_tensor(state.frame_damping)
    assert damping.shape == (problem.model.n_frames,)
    assert bool((damping >= 0).all()) and bool((damping > 0).any())  # frames that overshot are damped
    assert _lm_from_dict(_lm_to_dict(state)).frame_damping == state.frame_damping


def test_frame_line_search_weighs_each_frames_own_prior(small_dataset, truth):
    """A frame picks the fraction of its step by its data cost plus its own prior rows: a step that
    fits the data a little better but moves every orientation far outside a narrow prior is not
    taken by any frame, so the combined point does not raise the objective."""
    from blochflow.refine.optimise import _frame_line_search

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=2, thickness=500.0, free_fraction=0.0,
                              orientation_sigma=0.002)
    problem = build_problem(displaced(truth, 0.02, 0.02), ds, settings)
    theta = problem.theta0.clone()
    orient = problem.group_index("orientation")
    th = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(problem.objective(th), th)  # at zero corrections: the data's gradient
    delta = torch.zeros_like(theta)
    delta[orient] = -0.3 * torch.sign(grad[orient])  # downhill for the data, 150 sigma out for the prior
    with torch.no_grad():
        current = float(problem.objective(theta))
    frames = problem.parameter_frames()
    before = problem.frame_costs(theta) + problem.frame_prior_costs(theta)
    step, total, fraction, _ = _frame_line_search(problem, theta, delta, frames, before, current, "intensity")
    assert total <= current
    with torch.no_grad():
        assert float(problem.objective(theta + step)) == pytest.approx(total, rel=1e-9)
    assert bool((fraction == 0).all())


def test_frame_damping_follows_each_frames_fitted_fraction():
    """A frame that fitted best at a fraction f of its step is damped by at least 1/f - 1 (doubling
    what it had), one whose cost rose at every fraction as for the smallest fraction, and one whose
    full step fitted loses damping down to zero."""
    from blochflow.refine.optimise import FRAME_DAMPING_DECAY, update_frame_damping

    damping = torch.tensor([0.0, 0.0, 4.0, 3.0, 1e-3, 0.0])
    fraction = torch.tensor([0.5, 0.25, 0.5, 1.0, 1.0, 0.0])
    rose = torch.tensor([False, False, False, False, False, True])
    out = update_frame_damping(damping, fraction, rose)
    assert out.tolist() == pytest.approx([1.0, 3.0, 8.0, 3.0 / FRAME_DAMPING_DECAY, 0.0, 7.0])


def test_frames_whose_step_turned_back_are_found():
    """A frame whose own (scaled) step points back against its last one overshot; one that goes on,
    or turns by a right angle, did not; shared parameters (frame -1) do not count."""
    from blochflow.refine.optimise import reversed_frames

    frame_of = torch.tensor([-1, 0, 0, 1, 1, 2, 2, 3, 3])
    previous = torch.tensor([5.0, 1.0, 0.2, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    step = torch.tensor([-5.0, -0.8, -0.1, 0.5, 0.1, 0.0, 1.0, 1.0, 0.0])
    assert reversed_frames(previous, step, frame_of, 4).tolist() == [True, False, False, False]
    assert not reversed_frames(previous, previous, frame_of, 4).any()


def test_frame_damping_solves_the_structure_step_with_the_damped_frames(small_dataset, truth):
    """With a frame damped, the LM solve shortens that frame's own step and the shared part of the
    step follows from the same damped system (not the undamped step cut afterwards)."""
    from blochflow.refine.optimise import LMState, lm_step
    from blochflow.refine.run import refined_index

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=2, thickness=500.0, free_fraction=0.0,
                              orientation_sigma=0.0)
    problem = build_problem(displaced(truth, 0.02, 0.02), ds, settings)
    theta = problem.theta0.clone()
    index = refined_index(problem, settings)
    steps = []
    for frame_damping in (None, [0.0] + [1e3] * (problem.model.n_frames - 1)):
        state = LMState(damping=1e-7, frame_damping=frame_damping)
        new, _ = lm_step(problem, theta, state, index)
        steps.append(new - theta)
    frames = problem.parameter_frames()
    damped = frames >= 1
    assert float(steps[1][damped].abs().max()) < 0.02 * float(steps[0][damped].abs().max())
    own0 = frames == 0
    assert float(steps[1][own0].abs().max()) > 0.1 * float(steps[0][own0].abs().max())
    shared = frames < 0
    assert not torch.allclose(steps[0][shared], steps[1][shared], rtol=1e-3, atol=0)


@pytest.mark.parametrize("absorption", ["none", "proportional"])
def test_single_precision_jacobian_agrees_with_double(small_dataset, truth, absorption):
    """The default Jacobian works in complex64 (values stay double): every column within 1e-3 of
    the double-precision one, relative to the column's size, on every parameter kind (measured:
    median 5e-5, worst 2-4e-4; the LM step and the s.u. need far less). With exact absorption
    the same fused rule runs on general eigendecompositions."""
    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=4, adp="aniso", thickness=500.0, free_fraction=0.0, absorption=absorption,
                              refine_absorption=absorption != "none")
    problem = build_problem(displaced(truth, 0.03, 0.02), ds, settings)
    theta = problem.theta0.clone()
    theta[problem.group_index("orientation")] = 0.4
    out = {}
    for dtype in (torch.float64, torch.float32):
        problem.jacobian_dtype = dtype
        out[dtype] = problem.jacobian(theta)
    (_, r64, j64), (_, r32, j32) = out[torch.float64], out[torch.float32]
    tol = 1e-12 if absorption == "none" else 1e-9  # the double Jacobian's values come from its own eig
    assert torch.allclose(r64, r32, rtol=tol, atol=tol)  # residuals (LM cost) stay double
    scale = j64.abs().max(0).values
    err = (j32 - j64).abs().max(0).values / scale
    assert bool((scale > 0).all()) and float(err.max()) < 1e-3
    assert float(err.max()) > 1e-9  # it did run in single precision


def test_decompositions_are_kept_within_a_share_of_the_device_memory(small_dataset, truth, monkeypatch):
    """A forward pass keeps its decompositions for the Jacobian when they fit the fixed budget or the
    share of the solving device's memory, whichever is larger; beyond both it does not."""
    import blochflow.refine.problem as problem_mod

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=4, thickness=500.0, free_fraction=0.0)
    problem = build_problem(displaced(truth, 0.03, 0.02), ds, settings)
    problem.jacobian_dtype = problem.forward_dtype = torch.float64
    plan = problem.model.plan
    size = sum(ch.hkl.shape[0] * ch.hkl.shape[1] ** 2 for ch in plan.chunks) * 16  # complex128
    monkeypatch.setattr(problem_mod, "KEEP_DECOMPOSITIONS_BYTES", 0.0)
    for memory, kept in ((8.1 * size, True), (7.9 * size, False)):
        monkeypatch.setattr(problem_mod, "device_memory", lambda device, m=memory: m)
        assert problem._keeps(plan) is kept
    monkeypatch.setattr(problem_mod, "KEEP_DECOMPOSITIONS_BYTES", 1.01 * size)
    assert problem._keeps(plan)


@pytest.mark.parametrize("case", ["elastic", "absorption", "learned"])
def test_jacobian_reuses_the_decompositions_of_the_forward_pass(small_dataset, truth, monkeypatch, case):
    """A Jacobian at the point of the last forward pass without gradient (an LM iteration's accepted
    trial) takes that pass's eigendecompositions instead of solving again: in double precision the
    same columns with no eigensolver call; in single precision closer to the double-precision
    Jacobian than with its own complex64 solves."""
    ds, _, _ = small_dataset
    extra = {"absorption": dict(absorption="proportional", refine_absorption=True),
             "learned": dict(thickness_model="learned", thickness_points=4, thickness_knots=3, thickness_basis=3,
                             learned_warm_start="scan")}.get(case, {})
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=4, adp="aniso", thickness=500.0, free_fraction=0.0, **extra)
    problem = build_problem(displaced(truth, 0.03, 0.02), ds, settings)
    theta = problem.theta0.clone()
    theta[problem.group_index("orientation")] = 0.4
    solver = "eig" if case == "absorption" else "eigh"
    calls = []
    original = getattr(torch.linalg, solver)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, solver, counted)
    jac = {}
    for dtype in (torch.float64, torch.float32):
        problem.jacobian_dtype = dtype
        problem._last_decompositions = None
        jac[dtype, False] = problem.jacobian(theta)[2]
        with torch.no_grad():
            problem.intensities(theta.clone())  # keeps its decompositions
        calls.clear()
        jac[dtype, True] = problem.jacobian(theta)[2]
        assert not calls  # no eigensolver call
    scale = jac[torch.float64, False].abs().max(0).values
    assert bool((scale > 0).all())

    def err(j):
        return float(((j - jac[torch.float64, False]).abs().max(0).values / scale).max())

    assert err(jac[torch.float64, True]) < 1e-9
    assert err(jac[torch.float32, True]) < 0.2 * err(jac[torch.float32, False])  # measured 1-4e-5 against 4-5e-4
    problem._last_decompositions = None  # a pass at another point is not reused
    with torch.no_grad():
        problem.intensities(theta + 1e-3)
    calls.clear()
    problem.jacobian(theta)
    assert calls


def test_free_set_keeps_symmetry_groups_together(truth):
    hkl = np.array([[h, k, l] for h in range(-4, 5) for k in range(-4, 5) for l in range(-4, 5)])
    free = free_set_mask(hkl, truth.symmetry.rotations, 0.1)
    assert 0.03 < free.mean() < 0.2
    rots = np.concatenate([truth.symmetry.rotations, -truth.symmetry.rotations])
    index = {tuple(h): i for i, h in enumerate(hkl)}
    for i, h in enumerate(hkl):
        for r in rots:
            j = index.get(tuple(h @ r))
            if j is not None:
                assert free[i] == free[j]
    # one key per equivalence group: the -3m Laue class of quartz has 12 equivalents of a general hkl
    keys = equivalence_keys(hkl, truth.symmetry.rotations)
    general = [tuple(k) for h, k in zip(hkl, keys) if tuple(h) == (1, 2, 3)]
    assert sum(tuple(k) == general[0] for k in keys) == 12
    assert len({tuple(k) for k in keys}) == len({frozenset(tuple(h @ r) for r in rots) for h in hkl})
    # the fraction is of the groups present, whatever their number
    n_groups = len({tuple(k) for k in keys})
    for fraction, seed in ((0.1, 0), (0.05, 3)):
        chosen = free_set_mask(hkl, truth.symmetry.rotations, fraction, seed)
        assert len({tuple(k) for k in keys[chosen]}) == round(fraction * n_groups)
    few = hkl[:40]
    assert len({tuple(k) for k in equivalence_keys(few, truth.symmetry.rotations)[free_set_mask(
        few, truth.symmetry.rotations, 0.01)]}) == 1  # at least one group


def test_recovers_known_structure_with_honest_uncertainties(small_dataset, truth):
    ds, thickness, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, adp="aniso", adam_steps=10, lm_iterations=15, free_fraction=0.0)
    problem = build_problem(displaced(truth, 0.02, 0.03), ds, settings)
    res = refine(problem, settings, log=lambda s: None)
    assert res.lm.converged, res.lm.reason
    xyz, _, u = problem.structure.physical(res.theta[:len(problem.structure)])
    assert _rmsd(xyz, truth) < 0.002
    u_true = np.array([cellmod.u_frac_to_cif(x, truth.cell)[:3] for x in truth.asu.u_frac.numpy()])
    u_ref = np.array([cellmod.u_frac_to_cif(x, truth.cell)[:3] for x in u.detach().numpy()])
    assert np.max(np.abs(u_ref - u_true) / u_true) < 0.15
    t_ref = 1000 * torch.exp(problem.split(res.theta)["thickness"][:, 0]).numpy()
    assert np.max(np.abs(t_ref - thickness)) < 20
    assert 0.5 < res.figures.GoF < 2.0  # Poisson sigma and the same forward model: GoF near 1
    # errors against the truth in units of the reported s.u. (positions, fractional)
    sus = problem.structure.standard_uncertainties(res.theta[:len(problem.structure)],
                                                   res.covariance[:len(problem.structure), :len(problem.structure)])
    z = []
    for a, t in zip(sus, truth.asu.xyz.numpy()):
        for c in range(3):
            if a["xyz_su"][c] > 0:
                d = (a["xyz"][c] - t[c] + 0.5) % 1 - 0.5
                z.append(d / a["xyz_su"][c])
    assert len(z) >= 4 and np.max(np.abs(z)) < 5
    # the covariance is the last LM cycle's normal matrix scaled by GoF^2 at the final point: within
    # 1 % of one formed at the final point (structure), with GoF^2 from the final point's cost
    from blochflow.refine.optimise import covariance, normal_equations

    ne, _ = normal_equations(problem, res.theta, res.refined_index)
    fresh, _ = covariance(ne)
    structure = res.refined_index < len(problem.structure)
    ratio = torch.sqrt(torch.diagonal(res.covariance)[res.refined_index] / torch.diagonal(fresh))[structure]
    assert float((ratio - 1).abs().max()) < 0.01


def test_lm_in_single_precision_reaches_the_double_precision_minimum(small_dataset, truth):
    """LM trial points solved in complex64 (the default) end within 0.1 s.u. of an LM solved in
    double: the minimised wR2 the same to 1e-4 of itself, R_obs (not minimised) to 1e-3 (figures are
    computed in double either way)."""
    ds, _, _ = small_dataset
    start = displaced(truth, 0.02, 0.03)
    out = {}
    for precision in ("double", "single"):
        settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, adp="aniso", adam_steps=10,
                                  lm_iterations=15, free_fraction=0.0, lm_precision=precision)
        problem = build_problem(start, ds, settings)
        out[precision] = refine(problem, settings, log=lambda s: None)
        assert out[precision].lm.converged, out[precision].lm.reason
    a, b = out["double"], out["single"]
    su = torch.sqrt(torch.diagonal(a.covariance))[a.refined_index]
    assert float(((a.theta - b.theta)[a.refined_index].abs() / su).max()) < 0.1
    assert abs(a.figures.wR2 / b.figures.wR2 - 1) < 1e-4 and abs(a.figures.R_obs / b.figures.R_obs - 1) < 1e-3


def _full_and_resumed(ds, start, settings, tmp_path, stop_after):
    """(uninterrupted run, checkpoint of a run interrupted after LM iteration ``stop_after`` (or the
    iteration that function of the uninterrupted run names), its resumed problem, the resumed run)."""
    full = refine(build_problem(start, ds, settings), settings, log=lambda s: None)
    if callable(stop_after):
        stop_after = stop_after(full)

    def stop(line):
        if line.startswith(f"lm   {stop_after:4d}/"):
            raise Interrupted()

    ck = tmp_path / "checkpoint.pt"
    part = refine(build_problem(start, ds, settings), settings, checkpoint=ck, log=stop)
    assert part.interrupted and ck.exists()
    kept = torch.load(ck, weights_only=True)
    problem = build_problem(start, ds, settings)
    resumed = refine(problem, settings, checkpoint=ck, resume=torch.load(ck, weights_only=True), log=lambda s: None)
    return full, kept, problem, resumed


def test_interrupt_and_resume_give_the_same_result(small_dataset, truth, tmp_path):
    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=2, adam_steps=4, lm_iterations=3, checkpoint_every=1, thickness=500.0,
                              free_fraction=0.0)
    full, kept, _, resumed = _full_and_resumed(ds, displaced(truth, 0.02, 0.03), settings, tmp_path, stop_after=1)
    assert kept["decompositions_kept"] and kept["kept_single"]  # the resumed run must regenerate them so
    assert not resumed.interrupted
    assert torch.allclose(resumed.theta, full.theta, rtol=0, atol=1e-8)


def test_frames_that_grow_thicker_get_the_samples_they_need(small_dataset, truth):
    """A frame moved to a thicker branch than the start design gets the tilt samples its fringes
    need; no other frame changes, and values remembered for the old plan are dropped."""
    from blochflow.refine.frame_search import grow_samples

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.3, n_samples=2, thickness=500.0, free_fraction=0.0)
    problem = build_problem(truth, ds, settings)
    theta = problem.theta0.clone()
    assert grow_samples(problem, theta, settings) == 0  # the design covers the start thickness
    before = problem.model.samples_per_frame()
    with torch.no_grad():
        problem.intensities(theta)
    theta[problem.slots["thickness"].start + 2] += float(np.log(4.0))
    assert grow_samples(problem, theta, settings) == 1
    after = problem.model.samples_per_frame()
    assert after[2] > before[2] and np.array_equal(np.delete(after, 2), np.delete(before, 2))
    assert problem._last_intensities is None and problem._last_decompositions is None


def test_at_convergence_only_frames_below_one_sample_per_fringe_grow(small_dataset, truth):
    """The convergence check grows a frame whose refined thickness left it below one sample per
    fringe (to ``samples_per_fringe``), but not one between that and the design's 1.2."""
    from blochflow.refine.frame_search import grow_samples

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=1.2, n_samples=1, thickness=500.0, free_fraction=0.0)
    problem = build_problem(truth, ds, settings)
    theta = problem.theta0.clone()
    design = problem.model.samples_per_frame()  # 1.2 per fringe at 750 A
    thickness = problem.slots["thickness"].start
    theta[thickness + 1] += float(np.log(1.7))  # 850 A: 1.06 per fringe
    theta[thickness + 2] += float(np.log(2.5))  # 1250 A: 0.72 per fringe
    assert grow_samples(problem, theta, settings, below=1.0) == 1
    grown = problem.model.samples_per_frame()
    assert grown[1] == design[1] and np.array_equal(grown[3:], design[3:])
    assert grown[2] == problem.model.fringe_counts(np.full(len(grown), 1250.0), 1.2)[2] > design[2]
    assert grow_samples(problem, theta, settings) == 1  # the design's own rule grows the other too
    assert problem.model.samples_per_frame()[1] > design[1]


def _grow_frame_0(problem) -> int:
    """A stand-in for grow_samples' growth: frame 0 gets two more samples; one frame grown."""
    counts = problem.model.samples_per_frame()
    counts[0] += 2
    problem.resample(counts)
    return 1


def test_a_run_that_grows_frames_at_convergence_goes_on(small_dataset, truth, monkeypatch):
    """Frames grown at convergence (below one sample per fringe) change the model, so LM goes on
    from there and converges again; a run whose frames all have their samples stops at once."""
    from blochflow.refine import run as runmod

    ds, _, _ = small_dataset
    calls = []

    def grow_once(problem, theta, settings, below=None):
        calls.append(below)
        if below is None or calls.count(1.0) > 1 or not grows:
            return 0
        return _grow_frame_0(problem)

    monkeypatch.setattr(runmod, "grow_samples", grow_once)
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, adam_steps=0,
                              lm_iterations=15, refine_orientation=False, thickness_rescan=False)
    iterations = {}
    for grows in (False, True):
        calls.clear()
        problem = build_problem(truth, ds, settings)
        res = refine(problem, settings, log=lambda s: None)
        assert res.lm.converged
        iterations[grows] = res.lm.iteration
        assert calls.count(1.0) == (2 if grows else 1)
    assert problem.model.samples_per_frame()[0] == N_SAMPLES + 2
    assert iterations[True] > iterations[False]


def test_resume_rebuilds_the_grown_plan(small_dataset, truth, tmp_path, monkeypatch):
    """A run interrupted after its samples were grown resumes on the grown plan (recorded in the
    checkpoint) and ends where the uninterrupted run does, to 1e-8."""
    from blochflow.refine import run as runmod

    ds, _, _ = small_dataset
    monkeypatch.setattr(runmod, "RESCAN_AFTER", 1)

    def grow_frame_0(problem, theta, settings, below=None):  # as if frame 0 had moved onto a thicker branch
        # (and had enough samples at convergence, or after the tilt search); growing once, as grow_samples does
        if below is not None or getattr(problem, "grown_frame_0", False):
            return 0
        problem.grown_frame_0 = True
        return _grow_frame_0(problem)

    monkeypatch.setattr(runmod, "grow_samples", grow_frame_0)
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=2, adam_steps=0, lm_iterations=4, checkpoint_every=1,
                              thickness=500.0, free_fraction=0.0, thickness_grid=(300.0, 800.0, 25.0))
    full, kept, resumed_problem, resumed = _full_and_resumed(ds, displaced(truth, 0.02, 0.03), settings, tmp_path,
                                                             stop_after=2)
    assert int(kept["samples_per_frame"][0]) == 2 + 2
    assert resumed_problem.model.samples_per_frame()[0] == 4
    assert torch.allclose(resumed.theta, full.theta, rtol=0, atol=1e-8)


def test_refine_command_writes_every_output(small_dataset, quartz_paths, tmp_path, capsys):
    _, _, data = small_dataset
    out = tmp_path / "run"
    config = tmp_path / "settings.toml"
    config.write_text("n_samples = 2\nsamples_per_fringe = 0.0\nadam_steps = 2\nlm_iterations = 2\nthickness = 500.0\n")
    code = main(["refine", str(quartz_paths[0]), str(data), "--out", str(out), "--config", str(config),
                 "--free-fraction", "0.1", "--lm-iterations", "1"])
    assert code == 0
    def no_constant(name):  # NaN or Infinity: not JSON
        raise AssertionError(f"summary.json holds {name}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=no_constant)
    # R_free's footing: its unique reflections counted once over frames and equivalents, and a warning
    # when they are too few to judge over-fitting
    assert 0 < summary["n_free_groups"] <= summary["n_free"] and summary["n_free_obs"] <= summary["n_free"]
    printed = capsys.readouterr().out
    assert ("warning: R_free rests on" in printed) == (summary["n_free_groups"] < 10), printed
    for key in ("R_obs", "wR2", "GoF", "R_obs_frame_mean", "wR2_frame_mean", "n_obs", "n_all", "n_frames",
                "n_beams_mean", "elapsed_s", "R_free", "n_params", "iterations", "converged", "thickness", "frames",
                "adp_at_bound"):
        assert key in summary, key
    assert summary["iterations"] == {"adam": 2, "lm": 1}  # the flag overrides the config file
    logged = (out / "refine.log").read_text()  # every message as a plain line, the final summary included
    assert "adam    2/2" in logged and "lm      1/1" in logged and "model: R_obs" in logged
    assert "residual potential (residual_potential.ccp4; F_o - F_c Fourier" in logged
    assert summary["device"] == "cpu"  # where the solves ran (the default)
    check = summary["integration"]  # the final model at twice the samples: 2 tilts are far from converged
    assert check["samples_per_frame_min"] == check["samples_per_frame_max"] == 2
    assert 0.01 < check["R_integration"] < 1 and check["frames_below_one_sample_per_fringe"] > 0
    # each frame's integration error in frames.csv (and summary "frames"); the worst named in the summary
    import csv

    rows = list(csv.DictReader(open(out / "frames.csv")))
    r_frame = np.array([float(r["R_integration"]) for r in rows])
    assert {"tilt_samples", "samples_per_fringe"} <= set(rows[0]) and "per_frame" not in check
    assert np.nanmin(r_frame) <= check["R_integration"] <= np.nanmax(r_frame)
    assert check["R_integration_worst_frame"] == pytest.approx(np.nanmax(r_frame))
    assert int(rows[int(np.nanargmax(r_frame))]["frame"]) == check["worst_frame"]
    assert summary["frames"]["R_integration"] == pytest.approx([None if np.isnan(x) else x for x in r_frame])
    assert summary["settings"]["n_samples"] == 2
    block = gemmi.cif.read(str(out / "refined.cif")).sole_block()
    small = gemmi.make_small_structure_from_block(block)
    assert len(small.sites) == 2
    assert block.find_value("_refine_ls_R_factor_gt") is not None
    # the reflections' items: counts, Bragg-angle range (theta = asin(lambda d* / 2)), index limits, wR2(gt)
    assert int(block.find_value("_diffrn_reflns_number")) == summary["n_all"] + summary["n_free"]
    theta_max = float(block.find_value("_diffrn_reflns_theta_max"))
    assert 0 < float(block.find_value("_diffrn_reflns_theta_min")) < theta_max < 3.0
    assert int(block.find_value("_diffrn_reflns_limit_h_max")) > 0 > int(block.find_value("_diffrn_reflns_limit_h_min"))
    assert 0 < float(block.find_value("_refine_ls_wR_factor_gt")) <= float(block.find_value("_refine_ls_wR_factor_ref"))
    assert "3D electron diffraction" in block.find_value("_diffrn_measurement_method")
    assert "(" in block.find_loop("_atom_site_fract_x")[0] or "(" in block.find_loop("_atom_site_fract_y")[0]
    bonds = block.find("_geom_bond_", ["atom_site_label_1", "atom_site_label_2", "distance", "site_symmetry_2"])
    assert len(bonds) == 4 and all("(" in row[2] for row in bonds)  # Si-O with the s.u. of the covariance
    assert len(block.find_loop("_geom_angle")) == 7
    details = gemmi.cif.as_string(block.find_value("_refine_special_details"))
    assert "unmerged intensities" in details and "hydrogen" not in details.lower()  # quartz has no H to describe
    # the residual density: the F_o - F_c map's extremes, as in summary.json and its map file
    residual = summary["residual_potential"]
    assert float(block.find_value("_refine_diff_density_max")) == pytest.approx(residual["max"], abs=6e-4)
    assert float(block.find_value("_refine_diff_density_min")) == pytest.approx(residual["min"], abs=6e-4)
    assert float(block.find_value("_refine_diff_density_rms")) == pytest.approx(residual["rms"], abs=6e-4)
    assert residual["min"] < 0 < residual["max"] and "_refine_diff_density" in details.replace("\n", " ")
    grid = np.array(gemmi.read_ccp4_map(str(out / residual["file"])).grid, copy=False)
    assert grid.max() == pytest.approx(residual["max"], rel=1e-5) and grid.min() == pytest.approx(residual["min"], rel=1e-5)
    # the counts: every listed reflection-frame row, the work rows refined, the orientation priors as restraints
    fcf = gemmi.cif.read(str(out / "reflections.fcf")).sole_block()
    status = list(fcf.find_loop("_refln_refinement_status"))
    assert int(block.find_value("_reflns_number_total")) == len(status) == summary["n_all"] + summary["n_free"]
    assert status.count("excl") == summary["n_free"] and int(block.find_value("_refine_ls_number_reflns")) == status.count("incl")
    assert int(block.find_value("_refine_ls_number_restraints")) == 2 * summary["n_frames"]
    assert float(block.find_value("_refine_ls_restrained_S_all")) > 0
    io, ic = (np.array([float(x) for x in fcf.find_loop(t)]) for t in ("_refln_F_squared_meas", "_refln_F_squared_calc"))
    sig = np.array([float(x) for x in fcf.find_loop("_refln_F_squared_sigma")])
    work = np.array(status) == "incl"
    gt = work & (io > 3 * sig)  # R_obs recomputed from the fcf's included rows is the reported one
    r_obs = np.abs(np.sqrt(io.clip(0)) - np.sqrt(ic.clip(0)))[gt].sum() / np.sqrt(io.clip(0))[gt].sum()
    assert r_obs == pytest.approx(summary["R_obs"], rel=1e-5)
    assert "Not determined" in gemmi.cif.as_string(block.find_value("_refine_ls_abs_structure_details"))
    assert list(block.find_loop("_atom_site_refinement_flags_adp")) == ["T", "."]  # Si on its 2-fold axis
    assert sorted(block.find_loop("_atom_type_symbol")) == ["O", "Si"]
    for name in ("frames.csv", "reflections.fcf", "fo_fc.svg", "thickness.svg", "checkpoint.pt"):
        assert (out / name).exists(), name
    before = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err
    assert (out / "summary.json").read_bytes() == before
    assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(tmp_path / "x"), "--set", "lr_xyz=fast"]) == 2
    # a number out of its range is named as such (a negative s_max used to end in "no reflection is scored")
    for item, name in (("s_max=-1", "s_max"), ("lm_iterations=-2", "lm_iterations"), ("thickness=0", "thickness"),
                       ("thickness_grid=[500, 100, 25]", "thickness_grid"), ("s_bethe=0.01", "s_bethe")):
        capsys.readouterr()
        assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(tmp_path / "x"), "--set", item]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name}:" in err, err
    assert not (tmp_path / "x").exists()
    # --overwrite replaces the earlier run: its outputs this run does not write (no difference map here, no
    # inverted hand) go, with a line in the log; the user's own files stay
    (out / "inverted").mkdir()
    (out / "inverted" / "refined.cif").write_text("an earlier inverted hand")
    (out / "difference_map.ccp4").write_bytes(b"an earlier map")
    (out / "my_notes.txt").write_text("mine")
    for name in ("difference_map.ccp4", "inverted/refined.cif"):
        os.utime(out / name, (1e9, 1e9))
    assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(out), "--config", str(config), "--overwrite",
                 "--lm-iterations", "1", "--set", "difference_map=false"]) == 0
    assert not (out / "difference_map.ccp4").exists() and not (out / "inverted").exists()
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "refined.cif").exists()
    assert "removed the earlier run's difference_map.ccp4, inverted/" in (out / "refine.log").read_text()


def test_enantiomer_choice_prefers_the_true_hand(small_dataset, quartz_paths, tmp_path):
    """Data simulated from the reference hand: --enantiomer picks it, with a decisive probability."""
    ds, _, _ = small_dataset
    keep = np.zeros(len(ds.frames), bool)
    keep[:5] = True
    sub = select_frames(ds, keep)
    data = tmp_path / "five.cif_pets"
    from blochflow.io.writers import atomic_write_text, format_pets
    r = sub.reflections
    atomic_write_text(data, format_pets(sub, r.hkl, r.intensity, r.sigma, r.frame_id))
    out = tmp_path / "hands"
    assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(out), "--enantiomer", "--samples", str(N_SAMPLES), "--set", "samples_per_fringe=0",
                 "--thickness", "500", "--adam-steps", "0", "--lm-iterations", "3", "--free-fraction", "0"]) == 0
    model, inverted = (json.loads((d / "summary.json").read_text()) for d in (out, out / "inverted"))
    assert gemmi.cif.read(str(out / "inverted" / "refined.cif")).sole_block().name == "blochflow_refined_inverted"
    e = model["enantiomer"]
    assert e["chosen"] == "model" and e["probability_model_hand"] > 0.999
    # the scaled difference of the data's chi2 (the orientation priors left out): from the two hands' GoF
    dof = model["n_all"] - model["n_params"]
    ga, gb = model["GoF"] ** 2, inverted["GoF"] ** 2
    assert e["delta_chi2_scaled"] == pytest.approx((gb - ga) * dof / min(ga, gb), rel=1e-9)
    assert e["wR2_inverted"] > 1.5 * e["wR2_model"]
    assert (out / "inverted" / "refined.cif").exists()
    # each hand's CIF states how the hand was decided, which hand it holds and which the data prefer
    for path, holds, verdict in ((out, "start", "(this one)"), (out / "inverted", "inverted", "(the other file)")):
        block = gemmi.cif.read(str(path / "refined.cif")).sole_block()
        text = " ".join(gemmi.cif.as_string(block.find_value("_refine_ls_abs_structure_details")).split())
        assert f"holds the {holds} hand" in text and f"prefer the start hand {verdict}" in text, text
        assert f"{e['probability_model_hand']:.4f}" in text
        assert json.loads((path / "summary.json").read_text())["hand"] == ("model" if holds == "start" else "inverted")


@pytest.mark.parametrize("orientation", [False, True])
def test_standard_uncertainties_are_honest_over_noise_realisations(quartz_paths, truth, orientation):
    """Over independent noise realisations of the same data, (refined - true) / s.u. of every
    refined coordinate and U_ij has mean ~0 and spread ~1 (not 0.1 or 10: s.u. are not decoration);
    so do each frame's thickness and, when refined (with their prior), its orientation corrections,
    whose truth is zero (8 samples per frame there: at 2 the integral is too coarse to be linear in them).

    Gaussian noise with sigma from the expected counts and weights 1/sigma^2 (no instability
    term): the weights are the noise, so the spread must be 1 within its sampling error. (With
    Poisson counts and sigma = sqrt(I_obs), floored at 1, the same check gives 1.29: weights taken
    from the observed counts favour reflections that fluctuated down; measured over 8 seeds.)"""
    ds = every_nth_frame(quartz_paths[1], 12)
    thickness = np.full(len(ds.frames), 500.0)
    n_samples = 8 if orientation else 2
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=n_samples, adp="aniso", adam_steps=0,
                              lm_iterations=20 + 10 * orientation, free_fraction=0.0, refine_orientation=orientation,
                              thickness=500.0, instability=0.0)
    u6_true = [cellmod.u_frac_to_cif(x, truth.cell) for x in truth.asu.u_frac.numpy()]
    z, z_thickness, z_orientation = [], [], []
    for seed in range(6):
        noisy = simulated(ds, truth, thickness, n_samples, noise="gaussian", max_counts=2e4, seed=100 + seed)
        problem = build_problem(truth, noisy, settings)
        res = refine(problem, settings, log=lambda s: None)
        assert res.lm.converged, res.lm.reason  # an unconverged run adds optimisation error to the scatter
        # each frame's thickness s.u., propagated through the thickness model for frames.csv
        frame_su = frame_standard_uncertainties(res)
        t_su = frame_su["thickness_mean_su"]
        if orientation:
            so = problem.slots["orientation"]
            corrections = res.theta[so.start:so.stop].reshape(-1, 2).numpy()
            z_orientation.extend(corrections[:, 0] / frame_su["orientation_x_su_mrad"])
            z_orientation.extend(corrections[:, 1] / frame_su["orientation_y_su_mrad"])
        t_ref = problem.frames.thickness.describe(problem.split(res.theta), problem.frames.ctx)["thickness_mean"]
        z_thickness.extend((t_ref - thickness) / t_su)
        n = len(problem.structure)
        sus = problem.structure.standard_uncertainties(res.theta[:n], res.covariance[:n, :n])
        for a, x_true, u_true in zip(sus, truth.asu.xyz.numpy(), u6_true):
            for c in range(3):
                if a["xyz_su"][c] > 0:
                    z.append(((a["xyz"][c] - x_true[c] + 0.5) % 1 - 0.5) / a["xyz_su"][c])
            for c in range(6):
                if a["u_aniso_su"][c] > 0:
                    z.append((a["u_aniso"][c] - u_true[c]) / a["u_aniso_su"][c])
    z = np.array(z)
    print(f"s.u. honesty: n={len(z)} mean={z.mean():.3f} std={z.std():.3f}")
    assert len(z) >= 50
    assert abs(z.mean()) < 0.5 and 0.75 < z.std() < 1.3, (z.mean(), z.std())
    z_thickness = np.array(z_thickness)
    print(f"thickness s.u. honesty: n={len(z_thickness)} mean={z_thickness.mean():.3f} std={z_thickness.std():.3f}")
    assert len(z_thickness) >= 30 and np.isfinite(z_thickness).all()
    assert abs(z_thickness.mean()) < 0.6 and 0.7 < z_thickness.std() < 1.4, (z_thickness.mean(), z_thickness.std())
    if orientation:
        z_orientation = np.array(z_orientation)
        print(f"orientation s.u. honesty: n={len(z_orientation)} mean={z_orientation.mean():.3f} "
              f"std={z_orientation.std():.3f}")
        assert len(z_orientation) >= 60 and np.isfinite(z_orientation).all()
        assert abs(z_orientation.mean()) < 0.5 and 0.75 < z_orientation.std() < 1.3, (z_orientation.mean(),
                                                                                         z_orientation.std())


def test_samples_per_fringe_sizes_each_frame_for_its_sweep(quartz_paths, truth):
    """samples_per_fringe: each frame gets ceil(k * 1.5 t0 * 2 max dS_g) tilts (n_samples the minimum),
    for the start thickness t0, and the refinement problem sees the same observations."""
    ds = every_nth_frame(quartz_paths[1], 20)
    plain = build_problem(truth, ds, RefineSettings(samples_per_fringe=0.0, n_samples=4, thickness=600.0))
    sized = build_problem(truth, ds, RefineSettings(n_samples=4, thickness=600.0, samples_per_fringe=0.5))
    scored = sized.model.plan.scored
    sweep = np.zeros(len(ds.frames))
    np.maximum.at(sweep, scored.frame, 2 * scored.excitation_range)
    expected = np.maximum(4, np.ceil(0.5 * 1.5 * 600.0 * sweep))
    assert np.array_equal(sized.model.samples_per_frame(), expected) and expected.max() > 4
    assert np.array_equal(plain.model.samples_per_frame(), np.full(len(ds.frames), 4))
    assert torch.equal(sized.model.io, plain.model.io)
    with torch.no_grad():  # more samples, same parameters: intensities of the same reflections
        assert sized.intensities(sized.theta0).shape == plain.intensities(plain.theta0).shape


def test_thickness_rescan_moves_a_frame_off_a_wrong_branch(small_dataset, truth):
    """A frame put on another branch of the thickness oscillation is moved back to the grid point
    next to its true thickness, its orientation corrections (fitted with the wrong branch) back to
    zero; frames already on their branch stay where they are, corrections and all."""
    from blochflow.refine.frame_search import rescan_frame_thickness

    ds, thickness, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, thickness_grid=(300.0, 800.0, 10.0))
    problem = build_problem(truth, ds, settings)
    sl, so = problem.slots["thickness"], problem.slots["orientation"]
    theta = problem.theta0.clone()
    theta[sl.start:sl.stop] = torch.as_tensor(np.log(thickness / 1000.0))
    theta[sl.start + 2] = float(np.log((thickness[2] + 160.0) / 1000.0))
    theta[so.start:so.stop] = 0.005  # mrad: every frame a little off zero
    moved_theta, moved = rescan_frame_thickness(problem, theta, settings)
    t = 1000 * torch.exp(moved_theta[sl.start:sl.stop]).numpy()
    assert moved == 1 and abs(t[2] - thickness[2]) <= 5.0 + 1e-9
    assert np.allclose(np.delete(t, 2), np.delete(thickness, 2))
    orientation = moved_theta[so.start:so.stop].reshape(-1, 2).numpy()
    assert np.all(orientation[2] == 0) and np.all(np.delete(orientation, 2, 0) == 0.005)


def test_rescan_hands_its_decompositions_to_the_moved_point(small_dataset, truth, monkeypatch):
    """After a rescan at the point of the last single-precision pass, the intensities at the moved
    thicknesses come from that pass's decompositions (no eigensolver call) and agree with a fresh
    solve; the next Jacobian takes them too. A frame moved in its orientation is solved again alone
    (its samples only), the others' values and decompositions kept; a point that differs in a
    structure parameter is not served."""
    from blochflow.refine.frame_search import rescan_frame_thickness

    ds, thickness, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, thickness_grid=(300.0, 800.0, 10.0))
    problem = build_problem(truth, ds, settings)
    sl = problem.slots["thickness"]
    theta = problem.theta0.clone()
    theta[sl.start:sl.stop] = torch.as_tensor(np.log(thickness / 1000.0))
    theta[sl.start + 2] = float(np.log((thickness[2] + 160.0) / 1000.0))
    problem.forward_dtype = torch.float32
    with torch.no_grad():
        problem.intensities(theta)
    calls = []
    original = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *r, **k: calls.append(a.shape[0]) or original(a, *r, **k))
    moved_theta, moved = rescan_frame_thickness(problem, theta, settings)
    assert moved == 1 and not calls
    assert problem.decompositions_kept_at(moved_theta) and problem.values_single_at(moved_theta)
    handed = problem.intensities_at(moved_theta)
    problem.jacobian(moved_theta)
    assert not calls

    def fresh(at):
        problem._last_decompositions = problem._last_intensities = None
        with torch.no_grad():
            out = problem.intensities(at)
        assert calls
        calls.clear()
        return out

    assert float(torch.max(torch.abs(handed - fresh(moved_theta))) / torch.max(handed)) < 1e-5
    turned = moved_theta.clone()
    turned[problem.slots["orientation"].start + 2 * 1] += 0.5  # mrad, frame 1 only
    problem.follow_frames(moved_theta, turned)
    assert problem.decompositions_kept_at(turned)
    assert sum(calls) == int((problem.model.plan.samples.frame == 1).sum())  # frame 1's samples, no other
    calls.clear()
    followed = problem.intensities_at(turned)
    problem.jacobian(turned)
    assert not calls
    assert float(torch.max(torch.abs(followed - fresh(turned))) / torch.max(followed)) < 1e-5
    other = moved_theta.clone()
    other[problem.slots["structure"].start] += 1e-3
    with torch.no_grad():
        problem.intensities(moved_theta)
    problem.follow_frames(moved_theta, other)
    assert not problem.decompositions_kept_at(other)


def _frames_at_their_truth(small_dataset, truth):
    """For the orientation searches: the settings, the problem at the truth, the frames' true thicknesses,
    each frame's rotation axis and its normal (F, 2) in the corrections' components, and theta with every
    frame at its true thickness and zero correction."""
    from blochflow.physics.geometry import rocking_axis_lab

    ds, thickness, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0,
                              thickness_grid=(300.0, 800.0, 10.0))
    problem = build_problem(truth, ds, settings)
    st = problem.slots["thickness"]
    ctx = problem.frames.ctx
    axis = rocking_axis_lab(ctx.omega, ctx.axis_azimuth)[:, :2]
    theta = problem.theta0.clone()
    theta[st.start:st.stop] = torch.as_tensor(np.log(thickness / 1000.0))
    return settings, problem, thickness, axis, torch.stack([-axis[:, 1], axis[:, 0]], 1), theta


def test_tilt_search_brings_a_frame_back_across_the_minima_of_its_tilt(small_dataset, truth):
    """A frame put 1.2 mrad off in the tilt normal to its rotation axis, at a thickness 100 A off, comes
    back: that tilt to zero (a grid point) and its thickness next to the truth, its correction about
    the rotation axis kept. Only frames above the median frame's cost are searched; frames that fit
    stay exactly where they are. The grid's step follows a
    fringe: twice the thickness, half the step."""
    from blochflow.refine.frame_search import search_frame_tilt, tilt_search_grid

    settings, problem, thickness, axis, normal, theta = _frames_at_their_truth(small_dataset, truth)
    st, so = problem.slots["thickness"], problem.slots["orientation"]
    corrections = 0.005 * axis  # mrad: every frame a little off about its rotation axis
    corrections[2] += 1.2 * normal[2]
    theta[so.start:so.stop] = corrections.reshape(-1)
    theta[st.start + 2] = float(np.log((thickness[2] + 100.0) / 1000.0))
    searched, moved, tilts, looked = search_frame_tilt(problem, theta, settings)
    assert moved.tolist() == [2] and 0.0 in tilts and 1.2 > tilts[1] - tilts[0]
    assert looked[2] and 0 < looked.sum() <= len(thickness) // 2  # the frames above the median frame's cost
    after = searched[so.start:so.stop].reshape(-1, 2)
    assert abs(float(after[2] @ normal[2])) < 1e-9 and abs(float(after[2] @ axis[2]) - 0.005) < 1e-9
    t = 1000 * torch.exp(searched[st.start:st.stop]).numpy()
    assert abs(t[2] - thickness[2]) <= 10.0 + 1e-9
    keep = [f for f in range(len(thickness)) if f != 2]
    assert torch.equal(after[keep], corrections[keep]) and np.allclose(t[keep], thickness[keep])
    assert float(problem.frame_costs(searched)[2]) < 0.2 * float(problem.frame_costs(theta)[2])
    thicker = theta.clone()
    thicker[st.start:st.stop] += float(np.log(2.0))
    wide, narrow = tilt_search_grid(problem, theta, 2.0), tilt_search_grid(problem, thicker, 2.0)
    assert wide[-1] == narrow[-1] == 2.0 and len(narrow) - 1 == 2 * (len(wide) - 1)



def test_tilt_search_coarse_to_fine_finds_the_full_grids_choice(small_dataset, truth, monkeypatch):
    """The tilt search solves every second grid tilt and then the two beside each frame's best: with
    the grid's zero (the truth) between two coarse tilts, two frames put off by 1.2 and 0.7 mrad in the
    tilt normal to their rotation axis come back to zero, with the same tilt, thickness and theta as
    from the whole grid, in 8 thickness scans instead of 11."""
    import dataclasses

    import blochflow.refine.frame_search as fs

    settings, problem, thickness, axis, normal, theta = _frames_at_their_truth(small_dataset, truth)
    settings = dataclasses.replace(settings, orientation_sigma=1.6)  # 11 tilts, zero the 6th
    st, so = problem.slots["thickness"], problem.slots["orientation"]
    corrections = 0.005 * axis
    corrections[2] += 1.2 * normal[2]
    corrections[4] -= 0.7 * normal[4]
    theta[so.start:so.stop] = corrections.reshape(-1)
    theta[st.start + 4] = float(np.log((thickness[4] - 60.0) / 1000.0))
    scans = []
    grid_costs = fs._grid_costs
    monkeypatch.setattr(fs, "_grid_costs", lambda *a, **k: scans.append(1) or grid_costs(*a, **k))
    fine, moved, tilts, _ = fs.search_frame_tilt(problem, theta, settings)
    assert len(tilts) == 11 and tilts[5] == 0.0 and len(scans) == 6 + 2  # tilts 0, 2, .. 10, then beside each best
    scans.clear()
    monkeypatch.setattr(fs, "TILT_SEARCH_COARSE_STRIDE", 1)
    full, moved_full, _, _ = fs.search_frame_tilt(problem, theta, settings)
    assert len(scans) == 11
    assert moved.tolist() == moved_full.tolist() and {2, 4} <= set(moved.tolist())
    assert torch.equal(fine, full)
    after = fine[so.start:so.stop].reshape(-1, 2)
    assert abs(float(after[2] @ normal[2])) < 1e-9 and abs(float(after[4] @ normal[4])) < 1e-9


@pytest.mark.parametrize("azimuth_deg", [0.484, 40.0])
def test_a_correction_along_the_rotation_axis_is_a_shift_of_the_goniometer_angle(small_dataset, truth, azimuth_deg):
    """The tilt search keeps a frame's correction along its rotation axis and searches the one normal
    to it, taking corrections as rotation vectors about lab x and y and the axis from
    rocking_axis_lab: a correction of 1 mrad along that axis gives the intensities of the frame turned
    by 1 mrad more about its goniometer axis (0.4 % of the strongest apart, against 44 % unturned),
    also with the axis 40 deg off lab x; the same correction about the normal does not (61 %)."""
    from blochflow.physics.geometry import rocking_axis_lab

    ds, thickness, _ = small_dataset
    details = dataclasses.replace(ds.details, rotation_axis_deg=azimuth_deg)
    ds = dataclasses.replace(ds, details=details)
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0)
    problem = build_problem(truth, ds, settings)
    turned = build_problem(truth, dataclasses.replace(ds, frames=dataclasses.replace(
        ds.frames, alpha_deg=ds.frames.alpha_deg + np.degrees(1e-3))), settings)
    st, so = problem.slots["thickness"], problem.slots["orientation"]
    ctx = problem.frames.ctx
    axis = rocking_axis_lab(ctx.omega, ctx.axis_azimuth)[:, :2]
    theta = problem.theta0.clone()
    theta[st.start:st.stop] = torch.as_tensor(np.log(thickness / 1000.0))
    plain = theta.clone()
    along, normal = theta.clone(), theta.clone()
    along[so.start:so.stop] = axis.reshape(-1)  # mrad
    normal[so.start:so.stop] = torch.stack([-axis[:, 1], axis[:, 0]], 1).reshape(-1)
    rows, here, there = np.intersect1d(problem.model.plan.scored.row, turned.model.plan.scored.row,
                                       return_indices=True)  # the reflections both score
    assert len(rows) > 0.9 * len(problem.model.plan.scored.row)
    with torch.no_grad():
        reference = turned.intensities(plain)[there]
        scale = float(reference.max())
        # 1 mrad moves these thin frames' intensities by tens of per cent of the strongest: the turned
        # frame and the correction along its axis agree to well under one
        assert float((problem.intensities(plain)[here] - reference).abs().max()) > 0.2 * scale
        assert float((problem.intensities(along)[here] - reference).abs().max()) < 0.02 * scale
        assert float((problem.intensities(normal)[here] - reference).abs().max()) > 0.2 * scale


def test_tilt_search_moves_a_frame_only_for_a_drop_beyond_noise_refitted():
    """Five per cent less is not enough where it is a few units of chi2 (two parameters refitted over a
    grid find that much in noise), nor many units that are under five per cent; a drop beyond both moves
    the frame."""
    from blochflow.refine.frame_search import tilt_search_moves

    current = np.array([20.0, 20.0, 200.0, 200.0, 10.0, 1000.0])
    best = np.array([17.0, 10.0, 185.0, 195.0, 0.5, 960.0])
    assert tilt_search_moves(current, best).tolist() == [1, 2, 4]


def test_an_outlier_frame_restarts_from_zero_orientation_at_its_best_thickness(small_dataset, truth):
    """A frame left in a joint thickness-orientation minimum (thickness 160 A off, corrections of 3 mrad)
    costs far more than the median frame: it is tried at zero correction and the best grid thickness
    there, and moves (next to its true thickness). Frames that fit like the rest stay as they are,
    their small corrections included."""
    from blochflow.refine.frame_search import restart_outlier_frames

    ds, thickness, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0,
                              thickness_grid=(300.0, 800.0, 10.0))
    problem = build_problem(truth, ds, settings)
    st, so = problem.slots["thickness"], problem.slots["orientation"]
    theta = problem.theta0.clone()
    theta[st.start:st.stop] = torch.as_tensor(np.log(thickness / 1000.0))
    theta[so.start:so.stop] = 0.005  # mrad: every frame a little off zero
    theta[st.start + 2] = float(np.log((thickness[2] + 160.0) / 1000.0))
    theta[so.start + 4:so.start + 6] = torch.tensor([3.0, -3.0])
    costs = (problem.frame_costs(theta) / torch.bincount(problem.model.frame, minlength=len(thickness))).numpy()
    assert costs[2] > 10 * np.median(costs)
    restarted, moved = restart_outlier_frames(problem, theta, settings)
    t = 1000 * torch.exp(restarted[st.start:st.stop]).numpy()
    orientation = restarted[so.start:so.stop].reshape(-1, 2)
    assert moved.tolist() == [2] and abs(t[2] - thickness[2]) <= 5.0 + 1e-9 and torch.all(orientation[2] == 0)
    assert np.allclose(np.delete(t, 2), np.delete(thickness, 2))
    assert np.all(np.delete(orientation.numpy(), 2, 0) == 0.005)
    assert float(problem.frame_costs(restarted)[2]) < 0.1 * float(problem.frame_costs(theta)[2])
    again, moved_again = restart_outlier_frames(problem, restarted, settings)
    assert len(moved_again) == 0 and torch.equal(again, restarted)


def test_a_frame_off_both_neighbours_about_its_rotation_axis_is_moved_to_their_mean(small_dataset, truth):
    """At the truth (corrections zero), a frame turned about its rotation axis by three fringes beyond both
    neighbours is tried at their mean there, its correction normal to the axis kept, and moves back at its
    true thickness; a frame within a fringe of its neighbours is not tried, and a second call moves none."""
    from blochflow.refine.frame_search import _rocking_frame_axes, fringe_angle, restart_axis_jumps

    ds, thickness, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0,
                              thickness_grid=(300.0, 800.0, 10.0))
    problem = build_problem(truth, ds, settings)
    st = problem.slots["thickness"]
    theta = problem.theta0.clone()
    theta[st.start:st.stop] = torch.as_tensor(np.log(thickness / 1000.0))
    so, _, axis, normal = _rocking_frame_axes(problem, theta, settings)
    fringe = fringe_angle(problem, theta)
    corrections = torch.zeros(problem.model.n_frames, 2, dtype=theta.dtype)
    corrections[2] = 3 * fringe * axis[2] + 0.1 * normal[2]
    corrections[1] = 0.5 * fringe * axis[1]  # within a fringe of its neighbours, as frame 3
    corrections[3] = -0.5 * fringe * axis[3]
    theta[so.start:so.stop] = corrections.reshape(-1)
    moved_theta, moved = restart_axis_jumps(problem, theta, settings)
    assert list(moved) == [2]
    after = moved_theta[so.start:so.stop].reshape(-1, 2)
    assert abs(float(after[2] @ axis[2])) < 1e-12  # the neighbours' mean
    assert torch.allclose(after[2] @ normal[2], torch.tensor(0.1, dtype=theta.dtype))
    assert torch.equal(torch.cat([after[:2], after[3:]]), torch.cat([corrections[:2], corrections[3:]]))
    assert abs(1000 * float(torch.exp(moved_theta[st.start + 2])) - thickness[2]) <= 10.0
    assert len(restart_axis_jumps(problem, moved_theta, settings)[1]) == 0


def _joint_minimum_problem(truth, ds, thickness, settings):
    """The problem at the truth with every frame at its true thickness, except frame 2: 160 A thicker and
    turned by (3, -3) mrad, a joint thickness-orientation minimum that no local step leaves."""
    problem = build_problem(truth, ds, settings)
    st, so = problem.slots["thickness"], problem.slots["orientation"]
    start = problem.theta0.clone()
    start[st.start:st.stop] = torch.as_tensor(np.log(thickness / 1000.0))
    start[st.start + 2] = float(np.log((thickness[2] + 160.0) / 1000.0))
    start[so.start + 4:so.start + 6] = torch.tensor([3.0, -3.0])
    problem.theta0 = start
    return problem


def test_a_run_restarts_a_frame_left_in_a_joint_minimum_and_goes_on(small_dataset, truth):
    """LM from the truth with one frame in a joint thickness-orientation minimum (160 A off, 3 mrad)
    converges with that frame still there when outlier frames are not restarted (``frame_restart``
    off: the thickness rescan at its own orientation keeps it); with the restart at convergence the
    run goes on and ends with the frame at its true thickness and near-zero corrections. In double
    precision throughout, so that the path (about 20 iterations on 4 tilts per frame) does not turn on
    the rounding of single-precision solves."""
    ds, thickness, _ = small_dataset
    ends = {}
    for on in (False, True):
        settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, adam_steps=0,
                                  lm_iterations=30, thickness_grid=(300.0, 800.0, 10.0), frame_restart=on,
                                  jacobian_precision="double", lm_precision="double")
        problem = _joint_minimum_problem(truth, ds, thickness, settings)
        st, so = problem.slots["thickness"], problem.slots["orientation"]
        lines = []
        res = refine(problem, settings, log=lines.append)
        assert res.lm.converged
        ends[on] = (1000 * float(torch.exp(res.theta[st.start + 2])) - thickness[2],
                    float(res.theta[so.start + 4:so.start + 6].abs().max()),
                    sum("frame restart" in line and line.endswith(f"(frames {ds.frames.ids[2]})") for line in lines))
    assert ends[False][0] > 100.0 and ends[False][1] > 1.0 and ends[False][2] == 0
    assert abs(ends[True][0]) < 5.0 and ends[True][1] < 0.1 and ends[True][2] == 1


def test_frames_are_checked_once_the_structure_settles_not_only_at_convergence(small_dataset, truth):
    """The rescan and outlier restart run between convergences once the structure's shifts have been
    below 1 s.u. for two iterations, at most every 5 iterations; a run from the truth with one frame in
    a joint thickness-orientation minimum restarts it that way, before its first convergence."""
    from blochflow.refine.frame_search import RESCAN_EVERY, frames_check_due

    settled, moving = {"max_shift_su_structure": 0.5}, {"max_shift_su_structure": 3.0}
    assert frames_check_due([moving, settled, settled])
    assert not frames_check_due([settled, moving]) and not frames_check_due([settled])
    checked = [moving, {**settled, "frames_checked": True}] + [settled] * (RESCAN_EVERY - 1)
    assert not frames_check_due(checked) and frames_check_due(checked + [settled])
    ds, thickness, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, adam_steps=0,
                              lm_iterations=30, thickness_grid=(300.0, 800.0, 10.0),
                              jacobian_precision="double", lm_precision="double")
    problem = _joint_minimum_problem(truth, ds, thickness, settings)
    st = problem.slots["thickness"]
    lines = []
    res = refine(problem, settings, log=lines.append)
    restarts = [line for line in lines if line.startswith("frame restart")]
    assert res.lm.converged and len(restarts) == 1 and "(structure settled)" in restarts[0], restarts
    assert abs(1000 * float(torch.exp(res.theta[st.start + 2])) - thickness[2]) < 5.0
    checks = [h["iteration"] for h in res.lm.history if h.get("frames_checked")]  # the last at convergence
    assert checks[-1] == res.lm.iteration and all(b - a >= RESCAN_EVERY for a, b in zip(checks[:-1], checks[1:-1])), checks


def test_a_run_resumed_around_a_settled_structure_check_ends_the_same(small_dataset, truth, tmp_path):
    """Interrupted just before the check that restarts a frame (the checkpoint has not seen it) and just
    after it (the checkpoint has), the resumed runs end where the uninterrupted one does: the check is
    made once, at the same iteration."""
    ds, thickness, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, adam_steps=0,
                              lm_iterations=30, thickness_grid=(300.0, 800.0, 10.0), checkpoint_every=1,
                              jacobian_precision="double", lm_precision="double")

    def problem():
        return _joint_minimum_problem(truth, ds, thickness, settings)

    lines = []
    full = refine(problem(), settings, log=lines.append)
    at = int(next(line for line in lines if "(structure settled)" in line).split("iteration ")[1].split(" ")[0])
    for stop_after in (at, at + 1):
        def stop(line):
            if line.startswith(f"lm   {stop_after:4d}/"):
                raise Interrupted()

        ck = tmp_path / f"checkpoint{stop_after}.pt"
        assert refine(problem(), settings, checkpoint=ck, log=stop).interrupted
        again = []
        resumed = refine(problem(), settings, checkpoint=ck, resume=torch.load(ck, weights_only=True), log=again.append)
        assert sum("(structure settled)" in line for line in again) == (stop_after == at) * sum(
            "(structure settled)" in line and f"iteration {at} " in line for line in lines)
        assert resumed.lm.iteration == full.lm.iteration
        assert torch.allclose(resumed.theta, full.theta, rtol=0, atol=1e-8)


@contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count (and so the solver's worker count) set to n inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _tilted_problem(small_dataset, truth, **settings):
    """The six-frame problem from a displaced start, 5 samples per frame, every orientation correction at
    0.3 mrad (so that its tangents are not zero): (problem, theta)."""
    problem = build_problem(displaced(truth, 0.03, 0.02), small_dataset[0],
                            RefineSettings(samples_per_fringe=0.0, n_samples=5, adp="aniso", thickness=500.0, **settings))
    theta = problem.theta0.clone()
    theta[problem.group_index("orientation")] = 0.3
    return problem, theta


@pytest.mark.parametrize("absorption", ["none", "proportional"])
def test_solves_on_several_threads_give_the_one_thread_result(small_dataset, truth, absorption):
    """Intensities, the objective's gradient and the LM Jacobian are the same whether the solves run on
    one thread or are split over three (uneven pieces of every chunk)."""
    problem, theta = _tilted_problem(small_dataset, truth, free_fraction=0.2, absorption=absorption,
                                     refine_absorption=absorption != "none", jacobian_precision="double")
    out = []
    for n in (1, 3):
        with _torch_threads(n):
            th = theta.clone().requires_grad_(True)
            loss = problem.objective(th)
            (grad,) = torch.autograd.grad(loss, th)
            problem._last_intensities = None
            with torch.no_grad():
                ic = problem.intensities(theta)
            _, r, jac = problem.jacobian(theta)
            out.append((ic, loss.detach(), grad, r, jac))
    for one, three in zip(*out):
        assert torch.allclose(one, three, rtol=1e-10, atol=1e-13 * float(one.abs().max()))
    from blochflow.physics.diffraction import _work_items

    assert len(_work_items(problem.model.plan, 3)) == 3 * len(problem.model.plan.chunks)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_large_pass_solves_again_in_the_backward_pass_to_the_same_gradient(small_dataset, truth, monkeypatch, threads):
    """Above GRAPH_MEMORY_SHARE of the memory a pass with gradient keeps no graphs and solves each piece again in
    the backward pass: the same objective and gradient (also pulled twice, as gradcheck does), on one
    thread and on three."""
    import blochflow.physics.diffraction as diffraction

    problem, theta = _tilted_problem(small_dataset, truth, free_fraction=0.0)
    out = []
    with _torch_threads(threads):
        for share in (1e30, 0.0):
            monkeypatch.setattr(diffraction, "GRAPH_MEMORY_SHARE", share)
            th = theta.clone().requires_grad_(True)
            loss = problem.objective(th)
            (grad,) = torch.autograd.grad(loss, th, retain_graph=True)
            (again,) = torch.autograd.grad(loss, th)
            out.append((loss.detach(), grad, again))
    (l0, g0, a0), (l1, g1, a1) = out
    assert float(g0.abs().max()) > 0
    assert torch.allclose(l0, l1, rtol=1e-12) and torch.allclose(g0, g1, rtol=1e-10, atol=1e-12 * float(g0.abs().max()))
    assert torch.equal(g1, a1) and torch.equal(g0, a0)


def test_jacobian_by_potential_contraction_equals_one_product_per_tangent(small_dataset, truth, monkeypatch):
    """Many structure tangents go through one scatter of the N^3 products onto each sample's distinct
    potential entries; the Jacobian is the same as with one matrix product per tangent."""
    import blochflow.physics.diffraction as diffraction

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=3, adp="aniso", thickness=500.0, free_fraction=0.0, jacobian_precision="double")
    problem = build_problem(displaced(truth, 0.03, 0.02), ds, settings)
    jac = {}
    for threshold in (1, 10 ** 9):
        monkeypatch.setattr(diffraction, "CONTRACTION_MIN_TANGENTS", threshold)
        jac[threshold] = problem.jacobian(problem.theta0)[2]
    scale = float(jac[1].abs().max())
    assert scale > 0
    assert float((jac[1] - jac[10 ** 9]).abs().max()) < 1e-10 * scale


def test_uncached_pair_tables_are_built_piece_by_piece_on_the_workers(small_dataset, truth, monkeypatch):
    """When the plan does not cache its beam-pair tables (a large cell: 4.5 GB for 672 samples of 920
    beams), the Jacobian builds each piece's table on the worker that solves it, instead of holding
    every piece's at once; the Jacobian is the same as with the cached tables."""
    import threading

    import blochflow.physics.diffraction as diffraction

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=4, adp="aniso", thickness=500.0, free_fraction=0.0,
                              jacobian_precision="double")
    problem = build_problem(displaced(truth, 0.03, 0.02), ds, settings)
    plan = problem.model.plan
    assert all(ch.pair_index is not None for ch in plan.chunks)
    cached = problem.jacobian(problem.theta0)
    problem.model.plan = dataclasses.replace(plan, chunks=[dataclasses.replace(ch, pair_index=None, pair_set=None)
                                                           for ch in plan.chunks])
    problem._last_decompositions = None
    built = []
    pair_rows = diffraction._pair_rows

    def spy(*args):
        built.append(threading.current_thread().name)
        return pair_rows(*args)

    monkeypatch.setattr(diffraction, "_pair_rows", spy)
    with fixed_workers(2):
        uncached = problem.jacobian(problem.theta0)
    assert built and all(name.startswith("blochflow-solve") for name in built)
    for a, b in zip(uncached, cached):
        scale = float(b.abs().max())
        assert scale > 0
        assert float((a - b).abs().max()) < 1e-10 * scale


def test_samples_sharing_a_beam_set_share_their_potential_rows(small_dataset, truth):
    """With segment coupling the samples of a segment share their beam pairs: their potential rows and
    structure matrices are gathered once and their products stacked. Intensities and Jacobian equal
    those with a gather and a product per sample."""
    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=30, coupling="segments", adp="aniso", thickness=500.0,
                              free_fraction=0.0, jacobian_precision="double")
    problem = build_problem(displaced(truth, 0.03, 0.02), ds, settings)
    plan = problem.model.plan
    sizes = torch.cat([torch.unique(ch.pair_set, return_counts=True)[1] for ch in plan.chunks])
    assert int(sizes.max()) > 1 and len(torch.unique(sizes)) > 1  # sets of several sizes
    shared = problem.jacobian(problem.theta0)
    problem.model.plan = dataclasses.replace(plan, chunks=[dataclasses.replace(ch, pair_set=None) for ch in plan.chunks])
    alone = problem.jacobian(problem.theta0)
    for a, b in zip(shared, alone):  # intensities (their matrices too are built once per set), residuals, J
        scale = float(b.abs().max())
        assert scale > 0
        assert float((a - b).abs().max()) < 1e-10 * scale


def test_single_precision_solves_give_the_double_gradient_closely(small_dataset, truth):
    """The first-order phase may solve in complex64: intensities and the objective's gradient agree
    with double precision to ~1e-5 (bounds 1e-3), and such values serve only single-precision
    requests: a double-precision one at the same point solves again."""
    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=4, adp="aniso", thickness=500.0, free_fraction=0.1)
    problem = build_problem(displaced(truth, 0.03, 0.02), ds, settings)
    out = {}
    for dtype in (torch.float64, torch.float32):
        problem.forward_dtype = dtype
        problem._last_intensities = None
        th = problem.theta0.clone().requires_grad_(True)
        loss = problem.objective(th)
        (grad,) = torch.autograd.grad(loss, th)
        with torch.no_grad():
            ic = problem.intensities(problem.theta0)
        out[dtype] = (ic, grad)
        assert ic.dtype == torch.float64 and grad.dtype == torch.float64
    (i64, g64), (i32, g32) = out[torch.float64], out[torch.float32]
    assert problem.values_single_at(problem.theta0) and torch.equal(problem.intensities_at(problem.theta0), i32)
    problem.forward_dtype = torch.float64
    again = problem.intensities_at(problem.theta0)
    assert not torch.equal(again, i32) and torch.allclose(again, i64, rtol=1e-12, atol=0)
    assert float((i32 - i64).abs().sum() / i64.abs().sum()) < 1e-3
    assert 0 < float((g32 - g64).norm() / g64.norm()) < 1e-3  # close, and really computed in single


def test_lm_stops_on_an_r_plateau_only_when_the_structure_has_settled(small_dataset, truth):
    """The R-plateau stop needs wR2 flat over the last iterations *and* the shared parameters
    within 10 shift_tol s.u.; with plateau_tol 0 only the shift criterion stops the run."""
    from blochflow.refine.optimise import _on_plateau

    flat = [{"cost": c} for c in (100.0, 99.9, 99.85, 99.8)]
    assert _on_plateau(flat, 1e-3, 3) and not _on_plateau(flat[:3], 1e-3, 3)
    assert not _on_plateau([{"cost": c} for c in (100.0, 90.0, 89.99, 89.98)], 1e-3, 3)
    # a rescan (or grown samples) between iterations moved the cost from 100 to 90: each step is
    # measured from its own start, so one flat step after it is a plateau, a real gain is not
    rescanned = [{"cost": 100.0}, {"cost": 89.99, "cost_before": 90.0}]
    assert _on_plateau(rescanned, 1e-3, 1) and not _on_plateau([{"cost": 100.0}, {"cost": 89.99}], 1e-3, 1)
    assert not _on_plateau([{"cost": 100.0}, {"cost": 88.0, "cost_before": 90.0}], 1e-3, 1)
    ds, _, _ = small_dataset
    base = dict(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, adam_steps=0, lm_iterations=12, refine_orientation=False,
                lm_reuse_jacobian=False)  # a chord step that meets the rule goes on to a fresh Jacobian
    far = displaced(truth, 0.02, 0.03)
    loose = RefineSettings(**base, plateau_tol=0.9, plateau_iterations=2)  # every iteration counts as flat
    res = refine(build_problem(far, ds, loose), loose, log=lambda s: None)
    hist = res.lm.history
    assert res.lm.reason.startswith("R plateau"), (res.lm.reason, [round(h["max_shift_su_structure"], 3) for h in res.lm.history])
    assert len(hist) >= 4 and hist[-1]["max_shift_su_structure"] < 0.1
    assert all(h["max_shift_su_structure"] >= 0.1 for h in hist[2:-1])  # not before it had settled
    assert hist[-1]["max_shift_su_structure"] > 0.01  # and before the shift criterion would stop it
    shift_only = RefineSettings(**base, plateau_tol=0.0)
    res = refine(build_problem(far, ds, shift_only), shift_only, log=lambda s: None)
    assert not res.lm.reason.startswith("R plateau")


def test_one_flat_iteration_ends_a_run_that_was_on_its_plateau_before_a_rescan(small_dataset, truth):
    """After a thickness rescan moved frames of a run that had reached its R plateau, one flat
    iteration (with the shared parameters settled) ends it; otherwise the plateau needs its full
    window, here 2 iterations, and an earlier big drop keeps it going."""
    from blochflow.refine.optimise import LMState, lm_step
    from blochflow.refine.run import refined_index

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, adam_steps=0,
                              lm_iterations=15, refine_orientation=False)
    problem = build_problem(truth, ds, settings)
    res = refine(problem, settings, log=lambda s: None)
    assert res.lm.converged
    theta, index = res.theta, refined_index(problem, settings)
    for replateau, converged in ((True, True), (False, False)):
        cost = res.lm.cost
        state = LMState(iteration=5, cost=cost, history=[{"cost": 4 * cost}, {"cost": cost}], replateau=replateau)
        lm_step(problem, theta, state, index, plateau_tol=0.2, plateau_iterations=2)
        assert state.converged == converged, state.reason
        assert state.reason.startswith("R plateau") == converged


def test_wavelength_setting_replaces_a_wrong_header(small_dataset, truth):
    """Data simulated at one wavelength under a header stating another fit badly at the truth; the
    ``wavelength`` setting restores exactly the fit of the right header. (The paper's synthetic
    paracetamol file states 0.0335 A; its data were made at 0.0251 A: docs/refinement.md.)"""
    ds, thickness, _ = small_dataset
    wrong = dataclasses.replace(ds, wavelength=0.0335)
    base = dict(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0)

    def at_truth(dataset, **extra):
        problem = build_problem(truth, dataset, RefineSettings(**base, **extra))
        sl = problem.slots["thickness"]
        theta = problem.theta0.clone()
        theta[sl.start:sl.stop] = torch.as_tensor(np.log(thickness / 1000.0))
        return problem.figures(problem.intensities(theta)), problem

    right, _ = at_truth(ds)
    stated, _ = at_truth(wrong)
    fixed, problem = at_truth(wrong, wavelength=ds.wavelength)
    assert problem.model.plan.wavelength == ds.wavelength
    assert stated.R_obs > 3 * right.R_obs
    assert fixed.R_obs == pytest.approx(right.R_obs, rel=1e-12)
    with pytest.raises(ValueError, match="wavelength"):
        settings_from_mapping({"wavelength": 1.5}, "test")


def test_orientation_prior_holds_the_corrections_to_its_width(small_dataset, truth):
    """orientation_sigma adds one row o / sigma per correction angle (mrad): the Jacobian carries it,
    and a narrow prior keeps the refined corrections near zero where without it they move."""
    ds, _, _ = small_dataset
    base = dict(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, adam_steps=0, lm_iterations=4,
                thickness=500.0)
    start = displaced(truth, 0.01, 0.01)
    narrow = RefineSettings(**base, orientation_sigma=0.001)
    problem = build_problem(start, ds, narrow)
    theta = problem.theta0.clone()
    o = problem.group_index("orientation")
    theta[o] = torch.linspace(-1, 1, len(o), dtype=theta.dtype)
    rows = problem.prior_residuals(theta)
    assert len(rows) == len(o) and torch.allclose(rows, theta[o] / 0.001)
    _, residuals, jac = problem.jacobian(theta)
    assert torch.allclose(residuals[-len(o):], theta[o] / 0.001)
    assert torch.allclose(jac[-len(o):][:, o], torch.eye(len(o), dtype=jac.dtype) / 0.001)
    free = RefineSettings(**base)
    moved = {}
    for name, settings in (("narrow", narrow), ("free", free)):
        p = build_problem(start, ds, settings)
        res = refine(p, settings, log=lambda s: None)
        moved[name] = float(res.theta[p.group_index("orientation")].abs().max())
    assert moved["narrow"] < 0.2 and moved["free"] > 2 * moved["narrow"], moved


def test_refine_command_refines_a_selection_of_frames(small_dataset, quartz_paths, tmp_path, capsys):
    ds, _, data = small_dataset
    ids = ds.frames.ids
    out = tmp_path / "some"
    assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(out), "--frames", f"{ids[0]}-{ids[-1]}:2",
                 "--samples", "2", "--samples-per-fringe", "0", "--lm-iterations", "1", "--thickness", "500"]) == 0
    import csv

    rows = list(csv.DictReader(open(out / "frames.csv")))
    assert [int(r["frame"]) for r in rows] == list(ids[::2])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_frames"] == len(ids[::2]) and summary["settings"]["frames"] == f"{ids[0]}-{ids[-1]}:2"
    assert f"on {len(ids[::2])} frames" in (out / "refine.log").read_text()
    # its frame model re-used by simulate on the same frames; on all frames, an error that says so
    capsys.readouterr()
    assert main(["simulate", str(quartz_paths[0]), str(data), "--out", str(tmp_path / "all"), "--samples", "2",
                 "--frame-model", str(out / "frame_model.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"holds values for {len(ids[::2])} frames" in err and "--frames" in err, err
    assert main(["simulate", str(quartz_paths[0]), str(data), "--out", str(tmp_path / "same"), "--samples", "2",
                 "--frame-model", str(out / "frame_model.json"), "--frames", f"{ids[0]}-{ids[-1]}:2"]) == 0
    sim = json.loads((tmp_path / "same" / "summary.json").read_text())
    assert sim["n_frames"] == len(ids[::2])
    capsys.readouterr()
    assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(tmp_path / "none"),
                 "--frames", f"{ids[-1] + 1}-{ids[-1] + 9}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "frames:" in err and "selects no frame" in err, err
    assert not (tmp_path / "none").exists()


def test_adp_bound_warning_names_the_atoms():
    from blochflow.cli import adp_bound_warning

    assert adp_bound_warning([]) is None
    one = adp_bound_warning(["O1"])
    assert one.startswith("warning: the ADP of 1 atom (O1) ended on the positivity bound") and "hold it up" in one and "\n" not in one
    many = adp_bound_warning([f"C{i}" for i in range(12)])
    assert "12 atoms (C0, C1," in many and "C9 ..." in many and "C10" not in many and "hold them up" in many


def test_hand_preference_does_not_depend_on_the_start_hand():
    """Started from the wrong hand the same two fits give the same figure, negated: the chi^2
    difference is scaled by the preferred hand's GoF^2, not the start's."""
    from blochflow.cli import hand_preference

    delta, p = hand_preference(1000.0, 1300.0, 500)
    back, q = hand_preference(1300.0, 1000.0, 500)
    assert delta == pytest.approx(300.0 / 2.0) and back == pytest.approx(-delta) and q == pytest.approx(1 - p)
    assert p > 0.999


def test_enantiomer_on_a_centrosymmetric_structure_is_refused(small_dataset, tmp_path, capsys):
    """--enantiomer asks which hand the data prefer; in a centrosymmetric group the inverted model is
    the same structure, so the command says so in one line before any work."""
    _, _, data = small_dataset
    cif = tmp_path / "centric.cif"
    cif.write_text("data_c\n_cell_length_a 4.9226\n_cell_length_b 4.9226\n_cell_length_c 5.4003\n"
                   "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 120\n"
                   "loop_\n_symmetry_equiv_pos_as_xyz\nx,y,z\n-x,-y,-z\n"
                   "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n"
                   "_atom_site_fract_z\n_atom_site_U_iso_or_equiv\nSi1 Si 0.47 0.0 0.33 0.01\nO1 O 0.41 0.27 0.21 0.01\n")
    capsys.readouterr()
    assert main(["refine", str(cif), str(data), "--out", str(tmp_path / "hands"), "--enantiomer"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--enantiomer" in err and "centrosymmetric" in err, err
    assert not (tmp_path / "hands").exists()


def test_the_problem_size_and_the_cost_of_a_pass_are_logged_before_the_first_pass(small_dataset, truth, monkeypatch):
    """A logged build names the frames, tilts, beams and reflections and a timed estimate of one pass
    (from one chunk's solve) before the start's thickness scan runs; above SLOW_PASS_S it also says
    how to make a first look cheaper. Silent builds (no log) probe nothing. The estimate is what
    pass_seconds makes of the probe: the N^3 work of every chunk shared among the solver threads."""
    import blochflow.refine.run as run_mod
    from blochflow.physics.diffraction import pass_seconds

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=4, free_fraction=0.0)
    order = []
    scan = run_mod.initial_thickness
    monkeypatch.setattr(run_mod, "initial_thickness", lambda *a: order.append("scan") or scan(*a))
    problem = build_problem(truth, ds, settings, log=order.append)
    plan_line = next(i for i, line in enumerate(order) if line.startswith("plan: "))
    assert plan_line < order.index("scan")
    assert f"{len(ds.frames)} frames, {len(problem.model.plan.samples.frame)} tilt samples" in order[plan_line]
    assert not any(line.startswith("note: a large problem") for line in order)
    per_n3 = problem.model._per_n3
    assert per_n3 > 0
    work = sum(ch.hkl.shape[0] * float(ch.hkl.shape[1]) ** 3 for ch in problem.model.plan.chunks)
    assert pass_seconds(problem.model.plan, per_n3, workers=2) == pytest.approx(per_n3 * work / 2)
    monkeypatch.setattr(run_mod, "SLOW_PASS_S", 0.0)
    lines = []
    build_problem(truth, ds, settings, log=lines.append)
    assert any(line.startswith("note: a large problem") and f"--frames {min(ds.frames.ids)}-{max(ds.frames.ids)}:"
               in line and "--coupling segments" in line for line in lines)
    lines = []  # remedies already in use are not offered again
    chosen = dataclasses.replace(settings, coupling="segments", s_max=0.01,
                                 frames=f"{min(ds.frames.ids)}-{max(ds.frames.ids)}")
    build_problem(truth, ds, chosen, log=lines.append)
    note = [line for line in lines if line.startswith("note: a large problem")]
    assert len(note) == 1 and "--device cuda" in note[0] and "--frames" not in note[0] and "--coupling" not in note[0]
    assert build_problem(truth, ds, settings).model._per_n3 is None


def test_lm_on_amplitudes_first_reaches_the_intensity_minimum(small_dataset, truth):
    """``lm_amplitude_iterations`` LM iterations on wR(F) (logged as such, never declared converged)
    before the intensity objective: the run ends at the minimum of an intensity-only run, within 0.1
    s.u. of every refined parameter."""
    ds, _, _ = small_dataset
    start = displaced(truth, 0.02, 0.03)
    out, lines = {}, []
    for n in (0, 2):
        settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, adp="aniso", lm_iterations=20,
                                  free_fraction=0.0, lm_amplitude_iterations=n)
        problem = build_problem(start, ds, settings)
        out[n] = refine(problem, settings, log=lines.append if n else (lambda s: None))
        assert out[n].lm.converged, out[n].lm.reason
    lm_lines = [line for line in lines if line.startswith("lm ")]
    assert ["wR(F)" in line for line in lm_lines[:3]] == [True, True, False]
    assert all("wR2(work)" in line for line in lm_lines[2:])
    a, b = out[0], out[2]
    su = torch.sqrt(torch.diagonal(a.covariance))[a.refined_index]
    assert float(((a.theta - b.theta)[a.refined_index].abs() / su).max()) < 0.1
    assert abs(a.figures.wR2 / b.figures.wR2 - 1) < 1e-4


def test_lm_reusing_its_jacobian_reaches_the_same_minimum_with_fewer_jacobians(small_dataset, truth):
    """``lm_reuse_jacobian``: after a step its linear model predicted well, the next iteration keeps
    the Jacobian's structure columns (a chord step; the frames' own columns are taken afresh). The
    run takes fewer full Jacobians than LM iterations, is declared
    converged only on a fresh one, and ends at the minimum of a run without reuse (0.1 s.u., wR2 1e-4)."""
    ds, _, _ = small_dataset
    start = displaced(truth, 0.02, 0.03)
    out, calls = {}, {}
    for reuse in (False, True):
        settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, adp="aniso", lm_iterations=30,
                                  free_fraction=0.0, lm_reuse_jacobian=reuse)
        problem = build_problem(start, ds, settings)
        jacobian, calls[reuse] = problem.jacobian, []

        def counted(theta, index=None, *args, _jacobian=jacobian, _calls=calls[reuse], **kwargs):
            _calls.append(len(index))
            return _jacobian(theta, index, *args, **kwargs)

        problem.jacobian = counted
        out[reuse] = refine(problem, settings, log=lambda s: None)
        assert out[reuse].lm.converged, out[reuse].lm.reason
    history = out[True].lm.history
    reused = [h["jacobian_reused"] for h in history]
    assert any(reused) and not reused[0] and not reused[-1]
    # a chord step differentiates only the frames' own columns
    own = int((out[True].problem.parameter_frames()[out[True].refined_index] >= 0).sum())
    assert calls[True].count(len(out[True].refined_index)) == reused.count(False) < len(history)
    assert calls[True].count(own) == reused.count(True) and 0 < own < len(out[True].refined_index)
    assert all(abs(h["gain_ratio"] - 1) <= 0.25 for h, nxt in zip(history, reused[1:]) if nxt)
    a, b = out[False], out[True]
    su = torch.sqrt(torch.diagonal(a.covariance))[a.refined_index]
    assert float(((a.theta - b.theta)[a.refined_index].abs() / su).max()) < 0.1
    assert abs(a.figures.wR2 / b.figures.wR2 - 1) < 1e-4


def test_resume_keeps_the_reused_jacobian(small_dataset, truth, tmp_path):
    """An interrupted run with ``lm_reuse_jacobian`` checkpoints the Jacobian its next chord step
    takes, and the resumed run ends where the uninterrupted one does, to 1e-8."""
    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, adp="aniso", lm_iterations=8,
                              checkpoint_every=1, free_fraction=0.0, lm_reuse_jacobian=True)

    def before_a_chord_step(full):  # the iteration whose Jacobian the next one re-uses
        return next(h["iteration"] for h in full.lm.history if h["jacobian_reused"]) - 1

    full, kept, _, resumed = _full_and_resumed(ds, displaced(truth, 0.02, 0.03), settings, tmp_path,
                                               stop_after=before_a_chord_step)
    assert "jacobian" in kept["lm"] and any(h["jacobian_reused"] for h in full.lm.history)
    assert torch.allclose(resumed.theta, full.theta, rtol=0, atol=1e-8)


def test_an_interrupt_inside_an_lm_step_resumes_to_the_same_result(small_dataset, truth, tmp_path, monkeypatch):
    """SIGTERM arriving inside an LM step (its trial points, after the step dropped the kept Jacobian):
    the checkpoint holds the state at the step's start, so the resumed run repeats the step as a chord
    step and ends where the uninterrupted run does, to 1e-8 (before, it saved the part-updated state and
    took a fresh Jacobian there: another path, O1 0.009 A off in a QA run). The exit status is SIGTERM's."""
    import signal

    import blochflow.refine.optimise as opt

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, adp="aniso", lm_iterations=8,
                              checkpoint_every=1, free_fraction=0.0, lm_reuse_jacobian=True)
    start = displaced(truth, 0.02, 0.03)
    full = refine(build_problem(start, ds, settings), settings, log=lambda s: None)
    chord = next(h["iteration"] for h in full.lm.history if h["jacobian_reused"])
    real, armed = opt._frame_line_search, {"on": False}

    def search(*args, **kwargs):
        if armed["on"]:
            raise Interrupted(signal.SIGTERM)
        return real(*args, **kwargs)

    def log(line):
        armed["on"] = armed["on"] or line.startswith(f"lm   {chord - 1:4d}/")

    monkeypatch.setattr(opt, "_frame_line_search", search)
    ck = tmp_path / "checkpoint.pt"
    part = refine(build_problem(start, ds, settings), settings, checkpoint=ck, log=log)
    assert part.interrupted and part.interrupt_signal == signal.SIGTERM
    monkeypatch.setattr(opt, "_frame_line_search", real)
    kept = torch.load(ck, weights_only=True)
    assert "jacobian" in kept["lm"] and int(kept["lm"]["iteration"]) == chord - 1
    resumed = refine(build_problem(start, ds, settings), settings, checkpoint=ck, resume=kept, log=lambda s: None)
    assert torch.allclose(resumed.theta, full.theta, rtol=0, atol=1e-8)


def test_resume_refuses_other_inputs_and_names_the_settings_that_changed(small_dataset, truth, tmp_path):
    """A checkpoint is resumed only by a run of the same settings on the same start structure and data:
    another start, or the same frames with other intensities, is refused; changed settings are named."""
    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=2, adam_steps=0, lm_iterations=1, thickness=500.0,
                              free_fraction=0.0)
    start = displaced(truth, 0.02, 0.03)
    ck = tmp_path / "checkpoint.pt"
    refine(build_problem(start, ds, settings), settings, checkpoint=ck, log=lambda s: None)
    kept = torch.load(ck, weights_only=True)
    refine(build_problem(start, ds, settings), settings, resume=kept, log=lambda s: None)  # the same: accepted
    r = ds.reflections
    other_data = dataclasses.replace(ds, reflections=dataclasses.replace(r, intensity=r.intensity * 1.01))
    for st, data in ((displaced(truth, 0.03, 0.03, seed=1), ds), (start, other_data)):
        with pytest.raises(ValueError, match="another start structure or other data"):
            refine(build_problem(st, data, settings), settings, resume=kept, log=lambda s: None)
    other = dataclasses.replace(settings, n_samples=3, lm_iterations=3)
    with pytest.raises(ValueError, match=r"other settings \(n_samples: 2 then, 3 now; only lm_iterations and "
                                         r"checkpoint_every may change on --resume\)"):
        refine(build_problem(start, ds, other), other, resume=kept, log=lambda s: None)
    # a run stopped at its iteration limit goes on with a higher one, from where it stopped
    more = dataclasses.replace(settings, lm_iterations=3)
    lines = []
    went_on = refine(build_problem(start, ds, more), more, resume=kept, log=lines.append)
    assert "resumed with lm_iterations: 1 -> 3" in lines and went_on.lm.iteration > 1
    assert went_on.lm.history[0] == json.loads(kept["lm"]["history"])[0]  # the same run, gone on


def test_chord_steps_are_on_by_default_except_with_a_learned_thickness():
    """``lm_reuse_jacobian = "auto"`` (the default) re-uses Jacobian columns unless the thickness
    model is learned (its network columns are shared and nonlinear); true and false force it; any
    other value is refused naming the setting."""
    assert RefineSettings().chord_steps()
    assert not RefineSettings(thickness_model="learned").chord_steps()
    assert settings_from_mapping({"thickness_model": "learned", "lm_reuse_jacobian": True}, "t").chord_steps()
    assert not settings_from_mapping({"lm_reuse_jacobian": False}, "t").chord_steps()
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match="lm_reuse_jacobian: expected true, false or 'auto'"):
            settings_from_mapping({"lm_reuse_jacobian": bad}, "t")


def test_smooth_path_is_the_exact_minimum_and_follows_the_smooth_truth_past_decoys():
    """smooth_path gives the exact minimum of the summed costs plus the random-walk prior (against every
    path of a small grid), and on frames whose own costs hold a deeper decoy minimum away from a smooth
    truth it keeps the truth where each frame's own minimum would not; without neighbours' coupling (a
    huge step sigma) it is each frame's own minimum."""
    import itertools

    from blochflow.refine.frame_search import smooth_path

    rng = np.random.default_rng(5)
    cost = rng.uniform(0, 10, (5, 4))
    values = np.array([-1.0, -0.2, 0.5, 1.0])
    gaps = np.array([1.0, 2.0, 0.5, 1.0])

    def objective(path):
        steps = np.diff(values[list(path)]) / (0.4 * gaps)
        return cost[np.arange(5), list(path)].sum() + np.sum(steps ** 2)

    best = min(itertools.product(range(4), repeat=5), key=objective)
    assert tuple(smooth_path(cost, values, gaps, 0.4)) == best

    grid = np.linspace(-3, 3, 61)
    frames = np.arange(40)
    truth = 0.8 + 1.5 * np.sin(2 * np.pi * frames / 40)
    cost = 20 * ((grid[None, :] - truth[:, None]) / 1.0) ** 2  # broad minima at the truth
    decoys = frames[::4]
    fake = rng.uniform(-3, 3, len(decoys))
    cost[decoys] = np.minimum(cost[decoys], 20 * ((grid[None, :] - fake[:, None]) / 0.1) ** 2 - 5)  # deeper, narrow
    own = grid[np.argmin(cost, 1)]
    assert np.max(np.abs(own[decoys] - truth[decoys])) > 1.0
    path = grid[smooth_path(cost, grid, np.ones(39), 0.3)]
    assert np.max(np.abs(path - truth)) <= 0.1 + 1e-9
    assert np.array_equal(grid[smooth_path(cost, grid, np.ones(39), 1e6)], own)


def test_the_rotation_path_runs_per_dataset_of_a_merged_table():
    """Two merged datasets over the same alpha range, whose goniometers are off about their axes by
    different smooth amounts (+1 and -1 mrad, broad costs): each dataset gets its own path through its
    own minima. One path over both sorted by alpha (the frames interleave) would be dragged between the
    two and land on neither."""
    from types import SimpleNamespace

    from blochflow.refine.frame_search import rotation_path, smooth_path

    grid = np.linspace(-2, 2, 41)
    alpha = np.concatenate([np.arange(20.0), np.arange(20.0) + 0.5])
    truth = np.repeat([1.0, -1.0], 20)
    cost = 0.5 * (grid[None, :] - truth[:, None]) ** 2
    frames = SimpleNamespace(alpha_deg=alpha, dataset=np.repeat([0, 1], 20))
    path = grid[rotation_path(cost, grid, frames, 0.05)]
    assert np.allclose(path, truth)
    order = np.argsort(alpha)
    mixed = np.empty(40, int)
    mixed[order] = smooth_path(cost[order], grid, np.diff(alpha[order]), 0.05)
    assert np.max(np.abs(grid[mixed] - truth)) > 0.5
    single = SimpleNamespace(alpha_deg=alpha, dataset=None)  # one dataset: the one path sorted by alpha
    assert np.array_equal(rotation_path(cost, grid, single, 0.05), mixed)


def test_axis_search_brings_frames_back_about_their_rotation_axis(small_dataset, truth):
    """Frames put off about their rotation axis (1.4 mrad, one at -1.6) come back onto the grid next to
    their truth (zero) with their thickness, and keep their correction normal to the axis."""
    from blochflow.refine.frame_search import AXIS_SEARCH_STEP, search_axis_path

    settings, problem, thickness, axis, normal, theta = _frames_at_their_truth(small_dataset, truth)
    st, so = problem.slots["thickness"], problem.slots["orientation"]
    off = torch.full((len(thickness),), 1.4, dtype=torch.float64)
    off[3] = -1.6
    corrections = off[:, None] * axis + 0.01 * normal
    theta[so.start:so.stop] = corrections.reshape(-1)
    searched, moved, grid = search_axis_path(problem, theta, settings)
    after = searched[so.start:so.stop].reshape(-1, 2)
    along, across = (after * axis).sum(1), (after * normal).sum(1)
    assert sorted(moved.tolist()) == list(range(len(thickness)))
    assert torch.allclose(across, torch.full_like(across, 0.01))
    assert torch.all(torch.abs(along) <= 2 * AXIS_SEARCH_STEP + 1e-9)
    t = 1000 * torch.exp(searched[st.start:st.stop]).numpy()
    assert np.all(np.abs(t - thickness) <= 30.0)


def test_the_axis_search_is_remembered_by_a_checkpoint():
    """The search of the corrections about the rotation axis runs once per run: a resumed run knows it ran."""
    from blochflow.refine.optimise import LMState
    from blochflow.refine.run import _lm_from_dict, _lm_to_dict

    assert _lm_from_dict(_lm_to_dict(LMState(axis_searched=True))).axis_searched
    assert not _lm_from_dict(_lm_to_dict(LMState())).axis_searched


def _thicker_path(factor: float):
    """A stand-in for search_axis_path whose "path" makes every frame ``factor`` x thicker (and names
    every frame moved)."""
    def path(problem, theta, settings):
        moved = theta.clone()
        st = problem.slots["thickness"]
        moved[st.start:st.stop] += float(np.log(factor))
        return moved, np.arange(problem.model.n_frames), np.array([-1.0, 0.0, 1.0])

    return path


@pytest.mark.parametrize("factor, lm_iterations", [(1.8, 20), (1.15, 40)])
def test_an_axis_search_that_ends_worse_is_undone(small_dataset, truth, monkeypatch, factor, lm_iterations):
    """The axis search's path is a hypothesis (smooth goniometer errors): when the run converges again at
    a higher cost than before it, it goes back to the converged point before it, and ends where a run
    without the search ends, with its covariance. The stand-in path puts every frame 1.8x too thick, on
    other branches of the Pendelloesung oscillation that LM does not leave by its iteration limit (undone
    there), or 1.15x, which LM converges from to a worse point (undone then, and LM goes on)."""
    from blochflow.refine import run as runmod

    ds, _, _ = small_dataset
    monkeypatch.setattr(runmod, "search_axis_path", _thicker_path(factor))
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, adam_steps=0,
                              lm_iterations=lm_iterations, axis_search=True, tilt_search=False, frame_restart=False)
    lines = []
    with_search = refine(build_problem(truth, ds, settings), settings, log=lines.append)
    plain_settings = dataclasses.replace(settings, axis_search=False)
    plain = refine(build_problem(truth, ds, plain_settings), plain_settings, log=lambda s: None)
    assert any(line.startswith("axis search undone") for line in lines)
    assert with_search.lm.axis_fallback is None
    assert with_search.lm.converged == (factor < 1.5)  # 1.8x: the run stops at its limit, undone there
    assert with_search.figures.wR2 == pytest.approx(plain.figures.wR2, rel=1e-3)
    st = with_search.problem.slots["structure"]
    su, su_plain = (torch.sqrt(torch.diagonal(r.covariance)[st.start:st.stop]) for r in (with_search, plain))
    assert torch.allclose(su, su_plain, rtol=0.02)  # the covariance taken at the point gone back to


def test_resume_after_an_axis_search_keeps_the_point_before_it(small_dataset, truth, tmp_path, monkeypatch):
    """A run interrupted after the axis search and before it was judged resumes with the converged point
    before the search (in the checkpoint), undoes the search as the uninterrupted run does and ends
    where that run ends, to 1e-8."""
    from blochflow.refine import run as runmod

    ds, _, _ = small_dataset
    monkeypatch.setattr(runmod, "search_axis_path", _thicker_path(1.15))
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, free_fraction=0.0, adam_steps=0,
                              lm_iterations=40, checkpoint_every=1, axis_search=True, tilt_search=False,
                              frame_restart=False)

    def after_the_search(full):  # the first iteration from the searched point: it starts far above the last
        hist = full.lm.history
        return next(h["iteration"] for prev, h in zip(hist, hist[1:]) if h["cost_before"] > 2 * prev["cost"])

    full, kept, _, resumed = _full_and_resumed(ds, truth, settings, tmp_path, stop_after=after_the_search)
    assert "axis_fallback" in kept["lm"] and kept["lm"]["axis_searched"]
    assert full.lm.axis_fallback is None and resumed.lm.axis_fallback is None
    assert torch.allclose(resumed.theta, full.theta, rtol=0, atol=1e-8)


def test_dry_run_times_the_problem_and_writes_nothing(small_dataset, quartz_paths, tmp_path, capsys):
    """--dry-run builds the model as refine does, times a forward pass and a Jacobian, estimates the run,
    and leaves no folder behind; a bad restraint is still refused in one line."""
    from blochflow.cli import main

    _, _, data = small_dataset
    out = tmp_path / "dry"
    capsys.readouterr()
    assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(out), "--dry-run", "--samples", "2",
                 "--set", "samples_per_fringe=0", "--thickness", "500"]) == 0
    text = capsys.readouterr().out
    line = next(t for t in text.splitlines() if t.startswith("dry run:"))
    assert re.search(r"a Jacobian of \d+ refined parameters [\d.]+ s", line) and "Nothing was written" in line
    assert not out.exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('[[restraints]]\ntype = "rigid_bond"\natoms = ["Si1"]\n')
    assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(out), "--dry-run", "--config", str(bad),
                 "--samples", "2", "--set", "samples_per_fringe=0", "--thickness", "500"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists() and err.startswith(f"error: {bad}: restraints[0]")
    # the same kind of error from --set is blamed on --set, not on the structure or a config file
    assert main(["refine", str(quartz_paths[0]), str(data), "--out", str(out), "--dry-run", "--set", "restraints=[1]",
                 "--samples", "2", "--set", "samples_per_fringe=0", "--thickness", "500"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set: restraints[0]: expected a table") and err.count("\n") == 1


def test_a_bad_setting_is_blamed_on_where_it_came_from(quartz_paths, tmp_path, capsys):
    """A setting's error names its source: the config file, the flag or --set, also when another
    source gave other settings; a flag or --set overrides a config key written with hyphens."""
    from blochflow.cli import main

    typo, negative = tmp_path / "typo.toml", tmp_path / "negative.toml"
    typo.write_text("lm_iteratons = 1\n")
    negative.write_text("lm-iterations = -2\n")
    base = ["refine", *map(str, quartz_paths[:2]), "--out", str(tmp_path / "o"), "--dry-run"]
    for extra, first in ((["--config", str(typo), "--set", "s_max=0.01"], f"error: {typo}: lm_iteratons: unknown"),
                         (["--config", str(negative), "--set", "s_max=0.01"], f"error: {negative}: lm_iterations: -2"),
                         (["--config", str(negative), "--lm-iterations", "3", "--set", "free-seed=-1"],
                          "error: --set: free_seed: -1 must be from 0 to 2^63 - 1"),
                         (["--samples", "0"], "error: --samples: n_samples: must be at least 1")):
        capsys.readouterr()
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(first) and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_dry_run_times_a_part_of_a_large_problem(small_dataset, quartz_paths, tmp_path, capsys, monkeypatch):
    """A problem whose pass is estimated above WHOLE_PASS_S is timed on a part (frames spread over the
    rotation, or one frame at fewer samples) and scaled by the solves' work: never a pass over the whole
    data."""
    import blochflow.cli as cli
    import blochflow.refine.cost as cost
    import blochflow.refine.problem as problem_mod
    from blochflow.refine.model import ForwardModel

    _, _, data = small_dataset
    args = ["refine", str(quartz_paths[0]), str(data), "--out", str(tmp_path / "dry"), "--dry-run", "--samples", "8",
            "--set", "samples_per_fringe=0", "--thickness", "500"]

    def figures(line):
        return [float(x) for x in re.findall(r"a forward pass ([\d.]+) s, a Jacobian of \d+ refined parameters ([\d.]+) s",
                                             line)[0]]

    capsys.readouterr()
    largest = []
    solve = problem_mod.RefinementProblem._solve

    def counting(self, theta, plan, *rest, **kw):
        largest.append(len(plan.samples.frame))
        return solve(self, theta, plan, *rest, **kw)

    monkeypatch.setattr(problem_mod.RefinementProblem, "_solve", counting)
    monkeypatch.setattr(ForwardModel, "pass_seconds_estimate", lambda self: 1.0)
    for part_s in (1e-9, 1 / 3):  # one frame at two samples; a third of the frames
        monkeypatch.setattr(cost, "WHOLE_PASS_S", 0.5)
        monkeypatch.setattr(cost, "PART_PASS_S", part_s)
        largest.clear()
        assert cli.main(args) == 0
        line = next(t for t in capsys.readouterr().out.splitlines() if t.startswith("dry run:"))
        assert ("at 2 tilt samples" if part_s < 1e-6 else "frames spread over the rotation") in line
        assert "scaled to the whole data" in line
        n_frames = len(read_pets(data).frames.ids)
        assert max(largest) < 8 * n_frames  # no pass over every frame's samples
        assert all(x > 0 for x in figures(line))


def test_the_axis_search_is_suggested_where_neighbours_jump(small_dataset, truth):
    """The note reads the refined corrections about each frame's rotation axis: alternating by 6 mrad at
    0.1 mrad s.u. between neighbours (frames in different minima) it suggests the axis search; within their
    s.u. it does not; nor when the search ran."""
    from types import SimpleNamespace

    from blochflow.cli import axis_search_note
    from blochflow.refine.run import build_problem
    from blochflow.refine.settings import RefineSettings
    from blochflow.report.outputs import axis_jumps

    ds, _, _ = small_dataset
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=2, thickness=500.0)
    result = SimpleNamespace(problem=build_problem(truth, ds, settings))
    n = len(ds.frames)
    axis = np.radians(ds.details.rotation_axis_deg - ds.frames.omega_deg)  # x, y of each frame's axis: cos, -sin

    def frames(along, su):
        return {"orientation_x_mrad": along * np.cos(axis), "orientation_y_mrad": -along * np.sin(axis),
                "orientation_x_su_mrad": np.full(n, su), "orientation_y_su_mrad": np.full(n, su),
                "alpha_deg": ds.frames.alpha_deg, "n_reflections": np.ones(n, int)}

    jumping = axis_jumps(result, frames(3.0 * (-1.0) ** np.arange(n), 0.1))
    assert jumping == {"pairs": n - 1, "jumps": n - 1}
    assert "--set axis_search=true" in axis_search_note(jumping, settings)
    calm = axis_jumps(result, frames(0.05 * (-1.0) ** np.arange(n), 0.1))
    assert calm == {"pairs": n - 1, "jumps": 0} and axis_search_note(calm, settings) is None
    assert axis_search_note(jumping, dataclasses.replace(settings, axis_search=True)) is None


def test_a_dry_run_of_a_problem_too_large_to_time_extrapolates_without_solving(small_dataset, quartz_paths, monkeypatch):
    """Where one solve would take longer than PROBE_SAMPLE_S, the dry run neither scans the start thickness
    nor times a sample: the pass comes from the rate of a small eigendecomposition scaled by N^3, the Jacobian
    as that pass plus one product per tangent, and no solve of the problem runs."""
    from blochflow.physics import diffraction
    from blochflow.refine import cost

    _, _, data = small_dataset
    crystal = crystal_from_record(read_structure(quartz_paths[0]))
    settings = RefineSettings(n_samples=2, samples_per_fringe=0.0)
    monkeypatch.setattr(diffraction, "PROBE_SAMPLE_S", 1e-12)  # these small matrices (40-70 beams) as if huge
    for module in (cost, diffraction):
        monkeypatch.setattr(module, "PROBE_BEAMS", 16)

    def no_solve(*args, **kwargs):
        raise AssertionError("a solve of the problem ran")

    monkeypatch.setattr(diffraction, "_chunk_intensities", no_solve)
    monkeypatch.setattr(diffraction, "_piece_intensities", no_solve)
    rate = 1e-9  # s per N^3, fixed so that the estimate is exact arithmetic (the measured rate varies with load)
    for module in (cost, diffraction):
        if hasattr(module, "seconds_per_n3"):
            monkeypatch.setattr(module, "seconds_per_n3", lambda *args, **kwargs: rate)
    lines = []
    est = cost.estimate_cost(crystal, read_pets(data), settings, lines.append)
    assert any(line.startswith("start thickness not scanned") for line in lines)
    work = sum(ch.hkl.shape[0] * float(ch.hkl.shape[1]) ** 3 for ch in est.problem.model.plan.chunks)
    assert est.forward_s == pytest.approx(rate * work / diffraction._workers(est.problem.model.plan), rel=1e-9)
    # a pass plus a product per tangent (products at the same fixed rate): quartz's 14 structure parameters
    # (Si on its two-fold: x and four U; O: xyz and six U) and each frame's thickness and two orientation angles
    assert est.jacobian_s == pytest.approx(est.forward_s * (1 + 14 + 3), rel=1e-9)
    assert est.jacobian_s > est.forward_s and "extrapolated" in est.summary() and "a lower bound" in est.summary()
