"""A whole refinement: settings, start values, Adam then Levenberg-Marquardt, checkpoints, results.

The run is a sequence of steps on explicit state (theta, Adam moments, LM damping); after every
``checkpoint_every`` steps that state is written atomically, and ``resume`` continues from it to
the same result. Interrupts (SIGINT/SIGTERM) stop cleanly with the best model so far.
"""

from __future__ import annotations

import dataclasses
import difflib
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
from ..experiment.frames import (THICKNESS_REF, FrameContext, FrameModel, GlobalThickness, LearnedThickness,
                                 PerFrameThickness, SlabThickness)
from ..io.pets import frame_selection, is_electron_wavelength, select_frames, with_wavelength
from ..io.writers import atomic_write_bytes
from ..physics.diffraction import COUPLINGS, BeamSettings, split_samples
from ..physics.geometry import ROCKING_AXES, UB_CONVENTIONS, fringe_sample_counts, rocking_axis_lab
from .model import ForwardModel, ModelSettings
from .objective import Figures
from .optimise import (AdamState, LMState, NormalEquations, adam_learning_rates, adam_step, covariance, lm_step,
                       normal_equations, strong_correlations)
from .problem import RefinementProblem


@dataclass(frozen=True)
class RefineSettings:
    """Every setting of ``blochflow refine`` (config-file keys are these names)."""

    # physics
    wavelength: float | None = None  # A; replaces the data file's value (None: the file's)
    # frames used, by the ids of the data's frame loop: "1-40,52", "1-99:10" (every 10th); "": all
    frames: str = ""
    n_samples: int = 32  # tilts per frame; the minimum when samples_per_fringe > 0
    # > 0: each frame gets at least this many samples per Pendelloesung fringe (1/t) swept by its
    # fastest scored reflection, for 1.5 x the start thickness (see fringe_sample_counts); 1.2 converges
    # the rocking integral (docs/physics.md); 0: exactly n_samples per frame
    samples_per_fringe: float = 1.2
    integration_check: bool = True  # re-evaluate the final model at twice the samples and report it
    sample_rule: str = "midpoint"  # tilts in a frame's wedge: midpoint | gauss | linspace (ends included)
    ub_convention: str = "pets"  # pets: g = U B h as written; diffbloch: g = U^-T B h (paper's synthetic data)
    g_max: float | None = None
    s_max: float = 0.02
    s_bethe: float = 0.0  # > s_max: beams out to this |s_g| folded in by Bethe perturbation (0: off)
    # beams coupled per tilt (sample), or per run of tilts with the rocking tails beyond s_max cut
    # (segments: the simulator of diffBloch); see BeamSettings
    coupling: str = "sample"
    n_segments: int = 12
    tilt_window: int = 1  # > 1: tapered tilt weights (diffBloch's mosaic smoothing uses 5)
    rocking_axis: str = "goniometer"  # goniometer | fixed (lab x, as diffBloch rocks)
    rsg: float = 0.66
    dsg: float = 0.0015
    absorption: str = "none"
    kappa: float = 0.05
    refine_absorption: bool = False
    instability: float = 0.01
    # experiment models
    thickness_model: str = "per-frame"  # global | per-frame | slab | learned
    thickness: float | str = "auto"
    thickness_grid: tuple = (100.0, 3000.0, 25.0)  # start, stop, step (A) for the 'auto' scan
    # per-frame model: after 5 LM iterations, at convergence, and every 5 iterations once the structure
    # has settled (frames_check_due), scan each frame's thickness over thickness_grid at the current
    # structure and move frames whose best grid value fits clearly better (another branch, with their
    # orientation corrections back to zero; see rescan_frame_thickness)
    thickness_rescan: bool = True
    # per-frame model with orientation corrections: with each rescan after the first, frames costing more
    # than twice the median frame per reflection are tried at zero correction and their best grid
    # thickness there (see restart_outlier_frames), and rocking frames off both neighbours about their
    # rotation axis by more than a fringe at the neighbours' mean (restart_axis_jumps)
    frame_restart: bool = True
    # per-frame model with orientation corrections: after the rescan at LM iteration 5, each frame's
    # correction about the lab axis normal to its rotation axis and its thickness are searched together
    # on a grid (see search_frame_tilt): in that tilt a thick frame's cost has minima a fringe apart
    tilt_search: bool = True
    # once, at LM's first convergence: the corrections about the rotation axis of every frame, searched as
    # one smooth path over the frames (search_axis_path; thick crystals with few reflections per frame,
    # docs/refinement.md "Thick crystals"); axis_step_sigma: the path's step prior, mrad per degree of
    # rotation between neighbouring frames
    axis_search: bool = False
    axis_step_sigma: float = 0.3
    thickness_points: int = 8  # points of a learned distribution per frame (mixture: its weighted points)
    thickness_knots: int = 8  # knots of a learned quantile function
    # a learned distribution's form: 'mixture' (thickness_points weighted points, positions and weights
    # learned) or 'quantile' (monotone quantile function, linear between thickness_knots knots, at
    # thickness_points levels)
    thickness_distribution: str = "mixture"
    thickness_bounds: tuple = (20.0, 5000.0)  # A, hard limits of a learned distribution
    thickness_smoothness: float = 1.0  # prior weight tying neighbouring frames' distributions
    thickness_basis: int = 6  # radial basis functions of the thickness network
    # learned model's start: 'scan' (the best global thickness, 5 % spread), or a fit of the
    # per-frame or slab model first (warm_start_iterations LM), the network then fitted to its path lengths
    learned_warm_start: str = "per-frame"
    warm_start_iterations: int = 6
    holdout_frames: float = 0.0  # fraction of frames left out of the fit and reported
    # tables {type: distance|same_distance|same_adp|rigid_bond|similar_adp, atoms, target (A), sigma}: crystal/restraints.py
    restraints: tuple = ()
    refine_thickness: bool = True
    refine_orientation: bool = True
    # > 0 (mrad): Gaussian prior of this width on each frame's two orientation corrections (0: none).
    # Unrestrained, the corrections over-fit: on the quartz example they lower R_obs 5.4 -> 4.0 % but
    # raise R_free 8.7 -> 13.1 %; with 2 mrad (~0.1 deg, the accuracy of PETS frame orientations)
    # R_obs 4.15 %, R_free 10.7 % (docs/refinement.md, "R_free and the frame parameters")
    orientation_sigma: float = 2.0
    # structure
    refine_xyz: bool = True
    refine_adp: bool = True
    adp: str = "keep"
    hydrogens: str = "riding"
    # riding hydrogens placed from the parent's neighbours with neutron X-H distances (idealised), or
    # kept at their starting offset from the parent (offset); see crystal/riding.py
    riding_geometry: str = "idealised"
    # one refined torsion per idealised rotor group (OH, CH3, NH3: SHELXL's AFIX 147/137) and three turns per
    # rigid group (water, NH4+), or the start's kept
    riding_torsions: bool = True
    riding_max_distance: float = 1.3  # A: an H farther than this from every non-H atom is an error
    refine_occupancy: bool = False
    # one occupancy per disorder group (_atom_site_disorder_group, SHELXL's PART with a free variable), the
    # groups of an assembly keeping their starting sum; atoms outside a group keep theirs unless refine_occupancy
    refine_disorder: bool = True
    # outputs: the difference map (report/difference_map.py: the objective's gradient in the potential,
    # its strongest peaks tried as hydrogens), difference_map.ccp4 and its peaks in summary.json
    difference_map: bool = True
    # objective
    free_fraction: float = 0.05
    free_seed: int = 0
    # optimiser. First-order (Adam) steps before LM: none by default. LM alone reaches the same
    # minimum faster from the quartz kinematical model (R_obs 4.00 % against 4.10 % after 20 Adam
    # steps), from the paper's quartz starts up to 0.29 A away (0.0002 A in 12 s against 20 s) and
    # from paracetamol start 02, 0.19 A (same minimum, 1097 s against 1126 s); docs/refinement.md
    adam_steps: int = 0
    adam_objective: str = "intensity"  # first-order phase on intensities wR2, or on amplitudes wR(F)
    # LM iterations on the amplitude objective wR(F) before the intensity objective: from far starts
    # (the paper's synthetic quartz 0.29 A, paracetamol 0.33 A) 3-4 save 3 of 15-19 iterations; from
    # the quartz kinematical model (close) 3 cost 2 iterations and end higher (wR2 8.67 % against
    # 8.60 %), so none by default; docs/refinement.md
    lm_amplitude_iterations: int = 0
    # solves of the first-order phase: single (complex64: 2x faster, gradient within 2e-5 of double)
    # or double; the covariance and every reported figure stay double
    adam_precision: str = "single"
    lr_xyz: float = 0.005  # A
    lr_adp: float = 0.002  # A^2
    lr_occupancy: float = 0.01
    lr_thickness: float = 0.02  # log thickness
    lr_network: float = 0.01  # thickness-network weights
    lr_surface: float = 0.01  # slab normal angles (rad)
    # mrad. 0: Adam leaves the orientation corrections at their start and LM refines them. Adam moves
    # every parameter ~lr per step whatever its gradient's size, so 20 steps at 0.3 walked a simulated
    # rutile's frames up to 6 mrad off (truth 0) into a false minimum (wR2 2.7 % against 1.1 %), and
    # P3_2 quartz to GoF 4.3 (1.08 with 0)
    lr_orientation: float = 0.0
    lr_absorption: float = 0.005
    # the most LM iterations: a safety net, as runs stop when they converge (the quartz example
    # converges in 16-17 from its two starts, the paper's synthetic quartz in 13-26 from its three,
    # paracetamol in 6-21, precession quartz from 0.16 A with LM alone in 35)
    lm_iterations: int = 50
    # solves of the LM trial points: single (complex64: 10 % less time per quartz refinement; the
    # cost a step is judged by then differs from double by ~1e-6 of itself, intensities by ~1e-5,
    # and the refined structure by < 0.1 s.u.) or double; the covariance and every reported
    # figure stay double
    lm_precision: str = "single"
    jacobian_precision: str = "single"  # derivatives for LM and the covariance; values stay double
    # chord steps: after a step whose reduction its linear model predicted within 25 % and which moved
    # no shared parameter by more than 3 s.u., the next LM iteration keeps the shared parameters'
    # Jacobian columns with the new residuals and differentiates only the frames' own parameters.
    # Paracetamol with free H (80 structure tangents), 5 frames: 442 s against 586 s, the same minimum;
    # quartz experimental and the paper's quartz: the same time and figures. "auto": on, except with a
    # learned thickness model, whose network columns are shared and nonlinear (4 synthetic cases: 0-2
    # of 8-36 Jacobians saved, one run 5 iterations longer; docs/refinement.md)
    lm_reuse_jacobian: bool | str = "auto"
    shift_tol: float = 0.01
    # R plateau: stop when wR2 fell by less than this fraction of itself in each of the last
    # plateau_iterations LM iterations (0: off; the shift criterion alone)
    plateau_tol: float = 1e-3
    plateau_iterations: int = 3
    checkpoint_every: int = 5

    def model_settings(self) -> ModelSettings:
        beams = BeamSettings(g_max=self.g_max, s_max=self.s_max, n_samples=self.n_samples, rsg=self.rsg,
                             dsg=self.dsg, sample_rule=self.sample_rule, ub_convention=self.ub_convention,
                             coupling=self.coupling, n_segments=self.n_segments, tilt_window=self.tilt_window,
                             rocking_axis=self.rocking_axis, s_bethe=self.s_bethe)
        return ModelSettings(beams=beams, absorption=self.absorption, kappa=self.kappa,
                             instability=self.instability)

    def chord_steps(self) -> bool:
        """Whether LM re-uses the shared parameters' Jacobian columns (``lm_reuse_jacobian``)."""
        if self.lm_reuse_jacobian == "auto":
            return self.thickness_model != "learned"
        return bool(self.lm_reuse_jacobian)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]


SETTING_CHOICES = {"sample_rule": ("midpoint", "gauss", "linspace"), "ub_convention": UB_CONVENTIONS,
                   "coupling": COUPLINGS, "rocking_axis": ROCKING_AXES,
                   "absorption": ("none", "proportional", "tds"), "thickness_model": ("global", "per-frame", "slab", "learned"),
                   "adp": ("keep", "iso", "aniso"), "hydrogens": ("riding", "free", "fixed"),
                   "riding_geometry": ("idealised", "offset"),
                   "adam_objective": ("amplitude", "intensity"), "jacobian_precision": ("single", "double"),
                   "adam_precision": ("single", "double"), "lm_precision": ("single", "double"),
                   "learned_warm_start": ("scan", "per-frame", "slab")}


def precision_dtype(precision: str) -> torch.dtype:
    """The real dtype of a ``*_precision`` setting ("single" or "double")."""
    return torch.float32 if precision == "single" else torch.float64


def parse_setting(item: str) -> tuple[str, object]:
    """'NAME=VALUE' with VALUE read as a TOML value where it is one (numbers, booleans, lists), else text."""
    from ..io import toml
    if "=" not in item:
        raise ValueError(f"{item}: expected NAME=VALUE")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), toml.loads(f"v = {raw}")["v"]
    except toml.TOMLDecodeError:
        return key.strip(), raw


def settings_from_mapping(values: dict, source: str) -> RefineSettings:
    """Validated settings from a mapping (config file or flags); raises ValueError naming the key."""
    fields = {f.name: f for f in dataclasses.fields(RefineSettings)}
    kw = {}
    for key, val in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            near = difflib.get_close_matches(name, list(fields), n=1)
            raise ValueError(f"{key}: unknown setting" + (f" (did you mean {near[0]}?)" if near else ""))
        numbers = val if isinstance(val, (list, tuple)) else [val]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"{key}: {val!r} is not a finite number")
        default = getattr(RefineSettings(), name)
        if name in SETTING_CHOICES and val not in SETTING_CHOICES[name]:
            raise ValueError(f"{key}: '{val}' is not one of {', '.join(SETTING_CHOICES[name])}")
        if isinstance(default, bool):
            if not isinstance(val, bool):
                raise ValueError(f"{key}: expected true or false, got {val!r}")
        elif isinstance(default, int) and not isinstance(default, bool):
            if not isinstance(val, int) or isinstance(val, bool):
                raise ValueError(f"{key}: expected an integer, got {val!r}")
        elif isinstance(default, float) or name in ("g_max", "wavelength"):
            if val is not None and (not isinstance(val, (int, float)) or isinstance(val, bool)):
                raise ValueError(f"{key}: expected a number, got {val!r}")
        elif name == "lm_reuse_jacobian" and not (val == "auto" or isinstance(val, bool)):
            raise ValueError(f"{key}: expected true, false or 'auto', got {val!r}")
        elif name == "thickness" and not (val == "auto" or isinstance(val, (int, float))):
            raise ValueError(f"{key}: expected a number or 'auto', got {val!r}")
        elif name == "frames":
            if isinstance(val, bool) or not isinstance(val, (str, int)):
                raise ValueError(f"{key}: expected frame ids and ranges such as '1-40,52', got {val!r}")
            val = str(val)
        elif name == "restraints":
            if not isinstance(val, (list, tuple)):
                raise ValueError(f"{key}: expected a list of tables")
            val = tuple(dict(v) if isinstance(v, dict) else v for v in val)
        elif isinstance(default, tuple):
            if (not isinstance(val, (list, tuple)) or len(val) != len(default)
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in val)):
                raise ValueError(f"{key}: expected {len(default)} numbers, got {val!r}")
            val = tuple(float(v) for v in val)
        kw[name] = val
    s = RefineSettings(**kw)
    if s.wavelength is not None and not is_electron_wavelength(s.wavelength):
        raise ValueError(f"wavelength: {s.wavelength} A is not an electron wavelength")
    if s.samples_per_fringe < 0:
        raise ValueError("samples_per_fringe: must be 0 (off) or positive")
    for name in ("n_samples", "n_segments", "tilt_window"):
        if getattr(s, name) < 1:
            raise ValueError(f"{name}: must be at least 1")
    if not 0 <= s.free_fraction < 0.5:
        raise ValueError("free_fraction: must be in [0, 0.5)")
    if not 0 <= s.holdout_frames < 0.5:
        raise ValueError("holdout_frames: must be in [0, 0.5)")
    if not 0 < s.thickness_bounds[0] < s.thickness_bounds[1]:
        raise ValueError("thickness_bounds: must be two numbers 0 < low < high")
    if s.thickness_points < 1 or s.thickness_knots < 1 or s.thickness_basis < 1:
        raise ValueError("thickness_points, thickness_knots, thickness_basis: must be at least 1")
    if s.orientation_sigma < 0:
        raise ValueError("orientation_sigma: must be 0 (off) or positive")
    if s.thickness_distribution not in LearnedThickness.DISTRIBUTIONS:
        raise ValueError(f"thickness_distribution: '{s.thickness_distribution}' is not one of "
                         f"{', '.join(LearnedThickness.DISTRIBUTIONS)}")
    if s.thickness_smoothness < 0:
        raise ValueError("thickness_smoothness: must not be negative")
    for name, (ok, need) in SETTING_RANGES.items():
        value = getattr(s, name)
        if value is not None and not ok(value):
            raise ValueError(f"{name}: {value!r} {need}")
    a, b, step = s.thickness_grid
    if not (0 < a < b and step > 0):
        raise ValueError("thickness_grid: must be start, stop, step (A) with 0 < start < stop and step > 0")
    return s


def _positive(x) -> bool:
    return x > 0


def _not_negative(x) -> bool:
    return x >= 0


# Numeric settings outside these ranges are errors, named as such (not failures far downstream).
SETTING_RANGES = {
    **{name: (_positive, "must be positive") for name in (
        "g_max", "s_max", "rsg", "kappa", "riding_max_distance", "shift_tol", "checkpoint_every",
        "plateau_iterations", "warm_start_iterations", "axis_step_sigma")},
    **{name: (_not_negative, "must not be negative") for name in (
        "s_bethe", "dsg", "instability", "adam_steps", "lm_iterations", "lm_amplitude_iterations", "plateau_tol",
        "lr_xyz", "lr_adp", "lr_occupancy", "lr_thickness", "lr_network", "lr_surface", "lr_orientation",
        "lr_absorption")},
    "thickness": (lambda x: x == "auto" or x > 0, "must be 'auto' or a positive number (A)"),
}


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
    start_figures: Figures | None = None
    integration: dict | None = None  # the final model at twice the samples (integration_check)


class Interrupted(Exception):
    """Raised inside the loop when SIGINT/SIGTERM arrives."""


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
    moved = _frames_moved(problem, theta, move, grid[best[move]])
    problem.follow_thickness(theta, moved)  # (the decompositions serve only when no correction was reset)
    return moved, len(move)


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
    the tilt over :func:`tilt_search_grid` (absolute, within the orientation prior's width) and at each
    tilt the thickness over ``thickness_grid`` (one thickness scan per tilt, every frame at once); the
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
    best_tilt, best_thickness = np.zeros(n_frames), np.zeros(n_frames)
    if not searched.any():
        return theta.clone(), np.zeros(0, int), tilts, searched
    for tilt in tilts:
        trial = theta.clone()
        trial[so.start:so.stop] = (along + float(tilt) * normal).reshape(-1)
        grid, table = _grid_costs(problem, trial, settings, frames=torch.as_tensor(searched))
        with torch.no_grad():
            cost = table.min(1) + problem.frame_prior_costs(trial).numpy()
        better = cost < best_cost
        best_cost[better], best_tilt[better] = cost[better], tilt
        best_thickness[better] = grid[table.argmin(1)[better]]
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
        if resume["fingerprint"] != settings.fingerprint() or resume["n_params"] != problem.n_params:
            raise ValueError("checkpoint was written with different settings or data")
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

    def save():
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {"fingerprint": settings.fingerprint(), "n_params": problem.n_params,
                                          "theta": theta, "adam_step": adam.step, "adam_m": adam.m,
                                          "adam_v": adam.v, "lm": _lm_to_dict(lm),
                                          "phase_times": json.dumps(phase_times),
                                          "decompositions_kept": problem.decompositions_kept_at(theta),
                                          "kept_single": problem.values_single_at(theta),
                                          "samples_per_frame": torch.as_tensor(problem.model.samples_per_frame())})

    interrupted = False
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        raise Interrupted()

    for s in previous:
        signal.signal(s, handler)
    ne: NormalEquations | None = None
    try:
        while adam.step < adam_steps and len(index):
            t0 = time.perf_counter()
            problem.forward_dtype = precision_dtype(settings.adam_precision)
            try:
                theta, loss = adam_step(problem, theta, adam, lr, adam_steps, objective=settings.adam_objective)
            finally:
                problem.forward_dtype = torch.float64
            phase_times["adam_s"] += time.perf_counter() - t0
            figure = "wR(F)" if settings.adam_objective == "amplitude" else "wR2"
            log(f"adam {adam.step:4d}/{adam_steps}  {figure}(work) {math.sqrt(loss):.4f}")
            if adam.step % settings.checkpoint_every == 0:
                save()
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
                    f"normal to the rotation axis, {tilts[1] - tilts[0]:.2g} mrad apart, +-{tilts[-1]:g} mrad; {took:.1f} s)")
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
            log(f"lm   {lm.iteration:4d}/{settings.lm_iterations}  {'wR(F)' if on_amplitudes else 'wR2(work)'} "
                f"{math.sqrt(lm.cost / problem.objective_norm('amplitude' if on_amplitudes else 'intensity')):.4f}"
                f"  max shift/su {lm.max_shift_su:.3g} ({lm.history[-1].get('max_shift_parameter', '') if lm.history else ''}),"
                f" structure {lm.history[-1].get('max_shift_su_structure', float('nan')) if lm.history else float('nan'):.3g}"
                f"  damping {lm.damping:.2g}"
                + (f"  frames on a partial step {lm.history[-1]['frames_partial_step']}"
                   if lm.history and lm.history[-1].get("frames_partial_step") else "")
                + ("  (Jacobian re-used)" if lm.history and lm.history[-1].get("jacobian_reused") else ""))
            if lm.iteration % settings.checkpoint_every == 0 or lm.converged:
                save()
        if undo_axis_search_if_worse():  # the run stopped before it converged again after the axis search
            ne = None  # the covariance is then taken at the point gone back to
    except (Interrupted, KeyboardInterrupt):
        interrupted = True
        save()
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
                            interrupted=interrupted, correlations=corr, start_figures=start_fig,
                            integration=integration)
