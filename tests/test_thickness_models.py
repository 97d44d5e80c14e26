"""Thickness models: slab geometry, learned quantile distributions, their Jacobians and priors."""

from __future__ import annotations

import math

import numpy as np
import torch

from blochflow.experiment.frames import (FrameContext, LearnedThickness, SlabThickness,
                                         thickness_model_from_config)
from blochflow.io.pets import select_frames
from blochflow.refine.run import RefineSettings, build_problem

from conftest import _displaced


def _two_frames(ds):
    keep = np.zeros(len(ds.frames), bool)
    keep[[1, 4]] = True
    return select_frames(ds, keep)


def _check_jacobian(problem, theta, columns, h=1e-6, rtol=1e-5):
    _, r, jac = problem.jacobian(theta)

    def rows(th):
        return torch.cat([problem.residuals(problem.intensities(th)), problem.prior_residuals(th)])

    assert torch.allclose(r, rows(theta), rtol=1e-12, atol=1e-12)
    for i in columns:
        e = torch.zeros_like(theta)
        e[i] = h
        fd = (rows(theta + e) - rows(theta - e)) / (2 * h)
        scale = max(float(fd.abs().max()), 1e-3)
        assert float((jac[:, i] - fd).abs().max()) < rtol * scale, problem.names[i]
    return jac


def test_slab_jacobian_and_path_length(small_dataset, truth):
    ds, _, _ = small_dataset
    settings = RefineSettings(n_samples=2, thickness=400.0, thickness_model="slab", free_fraction=0.0)
    problem = build_problem(_displaced(truth, 0.02, 0.02), _two_frames(ds), settings)
    theta = problem.theta0.clone()
    normal = problem.slots["surface_normal"]
    theta[normal.start:normal.stop] = torch.tensor([0.3, -0.2])
    cols = torch.cat([problem.group_index("thickness"), problem.group_index("surface")]).tolist()
    jac = _check_jacobian(problem, theta, cols)
    assert float(jac[:, cols].abs().max(0).values.min()) > 0
    # normal along the beam at zero tilt: the beam crosses t0 / cos(alpha) of crystal
    ctx = problem.frames.ctx
    raw = problem.split(problem.theta0)
    desc = problem.frames.thickness.describe(raw, ctx)
    tilt = torch.arccos(torch.cos(ctx.alpha) * torch.cos(ctx.beta)).numpy()
    assert np.allclose(desc["thickness_mean"], 400.0 / np.cos(tilt), rtol=1e-9)


def test_learned_jacobian_through_the_network(small_dataset, truth):
    ds, _, _ = small_dataset
    settings = RefineSettings(n_samples=2, thickness=400.0, thickness_model="learned", thickness_hidden=3,
                              thickness_knots=3, thickness_points=4, thickness_smoothness=2.0,
                              free_fraction=0.0, refine_orientation=False)
    problem = build_problem(_displaced(truth, 0.02, 0.02), _two_frames(ds), settings)
    theta = problem.theta0.clone()
    net = problem.group_index("network")
    theta[net] += 0.3 * torch.randn(len(net), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert len(problem.prior_residuals(theta)) == 4  # (F - 1) x (K + 1) smoothness rows
    jac = _check_jacobian(problem, theta, net.tolist() + problem.group_index("xyz").tolist())
    assert float(jac[:, net].abs().max()) > 0


def test_quantile_distribution_is_ordered_bounded_and_flexible():
    ctx = FrameContext(alpha=torch.linspace(-0.8, 0.8, 7, dtype=torch.float64), beta=torch.zeros(7, dtype=torch.float64),
                       omega=torch.zeros(7, dtype=torch.float64))
    model = LearnedThickness(np.full(7, 600.0), 30.0, bounds=(50.0, 3000.0), knots=6, points=12, hidden=5)
    model.warm_start(ctx)
    raw = model.initial()
    t, w = model.evaluate(raw, ctx)
    assert torch.allclose(w.sum(-1), torch.ones(7, dtype=torch.float64))
    desc = model.describe(raw, ctx)
    assert np.all(np.abs(desc["thickness_mean"] - 600.0) < 15.0)  # warm start reproduces its target
    assert np.all(np.abs(desc["thickness_spread"] - 30.0) < 15.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # any weights: knots ordered and inside the bounds
        f = 5 * torch.randn(7, 8, generator=gen, dtype=torch.float64)
        k = model.knot_values(f)
        assert torch.all(k[:, 1:] >= k[:, :-1]) and k.min() >= 50.0 and k.max() <= 3000.0
    # one dominant increment between the knots at levels 1/2 and 2/3: two peaks at 400 and 1400 A,
    # the quantile function's linear interpolation leaves 1/6 of the mass between them
    lo, hi = 50.0, 3000.0
    p = torch.tensor([350.0, 1e-3, 1e-3, 1e-3, 1000.0, 1e-3, 1e-3, hi - lo - 1350.0], dtype=torch.float64)
    pts, _ = model.quadrature(model.knot_values(torch.log(p / p.sum())[None, :]))
    pts = np.sort(pts.numpy()[0])
    assert np.allclose(pts[:6], 400.0, atol=1.0) and np.allclose(pts[-4:], 1400.0, atol=1.0)
    assert np.allclose(pts[6:8], [650.0, 1150.0], atol=1.0)
    # a saved configuration rebuilds the same model
    again = thickness_model_from_config(model.config())
    assert torch.allclose(again.evaluate(raw, ctx)[0], t)


def test_slab_normal_turns_with_the_goniometer():
    ctx = FrameContext(alpha=torch.tensor([0.0, math.radians(30)], dtype=torch.float64),
                       beta=torch.zeros(2, dtype=torch.float64), omega=torch.zeros(2, dtype=torch.float64))
    slab = SlabThickness(300.0)
    n = slab.surface_normal(slab.initial(), ctx)
    assert torch.allclose(n[0], torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64))
    assert abs(float(n[1, 2]) + math.cos(math.radians(30))) < 1e-12  # rotated about x by alpha
