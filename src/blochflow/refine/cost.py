"""What a refinement would cost (``blochflow refine --dry-run``), without making one.

A pass over paracetamol at the default beams takes minutes on a 2-core machine and a Jacobian hours,
so a large problem is timed on a part of it and scaled by the solves' work (beams^3 over the tilt
samples). Nothing is written.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..crystal.structure import Crystal
from ..io.pets import frame_selection, select_frames, with_wavelength
from ..physics.diffraction import PROBE_BEAMS, seconds_per_n3, untimed_rate
from .model import ForwardModel
from .problem import RefinementProblem
from .run import build_problem, format_duration, refined_index
from .settings import RefineSettings, precision_dtype

START_FRAMES = 4  # frames, spread over the rotation, whose thickness scan gives the start thickness
WHOLE_PASS_S = 2.0  # a problem whose pass is estimated above this is timed on a part of it
PART_PASS_S = 0.5  # ... whose pass is estimated at about this
# passes outside the LM iterations: the start's thickness scan (1), the tilt search (12 of its 19 tilts, coarse
# to fine, over the half of the frames above the median cost: ~6) and the integration check (twice the samples: 2)
SEARCH_PASSES = 9
# LM iterations of the runs measured (docs/refinement.md): the range the estimate is given for
# (paracetamol 6-21, the quartz example 17, the paper's synthetic quartz 13-27, thick ZnO 26)
LM_ITERATIONS = (6, 27)


@dataclass(frozen=True)
class CostEstimate:
    """Seconds of a forward pass (at LM's precision) and of a Jacobian of the refined parameters."""

    problem: RefinementProblem  # the whole problem, built at the start thickness
    forward_s: float
    jacobian_s: float
    n_refined: int
    timed_on: str  # what was timed when not the whole problem ("" when it was)

    @property
    def lm_iteration_s(self) -> float:
        return self.jacobian_s + 2 * self.forward_s  # a Jacobian and a trial step or two

    def summary(self, hands: int = 1) -> str:
        """The dry run's closing line."""
        how = f" (timed on {self.timed_on}, scaled to the whole data by the solves' work)" if self.timed_on else ""
        if self.timed_on.startswith("extrapolated"):
            how = f" ({self.timed_on})"
        step, (few, many) = self.lm_iteration_s, LM_ITERATIONS
        return (f"dry run: a forward pass {format_duration(self.forward_s)}, a Jacobian of {self.n_refined} refined "
                f"parameters {format_duration(self.jacobian_s)}{how}: an LM iteration about {format_duration(step)}. "
                f"The runs measured took {few}-{many} LM iterations: about {format_duration(few * step)} to "
                f"{format_duration(many * step)} here, and the start's thickness scan, the tilt search and the "
                f"integration check add about {SEARCH_PASSES} passes ({format_duration(SEARCH_PASSES * self.forward_s)})"
                + (" (twice that with --enantiomer)" if hands == 2 else "") + ". Nothing was written.")


def estimate_cost(crystal: Crystal, dataset, settings: RefineSettings,
                  log: Callable[[str], None] = lambda line: None) -> CostEstimate:
    """The cost of refining ``crystal`` against ``dataset`` with ``settings``, with no pass over the whole
    data. The start thickness comes from the scan of START_FRAMES frames spread over the rotation; the
    whole problem is built at it (a learned model without its warm-start fit; its size lines go to
    ``log``). A forward pass, at the refinement's precision, and a Jacobian are timed on the whole
    problem when its pass is estimated below WHOLE_PASS_S (the second of two calls: the first pays for
    allocations); else, after a call on one tilt sample for the allocations, on a part whose pass is
    estimated at PART_PASS_S (frames spread over the rotation, or the median frame by reflections at
    fewer tilt samples) and scaled by the solves' work. Raises ValueError for settings the problem
    refuses, as build_problem does."""
    if settings.frames:
        keep = frame_selection(dataset.frames.ids, settings.frames)
        log(f"frames: {int(keep.sum())} of {len(keep)} ({settings.frames})")
        dataset = select_frames(dataset, keep)
        settings = dataclasses.replace(settings, frames="")
    settings = dataclasses.replace(settings, learned_warm_start="scan")
    n = len(dataset.frames.ids)

    def build(keep, s, log_to=None):
        return build_problem(crystal, dataset if keep.all() else select_frames(dataset, keep), s, log=log_to)

    def spread(k):  # (F,) k frames spread over the rotation
        keep = np.zeros(n, bool)
        keep[np.unique(np.round(np.linspace(0, n - 1, min(n, k))).astype(int))] = True
        return keep

    def work(p):  # a pass's solves: beams cubed, summed over the tilt samples
        return float(np.sum(np.asarray(p.model.plan.n_beams, float) ** 3))

    def timed(p, calls=1):  # (forward, Jacobian) seconds of the last of ``calls`` calls
        p.forward_dtype = precision_dtype(settings.lm_precision)  # as LM evaluates its trial points
        index = refined_index(p, settings)
        for call in range(calls):
            theta = p.theta0 + 1e-9 * call  # a new point each time: nothing remembered from the call before
            t0 = time.perf_counter()
            p.residual_vector(theta)
            t1 = time.perf_counter()
            p.jacobian(theta, index)
            t2 = time.perf_counter()
        return np.array([t1 - t0, t2 - t1])

    # a problem whose single solve takes minutes is neither scanned nor timed: its cost is extrapolated
    first = ForwardModel(crystal, with_wavelength(select_frames(dataset, spread(START_FRAMES)), settings.wavelength),
                         settings.model_settings())
    largest = float(first.plan.n_beams.max(initial=1))
    eigh_rate = untimed_rate(largest, torch.complex64, first.device)
    if eigh_rate is not None:
        return _extrapolated(crystal, dataset, settings, build, largest, eigh_rate, log)
    if settings.thickness == "auto":  # as the whole data's scan would find it, from these frames
        part = build(spread(START_FRAMES), settings)
        with torch.no_grad():
            thickness = float(part.state(part.split(part.theta0)).thickness.mean())
        settings = dataclasses.replace(settings, thickness=thickness)
        log(f"start thickness {thickness:.0f} A (the scan of {min(n, START_FRAMES)} frames spread over the rotation)")
    problem = build(np.ones(n, bool), settings, log)
    estimate, timed_on = problem.model.pass_seconds_estimate(), ""
    if estimate <= WHOLE_PASS_S:
        forward, jacobian = timed(problem, calls=2)
    else:
        order = np.argsort(dataset.frames.ids, kind="stable")
        frame_of = order[np.searchsorted(dataset.frames.ids[order], dataset.reflections.frame_id)]
        counts = np.bincount(frame_of, minlength=n)
        ranked = [f for f in np.argsort(counts, kind="stable") if counts[f]]  # frames with reflections
        median = np.zeros(n, bool)
        median[ranked[len(ranked) // 2] if ranked else n // 2] = True
        timed(build(median, dataclasses.replace(settings, n_samples=1, samples_per_fringe=0.0)))  # allocations
        k = min(n - 1, round(n * PART_PASS_S / estimate))
        if k >= 1:
            part, timed_on = build(spread(k), settings), f"{k} frames spread over the rotation"
        else:
            samples = max(2, round(len(problem.model.plan.n_beams) * PART_PASS_S / estimate))
            part = build(median, dataclasses.replace(settings, n_samples=samples, samples_per_fringe=0.0))
            timed_on = f"frame {dataset.frames.ids[median][0]} at {samples} tilt samples"
        forward, jacobian = timed(part) * work(problem) / max(work(part), 1.0)
    return CostEstimate(problem, float(forward), float(jacobian), len(refined_index(problem, settings)), timed_on)


# the start thickness a dry run assumes when scanning it would take too long (a typical 3D-ED crystal; the
# refinement scans it)
NOMINAL_THICKNESS = 600.0


def _extrapolated(crystal, dataset, settings, build, largest: float, eigh_rate: float, log) -> CostEstimate:
    """The estimate of a problem too large to time a sample of: a pass from the rate of a PROBE_BEAMS-beam
    eigendecomposition scaled by N^3 (solve_cost_probe does so too), a Jacobian as that pass plus one
    N^3 product per tangent (the potential's and the frames' own: _fused_jvp), at the measured ratio of
    a product to an eigendecomposition of that size. On the problems measured the Jacobians took 1-2.5x
    such a figure (their gathers and propagation), so it is a lower bound."""
    if settings.thickness == "auto":
        settings = dataclasses.replace(settings, thickness=NOMINAL_THICKNESS)
        log(f"start thickness not scanned: one solve of {largest:.0f} beams takes about "
            f"{format_duration(eigh_rate * largest ** 3)} here; the estimate assumes {NOMINAL_THICKNESS:.0f} A (the "
            f"refinement scans it)")
    problem = build(np.ones(len(dataset.frames.ids), bool), settings, log)
    forward = problem.model.pass_seconds_estimate()
    product_rate = seconds_per_n3(torch.complex64, problem.model.device, op="product")
    index = refined_index(problem, settings)
    tangents = _tangents(problem, index)
    jacobian = forward * (1 + tangents * product_rate / eigh_rate)
    return CostEstimate(problem, float(forward), float(jacobian), len(index),
                        f"extrapolated from a {PROBE_BEAMS}-beam eigendecomposition and matrix product by N^3, the "
                        f"Jacobian as a pass plus a product per each of its {tangents} tangents: a lower bound")


def _tangents(problem: RefinementProblem, index) -> int:
    """The directions a Jacobian of the parameters ``index`` pushes through the solver: one per global
    parameter, one per column of a per-frame block (all frames at once)."""
    wanted = torch.zeros(problem.n_params, dtype=torch.bool)
    wanted[torch.as_tensor(index, dtype=torch.long)] = True
    count = 0
    for slot in problem.slots.values():
        if slot.block.per_frame:
            f, k = slot.block.shape
            count += sum(bool(wanted[slot.start + torch.arange(f) * k + j].any()) for j in range(k))
        else:
            count += int(wanted[slot.start:slot.stop].sum())
    return count
