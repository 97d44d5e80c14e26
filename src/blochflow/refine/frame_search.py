"""Per-frame searches between LM iterations: the thickness rescan across Pendelloesung branches, the
restarts of outlier frames and of frames off their neighbours about the rotation axis, the tilt search
normal to the axis, the smooth-path axis search and the growth of tilt samples. Each takes theta and
returns theta with some frames moved; the data decide each move (a move must lower the frame's cost)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..experiment.frames import THICKNESS_REF, PerFrameThickness
from ..physics.geometry import rocking_axis_lab
from .problem import RefinementProblem
from .settings import RefineSettings


RESCAN_GAIN = 0.95  # a frame moves when its best grid value elsewhere costs less than this share of its own
RESCAN_BRANCH = 2  # grid steps: a best grid value within this many of the frame's thickness is its own branch
RESCAN_AFTER = 5  # LM iterations before the second rescan (the structure is then close)
RESCAN_MIN_LEFT = 3  # LM iterations that must remain for a rescan at convergence
# between convergences, once the structure has settled (see frames_check_due), the rescan and outlier
# restart also run every RESCAN_EVERY iterations
SETTLED_SHIFT_SU = 1.0
SETTLED_ITERATIONS = 2
RESCAN_EVERY = 5
# at convergence, frames below this many samples per fringe grow (below one the rocking integral is
# off by percents: quartz 3.5 % at 0.79, 0.3 % at 0.94; docs/refinement.md "Samples after the rescan")
GROW_AT_CONVERGENCE_BELOW = 1.0


def _grid_costs(problem: RefinementProblem, theta: torch.Tensor, settings: RefineSettings, **scan
                ) -> tuple[np.ndarray, np.ndarray]:
    """The thickness grid (A) and each frame's work cost at each grid value at theta (F, Q), inf where
    a frame has no value (``scan``: ``decompositions`` or ``frames`` for :meth:`ForwardModel.thickness_scan`)."""
    a, b, step = settings.thickness_grid
    grid = np.arange(a, b + 0.5 * step, step)
    raw = problem.split(theta)
    with torch.no_grad():
        table = problem.model.thickness_scan(grid, potential=problem.potential(raw), state=problem.state(raw),
                                             use=problem.work, **scan)
    return grid, np.where(np.isnan(table), np.inf, table)


def frames_check_due(history: list) -> bool:
    """Whether the frames' thickness rescan and outlier restart run now, before the run has converged:
    the structure's largest shift was below SETTLED_SHIFT_SU s.u. in each of the last SETTLED_ITERATIONS
    LM iterations (it has settled), and no check ran in the last RESCAN_EVERY (``frames_checked`` in a
    history entry: a check after that iteration). Frames left in another thickness branch or a joint
    thickness-orientation minimum otherwise creep for many iterations, each lowering wR2 by about 1 %,
    which the R plateau does not catch (the paper's synthetic quartz from start 03: the first restart
    at iteration 27, the run unconverged at 50; with this check at 12, converged at 26)."""
    if len(history) < SETTLED_ITERATIONS or any(h.get("frames_checked") for h in history[-RESCAN_EVERY:]):
        return False
    return all(h.get("max_shift_su_structure", math.inf) < SETTLED_SHIFT_SU for h in history[-SETTLED_ITERATIONS:])


def rescan_frame_thickness(problem: RefinementProblem, theta: torch.Tensor, settings: RefineSettings
                           ) -> tuple[torch.Tensor, int]:
    """Per-frame thickness model: each frame's cost over the thickness grid at theta (one set of
    eigendecompositions). A frame whose best grid value lies on another branch of the Pendelloesung
    oscillation (more than RESCAN_BRANCH steps from its thickness) and costs less than RESCAN_GAIN x
    the best grid value on its own branch moves there: no local step leaves a branch. Grid values are
    compared with grid values, so the grid's coarseness favours neither. A moved frame's orientation
    corrections go back to zero (the prior's centre, the data's own orientation): they were fitted
    together with the thickness of the branch it leaves, where they made up for it (known-truth ZnO at
    1500-2000 A, docs/refinement.md "Thick crystals"). Returns theta and the number of frames moved."""
    if not isinstance(problem.frames.thickness, PerFrameThickness):
        return theta, 0
    # the last forward pass's eigendecompositions serve when it was at theta (they do not depend on thickness)
    grid, table = _grid_costs(problem, theta, settings, decompositions=problem.decompositions_at(theta))
    step = settings.thickness_grid[2]
    with torch.no_grad():
        current = problem.frame_costs(theta).numpy()
    sl = problem.slots["thickness"]
    now = THICKNESS_REF * np.exp(theta[sl.start:sl.stop].detach().numpy())  # (F,)
    own = np.abs(grid[None, :] - now[:, None]) <= RESCAN_BRANCH * step  # (F, Q)
    own_best = np.minimum(np.where(own, table, np.inf).min(1), current)
    best = np.argmin(table, 1)
    cost = table[np.arange(len(best)), best]
    move = np.flatnonzero(~own[np.arange(len(best)), best] & (cost < RESCAN_GAIN * own_best))
    if not len(move):
        return theta.clone(), 0
    return _frames_moved(problem, theta, move, grid[best[move]]), len(move)


def _frames_moved(problem: RefinementProblem, theta: torch.Tensor, frames: np.ndarray, thickness_A: np.ndarray,
                  corrections: torch.Tensor | None = None) -> torch.Tensor:
    """theta with ``frames`` at these thicknesses (A) and their orientation corrections (if refined) at
    ``corrections`` ((k, 2) mrad), by default zero: a frame moved to another branch, or restarted, starts
    again from the data's own orientation."""
    moved = theta.clone()
    rows = torch.as_tensor(frames)
    moved[problem.slots["thickness"].start + rows] = torch.as_tensor(np.log(thickness_A / THICKNESS_REF),
                                                                     dtype=theta.dtype)
    if "orientation" in problem.slots:
        at = (problem.slots["orientation"].start + 2 * rows[:, None] + torch.arange(2)[None, :]).reshape(-1)
        moved[at] = 0.0 if corrections is None else corrections.to(theta.dtype).reshape(-1)
    problem.follow_frames(theta, moved)  # only these frames are solved again when next evaluated
    return moved


def _frames_above_median(problem: RefinementProblem, theta: torch.Tensor, factor: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's cost at theta (data and orientation prior, (F,)) and which frames cost more per work
    reflection than ``factor`` x the median frame's (frames without work reflections never)."""
    with torch.no_grad():
        current = (problem.frame_costs(theta) + problem.frame_prior_costs(theta)).numpy()
    n = np.bincount(problem.model.frame[problem.work].cpu().numpy(), minlength=problem.model.n_frames)
    has = n > 0
    if not has.any():
        return current, has
    per = current / np.maximum(n, 1)
    return current, has & (per > factor * np.median(per[has]))


# a frame costing more per reflection than this multiple of the median frame is tried afresh: at the truth a
# frame's chi2 per reflection scatters by ~sqrt(2/n), 0.26 of itself at 30 reflections, so 2x is no noise; a
# frame moves only when the try costs less, so a lower value costs trial solves only (docs/refinement.md)
RESTART_OUTLIER = 2.0


def restart_outlier_frames(problem: RefinementProblem, theta: torch.Tensor, settings: RefineSettings
                           ) -> tuple[torch.Tensor, np.ndarray]:
    """Per-frame thickness and orientation corrections: each frame whose cost (data and orientation
    prior) per work reflection exceeds RESTART_OUTLIER x the median frame's is tried at zero
    correction (its prior's centre: the data's own orientation) and the best thickness on the grid
    there (only these frames are solved); it moves when that costs less than RESCAN_GAIN x its cost
    now. Early on LM moves orientations to make up for a poor structure, and a frame can keep a joint
    thickness-orientation minimum that no local step or thickness rescan leaves (known-truth runs on
    rocking and precession frames: docs/refinement.md). Returns theta and the indices of the frames moved."""
    none = np.zeros(0, int)
    if not isinstance(problem.frames.thickness, PerFrameThickness) or "orientation" not in problem.slots:
        return theta, none
    n_frames = problem.model.n_frames
    current, above = _frames_above_median(problem, theta, RESTART_OUTLIER)
    so = problem.slots["orientation"]
    orientation = theta[so.start:so.stop].detach().reshape(n_frames, 2)
    try_again = above & (orientation != 0).any(1).numpy()
    if not try_again.any():
        return theta, none
    return _restart_frames_at(problem, theta, settings, try_again, torch.zeros_like(orientation), current)


def _restart_frames_at(problem: RefinementProblem, theta: torch.Tensor, settings: RefineSettings,
                       tried: np.ndarray, corrections: torch.Tensor, current: np.ndarray
                       ) -> tuple[torch.Tensor, np.ndarray]:
    """The restarts' common step: each ``tried`` frame (F,) at its row of ``corrections`` (F, 2 mrad) and
    its best grid thickness there (only these frames solved), moved there when that costs (data and
    orientation prior) less than RESCAN_GAIN x ``current`` (its cost now). Returns theta and the frames
    moved."""
    so = problem.slots["orientation"]
    trial = theta.clone()
    trial[so.start:so.stop] = torch.where(torch.as_tensor(tried)[:, None], corrections,
                                          theta[so.start:so.stop].reshape(-1, 2)).reshape(-1)
    grid, table = _grid_costs(problem, trial, settings, frames=torch.as_tensor(tried))
    with torch.no_grad():
        cost = table.min(1) + problem.frame_prior_costs(trial).numpy()
    move = np.flatnonzero(tried & (cost < RESCAN_GAIN * current))
    if not len(move):
        return theta, np.zeros(0, int)
    best = grid[table.argmin(1)[move]]
    return _frames_moved(problem, theta, move, best, corrections[torch.as_tensor(move)]), move


TILT_SEARCH_FRINGE_FRACTION = 1 / 3  # grid step: this share of a fringe for the thick frames' far reflections
TILT_SEARCH_MAX_POINTS = 81
TILT_SEARCH_HALF_RANGE = 2.0  # mrad, when no orientation prior sets the range
TILT_SEARCH_LR = 9.21  # chi2 with 2 degrees of freedom at 1 %
TILT_SEARCH_ABOVE_MEDIAN = 1.0  # frames costing more per reflection than this x the median frame are searched
# the grid is searched coarse to fine: every 2nd tilt (2/3 of a fringe apart, so each basin has a point within a
# third of a fringe of its minimum), then the tilts beside each frame's best; on the quartz example and the
# known-truth ZnO and quartz rocking cases (docs/refinement.md) every frame's choice is the full grid's
TILT_SEARCH_COARSE_STRIDE = 2


def fringe_angle(problem: RefinementProblem, theta: torch.Tensor) -> float:
    """The rotation (mrad) that moves a frame's cost from one minimum to the next: a rotation d moves a
    reflection's excitation error by up to |g| d, and its rocking curve repeats every 1/t (a
    Pendelloesung fringe), so 1/(t |g|), for the 90th percentiles of the frames' thicknesses at theta and
    of the scored |g| (quartz at 1100 A: 0.6 mrad; ZnO at 1700 A, 2 1/A: 0.3 mrad)."""
    with torch.no_grad():
        thick = problem.state(problem.split(theta)).thickness.amax(-1).cpu().numpy()
    g = np.linalg.norm(problem.model.plan.scored.hkl @ np.asarray(problem.model.dataset.ub).T, axis=1)
    return 1e3 / (np.quantile(thick, 0.9) * np.quantile(g, 0.9))


def tilt_search_grid(problem: RefinementProblem, theta: torch.Tensor, half_range: float) -> np.ndarray:
    """Tilts (mrad, symmetric about zero, zero included) for :func:`search_frame_tilt`. A tilt d moves a
    reflection's excitation error by up to |g| d, and its rocking curve repeats every 1/t (a Pendelloesung
    fringe), so the cost of a frame against the tilt has minima about 1/(t |g|) apart and a basin a
    fraction of that wide. The step is a third of it for the 90th percentile of the scored |g| and of
    the frames' thicknesses at theta (quartz at 1100 A: 0.2 mrad; ZnO at 1700 A, 2 1/A: 0.1 mrad)."""
    step = TILT_SEARCH_FRINGE_FRACTION * fringe_angle(problem, theta)
    half_points = min((TILT_SEARCH_MAX_POINTS - 1) // 2, max(1, math.ceil(half_range / step)))
    return np.linspace(-half_range, half_range, 2 * half_points + 1)


def tilt_search_moves(current: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Frames whose best (tilt, thickness) pair fits clearly better than their own: by the rescan's
    RESCAN_GAIN and, as a frame's own two parameters refitted over a grid lower its cost by a few units
    of chi2 from noise alone, by a likelihood-ratio test (chi2 with 2 degrees of freedom at 1 %)."""
    return np.flatnonzero((best < RESCAN_GAIN * current) & (current - best > TILT_SEARCH_LR))


def _rocking_frame_axes(problem: RefinementProblem, theta: torch.Tensor, settings: RefineSettings):
    """For the searches of orientation corrections (rocking frames, per-frame thickness, corrections
    refined; a precession cone has no rotation axis, else None): the corrections' slot, their values
    (F, 2) at theta, and each frame's rotation axis and its normal in the plane normal to the beam (F, 2)
    each, unit vectors in the corrections' components (rotation vectors about lab x and y)."""
    if ("orientation" not in problem.slots or not isinstance(problem.frames.thickness, PerFrameThickness)
            or problem.model.plan.geometry != "continuous"):
        return None
    ctx = problem.frames.ctx
    so = problem.slots["orientation"]
    base = theta[so.start:so.stop].detach().reshape(problem.model.n_frames, 2)
    axis = rocking_axis_lab(ctx.omega, ctx.axis_azimuth, settings.rocking_axis)[:, :2].to(theta.dtype)
    return so, base, axis, torch.stack([-axis[:, 1], axis[:, 0]], 1)


def search_frame_tilt(problem: RefinementProblem, theta: torch.Tensor, settings: RefineSettings
                      ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame thickness and orientation corrections: each frame's correction about the lab axis
    normal to its rotation axis (in the plane normal to the beam) and its thickness, searched together:
    the tilt over :func:`tilt_search_grid` (absolute, within the orientation prior's width; coarse to fine,
    TILT_SEARCH_COARSE_STRIDE) and at each tilt the thickness over ``thickness_grid`` (one thickness scan
    per tilt, every frame at once); the
    correction about the rotation axis is kept. A frame moves when its best pair fits clearly better
    (:func:`tilt_search_moves`; costs of data and orientation prior). LM from zero stops in the nearest of the
    minima a thick frame has in this tilt, and a frame's thickness fitted at a wrong tilt is wrong too
    (known-truth ZnO at 1400-1700 A: tilt errors 0.2 mrad rms at 9 s.u. before, docs/refinement.md
    "Thick crystals"). Only frames costing more per work reflection than the median frame are searched
    (a frame in a wrong minimum fits worse than one in its own; on the known-truth ZnO and the quartz
    example the same minima at half the solves). Returns theta, the frames moved, the tilts and the
    frames searched (F,) bool."""
    tilts = np.zeros(0)
    frames_axes = _rocking_frame_axes(problem, theta, settings)
    if frames_axes is None:
        return theta, np.zeros(0, int), tilts, np.zeros(problem.model.n_frames, bool)
    so, base, axis, normal = frames_axes
    n_frames = problem.model.n_frames
    along = (base * axis).sum(1, keepdim=True) * axis
    tilts = tilt_search_grid(problem, theta, settings.orientation_sigma or TILT_SEARCH_HALF_RANGE)
    current, searched = _frames_above_median(problem, theta, TILT_SEARCH_ABOVE_MEDIAN)
    best_cost = np.full(n_frames, np.inf)
    best_index, best_thickness = np.zeros(n_frames, int), np.zeros(n_frames)
    if not searched.any():
        return theta.clone(), np.zeros(0, int), tilts, searched
    tried = np.zeros((len(tilts), n_frames), bool)

    def try_tilts(index: np.ndarray, frames: np.ndarray) -> None:  # frame f at tilts[index[f]], for the frames marked
        trial = theta.clone()
        tilt = torch.as_tensor(tilts[np.clip(index, 0, len(tilts) - 1)], dtype=theta.dtype)
        trial[so.start:so.stop] = (along + tilt[:, None] * normal).reshape(-1)
        grid, table = _grid_costs(problem, trial, settings, frames=torch.as_tensor(frames))
        with torch.no_grad():
            cost = table.min(1) + problem.frame_prior_costs(trial).numpy()
        better = frames & (cost < best_cost)
        best_cost[better], best_index[better] = cost[better], index[better]
        best_thickness[better] = grid[table.argmin(1)[better]]
        tried[index[frames], np.flatnonzero(frames)] = True

    # coarse to fine: every TILT_SEARCH_COARSE_STRIDE-th grid tilt (and the last) for every searched frame,
    # then the grid tilts between each frame's best and its coarse neighbours, all frames at once
    coarse = np.unique(np.r_[np.arange(0, len(tilts), TILT_SEARCH_COARSE_STRIDE), len(tilts) - 1])
    for i in coarse:
        try_tilts(np.full(n_frames, i), searched)
    centre = best_index.copy()
    for offset in [o for d in range(1, TILT_SEARCH_COARSE_STRIDE) for o in (-d, d)]:
        index = centre + offset
        inside = searched & (index >= 0) & (index < len(tilts))
        inside[inside] = ~tried[index[inside], np.flatnonzero(inside)]
        if inside.any():
            try_tilts(index, inside)
    best_tilt = tilts[best_index]
    move = tilt_search_moves(current, best_cost)
    if not len(move):
        return theta.clone(), move, tilts, searched
    rows = torch.as_tensor(move)
    corrections = along[rows] + torch.as_tensor(best_tilt[move], dtype=theta.dtype)[:, None] * normal[rows]
    return _frames_moved(problem, theta, move, best_thickness[move], corrections), move, tilts, searched


def rotation_order(frames, use: np.ndarray) -> list[np.ndarray]:
    """The frames marked in ``use`` (F,) as runs in the order of the rotation: per dataset of a merged
    table (``frames.dataset``), their indices sorted by alpha. Neighbours in a run are neighbours on
    the goniometer."""
    group = np.zeros(len(use), int) if frames.dataset is None else np.asarray(frames.dataset)
    runs = []
    for g in np.unique(group):
        idx = np.flatnonzero((group == g) & use)
        runs.append(idx[np.argsort(np.asarray(frames.alpha_deg)[idx], kind="stable")])
    return runs


def restart_axis_jumps(problem: RefinementProblem, theta: torch.Tensor, settings: RefineSettings
                       ) -> tuple[torch.Tensor, np.ndarray]:
    """Rocking frames with per-frame thickness and orientation corrections: each frame whose correction
    about its rotation axis lies beyond both neighbours' (in alpha, within a dataset) by more than
    :func:`fringe_angle` is tried at its neighbours' mean there (its correction normal to the axis kept)
    and the best thickness on the grid there (only these frames are solved); it moves when that costs
    less than RESCAN_GAIN x its cost now. A goniometer's errors about its axis vary smoothly over the
    rotation, while a thick frame's cost has minima a fringe apart in that rotation, broad and close in
    depth, and LM leaves some frames in the wrong one (docs/refinement.md "Thick crystals"): a frame off
    both neighbours by a fringe or more is the mark. A cheap, local form of the axis search; the data
    decide each move. Returns theta and the indices of the frames moved."""
    none = np.zeros(0, int)
    frames_axes = _rocking_frame_axes(problem, theta, settings)
    if frames_axes is None:
        return theta, none
    _, base, axis, normal = frames_axes
    along = (base * axis).sum(1).numpy()
    n_work = np.bincount(problem.model.frame[problem.work].cpu().numpy(), minlength=problem.model.n_frames)
    limit = fringe_angle(problem, theta)
    target = np.full(len(along), np.nan)
    for idx in rotation_order(problem.model.dataset.frames, n_work > 0):
        for a, f, b in zip(idx[:-2], idx[1:-1], idx[2:]):
            off_a, off_b = along[f] - along[a], along[f] - along[b]
            if off_a * off_b > 0 and min(abs(off_a), abs(off_b)) > limit:
                target[f] = 0.5 * (along[a] + along[b])
    tried = np.isfinite(target)
    if not tried.any():
        return theta, none
    current, _ = _frames_above_median(problem, theta, 1.0)
    kept = (base * normal).sum(1, keepdim=True) * normal
    corrections = kept + torch.as_tensor(np.nan_to_num(target), dtype=base.dtype)[:, None] * axis
    return _restart_frames_at(problem, theta, settings, tried, corrections, current)


AXIS_SEARCH_STEP = 0.2  # mrad between the grid's rotations about the axis (its minima are broad, docs)
AXIS_SEARCH_RANGE = 1.5  # x orientation_sigma: the grid's half-range


def smooth_path(cost: np.ndarray, values: np.ndarray, gaps: np.ndarray, step_sigma: float) -> np.ndarray:
    """The grid index per frame (F,) minimising sum_f cost[f, i_f] + sum_f ((values[i_f+1] - values[i_f]) /
    (step_sigma gaps[f]))^2 over frames in their order (cost (F, G); gaps (F - 1,) the rotation between
    neighbours, degrees): the exact minimum over the grid by dynamic programming (Viterbi), O(F G^2)."""
    f_n, g_n = cost.shape
    jump = (values[None, :] - values[:, None]) ** 2  # (G, G) squared step from i to j
    total = cost[0].copy()
    back = np.zeros((f_n, g_n), int)
    for f in range(1, f_n):
        trans = total[:, None] + jump / max(step_sigma * abs(gaps[f - 1]), 1e-9) ** 2
        back[f] = np.argmin(trans, 0)
        total = trans[back[f], np.arange(g_n)] + cost[f]
    path = np.zeros(f_n, int)
    path[-1] = int(np.argmin(total))
    for f in range(f_n - 1, 0, -1):
        path[f - 1] = back[f, path[f]]
    return path


def rotation_path(cost: np.ndarray, values: np.ndarray, frames, step_sigma: float) -> np.ndarray:
    """:func:`smooth_path` for every frame (cost (F, G)), one path per dataset of a merged table in its
    rotation order (:func:`rotation_order`): the random walk links neighbours on one goniometer, never
    the last frame of one dataset to the first of the next."""
    path = np.empty(len(cost), int)
    alpha = np.asarray(frames.alpha_deg, float)
    for idx in rotation_order(frames, np.ones(len(cost), bool)):
        path[idx] = smooth_path(cost[idx], values, np.diff(alpha[idx]), step_sigma)
    return path


def search_axis_path(problem: RefinementProblem, theta: torch.Tensor, settings: RefineSettings
                     ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Per-frame corrections about the rotation axis as one smooth path per dataset: each frame's cost
    (data and orientation prior, its thickness scanned) over a grid of absolute corrections about its
    rotation axis, its correction normal to the axis kept; then the path through the grid that minimises
    the summed costs plus a random-walk prior between neighbouring frames (:func:`rotation_path`). A
    goniometer's angle errors are smooth over the rotation, while each frame's own landscape about the axis
    has broad, ambiguous minima where few reflections are partial. Every frame whose path value is more than
    a grid step from its correction moves there, at its best thickness. Returns theta, the frames moved and
    the grid (mrad)."""
    grid = np.zeros(0)
    frames_axes = _rocking_frame_axes(problem, theta, settings)
    if frames_axes is None:
        return theta, np.zeros(0, int), grid
    so, base, axis, normal = frames_axes
    n_frames = problem.model.n_frames
    across = (base * normal).sum(1, keepdim=True) * normal
    half = AXIS_SEARCH_RANGE * (settings.orientation_sigma or TILT_SEARCH_HALF_RANGE)
    grid = np.arange(-math.ceil(half / AXIS_SEARCH_STEP), math.ceil(half / AXIS_SEARCH_STEP) + 1) * AXIS_SEARCH_STEP
    cost = np.zeros((n_frames, len(grid)))
    best_t = np.zeros((n_frames, len(grid)))
    for g, x in enumerate(grid):
        trial = theta.clone()
        trial[so.start:so.stop] = (across + float(x) * axis).reshape(-1)
        thick, table = _grid_costs(problem, trial, settings)
        with torch.no_grad():
            prior = problem.frame_prior_costs(trial).numpy()
        # (_grid_costs gives inf where a frame has no value; a frame without any is free on the path)
        cost[:, g] = np.where(np.isfinite(table).any(1), table.min(1) + prior, 0.0)
        best_t[:, g] = thick[table.argmin(1)]
    path = rotation_path(cost, grid, problem.model.dataset.frames, settings.axis_step_sigma)
    now = (base * axis).sum(1).numpy()
    has = np.bincount(problem.model.frame[problem.work].cpu().numpy(), minlength=n_frames) > 0
    # every frame off its path point moves, also one whose own cost there is higher: the path carries the
    # information a frame's own broad, ambiguous minima lack (a move only on the frame's own gain, as the
    # tilt search's, left most of them: known-truth ZnO GoF 0.97 against 0.92, docs)
    move = np.flatnonzero(has & (np.abs(grid[path] - now) > AXIS_SEARCH_STEP))
    if not len(move):
        return theta.clone(), move, grid
    rows = torch.as_tensor(move)
    corrections = across[rows] + torch.as_tensor(grid[path[move]], dtype=theta.dtype)[:, None] * axis[rows]
    return _frames_moved(problem, theta, move, best_t[move, path[move]], corrections), move, grid


def grow_samples(problem: RefinementProblem, theta: torch.Tensor, settings: RefineSettings,
                 below: float | None = None) -> int:
    """Per-frame thickness model with fringe-fitted samples: each frame whose thickness at theta
    needs more tilt samples (``samples_per_fringe`` per fringe) than the start design gave it gets
    them (a rescan can move a frame onto a thicker branch; below one sample per fringe its rocking
    integral is off by percents and its thickness biased low); no frame loses any. ``below``: only
    frames with fewer than that many samples per fringe (or ``samples_per_fringe``, if fewer) grow.
    Returns the number of frames grown."""
    if settings.samples_per_fringe <= 0 or not isinstance(problem.frames.thickness, PerFrameThickness):
        return 0
    model = problem.model
    with torch.no_grad():
        thick = problem.state(problem.split(theta)).thickness.amax(-1).cpu().numpy()
    have = model.samples_per_frame()
    need = model.fringe_counts(thick, settings.samples_per_fringe)
    floor = need if below is None else model.fringe_counts(thick, min(below, settings.samples_per_fringe))
    grow = (floor > have) & (np.bincount(model.plan.scored.frame, minlength=model.n_frames) > 0)
    if grow.any():
        problem.resample(np.where(grow, need, have))
    return int(grow.sum())
