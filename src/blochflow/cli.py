"""The ``blochflow`` command line: a thin shell over the library."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import example_path
from .io.errors import InputError
from .physics.bloch import cuda_eigh_backend, fast_cuda_eigh_available
from .physics.device import set_default_device

EXAMPLES = {"quartz": ("quartz_reference.cif", "quartz.cif_pets")}
# refine --example starts where a user starts: from the kinematical model, and runs to convergence.
# Tilt samples per frame: at least 24, more where the default 1.2 samples per Pendelloesung fringe need them.
# From a kinematical model quartz is already in the Gauss-Newton basin: Adam steps first gain
# nothing here (docs/refinement.md), so the example runs LM only. Beams: diffBloch's and Jana's sets
# (coupled within |s_g| < 0.01 1/A at a run of tilts' ends): 4x faster than the defaults, and on
# these data the same R values (docs/refinement.md).
REFINE_EXAMPLES = {"quartz": ("quartz_kinematical.cif", "quartz.cif_pets",
                              {"n_samples": 24, "adam_steps": 0, "lm_iterations": 30, "coupling": "segments",
                               "s_max": 0.01})}


# what each command writes in --out: a folder holding any of these is refused unless the user says
# --overwrite (or --resume, for refine's own run); the user's files of the same names are never replaced unasked
REFINE_OUTPUTS = ("summary.json", "refined.cif", "reflections.fcf", "frames.csv", "frame_model.json", "fo_fc.svg",
                  "thickness.svg", "difference_map.ccp4", "residual_potential.ccp4", "refine.log", "checkpoint.pt", "inverted")
SIMULATE_OUTPUTS = ("summary.json", "reflections.csv")


def _writable_place(path: Path, flag: str, folder: bool) -> None:
    """InputError unless ``path`` can be made: a folder (``folder``) or a file, whose nearest existing
    ancestor is a writable folder."""
    if path.exists():
        if folder and not path.is_dir():
            raise InputError(path, flag, "is a file, not a folder")
        if not folder and path.is_dir():
            raise InputError(path, flag, "is a folder, not a file")
    parent = path if folder and path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(parent, flag, "is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(parent, flag, "cannot write here (permission denied)")


def _output_folder(out: Path, names: tuple[str, ...], *, overwrite: bool, resume: bool = False) -> None:
    """InputError if ``out`` cannot be a folder, or already holds files of these names and the user did not
    ask to replace them (--overwrite) or to continue the run there (--resume)."""
    _writable_place(out, "--out", folder=True)
    present = [n for n in names if (out / n).exists()]
    if not present or overwrite or resume:
        return
    if "checkpoint.pt" in present:  # blochflow's own run, finished or interrupted
        why = ("holds an earlier refinement (checkpoint.pt); pass --resume to continue it, --overwrite to replace "
               "it, or another --out")
    else:
        why = (f"already holds {', '.join(present)}; pass --overwrite to replace {'it' if len(present) == 1 else 'them'}, "
               "or another --out")
    raise InputError(out, "--out", why)


def _example_paths(name: str) -> tuple[str, str]:
    if name not in EXAMPLES:
        raise InputError("--example", name, f"unknown example; choose from {', '.join(EXAMPLES)}")
    return tuple(example_path(name, f) for f in EXAMPLES[name])


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("physics")
    g.add_argument("--wavelength", type=float, default=None,
                   help="electron wavelength (A) in place of the data file's (for a header that states the wrong one)")
    g.add_argument("--g-max", type=float, default=None, help="beam cut-off |g| (1/A); default 0.4 beyond dstarmax or the largest reflection")
    g.add_argument("--s-max", type=float, default=0.02, help="excitation-error limit for beams (1/A)")
    g.add_argument("--samples", type=int, default=32,
                   help="tilt samples per frame (or precession azimuths); the minimum when --samples-per-fringe > 0")
    g.add_argument("--samples-per-fringe", type=float, default=1.2,
                   help="samples per Pendelloesung fringe of each frame's fastest reflection at its thickness "
                        "(default 1.2, which converges the rocking integral; 0: exactly --samples per frame)")
    g.add_argument("--sample-rule", choices=["midpoint", "gauss", "linspace"], default="midpoint",
                   help="tilts across a frame's wedge; linspace includes both ends (diffBloch's set)")
    g.add_argument("--ub-convention", choices=["pets", "diffbloch"], default="pets",
                   help="g = U B h with UB as written (pets), or U^-T B h as diffBloch (paper's synthetic data)")
    g.add_argument("--s-bethe", type=float, default=0.0,
                   help="> S_MAX: beams with S_MAX <= |s_g| < S_BETHE are folded in by Bethe perturbation (0: off)")
    g.add_argument("--coupling", choices=["sample", "segments"], default="sample",
                   help="beams per tilt (sample), or per run of tilts with the rocking tails beyond --s-max cut "
                        "(segments, as diffBloch simulates)")
    g.add_argument("--segments", type=int, default=12, help="runs of tilts per frame for --coupling segments")
    g.add_argument("--tilt-window", type=int, default=1,
                   help="> 1: tapered tilt weights of a moving average this wide (diffBloch's mosaic smoothing: 5)")
    g.add_argument("--rocking-axis", choices=["goniometer", "fixed"], default="goniometer",
                   help="tilts turn about the goniometer axis, or about the fixed lab x axis (diffBloch)")
    g.add_argument("--rsg", type=float, default=0.66, help="score reflections with |s_g|/dS_g < RSG")
    g.add_argument("--dsg", type=float, default=0.0015, help="... and dS_g - |s_g| > DSG (1/A)")
    g.add_argument("--absorption", choices=["none", "proportional", "tds"], default="none")
    g.add_argument("--kappa", type=float, default=0.05, help="U'_g = kappa U_g for --absorption proportional")
    g.add_argument("--absorption-method", choices=["exact", "perturbative"], default="exact")
    g.add_argument("--instability", type=float, default=0.01, help="u in w = 1/(sigma^2 + (u Io)^2)")


# refine setting -> simulate option (dest) for the physics a config file may set
_SIMULATE_FROM_SETTING = {"n_samples": "samples", "n_segments": "segments", "thickness": "thickness",
                          **{n: n for n in ("wavelength", "g_max", "s_max", "samples_per_fringe", "sample_rule",
                                            "ub_convention", "s_bethe", "coupling", "tilt_window", "rocking_axis",
                                            "rsg", "dsg", "absorption", "kappa", "absorption_method", "instability")}}


def _config_into_simulate(args) -> None:
    """The physics of a refine config file (--config) for simulate: each option left at its default
    takes the file's value; options given on the command line win; the optimiser's settings are
    checked (unknown names are errors) and otherwise ignored."""
    values = _read_config(args.config)
    _checked_settings(values, args.config)
    for name, dest in _SIMULATE_FROM_SETTING.items():
        if name in values and getattr(args, dest) == args.simulate_defaults[dest]:
            value = values[name]
            setattr(args, dest, str(value) if dest == "thickness" else value)


def _model_settings(args):
    from .physics.plan import BeamSettings
    from .refine.model import ModelSettings
    from .refine.settings import SETTING_RANGES
    for name in ("samples", "segments", "tilt_window"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}", str(getattr(args, name)), "must be at least 1")
    if args.samples_per_fringe < 0:
        raise InputError("--samples-per-fringe", str(args.samples_per_fringe), "must be 0 (off) or positive")
    for name in ("g_max", "s_max", "rsg", "kappa", "s_bethe", "dsg", "instability"):  # the ranges refine checks
        ok, need = SETTING_RANGES[name]
        if getattr(args, name) is not None and not ok(getattr(args, name)):
            raise InputError(f"--{name.replace('_', '-')}", str(getattr(args, name)), need)
    beams = BeamSettings(g_max=args.g_max, s_max=args.s_max, n_samples=args.samples, rsg=args.rsg, dsg=args.dsg,
                         sample_rule=args.sample_rule, ub_convention=args.ub_convention, coupling=args.coupling,
                         n_segments=args.segments, tilt_window=args.tilt_window, rocking_axis=args.rocking_axis,
                         s_bethe=args.s_bethe)
    return ModelSettings(beams=beams, absorption=args.absorption, kappa=args.kappa,
                         absorption_method=args.absorption_method, instability=args.instability)


def _override_wavelength(ds, wavelength):
    from .io.pets import with_wavelength
    try:
        return with_wavelength(ds, wavelength)
    except ValueError as exc:
        raise InputError("command line", "--wavelength", str(exc)) from None


def _load_datasets(structure: str, data: str | list[str], wavelength: float | None = None):
    """:func:`_load` for a refinement: one dataset, or several merged (io.pets.merge_datasets), each checked
    against the structure; ``wavelength`` (--wavelength) replaces every file's before they are merged."""
    if isinstance(data, str):
        return _load(structure, data, refining=True)
    import hashlib

    from .io.pets import merge_datasets, with_wavelength
    seen = {}
    for d in data:  # the same data twice would count every reflection twice and halve its s.u.
        try:
            digest = hashlib.sha256(Path(d).read_bytes()).hexdigest()
        except OSError:
            continue  # the reader names what is wrong with the path
        if digest in seen:
            raise InputError(d, "dataset", f"the same data as {seen[digest]}, given twice: every reflection would "
                             "count twice")
        seen[digest] = d
    loaded = [(c, with_wavelength(d, wavelength)) for c, d in (_load(structure, d, refining=True) for d in data)]
    try:
        ds = merge_datasets([d for _, d in loaded])
    except ValueError as exc:
        path, _, why = str(exc).partition(": ")
        raise InputError(path, "dataset", why) from None
    base = ds.extra.get("frame_id_offset", 0)
    print(f"datasets: {len(data)} merged, {len(ds.frames)} frames, {len(ds.reflections.frame_id)} reflections"
          + (f"; their frame ids collide, so dataset k's frame n is (k - 1) x {base} + n (k from 1, in the order given; frames.csv gives "
             f"each frame's dataset and id there)" if base else ""))
    return loaded[0][0], ds


def _selected_frames(ds, spec: str, data):
    """The dataset restricted to the frames ``spec`` names (see io.pets.frame_selection), or a one-line
    InputError naming the data file."""
    from .io.pets import frame_selection, select_frames
    try:
        chosen = select_frames(ds, frame_selection(ds.frames.ids, spec))
    except ValueError as exc:
        raise InputError(data, "frames", str(exc)) from None
    if not len(chosen.reflections.frame_id):
        raise InputError(data, f"frames '{spec}'", "no row of the reflection loop belongs to these frames")
    return chosen


def _load(structure: str, data: str, *, refining: bool = False):
    """Structure and dataset, checked against each other. Cells: an error beyond 5 % (lengths) or 3 deg
    (angles), a warning beyond 1 % or 0.5 deg. U_ij that are not positive definite get a warning; a
    refinement starts such an atom from the isotropic U of its U_eq."""
    from .crystal.structure import crystal_from_record
    from .io.pets import read_pets
    from .io.structure_cif import non_positive_definite, read_structure
    rec = read_structure(structure)
    for note in rec.notes:
        print(f"warning: {structure}: {note}")
    ds = read_pets(data)
    for i, name in enumerate(("a", "b", "c", "alpha", "beta", "gamma")):
        c, p = rec.cell[i], ds.cell[i]
        length = i < 3
        item = f"_cell_{'length' if length else 'angle'}_{name}"
        off = 100 * abs(c - p) / abs(p) if length else abs(c - p)  # % or deg
        limit, note, unit = (5.0, 1.0, "%") if length else (3.0, 0.5, "deg")
        if off > limit:
            raise InputError(structure, item, f"{c} differs from {p} in {data} by more than {limit:g} {unit}: the "
                             f"structure and the data are not of one crystal (or one file's cell is mistyped)")
        if off > note:
            print(f"warning: {structure}: {item} {c} differs from {p} in {data} by {off:.2g} {unit}; "
                  f"the data file's UB matrix sets the geometry, the structure's cell the scattering factors")
    try:
        crystal = crystal_from_record(rec)
    except ValueError as exc:
        raise InputError(structure, "atoms", str(exc)) from None
    from .physics.scattering import atomic_number
    for a in rec.atoms:
        try:
            atomic_number(a.element)
        except ValueError:
            raise InputError(structure, f"atom '{a.label}'", f"element {a.element} has no electron scattering "
                                                             f"factors (the table covers Z = 1-103)") from None
    bad = non_positive_definite(rec)
    if bad and not refining:
        print(f"warning: {structure}: U_ij of {', '.join(bad)} are not positive definite (their Debye-Waller "
              f"factors grow along one direction); simulated as given")
    elif bad:
        from .crystal import cell as cellmod
        asu = crystal.asu
        for label in bad:
            i = asu.labels.index(label)
            u_eq = max(cellmod.u_equivalent(asu.u_frac[i].numpy(), crystal.cell), 0.005)
            asu.u_frac[i] = torch.as_tensor(cellmod.u_iso_to_frac(u_eq, crystal.cell))
        print(f"warning: {structure}: U_ij of {', '.join(bad)} are not positive definite; the refinement "
              f"starts them from the isotropic U of their U_eq")
    return crystal, ds


def _thickness_sources(args) -> None:
    """InputError when simulate is given two thickness models (a value, a profile, an expression, a frame
    model: one would be ignored silently) or a negative spread."""
    given = [flag for flag, on in (("--thickness", args.thickness not in ("auto", None)),
                                   ("--thickness-profile", bool(args.thickness_profile)),
                                   ("--thickness-expr", bool(args.thickness_expr)),
                                   ("--frame-model", bool(args.frame_model))) if on]
    if len(given) > 1:
        raise InputError(given[1], "thickness", f"give one of {', '.join(given)}: each sets every frame's thickness")
    if args.thickness_spread < 0:
        raise InputError("--thickness-spread", str(args.thickness_spread), "must not be negative")
    if args.thickness_spread and args.frame_model:
        raise InputError("--thickness-spread", str(args.thickness_spread), "--frame-model sets the spread itself")


def _thickness_spec(args, ds):
    from .simulate import ThicknessSpec, evaluate_profile
    n = len(ds.frames)
    spread = None
    if args.thickness_profile:
        path = args.thickness_profile
        try:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        except OSError as exc:
            raise InputError(path, "file", f"cannot read ({exc.strerror})") from None
        by_id: dict[int, list] = {}
        weighted = bool(rows) and "weight" in rows[0]
        for i, r in enumerate(rows):
            try:
                fid, t = int(r["frame"]), float(r["thickness"])
                extra = float(r.get("weight") or 0.0) if weighted else float(r.get("spread") or 0.0)
            except (KeyError, ValueError, TypeError):
                raise InputError(path, f"row {i + 2}", "needs numeric columns frame, thickness[, spread | weight]") from None
            if t <= 0 or extra < 0:
                raise InputError(path, f"row {i + 2}", "thickness must be positive and spread/weight not negative")
            if not weighted and fid in by_id:
                raise InputError(path, f"row {i + 2}", f"frame {fid} repeated without a weight column")
            by_id.setdefault(fid, []).append((t, extra))
        missing = [int(f) for f in ds.frames.ids if int(f) not in by_id]
        if missing:
            raise InputError(path, "frame", f"no thickness for frame id {missing[0]}")
        if weighted:
            if args.thickness_spread:
                raise InputError(path, "weight", "a weighted profile is each frame's distribution; leave out "
                                                 "--thickness-spread")
            q = max(len(by_id[int(f)]) for f in ds.frames.ids)
            pts = np.array([[p[0] for p in by_id[int(f)]] + [by_id[int(f)][0][0]] * (q - len(by_id[int(f)]))
                            for f in ds.frames.ids])
            wts = np.array([[p[1] for p in by_id[int(f)]] + [0.0] * (q - len(by_id[int(f)])) for f in ds.frames.ids])
            if np.any(wts.sum(1) <= 0):
                raise InputError(path, "weight", "every frame needs a positive total weight")
            return ThicknessSpec.from_points(pts, wts)
        mean = np.array([by_id[int(f)][0][0] for f in ds.frames.ids])
        if rows and "spread" in rows[0]:
            if args.thickness_spread:
                raise InputError(path, "spread", "the profile gives each frame's spread; leave out --thickness-spread")
            spread = np.array([by_id[int(f)][0][1] for f in ds.frames.ids])
    elif args.thickness_expr:
        mean = evaluate_profile(args.thickness_expr, ds.frames)
    else:
        mean = np.full(n, float(args.thickness))
    if args.thickness_spread:
        spread = np.full(n, float(args.thickness_spread)) if spread is None else spread
    from .physics.constants import MAX_THICKNESS
    if np.any(mean <= 0):
        raise InputError("--thickness", str(mean.min()), "thickness must be positive")
    if np.any(mean > MAX_THICKNESS):
        raise InputError("--thickness", f"{mean.max():g}", f"thickness above {MAX_THICKNESS:g} A (10 um): not a "
                         "crystal electrons cross; a unit mistake (nm or um for A)?")
    return ThicknessSpec(mean=mean, spread=spread)


def _frame_model_spec(path: str, ds):
    import torch

    from .experiment.frames import FrameContext, frame_model_from_record
    from .simulate import FrameModelSpec
    try:
        with open(path) as fh:
            record = json.load(fh)
    except OSError as exc:
        raise InputError(path, "file", f"cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"line {exc.lineno}", "not valid JSON") from None
    if not isinstance(record, dict) or record.get("format") != "blochflow-frame-model-1":
        raise InputError(path, "format", "not a frame_model.json written by 'blochflow refine'")
    ids, angles = record.get("frame_ids"), record.get("alpha_deg")
    if isinstance(ids, list) and isinstance(angles, list) and len(ids) == len(angles):
        saved = {int(i): float(a) for i, a in zip(ids, angles) if isinstance(a, (int, float))}
        off = [(int(f), saved[int(f)], float(a)) for f, a in zip(ds.frames.ids, ds.frames.alpha_deg)
               if int(f) in saved and abs(saved[int(f)] - float(a)) > 0.01]
        if off:
            f, a_saved, a_now = off[0]
            print(f"warning: {path}: refined on other data? frame {f} was at alpha {a_saved:g} deg there and is at "
                  f"{a_now:g} deg here ({len(off)} frames differ)")
    if record.get("ub") is not None:  # (files from before session 37 have none)
        try:
            saved_ub = np.asarray(record["ub"], dtype=float).reshape(3, 3)
        except (ValueError, TypeError):
            raise InputError(path, "ub", "not a 3 x 3 matrix of numbers") from None
        if not np.allclose(saved_ub, ds.ub, rtol=0, atol=1e-6 * np.max(np.abs(ds.ub))):
            print(f"warning: {path}: refined on other data? its UB matrix differs from this file's (another crystal "
                  f"or another orientation): its per-frame thickness and orientation values belong to that one")
    try:
        frames, raw = frame_model_from_record(record, FrameContext.from_dataset(ds), ds.frames.ids)
        with torch.no_grad():
            state = frames.state(raw)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise InputError(path, "thickness_model", str(exc)) from None
    return FrameModelSpec(state)


def _check_inputs(args, command: str) -> None:
    """One-line errors for input files given in a way the command cannot mean: files beside --example,
    none without it, the data before the structure, an empty --frames."""
    data = args.data if isinstance(args.data, list) else ([args.data] if args.data else [])
    if args.example and (args.structure or data):
        raise InputError("command line", "--example", f"brings its own structure and data; leave out "
                         f"{' '.join([args.structure or '', *data]).strip()} or drop --example")
    if not args.example and (not args.structure or not data):
        raise InputError("command line", command, "needs STRUCTURE.cif and DATA.cif_pets (or --example)")
    if not args.example and str(args.structure).lower().endswith(".cif_pets") and not any(
            str(d).lower().endswith(".cif_pets") for d in data):
        raise InputError("command line", command, f"{args.structure} looks like the data and {data[0]} like the "
                         "structure: give STRUCTURE.cif first, then DATA.cif_pets")
    if getattr(args, "frames", None) is not None and not args.frames.strip():
        raise InputError("--frames", repr(args.frames), "is empty: name frame ids, e.g. '1-40,52' or '1-99:10'")


def cmd_simulate(args) -> int:
    import torch

    from .io.writers import atomic_write_text, format_pets, write_csv, write_json
    from .simulate import synthesize
    from .refine.model import ForwardModel

    _check_inputs(args, "simulate")
    if args.example:
        structure, data = _example_paths(args.example)
    else:
        structure, data = args.structure, args.data
    t_start = time.perf_counter()
    if args.config:
        _config_into_simulate(args)
    _thickness_sources(args)
    crystal, ds = _load(structure, data)
    ds = _override_wavelength(ds, args.wavelength)
    if args.frames:
        ds = _selected_frames(ds, args.frames, data)
    settings = _model_settings(args)
    out = Path(args.out)
    if args.write_pets:
        target = Path(args.write_pets)  # as given, relative to the working directory like any path argument
        from .io.pets import MAX_INTENSITY
        if not 0 < args.max_counts <= MAX_INTENSITY:
            raise InputError("--max-counts", str(args.max_counts), f"must be positive and at most {MAX_INTENSITY:g} "
                             "(counts of the strongest reflection; the reader refuses larger intensities)")
        _writable_place(target, "--write-pets", folder=False)
        if target.exists() and target.resolve() == Path(data).resolve():
            raise InputError(target, "--write-pets", "is the input data file; write the synthetic data elsewhere")
        if target.exists() and not args.overwrite:
            raise InputError(target, "--write-pets", "exists already; choose another name or pass --overwrite")
        if args.thickness == "auto" and not (args.thickness_profile or args.thickness_expr or args.frame_model):
            raise InputError("--thickness", "auto", "--write-pets needs a thickness (value, profile, expression "
                                                    "or --frame-model)")
        spec = _frame_model_spec(args.frame_model, ds) if args.frame_model else _thickness_spec(args, ds)
        rows, i_obs, sigma = synthesize(crystal, ds, spec, settings, noise=args.noise,
                                        max_counts=args.max_counts, seed=args.seed,
                                        samples_per_fringe=args.samples_per_fringe)
        refl = ds.reflections
        atoms = [(a_l, a_e, tuple(x), float(o)) for a_l, a_e, x, o in
                 zip(crystal.asu.labels, crystal.asu.elements, crystal.asu.xyz.tolist(), crystal.asu.occupancy.tolist())]
        comments = [f"synthetic data made by blochflow simulate from {structure} on the geometry of {data}",
                    f"noise {args.noise}, max counts {args.max_counts}, seed {args.seed}",
                    "thickness per frame (A): " + " ".join(f"{t:.1f}" for t in spec.mean)]
        if spec.spread is not None:
            comments.append("thickness spread per frame (A): " + " ".join(f"{t:.1f}" for t in spec.spread))
        text = format_pets(ds, refl.hkl[rows], i_obs, sigma, refl.frame_id[rows], comments, atoms)
        atomic_write_text(target, text, overwrite=True)
        print(f"wrote {len(rows)} reflections on {len(ds.frames)} frames to {target}")
        return 0

    _output_folder(out, SIMULATE_OUTPUTS, overwrite=args.overwrite)
    model = ForwardModel(crystal, ds, settings)
    if args.frame_model:
        scan = None
        spec = _frame_model_spec(args.frame_model, ds)
    elif args.thickness == "auto" and not (args.thickness_profile or args.thickness_expr):
        best, scan = model.best_thickness()
        # the scan's samples may be too few for the thickness it finds (which then comes out too thin):
        # size them for 1.5 x that thickness and scan again
        if model.fit_samples_to_fringes(1.5 * best, args.samples_per_fringe):
            best, scan = model.best_thickness()
        spec = _thickness_spec(argparse.Namespace(**{**vars(args), "thickness": best}), ds)
    else:
        scan = None
        spec = _thickness_spec(args, ds)
    state = spec.frame_state(ds)
    model.fit_samples_to_fringes(state.thickness.detach().amax(-1).numpy(), args.samples_per_fringe)
    counts = model.samples_per_frame()
    with torch.no_grad():
        ic = model.intensities(state)
    fig = model.figures(ic)
    from .refine.objective import frame_scales, klar_weights
    k = frame_scales(model.io, ic, klar_weights(model.io, model.sigma, settings.instability), model.frame, model.n_frames)
    summary = {**fig.as_dict(), "n_beams_mean": model.n_beams_mean(),
               "samples_per_frame": {"min": int(counts.min()), "max": int(counts.max()), "mean": float(counts.mean())},
               "elapsed_s": time.perf_counter() - t_start, "device": str(model.device),
               "thickness": float(spec.mean.mean()) if spec.is_constant else spec.mean.tolist(),
               "structure": structure, "data": data,
               "settings": {**dataclasses.asdict(settings), "g_max_used": model.plan.g_max}}
    if scan is not None:
        summary["thickness_scan"] = scan
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    rows = model.plan.scored.row
    refl = ds.reflections
    kic = (k[model.frame] * ic).numpy()
    write_csv(out / "reflections.csv", ["frame", "h", "k", "l", "Io", "sigma", "Ic_scaled"],
              ([int(refl.frame_id[r]), *map(int, refl.hkl[r]), float(refl.intensity[r]), float(refl.sigma[r]),
                float(kic[j])] for j, r in enumerate(rows)))
    print(f"R_obs {fig.R_obs:.4f}  wR2 {fig.wR2:.4f}  GoF {fig.GoF:.3f}  "
          f"R_obs(frame mean) {fig.R_obs_frame_mean:.4f}  wR2(frame mean) {fig.wR2_frame_mean:.4f}  "
          f"n_obs {fig.n_obs}/{fig.n_all}  thickness {summary['thickness'] if scan is None else f'{best:.0f} A (best)'}")
    if fig.n_obs == 0:
        print("warning: no reflection of these frames is observed (I > 3 sigma), so R_obs is undefined")
    print(f"wrote {out / 'summary.json'} and {out / 'reflections.csv'} in {summary['elapsed_s']:.1f} s")
    return 0


def _read_config(path: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # (a byte-order mark from Windows editors)
    except OSError as exc:
        raise InputError(path, "file", f"cannot read ({exc.strerror})") from None
    if path.endswith(".json"):
        import json
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"line {exc.lineno}", f"not valid JSON ({exc.msg})") from None
    else:
        from .io import toml
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as exc:
            raise InputError(path, "file", f"not valid TOML ({exc})") from None
    data = data.get("refine", data)
    if not isinstance(data, dict):
        raise InputError(path, "file", "expected key = value settings")
    return data


_REFINE_FLAGS = {  # flag dest -> setting name
    "samples": "n_samples", "samples_per_fringe": "samples_per_fringe", "thickness_model": "thickness_model", "thickness": "thickness",
    "adam_steps": "adam_steps", "lm_iterations": "lm_iterations", "adp": "adp", "hydrogens": "hydrogens",
    "free_fraction": "free_fraction", "absorption": "absorption", "checkpoint_every": "checkpoint_every",
    "wavelength": "wavelength", "g_max": "g_max", "s_max": "s_max", "sample_rule": "sample_rule", "ub_convention": "ub_convention",
    "coupling": "coupling", "tilt_window": "tilt_window", "rocking_axis": "rocking_axis", "s_bethe": "s_bethe",
    "thickness_points": "thickness_points", "thickness_distribution": "thickness_distribution",
    "holdout_frames": "holdout_frames", "frames": "frames",
    "orientation_sigma": "orientation_sigma",
}


def _refine_settings(args, base: dict | None = None):
    """RefineSettings from the example's settings, the config file, the flags and --set (each overriding
    the one before); an error names where the offending setting came from."""
    from .refine.settings import parse_setting
    values = dict(base or {})
    origin = dict.fromkeys(values, f"--example {args.example}" if getattr(args, "example", None) else "command line")
    if args.config:
        config = {k.replace("-", "_"): v for k, v in _read_config(args.config).items()}  # lm-iterations as a flag
        values.update(config)
        origin.update(dict.fromkeys(config, args.config))
    for dest, name in _REFINE_FLAGS.items():
        v = getattr(args, dest, None)
        if v is not None:
            values[name], origin[name] = v, f"--{dest.replace('_', '-')}"
    if args.no_orientation:
        values["refine_orientation"], origin["refine_orientation"] = False, "--no-orientation"
    if args.refine_occupancy:
        values["refine_occupancy"], origin["refine_occupancy"] = True, "--refine-occupancy"
    for item in args.set or []:
        if "=" not in item:
            raise InputError("--set", item, "expected NAME=VALUE")
        key, value = parse_setting(item)
        key = key.replace("-", "_")
        values[key], origin[key] = value, "--set"
    if isinstance(values.get("thickness"), str) and values["thickness"] != "auto":
        try:
            values["thickness"] = float(values["thickness"])
        except ValueError:
            raise InputError(origin["thickness"], "thickness", f"'{values['thickness']}' is not a number or 'auto'") from None
    args.setting_origin = origin  # where each setting came from, for errors found later (build_problem)
    return _checked_settings(values, args.config or "command line", origin)


def _problem_error(args, structure, exc: ValueError) -> InputError:
    """A one-line error for a ValueError of build_problem: named after the setting it is about and where
    that was set (config file, flag, --set), else after the structure (atoms, hydrogens)."""
    item, _, why = str(exc).partition(": ")
    name = item.split("[")[0].split(".")[0].strip()
    source = getattr(args, "setting_origin", {}).get(name)
    return InputError(source or structure, item, why or item)


def _checked_settings(values: dict, source: str, origin: dict | None = None):
    """RefineSettings from ``values``, or a one-line InputError naming the setting and where it came
    from: ``origin[name]`` (a file, a flag, --set), else ``source``."""
    from .refine.settings import settings_from_mapping
    try:
        return settings_from_mapping(values, source)
    except (ValueError, TypeError) as exc:
        item, why = str(exc).split(":")[0], str(exc).split(":", 1)[-1].strip()
        named = [origin[n] for n in item.split(", ") if n in (origin or {})]
        raise InputError(named[0] if named else source, item, why) from None


def determinacy_warning(n_all: int, n_params: int) -> str | None:
    """The warning for a fit with fewer than 3 work reflections per refined parameter (None otherwise):
    not determined at all below one, its GoF and s.u. unreliable below three (e.g. 306 reflections for
    289 parameters leave the GoF 17 degrees of freedom)."""
    advice = "refine fewer frame parameters (--thickness-model global, --no-orientation) or use more frames"
    if n_params >= n_all:
        return (f"warning: {n_params} refined parameters for {n_all} work reflections: the fit is not determined "
                f"and its GoF and s.u. mean nothing; {advice}")
    if n_all < 3 * n_params:
        return (f"warning: {n_all} work reflections for {n_params} refined parameters (ratio {n_all / n_params:.1f}): "
                f"the fit is barely determined, and its GoF (over {n_all - n_params} degrees of freedom) and s.u. "
                f"are unreliable; {advice}")
    return None


def cmd_refine(args) -> int:
    from .refine.run import load_checkpoint
    from .report.progress import ProgressLog

    example_settings = {}
    _check_inputs(args, "refine")
    if args.example:
        if args.example not in REFINE_EXAMPLES:
            raise InputError("--example", args.example, f"unknown example; choose from {', '.join(REFINE_EXAMPLES)}")
        cif, pets, example_settings = REFINE_EXAMPLES[args.example]
        structure, data = example_path(args.example, cif), example_path(args.example, pets)
    else:
        structure, data = args.structure, (args.data[0] if len(args.data) == 1 else list(args.data))
    settings = _refine_settings(args, example_settings)
    if getattr(args, "dry_run", False):
        crystal, ds = _load_datasets(structure, data, settings.wavelength)
        if settings.frames:
            _selected_frames(ds, settings.frames, ds.path)
        return _dry_run(args, crystal, ds, structure, settings)
    out = Path(args.out)
    checkpoint = out / "checkpoint.pt"
    _output_folder(out, REFINE_OUTPUTS, overwrite=args.overwrite, resume=args.resume)
    resume = None
    if args.resume:
        if not checkpoint.exists():
            raise InputError(checkpoint, "--resume", "no checkpoint to resume from")
        try:
            resume = load_checkpoint(checkpoint)
        except Exception as exc:  # a truncated or foreign file
            raise InputError(checkpoint, "--resume", f"unreadable checkpoint ({type(exc).__name__})") from None
    crystal, ds = _load_datasets(structure, data, settings.wavelength)
    if args.enantiomer and crystal.symmetry.inversion_centre() is not None:
        raise InputError(structure, "--enantiomer", "the space group is centrosymmetric: the inverted model is the "
                                                     "same structure, so the data have no hand to choose")
    if settings.frames:
        _selected_frames(ds, settings.frames, ds.path)  # checked here; build_problem selects them
    started = time.time()
    log = ProgressLog(out / "refine.log", append=args.resume)
    try:
        code = _refine_hands(args, crystal, ds, structure, data, settings, out, checkpoint, resume, log)
        if args.overwrite:
            removed = _remove_stale_outputs(out, started, keep_inverted=args.enantiomer)
            if removed:
                log(f"removed the earlier run's {', '.join(removed)} (--overwrite; this run wrote none)")
        return code
    finally:
        log.close()


def _remove_stale_outputs(out: Path, started: float, keep_inverted: bool) -> list[str]:
    """After an --overwrite run: blochflow's own outputs in ``out`` that the earlier run wrote and this one
    did not (a difference map, the inverted hand's folder), which would otherwise sit beside the new
    model as if they were its own. Only the names of REFINE_OUTPUTS; anything else stays. Returns them."""
    removed = []
    for name in REFINE_OUTPUTS:
        path = out / name
        if name == "inverted":
            if keep_inverted or not path.is_dir():
                continue
            ours = [path / inner for inner in REFINE_OUTPUTS if (path / inner).is_file()]
            for inner in ours:
                inner.unlink()
            if not any(path.iterdir()):
                path.rmdir()
            if ours:
                removed.append(name + "/")
        elif path.is_file() and path.stat().st_mtime < started - 1.0:
            path.unlink()
            removed.append(name)
    return removed


def _dry_run(args, crystal, ds, structure, settings) -> int:
    """--dry-run: what the refinement would cost (refine.cost.estimate_cost), logged; nothing is written."""
    from .refine.cost import estimate_cost
    from .report.progress import ProgressLog

    log = ProgressLog(None)
    try:
        estimate = estimate_cost(crystal, ds, settings, log)
    except ValueError as exc:  # restraints naming unknown atoms, hydrogens without a parent, ...
        raise _problem_error(args, structure, exc) from None
    log(_size_line("model", estimate.problem))
    log(estimate.summary(hands=2 if args.enantiomer else 1))
    return 0


def _size_line(name: str, problem) -> str:
    """'model: 311 parameters, 1829 work / 107 free reflections on 99 frames, 38 beams per solve'."""
    return (f"{name}: {problem.n_params} parameters, {int(problem.work.sum())} work / {int(problem.free.sum())} free "
            f"reflections on {problem.model.n_frames} frames, {problem.model.n_beams_mean():.0f} beams per solve")


def _refine_hands(args, crystal, ds, structure, data, settings, out, checkpoint, resume, log) -> int:
    """The refinement of the model (and with --enantiomer the inverted one), its outputs and summary lines."""
    from .crystal.structure import inverted
    from .refine.run import ResumeError, build_problem, refine
    from .report.outputs import MIN_FREE_GROUPS, write_outputs

    hands = [("model", crystal)] + ([("inverted", inverted(crystal))] if args.enantiomer else [])
    results = []
    for name, cr in hands:
        sub = out if name == "model" else out / "inverted"
        try:
            problem = build_problem(cr, ds, settings, log=log)
        except ValueError as exc:  # restraints naming unknown atoms, hydrogens without a parent, ...
            raise _problem_error(args, structure, exc) from None
        log(_size_line(name, problem))
        try:
            res = refine(problem, settings, checkpoint=sub / "checkpoint.pt",
                         resume=resume if name == "model" else None, log=log)
        except ResumeError as exc:
            raise InputError(checkpoint, "--resume", str(exc)) from None
        results.append((name, sub, res))
        if res.interrupted:
            break
    extra = {}
    if args.enantiomer and len(results) == 2:
        (_, _, ra), (_, _, rb) = results
        from .refine.objective import data_chi2
        ca, cb = data_chi2(ra.figures, len(ra.refined_index)), data_chi2(rb.figures, len(rb.refined_index))
        delta, p_model = hand_preference(ca, cb, max(ra.figures.n_all - len(ra.refined_index), 1))
        extra["enantiomer"] = {"chosen": "model" if ca <= cb else "inverted",
                               "chosen_cif": str(results[0 if ca <= cb else 1][1] / "refined.cif"),
                               "wR2_model": ra.figures.wR2, "wR2_inverted": rb.figures.wR2,
                               "R_obs_model": ra.figures.R_obs, "R_obs_inverted": rb.figures.R_obs,
                               "delta_chi2_scaled": delta, "probability_model_hand": p_model}
    code = 0
    for name, sub, res in results:
        summ = write_outputs(res, sub, structure_path=structure, data_path=data, settings=settings,
                             extra={**extra, "hand": name} if extra else extra)
        f = res.figures
        has_free = summ["R_free"] is not None and bool(np.isfinite(summ["R_free"]))
        free = f"  R_free {summ['R_free']:.4f}" if has_free else ""
        log(f"{name}: R_obs {f.R_obs:.4f}  wR2 {f.wR2:.4f}  GoF {f.GoF:.3f}  R_obs(frame mean) "
              f"{f.R_obs_frame_mean:.4f}{free}  {'converged' if summ['converged'] else 'NOT converged'} "
              f"({summ['convergence'] or 'iteration limit'})  {res.elapsed_s:.1f} s -> {sub}")
        for d in summ["datasets"]:
            log(f"  dataset {d['dataset']} ({d['path']}, {d['n_frames']} frames): R_obs {d['R_obs']:.4f}  "
                f"wR2 {d['wR2']:.4f}  {d['n_all']} work reflections")
        for note in (disorder_line(summ["disorder"]), *rigid_bond_lines(summ["rigid_bond_test"]),
                     residual_potential_line(summ["residual_potential"]),
                     *difference_map_lines(summ["difference_map"]),
                     axis_search_note(summ["axis_jumps"], settings),
                     determinacy_warning(summ["n_all"], summ["n_params"]),
                     thickness_note(summ["frames"]), zero_scale_warning(summ["frames"]),
                     adp_bound_warning(summ["adp_at_bound"]),
                     undetermined_warning(summ["undetermined"])):
            if note:
                log(note)
        if not has_free and settings.free_fraction > 0:
            log("warning: no observed free reflection (Io > 3 sigma): R_free is not available")
        if 0 < summ["n_free_groups"] < MIN_FREE_GROUPS:
            log(f"warning: R_free rests on {summ['n_free_groups']} unique reflections ({summ['n_free_obs']} observed "
                  f"in all frames): too few to judge over-fitting; raise --free-fraction for a firmer figure")
        if res.interrupted:
            code = 128 + (res.interrupt_signal or 2)  # as a shell reports a process stopped by the signal
    if "enantiomer" in extra:
        e = extra["enantiomer"]
        log(f"absolute structure: the data prefer the {e['chosen']} hand (wR2 {e['wR2_model']:.4f} vs "
              f"{e['wR2_inverted']:.4f}; scaled chi2 difference {e['delta_chi2_scaled']:.1f}, "
              f"P(model hand) = {e['probability_model_hand']:.4f}); its model: {e['chosen_cif']}")
    return code


def hand_preference(chi2_model: float, chi2_inverted: float, dof: int) -> tuple[float, float]:
    """The chi^2 difference of the two hands in units of the preferred hand's fit variance (GoF^2),
    and P(model hand) = 1 / (1 + exp(-delta / 2)); swapping the hands negates delta, whichever the start."""
    gof2 = max(min(chi2_model, chi2_inverted) / dof, 1e-300)
    delta = (chi2_inverted - chi2_model) / gof2
    return delta, float(1 / (1 + np.exp(-max(min(delta / 2, 700), -700))))


# the share of neighbouring frames whose corrections about the rotation axis jump beyond 3 s.u. above which
# the axis search is suggested: 0.62 on the known-truth thick ZnO (errors 42 s.u.), at most 0.05 on
# error-free or well-fitted runs (quartz synthetic and experimental, ilmenite)
AXIS_JUMP_SHARE = 0.25


def axis_search_note(jumps: dict | None, settings) -> str | None:
    """A note suggesting the axis search where the refined corrections about the rotation axis jump between
    neighbouring frames far beyond their s.u. (frames in different minima), or None."""
    if not jumps or settings.axis_search or jumps["jumps"] <= AXIS_JUMP_SHARE * jumps["pairs"]:
        return None
    return (f"note: the corrections about the rotation axis jump between neighbouring frames by more than 3 s.u. "
            f"in {jumps['jumps']} of {jumps['pairs']} pairs: frames may sit in different minima of a thick crystal's "
            f"tilt landscape. Where the goniometer's errors are smooth over the rotation, --set axis_search=true "
            f"searches them as one smooth path (undone if the fit ends worse; docs/refinement.md \"Thick crystals\")")


def disorder_line(groups: list[dict]) -> str | None:
    """The refined occupancy of each disorder group, 'disorder occupancies: A:1 0.650(2), A:2 0.350(2)'."""
    if not groups:
        return None
    from .io.refined_cif import format_su
    return "disorder occupancies: " + ", ".join(
        f"{g['assembly'] + ':' if g['assembly'] else ''}{g['group']} ({g['atoms'][0]}...) "
        f"{format_su(g['occupancy'], g['occupancy_su'] or None)}" for g in groups)


def residual_potential_line(res: dict | None) -> str:
    """The F_o - F_c Fourier map's extremes (refined.cif's residual density), with where they lie."""
    if not res:
        return ""
    if "error" in res:
        return f"warning: the residual potential map could not be made ({res['error']}); every other output is written"

    def where(q):
        return f" at {q['xyz'][0]:.4f} {q['xyz'][1]:.4f} {q['xyz'][2]:.4f}, {q['distance']:.2f} A from {q['nearest']}"

    top, hole = (res["peaks"] or [None])[0], (res["holes"] or [None])[0]
    return (f"residual potential ({res['file']}; F_o - F_c Fourier with dynamically corrected F_o, "
            f"{res['n_unique']} unique reflections, A^-2 as refined.cif's _refine_diff_density_*): max "
            f"{res['max']:.3f}{where(top) if top else ''}; min {res['min']:.3f}{where(hole) if hole else ''}; "
            f"rms {res['rms']:.3f}")


def difference_map_lines(diff: dict | None, shown: int = 3) -> list[str]:
    """The difference map's extremes and its strongest peaks, each with what a hydrogen there would do."""
    if not diff:
        return []
    if "error" in diff:
        return [f"warning: the difference map could not be made ({diff['error']}); every other output is written"]
    out = [f"difference map ({diff['file']}; the objective's gradient in the potential, in sigma): max "
           f"{diff['max_sigma']:.1f}, min {diff['min_sigma']:.1f}; strongest peaks, each tried as a hydrogen:"]
    for n, q in enumerate(diff["peaks"][:shown]):
        out.append(f"  {n + 1}) {q['height']:.1f} sigma at {q['xyz'][0]:.4f} {q['xyz'][1]:.4f} {q['xyz'][2]:.4f}, "
                   f"{q['distance']:.2f} A from {q['nearest']}: an H there takes occupancy {q['h_occupancy']:.2f} "
                   f"and lowers chi^2 by {100 * q['chi2_fall']:.1f} %")
    for q in diff.get("holes", [])[:1]:
        out.append(f"  deepest hole by fit: {q['height']:.1f} sigma at {q['xyz'][0]:.4f} {q['xyz'][1]:.4f} "
                   f"{q['xyz'][2]:.4f}, {q['distance']:.2f} A from {q['nearest']}: {-q['h_occupancy']:.2f} H of "
                   f"potential less there lowers chi^2 by {100 * q['chi2_fall']:.1f} %")
    return out


# Hirshfeld's rigid-bond test: a bond's dU is reported as suspect above this many A^2 and s.u.
RIGID_BOND_LIMIT = (0.001, 3.0)


def rigid_bond_lines(rows: list[dict]) -> list[str]:
    """The rigid-bond test's summary line (largest |dU|), and a warning naming the bonds above
    RIGID_BOND_LIMIT; none without anisotropic bonded atoms."""
    if not rows:
        return []
    from .io.refined_cif import format_su
    worst = max(rows, key=lambda r: abs(r["delta"]))

    def ratio(r):
        return f", {abs(r['delta']) / r['su']:.1f} s.u." if r["su"] else ""

    out = [f"rigid-bond test (Hirshfeld): {len(rows)} bond{'s' if len(rows) > 1 else ''} between anisotropic atoms, "
           f"largest |dU| {format_su(abs(worst['delta']), worst['su'])} A^2 ({worst['label_1']}-{worst['label_2']}"
           f"{ratio(worst)})"]
    bad = [r for r in rows if abs(r["delta"]) > RIGID_BOND_LIMIT[0]
           and (r["su"] is None or abs(r["delta"]) > RIGID_BOND_LIMIT[1] * r["su"])]
    if bad:
        out.append(f"warning: {len(bad)} bond{'s' if len(bad) > 1 else ''} fail{'' if len(bad) > 1 else 's'} the "
                   f"rigid-bond test (|dU| above {RIGID_BOND_LIMIT[0]:g} A^2 and {RIGID_BOND_LIMIT[1]:g} s.u.: "
                   f"{_first_few([r['label_1'] + '-' + r['label_2'] for r in bad])}): look for disorder or a wrong "
                   f"element, or restrain the ADPs (rigid_bond, similar_adp); summary.json lists every bond")
    return out


# a frame thickness whose s.u. exceeds this fraction of its value is reported as undetermined
THICKNESS_SU_LIMIT = 0.5


def thickness_note(frames: dict) -> str | None:
    """A note naming the frames whose refined thickness the data barely determine (s.u. above
    THICKNESS_SU_LIMIT of the value: typically frames with few reflections, whose thickness can wander
    between fringe branches), or None."""
    t = np.asarray(frames["thickness_mean"], dtype=float)
    su = np.asarray(frames["thickness_mean_su"], dtype=float)
    loose = np.flatnonzero(np.isfinite(su) & (su > THICKNESS_SU_LIMIT * t))
    if not len(loose):
        return None
    ids = _first_few([frames["frame"][i] for i in loose])
    return (f"note: {len(loose)} of {len(t)} frames have a thickness s.u. above {THICKNESS_SU_LIMIT:.0%} of its value "
            f"(frames {ids}): their thickness is barely determined; frames.csv lists each with its s.u.")


def zero_scale_warning(frames: dict) -> str | None:
    """The warning for frames with reflections whose scale ended at 0: their Io anticorrelate with the
    model (all negative, or another crystal's), so they are left unexplained (None when there are none)."""
    idle = np.flatnonzero((np.asarray(frames["scale"], float) <= 0) & (np.asarray(frames["n_reflections"]) > 0))
    if not len(idle):
        return None
    return (f"warning: {len(idle)} frame{'s' if len(idle) > 1 else ''} ({_first_few([frames['frame'][i] for i in idle])}) "
            f"ended with scale 0: {'their' if len(idle) > 1 else 'its'} intensities do not correlate with the "
            f"model's, so the fit leaves {'them' if len(idle) > 1 else 'it'} unexplained; check frames.csv, or "
            f"leave {'them' if len(idle) > 1 else 'it'} out (--frames)")


def adp_bound_warning(labels: list[str]) -> str | None:
    """The warning for atoms whose refined ADP ended on the positivity bound (None when there are none)."""
    if not labels:
        return None
    from .crystal.parameters import ADP_FLOOR
    them = "them" if len(labels) > 1 else "it"
    return (f"warning: the ADP of {len(labels)} atom{'s' if len(labels) > 1 else ''} ({_first_few(labels)}) ended on "
            f"the positivity bound (smallest eigenvalue <= {2 * ADP_FLOOR:g} A^2): the data do not hold {them} up; "
            f"restrain {them} (same_adp), use more frames, or look for a model error")


def undetermined_warning(names: list[str]) -> str | None:
    """The warning for parameters the data do not determine (s.u. beyond their range; None when none)."""
    if not names:
        return None
    return (f"warning: the data do not determine {len(names)} parameter{'s' if len(names) > 1 else ''} "
            f"({_first_few(names)}): their s.u. exceed the parameter's whole range, so refined.cif gives them "
            f"without one; an atom of zero occupancy, or one no scored reflection depends on? Fix or remove them")


def _first_few(items, n: int = 10) -> str:
    """The first ``n`` items joined by commas, and " ..." when there are more."""
    return ", ".join(str(x) for x in items[:n]) + (" ..." if len(items) > n else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blochflow", description="Bloch-wave refinement of 3D-ED data")
    p.add_argument("--version", action="version", version=f"blochflow {__version__}")
    p.add_argument("--threads", type=int, help="CPU threads for the Bloch solves (default: torch's, the cores)")
    p.add_argument("--device", default="cpu", help="where the Bloch solves run: cpu (default), cuda, cuda:N, or auto "
                                                   "(cuda when torch sees one and jax or cupy can solve there); "
                                                   "results and files are the same")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="dynamical intensities of a structure on a dataset's geometry")
    s.add_argument("structure", nargs="?", help="structure CIF")
    s.add_argument("data", nargs="?", help="PETS2 .cif_pets file")
    s.add_argument("--example", help="use a bundled example dataset (quartz)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--thickness", default="auto", help="thickness in A, or 'auto' for the best single value")
    s.add_argument("--thickness-profile", help="CSV with columns frame, thickness[, spread | weight] (A); several "
                                               "rows with a weight per frame give a distribution")
    s.add_argument("--thickness-expr", help="per-frame expression, e.g. '800/cos(radians(alpha))'")
    s.add_argument("--thickness-spread", type=float, default=0.0, help="Gaussian spread per frame (A)")
    s.add_argument("--frames", help="frames to simulate, by the ids of the data's frame loop: '1-40,52', or "
                                    "'1-99:10' for every 10th (default: all)")
    s.add_argument("--frame-model", help="frame_model.json written by 'blochflow refine' (thickness model, "
                                         "orientation corrections)")
    s.add_argument("--write-pets", help="write a synthetic .cif_pets to this path instead of comparing (--out "
                                        "then receives nothing); with --frames, of those frames only")
    s.add_argument("--noise", choices=["poisson", "gaussian", "none"], default="poisson")
    s.add_argument("--max-counts", type=float, default=1e5, help="counts of the strongest synthetic reflection")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace an existing --write-pets file, or the files of an earlier run in --out")
    s.add_argument("--config", help="refine's TOML (or .json) settings file: its physics (beams, samples, "
                                    "wavelength, absorption, thickness); options given here override it")
    _add_model_options(s)
    s.set_defaults(func=cmd_simulate, simulate_defaults={d: s.get_default(d) for d in _SIMULATE_FROM_SETTING.values()})

    r = sub.add_parser("refine", help="refine a structure against a 3D-ED dataset (dynamical)")
    r.add_argument("structure", nargs="?", help="starting structure CIF")
    r.add_argument("data", nargs="*", help="PETS2 .cif_pets file; several datasets of one phase (crystals, runs) "
                                           "are refined together, each frame with its own dataset's UB")
    r.add_argument("--example", help="use a bundled example dataset (quartz)")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--config", help="TOML (or .json) file with settings; flags override it")
    r.add_argument("--set", action="append", metavar="NAME=VALUE", help="any setting, e.g. --set lr_xyz=0.01")
    r.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    r.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    r.add_argument("--enantiomer", action="store_true", help="also refine the inverted model and compare hands")
    r.add_argument("--samples", type=int, help="tilt samples per frame (the minimum when --samples-per-fringe > 0)")
    r.add_argument("--samples-per-fringe", type=float,
                   help="samples per Pendelloesung fringe of each frame's fastest reflection (default 1.2, "
                        "which converges the rocking integral; 0: exactly --samples per frame)")
    r.add_argument("--sample-rule", choices=["midpoint", "gauss", "linspace"], help="tilts across a frame's wedge")
    r.add_argument("--ub-convention", choices=["pets", "diffbloch"], help="g = U B h (pets) or U^-T B h (diffbloch)")
    r.add_argument("--coupling", choices=["sample", "segments"],
                   help="beams per tilt, or per run of tilts with rocking tails cut (as diffBloch simulates)")
    r.add_argument("--tilt-window", type=int, help="> 1: tapered tilt weights (diffBloch's mosaic smoothing: 5)")
    r.add_argument("--rocking-axis", choices=["goniometer", "fixed"], help="tilt about the goniometer or lab x axis")
    r.add_argument("--thickness-model", choices=["global", "per-frame", "slab", "learned"])
    r.add_argument("--thickness-points", type=int,
                   help="points of a learned thickness distribution (a mixture's weighted points, or a quantile "
                        "function's quadrature levels; default 8)")
    r.add_argument("--thickness-distribution", choices=["quantile", "mixture"],
                   help="form of a learned distribution: a quantile function at fixed levels, or weighted points")
    r.add_argument("--holdout-frames", type=float, help="fraction of frames left out of the fit and reported")
    r.add_argument("--frames", help="frames to refine, by the ids of the data's frame loop: '1-40,52', or '1-99:10' "
                                    "for every 10th (default: all)")
    r.add_argument("--thickness", help="start thickness in A or 'auto'")
    r.add_argument("--adam-steps", type=int)
    r.add_argument("--lm-iterations", type=int)
    r.add_argument("--adp", choices=["keep", "iso", "aniso"])
    r.add_argument("--hydrogens", choices=["riding", "free", "fixed"],
                   help="riding (default): idealised on their parents, OH/CH3/NH3 rotors and rigid water/NH4+ "
                        "turned by refined angles (--set riding_torsions=false keeps the start's); free; or fixed")
    r.add_argument("--refine-occupancy", action="store_true")
    r.add_argument("--dry-run", action="store_true",
                   help="read the inputs and build the model as refine would, time one forward pass and one "
                        "Jacobian, say what the refinement would cost; write nothing")
    r.add_argument("--no-orientation", action="store_true", help="do not refine per-frame orientation corrections")
    r.add_argument("--orientation-sigma", type=float,
                   help="width (mrad) of the prior on each orientation correction (default 2; 0: none)")
    r.add_argument("--free-fraction", type=float)
    r.add_argument("--absorption", choices=["none", "proportional", "tds"])
    r.add_argument("--wavelength", type=float, help="electron wavelength (A) in place of the data file's")
    r.add_argument("--g-max", type=float)
    r.add_argument("--s-max", type=float)
    r.add_argument("--s-bethe", type=float, help="fold beams out to this |s_g| in by Bethe perturbation (0: off)")
    r.add_argument("--checkpoint-every", type=int)
    r.set_defaults(func=cmd_refine)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for name, value in vars(args).items():  # nan or inf in any numeric flag: no setting means that
            if isinstance(value, float) and not np.isfinite(value):
                raise InputError(f"--{name.replace('_', '-')}", str(value), "is not a finite number")
        if args.threads is not None:
            if args.threads < 1:
                raise InputError("--threads", str(args.threads), "must be at least 1")
            torch.set_num_threads(args.threads)
        try:
            device = set_default_device(args.device)
        except ValueError as exc:
            raise InputError("--device", args.device, str(exc)) from None
        if device.type == "cuda":
            try:
                cuda_eigh_backend()
            except ValueError as exc:
                raise InputError("environment", "BLOCHFLOW_CUDA_EIGH", str(exc).split(": ", 1)[-1]) from None
        if device.type == "cuda" and not fast_cuda_eigh_available():
            print("warning: no batched CUDA eigensolver is usable (jax or cupy with CUDA): the eigendecompositions run "
                  "through MAGMA, about as fast as 16 CPU threads; pip install 'jax[cuda13]' or 'jax[cuda12]' "
                  "(or cupy-cuda13x) to match your CUDA, for 10-60x faster solves", file=sys.stderr)
        if args.command == "simulate" and getattr(args, "thickness", "auto") != "auto":
            try:
                args.thickness = float(args.thickness)
            except ValueError:
                raise InputError("--thickness", args.thickness, "not a number or 'auto'") from None
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        sys.stderr = open(os.devnull, "w")
        return 1
    except OSError as exc:  # a file that cannot be written or read once the run is under way (disk full, ...)
        print(f"error: {exc.filename or 'file system'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
