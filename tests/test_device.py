"""The Bloch solves on another device: nothing is created off the plan's device (checked on any
machine), and on CUDA, where there is one, the same intensities, gradients, Jacobians and
refinement steps as on the CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from blochflow.crystal.structure import displaced
from blochflow.io.pets import select_frames
from blochflow.physics.bloch import CUDA_EIGH_BACKENDS, cuda_eigh_backend
from blochflow.physics.device import resolve_device
from blochflow.physics.workers import fixed_workers
from blochflow.physics.diffraction import Decompositions, FrameState, simulate_frames, simulate_frames_jvp
from blochflow.refine.run import build_problem
from blochflow.refine.settings import RefineSettings

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


def _problem(small_dataset, truth, device=None, **extra):
    ds, _, _ = small_dataset
    keep = np.zeros(len(ds.frames), bool)
    keep[[1, 4]] = True
    method = extra.pop("absorption_method", None)
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=3, adp="aniso", thickness=500.0, free_fraction=0.0,
                              jacobian_precision="double", **extra)
    problem = build_problem(displaced(truth, 0.03, 0.02), select_frames(ds, keep), settings)
    if method is not None:
        problem.model.settings = dataclasses.replace(problem.model.settings, absorption_method=method)
    if device is not None:
        problem.model.plan = problem.model.plan.to(device)
    return problem


def _inputs(problem, points: int = 1, seed: int = 0, n_tangents: int = 3):
    """(potential, potential_abs, state, tangents) at the start with orientation corrections set and
    ``points`` thicknesses per frame; tangents random in every input."""
    theta = problem.theta0.clone()
    theta[problem.group_index("orientation")] = 0.3
    raw = problem.split(theta)
    with torch.no_grad():
        u, u_abs = problem.potential(raw)
        state = problem.state(raw)
    if points > 1:
        f = state.thickness.shape[0]
        t = state.thickness[:, :1] * torch.linspace(0.8, 1.2, points, dtype=torch.float64)
        state = FrameState(state.alpha, state.beta, state.omega, t, torch.full((f, points), 1.0 / points,
                                                                                 dtype=torch.float64),
                           state.surface_normal, state.orientation_correction)
    gen = torch.Generator().manual_seed(seed)

    def rand(x):
        if x is None:
            return None
        if x.is_complex():
            return torch.complex(torch.randn(x.shape, generator=gen, dtype=torch.float64),
                                 torch.randn(x.shape, generator=gen, dtype=torch.float64)) * 1e-3 * x.abs().mean()
        return torch.randn(x.shape, generator=gen, dtype=x.dtype) * 1e-3

    tangents = [(rand(u), rand(u_abs), tuple(rand(x) for x in state.tensors())) for _ in range(n_tangents)]
    return u, u_abs, state, tangents


def _run_physics(problem, u, u_abs, state, tangents, **jvp_options):
    """Every physics entry point: values with kept decompositions, values with gradient and their
    backward pass, forward-mode tangents (fresh and from the kept decompositions)."""
    plan = problem.model.plan
    method = problem.model.settings.absorption_method
    keep = Decompositions(torch.complex128)
    with torch.no_grad():
        ic = simulate_frames(plan, u, u_abs, state, absorption_method=method, keep=keep)
    leaves = [x.clone().requires_grad_(True) for x in (u, state.thickness)]
    ic_g = simulate_frames(plan, leaves[0], u_abs, FrameState(state.alpha, state.beta, state.omega, leaves[1],
                                                                 *state.tensors()[4:]), absorption_method=method)
    grads = torch.autograd.grad(torch.sum(ic_g ** 2), leaves)
    jv = simulate_frames_jvp(plan, u, u_abs, state, tangents, absorption_method=method, **jvp_options)
    jv_kept = simulate_frames_jvp(plan, u, u_abs, state, tangents, absorption_method=method, decompositions=keep,
                                  **jvp_options) if keep.chunks else jv
    return ic, ic_g.detach(), grads, jv, jv_kept


CASES = {  # (a dict per call: _problem pops from it)
    "elastic": {},
    "absorption": dict(absorption="proportional", refine_absorption=True),
    "perturbative": dict(absorption="proportional", absorption_method="perturbative"),
    "bethe": dict(s_max=0.01, s_bethe=0.04),
    "slab": dict(thickness_model="slab"),
}


@pytest.mark.parametrize("points", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_the_physics_creates_no_tensor_off_the_plan_device(small_dataset, truth, case, points):
    """Run with the default device set to 'meta': a tensor the physics made without naming the
    plan's device would land there and fail at its first use with the plan's tensors, so this
    catches on a CPU what would break on a GPU."""
    problem = _problem(small_dataset, truth, **dict(CASES[case]))
    u, u_abs, state, tangents = _inputs(problem, points)
    expected = _run_physics(problem, u, u_abs, state, tangents)
    with fixed_workers(1), torch.device("meta"):  # the mode is per thread: no worker threads
        got = _run_physics(problem, u, u_abs, state, tangents)
    flat_e, flat_g = torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)
    assert len(flat_e) == len(flat_g)
    for a, b in zip(flat_e, flat_g):
        assert b.device.type == "cpu"
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["elastic", "absorption"])
def test_passes_without_gradient_form_only_the_scored_waves_and_take_kept_decompositions(small_dataset, truth, case):
    """A pass without gradient forms the waves at the scored beams only; its values equal those of a
    recorded pass (all beams). Decompositions kept at one thickness serve a pass at others (the
    structure matrix does not depend on thickness) and give the values of a fresh pass."""
    problem = _problem(small_dataset, truth, **dict(CASES[case]))
    plan, method = problem.model.plan, problem.model.settings.absorption_method
    u, u_abs, state, _ = _inputs(problem, points=3)
    with torch.no_grad():
        fresh = simulate_frames(plan, u, u_abs, state, absorption_method=method, per_thickness=True)
    leaf = u.clone().requires_grad_(True)
    recorded = simulate_frames(plan, leaf, u_abs, state, absorption_method=method, per_thickness=True).detach()
    assert torch.allclose(fresh, recorded, rtol=1e-11, atol=1e-14)
    one = FrameState(state.alpha, state.beta, state.omega, state.thickness[:, :1], state.thickness_weight[:, :1],
                     state.surface_normal, state.orientation_correction)
    keep = Decompositions(torch.complex128)
    with torch.no_grad():
        simulate_frames(plan, u, u_abs, one, absorption_method=method, keep=keep)
        assert keep.chunks and (keep.chunks[0][2] is None) == (case == "elastic")
        reused = simulate_frames(plan, u, u_abs, state, absorption_method=method, per_thickness=True,
                                 decompositions=keep)
    assert float((fresh[:, 0] - fresh[:, 2]).abs().max()) > 1e-3 * float(fresh.abs().max())  # thicknesses matter
    assert torch.allclose(reused, fresh, rtol=1e-10, atol=1e-14)


def test_a_frame_subplan_solves_those_frames_as_the_whole_plan_does(small_dataset, truth):
    """Intensities over a plan cut to some frames are the whole plan's at those frames' reflections
    (zero at the others), and that pass's decompositions, merged into another set, put exactly
    the whole plan's in those frames' places."""
    from blochflow.physics.plan import frame_subplan

    problem = _problem(small_dataset, truth)
    plan = problem.model.plan
    u, u_abs, state, _ = _inputs(problem)
    frames = torch.zeros(plan.n_frames, dtype=torch.bool)
    frames[int(plan.scored.frame[0])] = True
    rows = torch.as_tensor(frames[torch.as_tensor(plan.scored.frame)])
    assert 0 < int(rows.sum()) < len(rows)
    sub, source = frame_subplan(plan, frames)
    whole, part, other = (Decompositions(torch.complex128) for _ in range(3))
    with torch.no_grad():
        ic = simulate_frames(plan, u, u_abs, state, keep=whole)
        ic_sub = simulate_frames(sub, u, u_abs, state, keep=part)
        shifted = FrameState(state.alpha, state.beta, state.omega + 0.01, *state.tensors()[3:])
        simulate_frames(plan, u, u_abs, shifted, keep=other)  # other orientations: other decompositions
    assert torch.allclose(ic_sub[rows], ic[rows], rtol=1e-12, atol=0) and bool((ic_sub[~rows] == 0).all())
    other.take_frames(plan, part, frames, source)
    for ch, mine, theirs in zip(plan.chunks, other.chunks, whole.chunks):
        sel = frames[ch.frame]
        assert torch.equal(mine[1][sel], theirs[1][sel]) and not torch.allclose(mine[1][~sel], theirs[1][~sel])


def test_resolve_device_names_what_is_wrong():
    assert resolve_device("cpu") == torch.device("cpu")
    from blochflow.physics.bloch import fast_cuda_eigh_available

    assert resolve_device("auto").type == ("cuda" if CUDA and fast_cuda_eigh_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@needs_cuda
@pytest.mark.parametrize("points", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_gives_the_cpu_results(small_dataset, truth, case, points):
    """Values, gradients and forward-mode tangents on CUDA agree with the CPU's to double-precision
    rounding (different eigensolvers: eigenvectors differ by phases, the physics does not)."""
    cpu = _problem(small_dataset, truth, **dict(CASES[case]))
    gpu = _problem(small_dataset, truth, device="cuda", **dict(CASES[case]))
    args = _inputs(cpu, points)
    expected = _run_physics(cpu, *args)
    got = _run_physics(gpu, *args)
    for a, b in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)):
        assert b.device.type == "cpu"  # results come home
        scale = float(a.abs().max())
        assert float((a - b).abs().max()) <= 1e-9 * max(scale, 1e-30)


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=needs_cuda)])
def test_many_tangents_take_the_potential_contraction_on_any_device(small_dataset, truth, device):
    """From CONTRACTION_MIN_TANGENTS tangents on, the Jacobian contracts the potential through one
    scatter per sample: it too makes nothing off the plan's device, and on CUDA gives the CPU's."""
    from blochflow.physics.diffraction import CONTRACTION_MIN_TANGENTS

    cpu = _problem(small_dataset, truth)
    u, u_abs, state, tangents = _inputs(cpu, n_tangents=CONTRACTION_MIN_TANGENTS + 2)
    plan = cpu.model.plan
    expected = simulate_frames_jvp(plan, u, u_abs, state, tangents)
    if device == "meta":
        with fixed_workers(1), torch.device("meta"):
            got = simulate_frames_jvp(plan, u, u_abs, state, tangents)
    else:
        got = simulate_frames_jvp(plan.to("cuda"), u, u_abs, state, tangents)
    for a, b in zip(expected, got):
        assert b.device.type == "cpu"
        assert float((a - b).abs().max()) <= 1e-9 * float(a.abs().max())


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_EIGH_BACKENDS)
def test_cuda_eigensolver_backends_agree(small_dataset, truth, backend, monkeypatch):
    if backend in ("cupy", "jax"):
        pytest.importorskip(backend)
    if backend == "auto":
        assert cuda_eigh_backend() in CUDA_EIGH_BACKENDS[1:]
    monkeypatch.setenv("BLOCHFLOW_CUDA_EIGH", backend)
    cpu = _problem(small_dataset, truth)
    gpu = _problem(small_dataset, truth, device="cuda")
    u, u_abs, state, _ = _inputs(cpu)
    with torch.no_grad():
        a = simulate_frames(cpu.model.plan, u, u_abs, state)
        b = simulate_frames(gpu.model.plan, u, u_abs, state)
    assert float((a - b).abs().max()) <= 1e-9 * float(a.abs().max())


@needs_cuda
def test_a_refinement_on_cuda_follows_the_cpu_one(small_dataset, truth):
    """Two LM iterations from the same start: the same parameters on both devices (with a double
    precision Jacobian; measured with the single-precision default: 1e-4 apart after two)."""
    from blochflow.refine.run import refine

    settings = RefineSettings(samples_per_fringe=0.0, n_samples=3, thickness=500.0, free_fraction=0.0, adam_steps=0,
                              lm_iterations=2, jacobian_precision="double")  # single: steps differ by 1e-5
    ds = small_dataset[0]
    start = displaced(truth, 0.03, 0.02)
    out = {}
    for device in ("cpu", "cuda"):
        problem = build_problem(start, ds, settings)
        problem.model.plan = problem.model.plan.to(device)
        out[device] = refine(problem, settings).theta
    assert torch.allclose(out["cpu"], out["cuda"], rtol=1e-6, atol=1e-8)


def test_cuda_eigensolver_choice(monkeypatch):
    """auto: jax, else cupy, else MAGMA, by what is usable with CUDA; a named backend that cannot be
    used, or an unknown name, is an error saying so."""
    from blochflow.physics import bloch

    usable = {"jax": False, "cupy": False}
    monkeypatch.setattr(bloch, "cuda_backend_usable", lambda m: usable[m])
    monkeypatch.delenv("BLOCHFLOW_CUDA_EIGH", raising=False)
    assert bloch.cuda_eigh_backend() == "magma" and not bloch.fast_cuda_eigh_available()
    usable["cupy"] = True
    assert bloch.cuda_eigh_backend() == "cupy" and bloch.fast_cuda_eigh_available()
    usable["jax"] = True
    assert bloch.cuda_eigh_backend() == "jax"
    monkeypatch.setenv("BLOCHFLOW_CUDA_EIGH", "torch")
    assert bloch.cuda_eigh_backend() == "torch"
    usable["cupy"] = False
    monkeypatch.setenv("BLOCHFLOW_CUDA_EIGH", "cupy")
    with pytest.raises(ValueError, match="cupy is not installed with CUDA"):
        bloch.cuda_eigh_backend()
    monkeypatch.setenv("BLOCHFLOW_CUDA_EIGH", "lapack")
    with pytest.raises(ValueError, match="choose one of"):
        bloch.cuda_eigh_backend()


def test_device_errors_are_one_line(capsys):
    from blochflow.cli import main

    assert main(["--device", "gpu0", "simulate", "--example", "quartz", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device: gpu0: unknown device") and "\n" not in err


def test_jacobian_pieces_share_one_potential_tangent(small_dataset, truth, monkeypatch):
    """The potential's tangent table (T, M+1) is the same for every chunk of samples: the fused rule's
    pieces all get one shared table, not a copy per chunk (a copy each took 12 GB for the 50
    paracetamol frames), and the Jacobian is the same as with one chunk."""
    from blochflow.physics import diffraction
    from blochflow.refine import model as model_mod

    problem = _problem(small_dataset, truth)
    u, u_abs, state, tangents = _inputs(problem, n_tangents=4)
    one = simulate_frames_jvp(problem.model.plan, u, u_abs, state, tangents)
    monkeypatch.setattr(model_mod, "work_scale", lambda device: 1e-3)  # small chunks: many of them
    many = _problem(small_dataset, truth)
    assert len(many.model.plan.chunks) > 3 * len(problem.model.plan.chunks)
    seen = []
    fused = diffraction._fused_jvp

    def spy(tm, primal, tangent, **kw):
        seen.append((primal[0].data_ptr(), tangent[0].data_ptr()))
        return fused(tm, primal, tangent, **kw)

    monkeypatch.setattr(diffraction, "_fused_jvp", spy)
    got = simulate_frames_jvp(many.model.plan, u, u_abs, state, tangents)
    assert len(seen) >= len(many.model.plan.chunks) and len(set(seen)) == 1
    for a, b in zip(one, got):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * float(a.abs().max()))


@pytest.mark.parametrize("geometry", ["continuous", "precession"])
def test_split_samples_is_the_midpoint_rule_with_twice_the_samples(small_dataset, truth, geometry):
    """Every sample split in two (a quarter spacing either side, half the weight, its own beams)
    gives the intensities of a plan built with twice the samples, where every candidate beam is
    coupled at every sample (so that the two plans' beam sets cannot differ); rules whose nodes do
    not nest get None."""
    from blochflow.physics.plan import build_plan, split_samples

    ds, _, _ = small_dataset
    keep = np.zeros(len(ds.frames), bool)
    keep[[1, 4]] = True
    ds = select_frames(ds, keep)
    ds = dataclasses.replace(ds, details=dataclasses.replace(ds.details, geometry=geometry))
    settings = RefineSettings(samples_per_fringe=0.0, n_samples=3, thickness=500.0, free_fraction=0.0,
                              g_max=1.0, s_max=10.0, coupling="sample")
    problem = build_problem(truth, ds, settings)
    plan = problem.model.plan
    u, u_abs = problem.potential(problem.split(problem.theta0))
    state = problem.state(problem.split(problem.theta0))
    counts = np.bincount(plan.samples.frame, minlength=plan.n_frames)
    rebuilt = build_plan(ds, plan.settings, samples_per_frame=2 * counts, scored_rows=plan.scored.row)
    split = split_samples(plan, ds.frames.half_angle_deg)
    assert np.allclose(np.sort(split.samples.alpha_offset), np.sort(rebuilt.samples.alpha_offset), atol=1e-15)
    with torch.no_grad():
        once, twice, built = (simulate_frames(p, u, u_abs, state) for p in (plan, split, rebuilt))
    assert torch.allclose(twice, built, rtol=1e-10, atol=0)
    assert float((twice - once).abs().max()) > 1e-6 * float(once.abs().max())  # the rules do differ
    assert split_samples(dataclasses.replace(plan, settings=dataclasses.replace(plan.settings, sample_rule="gauss")),
                         ds.frames.half_angle_deg) is None
