"""A whole refinement: start values, Adam then Levenberg-Marquardt, checkpoints, results.

The run is a sequence of steps on explicit state (theta, Adam moments, LM damping); after every
``checkpoint_every`` steps that state is written atomically, and ``resume`` continues from it to
the same result. Interrupts (SIGINT/SIGTERM) stop cleanly with the best model so far.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from ..crystal.parameters import StructureParameters
from ..crystal.restraints import restraints_from_config
from ..crystal.structure import Crystal, lattice_allowed
from ..experiment.frames import (FrameContext, FrameModel, GlobalThickness, LearnedThickness,
                                 PerFrameThickness, SlabThickness)
from ..io.pets import frame_selection, select_frames, with_wavelength
from ..io.writers import atomic_write_bytes
from ..physics.plan import split_samples
from ..physics.geometry import fringe_sample_counts
from .frame_search import (GROW_AT_CONVERGENCE_BELOW, RESCAN_AFTER, RESCAN_MIN_LEFT, frames_check_due, grow_samples,
                           rescan_frame_thickness, restart_axis_jumps, restart_outlier_frames, search_axis_path,
                           search_frame_tilt)
from .model import ForwardModel
from .objective import Figures
from .optimise import (AdamState, LMState, NormalEquations, adam_learning_rates, adam_step, covariance, lm_step,
                       normal_equations, strong_correlations)
from .problem import RefinementProblem
from .settings import RefineSettings, precision_dtype


@dataclass
class RefinementResult:
    problem: RefinementProblem
    theta: torch.Tensor
    ic: torch.Tensor
    figures: Figures
    figures_free: Figures | None
    figures_holdout: Figures | None
    covariance: torch.Tensor | None  # (P, P) over all parameters (zeros where not refined)
    refined_index: torch.Tensor
    lm: LMState
    adam_steps: int
    phase_times: dict
    elapsed_s: float
    interrupted: bool
    correlations: list = field(default_factory=list)
    interrupt_signal: int = 0  # the signal that stopped an interrupted run (SIGINT 2, SIGTERM 15)
    start_figures: Figures | None = None
    integration: dict | None = None  # the final model at twice the samples (integration_check)


class Interrupted(Exception):
    """Raised inside the loop when SIGINT/SIGTERM arrives (``signum``: which)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = int(signum)


# Per-frame thicknesses spread about the start value as the refinement moves them: the fringe rule
# samples for this multiple of the start thickness (integration_check reports what was reached).
FRINGE_MARGIN = 1.5


def integration_check(problem: RefinementProblem, theta: torch.Tensor, ic: torch.Tensor) -> dict:
    """The final model's intensities at twice the samples of every frame, against those fitted.
    With the midpoint rule each sample is split in two and keeps its beams (:func:`split_samples`),
    so the comparison measures the rocking integration alone; other rules rebuild the plan.

    ``R_integration`` = sum |sqrt(k Ic_n) - sqrt(k' Ic_2n)| / sum sqrt(k' Ic_2n) over the work
    reflections (each with its own frame scales) is the rocking-integration error of the fit; the
    R values at twice the samples say what it does to the figures. Also reported: how many frames
    had fewer than one sample per Pendelloesung fringe at their refined thickness.
    """
    model = problem.model
    counts = model.samples_per_frame()
    plan, pot_plan, last, dtype = model.plan, model.potential_plan, problem._last_intensities, problem.forward_dtype
    try:  # single precision: its error (~1e-5 of an intensity) is far below the integration error measured
        split = split_samples(plan, model.dataset.frames.half_angle_deg)  # each sample's beams kept
        if split is None:
            model.resample(2 * counts)
        else:
            model.plan = split
        problem.forward_dtype = torch.float32
        with torch.no_grad():
            ic2 = problem.intensities(theta).to(torch.float64)
    finally:
        model.plan, model.potential_plan, problem._last_intensities = plan, pot_plan, last
        problem.forward_dtype = dtype
    work = problem.work
    a = torch.sqrt(torch.clamp(problem.scales(ic)[model.frame] * ic, min=0))[work]
    b = torch.sqrt(torch.clamp(problem.scales(ic2)[model.frame] * ic2, min=0))[work]
    fig2 = problem.figures(ic2, "work")
    with torch.no_grad():
        thick = problem.state(problem.split(theta)).thickness.amax(-1).numpy()
    scored = plan.scored
    needed = fringe_sample_counts(scored.excitation_range, scored.frame, model.n_frames, thick, plan.geometry, 1)
    has = np.bincount(scored.frame[work.numpy()], minlength=model.n_frames) > 0
    frame = model.frame[work]
    per_frame = (torch.zeros(model.n_frames, dtype=torch.float64).index_add(0, frame, torch.abs(a - b))
                 / torch.zeros(model.n_frames, dtype=torch.float64).index_add(0, frame, b)).numpy()
    per_frame = np.where(has, per_frame, np.nan)
    worst = int(np.nanargmax(per_frame))
    return {"samples_per_frame_min": int(counts[has].min()), "samples_per_frame_max": int(counts[has].max()),
            "R_integration": float(torch.sum(torch.abs(a - b)) / torch.sum(b)),
            "R_obs_double_samples": fig2.R_obs, "wR2_double_samples": fig2.wR2,
            "frames_below_one_sample_per_fringe": int(np.sum((counts < needed) & has)),
            "samples_per_fringe_min": float(np.min(counts[has] / needed[has])),
            "worst_frame": int(model.dataset.frames.ids[worst]), "R_integration_worst_frame": float(per_frame[worst]),
            # per frame (F,), for frames.csv: its samples, their number per fringe, its R_integration
            "per_frame": {"samples": counts, "samples_per_fringe": np.where(has, counts / np.maximum(needed, 1), np.nan),
                          "R_integration": per_frame}}


def initial_thickness(model: ForwardModel, settings: RefineSettings, use: torch.Tensor) -> float:
    """Start thickness (A): the best single value of a scan over the grid at the start structure.

    Every frame starts there, also for per-frame models: a per-frame scan at a wrong structure
    picks wrong branches of the thickness oscillation, while the global optimum is robust and the
    refinement then moves each frame locally.
    """
    if settings.thickness != "auto":
        return float(settings.thickness)
    a, b, step = settings.thickness_grid
    grid = np.arange(a, b + 0.5 * step, step)
    table = model.thickness_scan(grid, use=use)  # (F, Q)
    return float(grid[int(np.argmin(np.nansum(table, 0)))])



class WarmStart(NamedTuple):
    """Where a learned model starts after a fit of a simpler model (see :func:`_warm_start_fit`)."""

    crystal: Crystal  # the refined structure
    mean: np.ndarray  # (F,) each frame's mean path length (A)
    orientation: torch.Tensor | None  # (F, 2) orientation corrections, or None
    fitted: np.ndarray  # (F,) frames whose thickness was fitted (hold-out frames were not)
    record: dict  # what the fit did, for the summary


def _warm_start_fit(crystal: Crystal, dataset, settings: RefineSettings, frame_mask, log) -> WarmStart:
    """Fit the simpler model named by ``learned_warm_start`` first (same settings otherwise)."""
    pre = dataclasses.replace(settings, thickness_model=settings.learned_warm_start,
                              lm_iterations=settings.warm_start_iterations,
                              integration_check=False,  # the learned model's own run checks its result
                              frames="")  # the dataset holds the selected frames already
    problem = build_problem(crystal, dataset, pre, frame_mask)
    result = refine(problem, pre, log=lambda line: log(f"warm start ({pre.thickness_model}): {line}"))
    if result.interrupted:  # stop the whole run; the warm-start fit has no checkpoint of its own
        raise KeyboardInterrupt
    raw = problem.split(result.theta)
    mean = problem.frames.thickness.describe(raw, problem.frames.ctx)["thickness_mean"]
    fitted = ~problem.holdout_frame.numpy()
    if frame_mask is not None:
        fitted &= np.asarray(frame_mask, bool)
    record = {"model": pre.thickness_model, "adam_steps": result.adam_steps, "lm_iterations": result.lm.iteration,
              "R_obs": result.figures.R_obs, "wR2": result.figures.wR2,
              "seconds": result.elapsed_s}
    return WarmStart(problem.structure.crystal_at(raw["structure"]), mean, raw.get("orientation"), fitted, record)


def _log_centring_extinct(crystal: Crystal, dataset, log: Callable[[str], None]) -> None:
    """Say how many listed reflections the lattice centring makes extinct (not scored: zero in any
    theory) and their mean I/sigma, which is about 0 when the cell and centring are right."""
    refl = dataset.reflections
    extinct = ~lattice_allowed(refl.hkl, crystal.symmetry.centring_translations())
    if extinct.any():
        i_sig = refl.intensity[extinct] / np.maximum(refl.sigma[extinct], 1e-12)
        log(f"{int(extinct.sum())} of {len(extinct)} reflection rows are extinct by the lattice centring and not "
            f"scored (mean I/sigma there {float(np.mean(i_sig)):.2f}; well above 0 means a wrong cell or centring)")


SLOW_PASS_S = 30.0  # a pass above this (s) on this machine gets the note on how to make a first look cheaper


def format_duration(seconds: float) -> str:
    """A duration for a person to read: 0.37 s, 42 s, 12 min, 2.5 h."""
    if seconds < 100:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _log_cost(model: ForwardModel, settings: RefineSettings, log: Callable[[str], None]) -> None:
    """The problem's size and what one pass over it costs here (timed on one chunk, see
    solve_cost_probe) before the first pass, the start's thickness scan, runs: on a large dataset
    that pass alone can take many minutes, and the user should know why and what helps (the remedies
    not already in use)."""
    est = model.pass_seconds_estimate()
    log(f"plan: {model.n_frames} frames, {len(model.plan.samples.frame)} tilt samples, {model.n_beams_mean():.0f} "
        f"beams per solve, {len(model.plan.scored.row)} scored reflections; a pass over every tilt (a thickness "
        f"scan is one; an LM iteration 2-20, more with more structure parameters) about {format_duration(est)} here")
    if est > SLOW_PASS_S:
        ids = model.dataset.frames.ids
        step = int(min(10, max(2, math.ceil(est / 60.0))))
        remedies = [] if settings.frames else [f"refine fewer frames (--frames {min(ids)}-{max(ids)}:{step})"]
        if settings.coupling != "segments" or settings.s_max > 0.01:
            remedies.append("use smaller beam sets (--coupling segments --s-max 0.01, as diffBloch)")
        if model.device.type == "cpu":
            remedies.append("use a GPU (blochflow --device cuda refine ...)")
        if remedies:
            log("note: a large problem for this machine; for a first look " + ", ".join(remedies[:-1])
                + (" or " if len(remedies) > 1 else "") + remedies[-1])


def build_problem(crystal: Crystal, dataset, settings: RefineSettings, frame_mask=None,
                  log: Callable[[str], None] | None = None) -> RefinementProblem:
    """The refinement problem for a start structure and a dataset; a learned thickness model with a
    per-frame or slab warm start first refines that model (logged through ``log``, which also gets the
    problem's size and the cost of a pass, timed on one chunk)."""
    timed = log is not None
    log = log or (lambda line: None)
    dataset = with_wavelength(dataset, settings.wavelength)
    if settings.frames:
        keep = frame_selection(dataset.frames.ids, settings.frames)
        log(f"frames: {int(keep.sum())} of {len(keep)} ({settings.frames})")
        dataset = select_frames(dataset, keep)
    for note in dataset.extra.get("notes", []):
        log("note: " + note)
    _log_centring_extinct(crystal, dataset, log)
    kind = settings.thickness_model
    if dataset.frames.dataset is not None and len(np.unique(dataset.frames.dataset)) > 1:
        # several datasets (crystals): a thickness model over the rotation, or one smooth path of the
        # corrections about the rotation axis, describes one crystal
        if kind != "per-frame":
            raise ValueError(f"thickness_model: '{kind}' describes one crystal's frames; several datasets take "
                             "'per-frame'")
        if settings.axis_search:
            raise ValueError("axis_search: searches one crystal's frames as one path; not with several datasets")
    warm = None
    if kind == "learned" and settings.learned_warm_start != "scan":
        warm = _warm_start_fit(crystal, dataset, settings, frame_mask, log)
        crystal = warm.crystal
    structure = StructureParameters(crystal, refine_xyz=settings.refine_xyz, refine_adp=settings.refine_adp,
                                    adp=settings.adp, hydrogens=settings.hydrogens,
                                    refine_occupancy=settings.refine_occupancy,
                                    refine_disorder=settings.refine_disorder,
                                    riding_geometry=settings.riding_geometry,
                                    riding_max_A=settings.riding_max_distance,
                                    refine_torsions=settings.riding_torsions)
    if structure.riding:
        kinds = Counter(g.kind for g in structure.riding_groups for _ in g.hydrogens)
        placed = {h for g in structure.riding_groups for h in g.hydrogens}
        offset = [structure.labels[h] for h in structure.riding if h not in placed]
        log(f"riding hydrogens: {len(structure.riding)}" + "".join(f", {n} {k}" for k, n in sorted(kinds.items()))
            + (f", {len(offset)} on their starting offset, which keeps the start's geometry: {' '.join(offset[:8])}"
               + (" ..." if len(offset) > 8 else "") if offset else ""))
        rotors, rigid = structure.rotor_groups, structure.rigid_groups
        if rotors and settings.riding_torsions and settings.refine_xyz:
            log(f"rotor groups (OH, SH, CH3, NH3): {len(rotors)}, each turning about its bond by one refined torsion")
        elif rotors:  # a wrong start torsion stays, and in ED an H pulls its parent (QA, session 36)
            log(f"note: the {sum(len(g.hydrogens) for g in rotors)} rotor hydrogens (OH, SH, CH3, NH3) keep the start's "
                f"torsion about their bond; check them in the start model, or refine them (--set riding_torsions=true, "
                f"or --hydrogens free)")
        if rigid and settings.riding_torsions and settings.refine_xyz:
            log(f"rigid groups (water, NH4+, H3O+): {len(rigid)}, each of ideal shape and turning about its parent "
                f"by three refined angles (one where its site is on a two-fold axis or a mirror)")
        elif rigid:
            log(f"note: the {sum(len(g.hydrogens) for g in rigid)} hydrogens of rigid groups (water, NH4+, H3O+) keep "
                f"the start's orientation; check them in the start model, or refine them (--set riding_torsions=true, "
                f"or --hydrogens free)")
    if structure.disorder_parts:
        log("disorder groups: " + ", ".join(
            f"{assembly + ':' if assembly else ''}{group} ({len(atoms)} atoms, occupancy "
            f"{'refined' if p is not None else 'the rest of the sum'})"
            for assembly, group, atoms, p, _ in structure.disorder_parts)
            + "; atoms of different groups of one assembly are never bonded")
    # the model sees the start projected onto its special positions, so site weights are right
    model = ForwardModel(structure.crystal_at(structure.theta0), dataset, settings.model_settings(),
                         frame_mask=frame_mask)
    ctx = FrameContext.from_dataset(dataset)
    from .problem import free_set_mask
    free = torch.as_tensor(free_set_mask(model.plan.scored.hkl, crystal.symmetry.rotations, settings.free_fraction,
                                         settings.free_seed))
    if timed:
        _log_cost(model, settings, log)
    t0 = None if warm is not None else initial_thickness(model, settings, ~free)
    if settings.samples_per_fringe > 0:
        design = (warm.mean if warm is not None else np.full(model.n_frames, t0)) * FRINGE_MARGIN
        model.fit_samples_to_fringes(design, settings.samples_per_fringe)
        counts = model.samples_per_frame()
        log(f"samples per frame {counts.min()}-{counts.max()} (mean {counts.mean():.0f}) for "
            f"{settings.samples_per_fringe:g} per fringe at {FRINGE_MARGIN:g} x the start thickness"
            + (f"; a pass now about {format_duration(model.pass_seconds_estimate())}" if timed else ""))
    if kind == "learned":
        mean = warm.mean if warm is not None else np.full(model.n_frames, t0)
        thick = LearnedThickness(mean, 0.05 * mean, bounds=settings.thickness_bounds,
                                 knots=settings.thickness_knots, points=settings.thickness_points,
                                 basis=settings.thickness_basis, smoothness=settings.thickness_smoothness,
                                 distribution=settings.thickness_distribution).warm_start(ctx, frames=None if warm is None else warm.fitted)
    elif kind == "global":
        thick = GlobalThickness(t0)
    elif kind == "slab":
        thick = SlabThickness(t0)
    else:
        thick = PerFrameThickness(np.full(model.n_frames, t0))
    frames = FrameModel(ctx, thick, refine_orientation=settings.refine_orientation,
                        orientation_sigma=settings.orientation_sigma)
    restraints = restraints_from_config(settings.restraints, structure.crystal_at(structure.theta0))
    problem = RefinementProblem(model, structure, frames, refine_absorption=settings.refine_absorption,
                                free_fraction=settings.free_fraction, free_seed=settings.free_seed,
                                holdout_frames=settings.holdout_frames, restraints=restraints)
    if warm is not None:
        if warm.orientation is not None and "orientation" in problem.slots:
            o = problem.slots["orientation"]
            problem.theta0[o.start:o.stop] = warm.orientation.reshape(-1)
        problem.warm_start = warm.record  # refine() then skips Adam: the warm-start fit ran it
    problem.jacobian_dtype = precision_dtype(settings.jacobian_precision)
    return problem


def refined_index(problem: RefinementProblem, settings: RefineSettings) -> torch.Tensor:
    switches = {"xyz": settings.refine_xyz, "adp": settings.refine_adp,
                "occupancy": settings.refine_occupancy or settings.refine_disorder,
                "thickness": settings.refine_thickness, "network": settings.refine_thickness,
                "surface": settings.refine_thickness, "orientation": settings.refine_orientation,
                "absorption": problem.refine_absorption}
    groups = [g for g, on in switches.items() if on]
    idx = torch.cat([problem.group_index(g) for g in groups]) if groups else torch.zeros(0, dtype=torch.long)
    # parameters that no scored reflection depends on (frames without reflections) are left out
    frame_has = torch.bincount(problem.model.frame[problem.work], minlength=problem.model.n_frames) > 0
    frame = problem.parameter_frames()[idx]
    keep = (frame < 0) | frame_has[frame.clamp_min(0)]
    return torch.sort(idx[keep]).values


# -- checkpoints -------------------------------------------------------------------------------------

def _save_checkpoint(path: Path, payload: dict) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def inputs_fingerprint(problem: RefinementProblem) -> str:
    """A hash of what a run was fitted to: the start structure's parameters (as read from its file) and the
    scored observations (hkl, frame, Io, sigma). A checkpoint keeps it, so --resume refuses other inputs."""
    h = hashlib.sha256()
    model = problem.model
    for x in (problem.split(problem.theta0)["structure"], model.io, model.sigma, model.frame,
              torch.as_tensor(np.asarray(model.plan.scored.hkl))):
        h.update(np.ascontiguousarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x).tobytes())
    return h.hexdigest()[:16]


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (other settings, inputs or parameters)."""


# settings a resumed run may change: how far LM goes (a run stopped at its limit goes on) and how often it
# saves; every other change would make the resumed run another refinement
RESUMABLE_CHANGES = ("lm_iterations", "checkpoint_every")


def _check_resume(resume: dict, problem: RefinementProblem, settings: RefineSettings) -> list[str]:
    """ResumeError unless the checkpoint was written by a run of these settings on these inputs, naming
    the settings that differ (checkpoints before session 44 hold only the settings' hash); changes of
    RESUMABLE_CHANGES alone are allowed, and returned as 'name: then -> now'."""
    allowed = []
    if resume["fingerprint"] != settings.fingerprint():
        then = json.loads(resume["settings"]) if "settings" in resume else None
        now = json.loads(settings.as_json())
        keys = [k for k in now if then is not None and then.get(k) != now[k]]
        changed = [f"{k}: {then.get(k)!r} then, {now[k]!r} now" for k in keys]
        if not keys or any(k not in RESUMABLE_CHANGES for k in keys):
            raise ResumeError("checkpoint was written with other settings" + (
                f" ({'; '.join(c for k, c in zip(keys, changed) if k not in RESUMABLE_CHANGES)}; only "
                f"{' and '.join(RESUMABLE_CHANGES)} may change on --resume)" if changed else ""))
        allowed = [f"{k}: {then.get(k)} -> {now[k]}" for k in keys]
    inputs = inputs_fingerprint(problem)
    if resume["n_params"] != problem.n_params or resume.get("inputs", inputs) != inputs:
        raise ResumeError("checkpoint was written for another start structure or other data")
    return allowed


def _lm_to_dict(s: LMState) -> dict:
    return {"iteration": s.iteration, "damping": s.damping, "cost": s.cost, "converged": s.converged,
            "reason": s.reason, "max_shift_su": s.max_shift_su, "history": json.dumps(s.history),
            "frame_damping": json.dumps(s.frame_damping), "frame_step": json.dumps(s.frame_step),
            "replateau": s.replateau, "jacobian_kind": s.jacobian_kind, "axis_searched": s.axis_searched,
            "axis_fallback_cost": s.axis_fallback_cost,
            **({} if s.jacobian is None else {"jacobian": s.jacobian}),
            **({} if s.axis_fallback is None else {"axis_fallback": s.axis_fallback})}


def _lm_from_dict(d: dict) -> LMState:
    return LMState(iteration=int(d["iteration"]), damping=float(d["damping"]), cost=float(d["cost"]),
                   converged=bool(d["converged"]), reason=str(d["reason"]), max_shift_su=float(d["max_shift_su"]),
                   history=json.loads(d["history"]), frame_damping=json.loads(d.get("frame_damping", "null")),
                   frame_step=json.loads(d.get("frame_step", "null")), replateau=bool(d.get("replateau", False)),
                   jacobian=d.get("jacobian"), jacobian_kind=str(d.get("jacobian_kind", "")),
                   axis_searched=bool(d.get("axis_searched", False)), axis_fallback=d.get("axis_fallback"),
                   axis_fallback_cost=float(d.get("axis_fallback_cost", float("nan"))))


def refine(problem: RefinementProblem, settings: RefineSettings, *, checkpoint: Path | None = None,
           resume: dict | None = None, log: Callable[[str], None] = print) -> RefinementResult:
    """Run Adam then LM on ``problem``; returns the result (also when interrupted).

    A problem that was warm-started by a fit of a simpler model (``problem.warm_start``) starts in
    the basin that fit found: Adam is skipped and LM refines from there.
    """
    t_start = time.perf_counter()
    adam_steps = 0 if problem.warm_start else settings.adam_steps
    index = refined_index(problem, settings)
    problem.n_refined = len(index)
    theta = problem.theta0.clone()
    lr = adam_learning_rates(problem, {"xyz": settings.lr_xyz, "adp": settings.lr_adp,
                                       "occupancy": settings.lr_occupancy, "thickness": settings.lr_thickness,
                                       "network": settings.lr_network, "surface": settings.lr_surface,
                                       "orientation": settings.lr_orientation, "absorption": settings.lr_absorption})
    mask = torch.zeros(problem.n_params, dtype=torch.float64)
    mask[index] = 1.0
    lr = lr * mask
    adam = AdamState(0, torch.zeros_like(theta), torch.zeros_like(theta))
    lm = LMState()
    phase_times = {"setup_s": 0.0, "adam_s": 0.0, "lm_s": 0.0, "covariance_s": 0.0}
    if resume is not None:
        changed = _check_resume(resume, problem, settings)
        if changed:
            log(f"resumed with {', '.join(changed)}")
        theta = resume["theta"].clone()
        adam = AdamState(int(resume["adam_step"]), resume["adam_m"].clone(), resume["adam_v"].clone())
        lm = _lm_from_dict(resume["lm"])
        phase_times.update(json.loads(resume["phase_times"]))
        log(f"resumed at Adam step {adam.step}, LM iteration {lm.iteration}")
    with torch.no_grad():
        # solved as the first LM iteration would (its Jacobian then takes these decompositions)
        problem.forward_dtype = precision_dtype(settings.lm_precision if adam.step >= adam_steps else "double")
        start_fig = problem.figures(problem.intensities(problem.theta0))
        problem.forward_dtype = torch.float64
        counts = None if resume is None else resume.get("samples_per_frame")
        if counts is not None and not np.array_equal(counts.numpy(), problem.model.samples_per_frame()):
            problem.resample(counts.numpy())  # the plan the interrupted run had grown to
        if resume is not None and resume.get("decompositions_kept"):
            # the next Jacobian takes its decompositions and values, as it would have
            problem.forward_dtype = torch.float32 if resume.get("kept_single") else torch.float64
            problem.intensities(theta)
            problem.forward_dtype = torch.float64

    # what the run is of (settings, inputs): the same in every checkpoint it writes
    identity = {"fingerprint": settings.fingerprint(), "settings": settings.as_json(),
                "inputs": inputs_fingerprint(problem), "n_params": problem.n_params}

    def payload() -> dict:
        """The run's state as a checkpoint holds it (adam_step and lm_step replace theta and the moments
        rather than change them in place, so they are held as they are)."""
        return {**identity, "theta": theta, "adam_step": adam.step, "adam_m": adam.m,
                "adam_v": adam.v, "lm": _lm_to_dict(lm),
                "phase_times": json.dumps(phase_times),
                "decompositions_kept": problem.decompositions_kept_at(theta),
                "kept_single": problem.values_single_at(theta),
                "samples_per_frame": torch.as_tensor(problem.model.samples_per_frame())}

    def save(state: dict | None = None):
        if checkpoint is not None:
            _save_checkpoint(checkpoint, payload() if state is None else state)

    interrupted, stopped_by = False, 0
    # the state at the start of the step under way: an interrupt inside a step leaves the LM or Adam state
    # part-updated (damping raised, the kept Jacobian dropped), so the checkpoint it writes holds this one,
    # from which a resumed run repeats the step exactly
    consistent: dict | None = None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        raise Interrupted(signum)

    for s in previous:
        signal.signal(s, handler)
    ne: NormalEquations | None = None
    try:
        while adam.step < adam_steps and len(index):
            consistent = payload()
            t0 = time.perf_counter()
            problem.forward_dtype = precision_dtype(settings.adam_precision)
            try:
                theta, loss = adam_step(problem, theta, adam, lr, adam_steps, objective=settings.adam_objective)
            finally:
                problem.forward_dtype = torch.float64
            phase_times["adam_s"] += time.perf_counter() - t0
            consistent = payload()  # the step is whole
            figure = "wR(F)" if settings.adam_objective == "amplitude" else "wR2"
            log(f"adam {adam.step:4d}/{adam_steps}  {figure}(work) {math.sqrt(loss):.4f}")
            if adam.step % settings.checkpoint_every == 0:
                save(consistent)
        rescan = settings.thickness_rescan and settings.refine_thickness and "thickness" in problem.slots

        def rescan_now(why: str = "") -> int:
            nonlocal theta
            t0 = time.perf_counter()
            if lm.history:  # for frames_check_due (kept in checkpoints)
                lm.history[-1]["frames_checked"] = True
            theta, moved = rescan_frame_thickness(problem, theta, settings)
            phase_times["thickness_rescan_s"] = phase_times.get("thickness_rescan_s", 0.0) + time.perf_counter() - t0
            if moved:
                lm.jacobian = None
                log(f"thickness rescan at LM iteration {lm.iteration}{why}: {moved} frames moved to another branch")
            return moved

        def restart_now(why: str = "") -> int:
            """The outlier restart, then the restart of frames off both neighbours about their rotation axis."""
            nonlocal theta
            t0 = time.perf_counter()
            theta, frames = restart_outlier_frames(problem, theta, settings)
            theta, jumps = restart_axis_jumps(problem, theta, settings)
            phase_times["frame_restart_s"] = phase_times.get("frame_restart_s", 0.0) + time.perf_counter() - t0
            ids = problem.model.dataset.frames.ids
            if len(frames):
                log(f"frame restart at LM iteration {lm.iteration}{why}: {len(frames)} outlier frames moved to zero "
                    f"orientation correction and their best thickness there (frames {' '.join(map(str, ids[frames]))})")
            if len(jumps):
                log(f"frame restart at LM iteration {lm.iteration}{why}: {len(jumps)} frames off both neighbours about "
                    f"the rotation axis moved to their mean and their best thickness there (frames "
                    f"{' '.join(map(str, ids[jumps]))})")
            if len(frames) or len(jumps):
                lm.jacobian = None
            return len(frames) + len(jumps)

        def undo_axis_search_if_worse() -> bool:
            """Once the run has converged again after the axis search (or stopped), go back to the converged
            point before it when that had the lower cost: the search's smooth path is a hypothesis about
            the goniometer, and the objective decides (the fit never ends worse for having tried it)."""
            nonlocal theta
            if lm.axis_fallback is None:
                return False
            worse = lm.cost > lm.axis_fallback_cost
            if worse:
                log(f"axis search undone at LM iteration {lm.iteration}: wR2(work) "
                    f"{math.sqrt(lm.cost / problem.objective_norm()):.4f} after it against "
                    f"{math.sqrt(lm.axis_fallback_cost / problem.objective_norm()):.4f} at the convergence before it; "
                    f"back to that point")
                theta, lm.cost, lm.jacobian = lm.axis_fallback.clone(), lm.axis_fallback_cost, None
            lm.axis_fallback = None
            return worse

        def axis_now() -> int:
            nonlocal theta
            t0 = time.perf_counter()
            lm.axis_searched = True
            theta, frames, grid = search_axis_path(problem, theta, settings)
            took = time.perf_counter() - t0
            phase_times["axis_search_s"] = phase_times.get("axis_search_s", 0.0) + took
            if len(grid):
                log(f"axis search at LM iteration {lm.iteration}: {len(frames)} frames moved onto the smooth path of "
                    f"corrections about the rotation axis ({len(grid)} values, +-{grid[-1]:g} mrad; {took:.1f} s)")
            if len(frames):
                lm.jacobian = None
                if settings.refine_thickness:
                    grow_now()
            return len(frames)

        def tilt_now() -> int:
            nonlocal theta
            t0 = time.perf_counter()
            theta, frames, tilts, searched = search_frame_tilt(problem, theta, settings)
            took = time.perf_counter() - t0
            phase_times["tilt_search_s"] = phase_times.get("tilt_search_s", 0.0) + took
            if searched.any():
                log(f"tilt search at LM iteration {lm.iteration}: {len(frames)} of {int(searched.sum())} frames searched "
                    f"(those above the median frame's cost) moved to another tilt and thickness ({len(tilts)} tilts "
                    f"normal to the rotation axis, {tilts[1] - tilts[0]:.2g} mrad apart, +-{tilts[-1]:g} mrad, searched coarse to "
                    f"fine; {took:.1f} s)")
            if len(frames):
                lm.jacobian = None
                if settings.refine_thickness:
                    grow_now()  # frames moved onto thicker branches
            return len(frames)

        def grow_now(below: float | None = None) -> int:
            t0 = time.perf_counter()
            grown = grow_samples(problem, theta, settings, below)
            if grown:
                lm.jacobian = None
                phase_times["resample_s"] = phase_times.get("resample_s", 0.0) + time.perf_counter() - t0
                log(f"tilt samples raised for {grown} frames at LM iteration {lm.iteration} (their thickness "
                    f"needs more than " + ("the start design)" if below is None else f"{below:g} per fringe)"))
            return grown

        problem.forward_dtype = precision_dtype(settings.lm_precision)
        while not lm.converged and lm.iteration < settings.lm_iterations and len(index):
            consistent = payload()
            # thickness rescans after RESCAN_AFTER LM iterations (the structure is then close; at the
            # start a frame can be moved onto a wrong branch that LM then keeps) and at convergence,
            # each only while RESCAN_MIN_LEFT iterations remain to refine from it
            enough_left = settings.lm_iterations - lm.iteration >= RESCAN_MIN_LEFT
            if lm.iteration == RESCAN_AFTER and enough_left:
                if rescan:
                    rescan_now()
                # frames the rescan (or LM) moved onto thicker branches get the samples they need now;
                # at convergence only those below one sample per fringe grow (see below)
                if settings.refine_thickness:
                    grow_now()
                if rescan and settings.tilt_search:
                    tilt_now()
            elif rescan and enough_left and lm.iteration > RESCAN_AFTER and frames_check_due(lm.history):
                why = " (structure settled)"
                rescan_now(why)
                if settings.frame_restart:
                    restart_now(why)
            t0 = time.perf_counter()
            on_amplitudes = lm.iteration < settings.lm_amplitude_iterations
            theta, ne = lm_step(problem, theta, lm, index, shift_tol=settings.shift_tol,
                                kind="amplitude" if on_amplitudes else "intensity",
                                plateau_tol=settings.plateau_tol, plateau_iterations=settings.plateau_iterations,
                                reuse_jacobian=settings.chord_steps())
            if on_amplitudes:  # a phase to get into the basin: convergence is judged on intensities
                lm.converged, lm.reason = False, ""
            if lm.converged and settings.lm_iterations - lm.iteration >= RESCAN_MIN_LEFT:
                # at convergence: frames on other branches move, outlier frames are tried afresh at zero
                # orientation correction, and frames whose refined thickness left them below one sample per
                # fringe (their rocking integral off by percents, which biases the thickness low) get the
                # samples they need; in each case LM goes on from there
                undone = undo_axis_search_if_worse()  # then one more iteration takes the normal matrix there
                axis_search = rescan and settings.axis_search and not lm.axis_searched  # once, when the structure is right
                if axis_search:  # the converged point, before this convergence's rescan too
                    lm.axis_fallback, lm.axis_fallback_cost = theta.clone(), lm.cost
                moved = rescan_now() if rescan else 0
                if axis_search:
                    moved += axis_now()
                restarted = restart_now() if rescan and settings.frame_restart else 0
                grown = grow_now(below=GROW_AT_CONVERGENCE_BELOW) if settings.refine_thickness else 0
                if moved or restarted or grown or undone:
                    lm.replateau = undone or lm.reason.startswith("R plateau")  # one flat iteration then shows it still is
                    lm.converged, lm.reason = False, ""
            phase_times["lm_s"] += time.perf_counter() - t0
            consistent = payload()  # the iteration is whole (with the frame checks at convergence)
            log(f"lm   {lm.iteration:4d}/{settings.lm_iterations}  {'wR(F)' if on_amplitudes else 'wR2(work)'} "
                f"{math.sqrt(lm.cost / problem.objective_norm('amplitude' if on_amplitudes else 'intensity')):.4f}"
                f"  max shift/su {lm.max_shift_su:.3g} ({lm.history[-1].get('max_shift_parameter', '') if lm.history else ''}),"
                f" structure {lm.history[-1].get('max_shift_su_structure', float('nan')) if lm.history else float('nan'):.3g}"
                f"  damping {lm.damping:.2g}"
                + (f"  frames on a partial step {lm.history[-1]['frames_partial_step']}"
                   if lm.history and lm.history[-1].get("frames_partial_step") else "")
                + ("  (Jacobian re-used)" if lm.history and lm.history[-1].get("jacobian_reused") else ""))
            if lm.iteration % settings.checkpoint_every == 0 or lm.converged:
                save(consistent)
        if undo_axis_search_if_worse():  # the run stopped before it converged again after the axis search
            ne = None  # the covariance is then taken at the point gone back to
    except (Interrupted, KeyboardInterrupt) as exc:
        interrupted, stopped_by = True, getattr(exc, "signum", int(signal.SIGINT))
        save(consistent)
        log("interrupted: " + ("checkpoint written; " if checkpoint is not None else "")
            + "the results below are the model so far")
    finally:
        problem.forward_dtype = torch.float64
        for s, h in previous.items():
            signal.signal(s, h)
    if not interrupted:
        save()
    cov_full, corr = None, []
    t0 = time.perf_counter()
    if len(index) and not interrupted:
        if ne is not None and lm.converged:  # (a chord step never converges: lm_step)
            # as least-squares programs do: the normal matrix of the last cycle (its step is below the
            # convergence test), scaled by GoF^2 at the final point (the reported figures' double pass)
            ic = problem.intensities_at(theta)
            with torch.no_grad():
                final = float(torch.sum(problem.residuals(ic) ** 2) + problem.prior_cost(theta))
            ne = dataclasses.replace(ne, cost=final)
        else:
            ne, _ = normal_equations(problem, theta, index)
        cov, _ = covariance(ne, problem.step_basis(index))
        cov_full = torch.zeros((problem.n_params, problem.n_params), dtype=torch.float64)
        cov_full[index[:, None], index[None, :]] = cov
        st = problem.slots["structure"]
        sidx = index[(index >= st.start) & (index < st.stop)]
        pos = torch.searchsorted(index, sidx)
        corr = strong_correlations(cov[pos[:, None], pos[None, :]], [problem.names[i] for i in sidx.tolist()])
    phase_times["covariance_s"] = time.perf_counter() - t0
    ic = problem.intensities_at(theta)
    fig = problem.figures(ic, "work")
    fig_free = problem.figures(ic, "free") if bool(problem.free.any()) else None
    fig_hold = problem.figures(ic, "holdout") if bool(problem.holdout.any()) else None
    integration = None
    if settings.integration_check and not interrupted:
        t0 = time.perf_counter()
        integration = integration_check(problem, theta, ic)
        phase_times["integration_check_s"] = time.perf_counter() - t0
        log(f"integration check (twice the samples): R_integration {100 * integration['R_integration']:.2f} %, "
            f"R_obs {100 * integration['R_obs_double_samples']:.2f} %, wR2 {100 * integration['wR2_double_samples']:.2f} %; "
            f"{integration['frames_below_one_sample_per_fringe']} frames below one sample per fringe; worst frame "
            f"{integration['worst_frame']} ({100 * integration['R_integration_worst_frame']:.1f} %, frames.csv has each)")
        if integration["R_integration"] > 0.01:
            log(f"warning: the rocking integration is not converged at these samples; raise samples_per_fringe "
                f"(now {settings.samples_per_fringe:g}) or n_samples (now {settings.n_samples})")
    return RefinementResult(problem=problem, theta=theta, ic=ic, figures=fig, figures_free=fig_free,
                            figures_holdout=fig_hold,
                            covariance=cov_full, refined_index=index, lm=lm, adam_steps=adam.step,
                            phase_times=phase_times, elapsed_s=time.perf_counter() - t_start,
                            interrupted=interrupted, interrupt_signal=stopped_by, correlations=corr, start_figures=start_fig,
                            integration=integration)
