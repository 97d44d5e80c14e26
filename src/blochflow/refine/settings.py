"""The settings of a refinement (``blochflow refine``, config files, ``--set``): their defaults, the
checks of their values and types, and the parsing of NAME=VALUE items."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass

import torch

from ..experiment.frames import LearnedThickness
from ..io.pets import is_electron_wavelength
from ..physics.constants import MAX_THICKNESS
from ..physics.plan import COUPLINGS, BeamSettings
from ..physics.geometry import ROCKING_AXES, UB_CONVENTIONS
from .model import ModelSettings


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

    def as_json(self) -> str:
        """Every setting as JSON (sorted keys): what a checkpoint keeps to name the settings a resume changed."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.as_json().encode()).hexdigest()[:16]


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
    "free_seed": (lambda x: 0 <= x < 2 ** 63, "must be from 0 to 2^63 - 1"),
    "thickness": (lambda x: x == "auto" or 0 < x <= MAX_THICKNESS,
                  f"must be 'auto' or a thickness in A, above 0 and at most {MAX_THICKNESS:g} (10 um)"),
}
