"""Optimisers on a :class:`RefinementProblem`: Adam with per-group rates, then Levenberg-Marquardt.

Both are written as explicit state + step functions so that a run can be checkpointed after any
step and resumed to the same result. The Gauss-Newton normal matrix of the last LM iteration also
gives the covariance (see :mod:`.covariance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .problem import RefinementProblem


@dataclass
class AdamState:
    step: int
    m: torch.Tensor
    v: torch.Tensor


def adam_learning_rates(problem: RefinementProblem, rates: dict[str, float]) -> torch.Tensor:
    """A per-parameter learning-rate vector from per-group rates (0 freezes a group)."""
    lr = torch.zeros(problem.n_params, dtype=torch.float64)
    for group, rate in rates.items():
        lr[problem.group_index(group)] = rate
    return lr


def adam_step(problem: RefinementProblem, theta: torch.Tensor, state: AdamState, lr: torch.Tensor,
              total_steps: int, betas=(0.9, 0.99), final_fraction: float = 0.1,
              objective: str = "intensity") -> tuple[torch.Tensor, float]:
    """One Adam step with a cosine-decayed rate; returns (theta, loss before).

    ``objective``: "amplitude" minimises wR(F)^2, "intensity" wR2^2 (both on the work set).
    """
    th = theta.detach().clone().requires_grad_(True)
    loss = problem.objective(th, objective) / problem.objective_norm(objective)
    (grad,) = torch.autograd.grad(loss, th)
    state.step += 1
    b1, b2 = betas
    state.m = b1 * state.m + (1 - b1) * grad
    state.v = b2 * state.v + (1 - b2) * grad * grad
    mhat = state.m / (1 - b1 ** state.step)
    vhat = state.v / (1 - b2 ** state.step)
    frac = min(state.step / max(total_steps, 1), 1.0)
    decay = final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * frac))
    delta = -lr * decay * mhat / (vhat.sqrt() + 1e-12)
    delta, _ = problem.bounded_step(theta, delta)
    # polar space groups: the step's shift of the centroid (along which no intensity changes) undone
    return problem.fix_origin(theta + delta, theta).detach(), float(loss.detach())


@dataclass
class LMState:
    iteration: int = 0
    damping: float = 1e-3
    cost: float = float("nan")
    converged: bool = False
    reason: str = ""
    max_shift_su: float = float("nan")
    history: list = field(default_factory=list)
    frame_damping: list | None = None  # per-frame damping of each frame's own parameters (None: all 0)
    frame_step: list | None = None  # the last accepted step of the frames' own parameters, Marquardt-scaled
    # the run was on its R plateau when a thickness rescan moved frames: one flat iteration then
    # shows that it still is (see lm_step)
    replateau: bool = False
    # the last Jacobian (rows: observations then prior rows; columns: the refined index) when the
    # next iteration may re-use it (see lm_step), with the objective it was taken for
    jacobian: torch.Tensor | None = None
    jacobian_kind: str = ""
    axis_searched: bool = False  # the run's one search of the corrections about the rotation axis is done
    # the converged point before that search and its cost, until the run converges again: kept if that
    # ends higher (see refine)
    axis_fallback: torch.Tensor | None = None
    axis_fallback_cost: float = float("nan")


@dataclass
class NormalEquations:
    """J^T J and J^T r at the last accepted point, with the indices they refer to."""

    index: torch.Tensor  # (p,) refined parameter indices
    jtj: torch.Tensor  # (p, p)
    jtr: torch.Tensor  # (p,)
    cost: float  # sum of squared weighted residuals
    n_obs: int


def normal_equations(problem: RefinementProblem, theta: torch.Tensor, index: torch.Tensor,
                     kind: str = "intensity") -> tuple[NormalEquations, torch.Tensor]:
    ic, r, j = problem.jacobian(theta, index, kind)
    return NormalEquations(index, j.T @ j, j.T @ r, float(r @ r), len(r)), ic


# A step whose actual reduction of the objective is within this fraction of the reduction its
# linear model predicted found the problem linear over the step: the next iteration re-uses its
# Jacobian (a chord step: one forward pass instead of a Jacobian). A gain ratio far above 1 is no
# better a sign than one far below: a stale Jacobian's short steps keep reducing the objective more
# than it predicts while they creep towards its own, wrong, fixed point.
CHORD_GAIN_TOLERANCE = 0.25
# ... and only once the shared parameters have settled: a step that moved one of them by more than
# this many s.u. says the Jacobian at the new point is another one, however linear the cost was along
# the step. Without it, a quartz known-truth run took a chord step after a 10 s.u. step, reduced the
# cost 5x where a fresh Jacobian reduces it 20x, and a frame's orientation meanwhile settled in a
# wrong minimum (16 iterations against 7, to a worse cost)
CHORD_SHIFT_LIMIT = 3.0


# Fractions of each frame's own step tried in an LM iteration. Frame costs are separable once the
# global step is fixed (a frame's intensities and profiled scale depend only on the structure and
# its own parameters), so each frame keeps the fraction that fits it best: a line search per frame
# at the cost of one forward pass per fraction. Rocking curves make a frame's orientation strongly
# nonlinear beyond a fraction of a curve width, where one global step length fits no frame well.
FRAME_STEP_FRACTIONS = (1.0, 0.5, 0.25)
FRAME_DAMPING_DECAY = 3.0  # a frame's own damping falls by this factor while its full steps fit
FRAME_DAMPING_FLOOR = 1e-3  # and is dropped below this
REVERSAL_COSINE = 0.5  # a frame's step turned back on its last one (cosine below minus this) overshot


def update_frame_damping(damping: torch.Tensor, fraction: torch.Tensor, rose: torch.Tensor) -> torch.Tensor:
    """Each frame's own Marquardt damping (F,) after a step: a frame that fitted best at a fraction
    f < 1 of its step (or whose cost rose) gets at least 1/f - 1, and twice what it had: adding
    lambda times the diagonal shortens a step along a diagonal-dominated direction by 1/(1 + lambda),
    so the next solve already asks for a step the frame's rocking curves allow, and the structure's
    share of the step is solved consistently with it. A frame whose full step fitted loses a factor
    FRAME_DAMPING_DECAY."""
    short = rose | (fraction < 1)
    grown = torch.maximum(2 * damping, 1 / fraction.clamp_min(FRAME_STEP_FRACTIONS[-1] / 2) - 1)
    out = torch.where(short, grown, damping / FRAME_DAMPING_DECAY)
    return torch.where(out < FRAME_DAMPING_FLOOR, 0.0, out)


def reversed_frames(previous: torch.Tensor, step: torch.Tensor, frame_of: torch.Tensor, n_frames: int) -> torch.Tensor:
    """(F,) whether each frame's own step (entries of ``step`` with ``frame_of`` f; Marquardt-scaled)
    turned back on its previous one: cosine below -REVERSAL_COSINE. A frame whose steps alternate in
    sign overshoots its minimum each time (the full step of a frame near a rocking-curve feature, at
    its cap: its cost need not rise, since the structure's step lowers it), and a damping of 1 halves
    its next step. Entries with frame_of < 0 (shared parameters) are ignored."""
    own = frame_of >= 0
    f = frame_of[own]
    a, b = previous[own].double(), step[own].double()

    def per_frame(x):
        return torch.zeros(n_frames, dtype=torch.float64).index_add(0, f, x)

    return per_frame(a * b) < -REVERSAL_COSINE * torch.sqrt(per_frame(a * a) * per_frame(b * b))


def lm_step(problem: RefinementProblem, theta: torch.Tensor, state: LMState, index: torch.Tensor,
            shift_tol: float = 0.01, rel_tol: float = 1e-7, max_tries: int = 12,
            kind: str = "intensity", plateau_tol: float = 0.0, plateau_iterations: int = 3,
            reuse_jacobian: bool = False) -> tuple[torch.Tensor, NormalEquations]:
    """One Levenberg-Marquardt iteration (Marquardt scaling) on the refined ``index`` of theta,
    on the intensity or the amplitude objective (``kind``).

    With per-frame parameters refined, a full step that lowers the objective is taken whole (also
    by frames whose own cost rose: they move with the structure). Otherwise the global part is
    taken whole and each frame takes the fraction of its own part (``FRAME_STEP_FRACTIONS``, or
    none) that lowers its cost most, before the damping is raised. Each frame's own parameters carry
    a damping of their own on top of the global one (:func:`update_frame_damping`): frames whose
    rocking curves made the last step overshoot are damped in the next solve, and the others not.
    Convergence: the largest |shift| / s.u. of the accepted step < ``shift_tol`` (s.u. from the
    normal matrix scaled by GoF^2), or a relative cost change < ``rel_tol``, or (``plateau_tol`` > 0)
    an R plateau: sqrt(cost), i.e. wR2, fell by less than ``plateau_tol`` of itself in each of the
    last ``plateau_iterations`` iterations while no parameter shared by all frames (structure,
    absorption, network) moved by more than 10 ``shift_tol`` s.u. (per-frame nuisance parameters
    near narrow rocking features can creep for many iterations at no gain in fit). With
    ``state.replateau`` (the run had reached its plateau and a thickness rescan then moved some
    frames onto other branches) one such iteration suffices: the plateau is established, and the
    question is only whether the moved frames took the structure off it.
    With ``reuse_jacobian``, an iteration after a step whose gain ratio (actual over predicted
    reduction) is within ``CHORD_GAIN_TOLERANCE`` of 1, and that moved no shared parameter by more than
    ``CHORD_SHIFT_LIMIT`` s.u., keeps that step's Jacobian columns of the
    shared parameters (structure) with the residuals at the new point and the frames' own columns
    afresh (a chord step, as in the modified Gauss-Newton method, on the expensive columns); any other
    step, and ``state.jacobian = None`` (set by the caller when the model changed), bring a fresh one.
    """
    chord = (reuse_jacobian and state.jacobian is not None and state.jacobian_kind == kind
             and state.jacobian.shape[1] == len(index))
    param_frame = problem.parameter_frames()
    if chord:
        own = param_frame[index] >= 0
        if own.any():  # the frames' own columns afresh: cheap (a few tangents), and the nonlinear ones
            _, r, j_own = problem.jacobian(theta, index[own], kind)
            j = state.jacobian.clone()
            j[:, own] = j_own
        else:
            j, r = state.jacobian, problem.residual_vector(theta, kind)
    else:
        _, r, j = problem.jacobian(theta, index, kind)
    ne = NormalEquations(index, j.T @ j, j.T @ r, float(r @ r), len(r))
    state.jacobian = None
    before_chord = (state.damping, state.frame_damping, state.frame_step)
    a, g = ne.jtj, ne.jtr
    diag = torch.diagonal(a).clamp_min(1e-12 * float(torch.diagonal(a).max()))
    net = problem.derived_mask()[index]
    if net.any():  # network weights: nearly flat directions get the block's mean curvature as damping scale
        diag = torch.where(net, diag.clamp_min(float(diag[net].mean())), diag)
    dof = max(ne.n_obs - len(index), 1)
    basis = problem.step_basis(index)  # polar space groups: steps that keep the centroid
    cov_unit = constrained_inverse(a, basis)
    su = torch.sqrt(torch.clamp(torch.diagonal(cov_unit), min=0) * ne.cost / dof)
    state.cost = ne.cost
    per_frame = bool(param_frame[index].ge(0).any())
    partial, own_damping = 0, torch.zeros(len(index), dtype=torch.float64)
    if per_frame:
        frame_damping = torch.zeros(problem.model.n_frames, dtype=torch.float64) if state.frame_damping is None \
            else torch.as_tensor(state.frame_damping, dtype=torch.float64)
        frame_of = param_frame[index]
        own_damping = torch.where(frame_of >= 0, frame_damping[frame_of.clamp_min(0)], 0.0)
        before = problem.frame_costs(theta, kind) + problem.frame_prior_costs(theta, kind)
    for _ in range(max_tries):
        lhs = a + torch.diag((state.damping + own_damping) * diag)
        if basis is None:
            step = -torch.linalg.solve(lhs, g)
        else:
            step = -(basis @ torch.linalg.solve(basis.T @ lhs @ basis, basis.T @ g))
        delta = torch.zeros_like(theta)
        delta[index] = step
        delta, cut = problem.bounded_step(theta, delta)
        if per_frame:
            delta, new_cost, fraction, rose = _frame_line_search(problem, theta, delta, param_frame, before, ne.cost,
                                                           kind)
            if np.isfinite(new_cost):
                damped = update_frame_damping(frame_damping, fraction, rose)
                scaled = torch.where(frame_of >= 0, delta[index] * diag.sqrt(), 0.0)  # Marquardt-scaled
                if state.frame_step is not None and len(state.frame_step) == len(scaled):
                    back = reversed_frames(torch.as_tensor(state.frame_step, dtype=torch.float64), scaled,
                                           frame_of, len(frame_damping))
                    damped = torch.where(back, torch.maximum(damped, (2 * frame_damping).clamp_min(1.0)), damped)
                state.frame_damping = damped.tolist()
                state.frame_step = scaled.tolist()
                partial = int((fraction < 1).sum())
                cut = cut or partial > 0
        else:
            with torch.no_grad():
                new_cost = float(problem.objective(theta + delta, kind))
        trial = theta + delta
        if np.isfinite(new_cost) and new_cost <= ne.cost:
            state.damping = max(state.damping / 3, 1e-7)
            determined = su > 0  # null directions (e.g. redundant network weights) have no s.u.
            ratio = torch.where(determined, torch.abs(delta[index]) / torch.where(determined, su, 1.0), 0.0)
            shift_su = float(ratio.max()) if determined.any() else 0.0
            worst = problem.names[int(index[int(torch.argmax(ratio))])] if determined.any() else ""
            st = problem.slots["structure"]
            in_structure = (index >= st.start) & (index < st.stop)
            shift_su_structure = float(ratio[in_structure].max()) if in_structure.any() else 0.0
            shared = param_frame[index] < 0  # parameters every frame sees (structure, absorption, network)
            shift_su_shared = float(ratio[shared].max()) if shared.any() else 0.0
            rel = (ne.cost - new_cost) / max(ne.cost, 1e-300)
            taken = delta[index]
            predicted = -float(2 * g @ taken + taken @ (a @ taken))  # the linear model's reduction
            gain = (ne.cost - new_cost) / predicted if predicted > 0 else 0.0
            if reuse_jacobian and abs(gain - 1) <= CHORD_GAIN_TOLERANCE and shift_su_shared <= CHORD_SHIFT_LIMIT:
                state.jacobian = j
                state.jacobian_kind = kind
            state.iteration += 1
            state.max_shift_su = shift_su
            state.history.append({"iteration": state.iteration, "cost": new_cost, "cost_before": ne.cost,
                                  "damping": state.damping,
                                  "max_shift_su": shift_su, "max_shift_parameter": worst,
                                  "max_shift_su_structure": shift_su_structure, "frames_partial_step": partial,
                                  "gain_ratio": gain, "jacobian_reused": chord})
            state.cost = new_cost
            reason = ""
            if shift_su < shift_tol and state.damping < 1e-2 and not cut:  # a damped or cut step is short
                reason = f"max |shift|/s.u. {shift_su:.3g} < {shift_tol}"
            elif rel < rel_tol:
                reason = f"relative cost change {rel:.2g} < {rel_tol}"
            elif (plateau_tol > 0 and shift_su_shared < 10 * shift_tol
                  and _on_plateau(state.history, plateau_tol, window := 1 if state.replateau else plateau_iterations)):
                reason = (f"R plateau: wR2 fell by less than {plateau_tol:g} of itself in each of the last {window} "
                          f"iteration{'s' if window > 1 else ''}{' after a rescan on the plateau' if state.replateau else ''}, "
                          f"shared parameters' max |shift|/s.u. {shift_su_shared:.2g}")
            if reason and chord:  # convergence is judged (and the covariance taken) on a fresh Jacobian: the next
                state.jacobian = None
            elif reason:
                state.converged, state.reason = True, reason
            return trial.detach(), ne
        if chord:  # the kept Jacobian no longer fits here: the same iteration with a fresh one
            state.damping, state.frame_damping, state.frame_step = before_chord
            return lm_step(problem, theta, state, index, shift_tol, rel_tol, max_tries, kind, plateau_tol,
                           plateau_iterations, reuse_jacobian)
        state.damping *= 4
    state.iteration += 1
    state.converged, state.reason = True, "no downhill step found (at a minimum to numerical precision)"
    state.max_shift_su = 0.0
    return theta, ne


def _on_plateau(history: list, tol: float, iterations: int) -> bool:
    """Whether each of the last ``iterations`` steps lowered sqrt(cost) by less than ``tol`` of
    itself. Each step is measured from the cost at its own start ("cost_before"): a thickness rescan
    or grown samples between iterations change the model, and their change is not LM's progress.
    Entries without it (older checkpoints) are measured from the entry before."""
    if len(history) < iterations + 1:
        return False
    recent = history[-(iterations + 1):]
    pairs = [(h.get("cost_before", prev["cost"]), h["cost"]) for prev, h in zip(recent[:-1], recent[1:])]
    return all(1 - math.sqrt(b / a) < tol for a, b in pairs if a > 0)


def _frame_line_search(problem: RefinementProblem, theta: torch.Tensor, delta: torch.Tensor,
                       param_frame: torch.Tensor, before: torch.Tensor, current: float, kind: str
                       ) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """(step, objective there, (F,) fraction of each frame's own step, (F,) whether the frame's cost
    rose). The full step is kept when it lowers the objective (``current``) or no frame's cost rose
    there; else each frame whose cost rose takes its best fraction, with the global part whole in
    every trial, and where that combination does not lower the objective either, such frames may
    also not move. The shorter trials solve only those frames (the others keep their full step)."""
    own = param_frame >= 0
    refl_frame = problem.model.frame
    fractions = list(FRAME_STEP_FRACTIONS)
    costs, values = [], []
    # each frame's eigendecompositions from the trial it would pick (as its intensities), assembled as
    # the trials come so that only two sets are in memory: the next Jacobian then needs no solver
    kept = {"dec": None, "from": None, "cost": None}

    def evaluate(f: float, frames: torch.Tensor | None = None):  # frames: (F,) the ones solved (None: all)
        trial = delta.clone()
        trial[own] *= f
        source = None
        if frames is None:
            with torch.no_grad():
                ic = problem.intensities(theta + trial)
            dec = problem.decompositions_at(theta + trial)
        else:
            ic, dec, source = problem.frame_intensities(theta + trial, frames)
        c = problem.frame_costs_of(ic, kind) + problem.frame_prior_costs(theta + trial, kind)
        if frames is not None:
            c = torch.where(frames, c, torch.inf)
        if not costs:
            kept.update(dec=dec, cost=c.clone(), **{"from": torch.zeros(len(c), dtype=torch.long)})
        elif kept["dec"] is not None and dec is not None:
            better = c < kept["cost"]
            kept["dec"].take_frames(problem.model.plan, dec, better, source)
            kept["cost"] = torch.where(better, c, kept["cost"])
            kept["from"][better] = len(costs)
        else:
            kept["dec"] = None
        costs.append(c)
        values.append(ic)

    def combine():
        c = torch.stack(costs)
        pick = torch.argmin(c, 0)
        frac = torch.as_tensor(fractions[:len(costs)], dtype=torch.float64)[pick]
        step = delta.clone()
        step[own] *= frac[param_frame[own]]
        ic = torch.stack(values).gather(0, pick[refl_frame][None])[0]
        with torch.no_grad():  # the frames' own prior rows are in c; the rest of the prior at the combined point
            total = float(c.gather(0, pick[None])[0].sum() + problem.prior_cost(theta + step, kind)
                          - problem.frame_prior_costs(theta + step, kind).sum())
        return step, total, frac, ic

    evaluate(fractions[0])
    step, total, frac, ic = combine()
    rose = costs[0] > before
    if total > current and bool(rose.any()):
        for f in fractions[1:]:
            evaluate(f, rose)
        step, total, frac, ic = combine()
        if not total <= current:
            fractions.append(0.0)
            evaluate(0.0, rose)
            step, total, frac, ic = combine()
    if np.isfinite(total):
        problem.remember_intensities(theta + step, ic)  # what the next iteration would recompute
        pick = torch.argmin(torch.stack(costs), 0)
        if kept["dec"] is not None and torch.equal(pick, kept["from"]):
            problem.remember_decompositions(theta + step, kept["dec"])
    return step, total, frac, torch.stack(costs).amin(0) > before


def _safe_inverse(a: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric positive semi-definite matrix; null directions get zero variance."""
    d = torch.sqrt(torch.diagonal(a).clamp_min(1e-300))
    scaled = a / d[:, None] / d[None, :]
    lam, vec = torch.linalg.eigh(scaled)
    inv_lam = torch.where(lam > 1e-12 * lam.max(), 1.0 / lam, torch.zeros_like(lam))
    return (vec * inv_lam) @ vec.T / d[:, None] / d[None, :]


def constrained_inverse(a: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """:func:`_safe_inverse` of the normal matrix, or, with ``basis`` (p, q) orthonormal spanning the
    allowed steps, basis (basis^T a basis)^-1 basis^T: the covariance with the constraint imposed
    (the origin of a polar space group held at its centroid), whatever a does along the null direction."""
    if basis is None:
        return _safe_inverse(a)
    return basis @ _safe_inverse(basis.T @ a @ basis) @ basis.T


def covariance(ne: NormalEquations, basis: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Covariance of the refined parameters: (J^T J)^-1 GoF^2 (on the steps ``basis`` allows), and GoF."""
    dof = max(ne.n_obs - len(ne.index), 1)
    gof2 = ne.cost / dof
    return constrained_inverse(ne.jtj, basis) * gof2, math.sqrt(gof2)


def strong_correlations(cov: torch.Tensor, names: list[str], threshold: float = 0.9) -> list[dict]:
    """Pairs of parameters with |correlation| above ``threshold``."""
    sd = torch.sqrt(torch.diagonal(cov).clamp_min(1e-300))
    corr = cov / sd[:, None] / sd[None, :]
    out = []
    iu = torch.triu_indices(len(names), len(names), 1)
    for i, j in iu.T.tolist():
        c = float(corr[i, j])
        if abs(c) > threshold and torch.diagonal(cov)[i] > 0 and torch.diagonal(cov)[j] > 0:
            out.append({"a": names[i], "b": names[j], "correlation": round(c, 4)})
    return out
