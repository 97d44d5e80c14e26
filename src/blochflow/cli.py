"""The ``blochflow`` command line: a thin shell over the library."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from .io.errors import InputError

EXAMPLES = {"quartz": ("quartz_reference.cif", "quartz.cif_pets")}


def _example_paths(name: str) -> tuple[str, str]:
    if name not in EXAMPLES:
        raise InputError("--example", name, f"unknown example; choose from {', '.join(EXAMPLES)}")
    base = resources.files("blochflow").joinpath("data", "examples", name)
    return tuple(str(base.joinpath(f)) for f in EXAMPLES[name])


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("physics")
    g.add_argument("--g-max", type=float, default=None, help="beam cut-off |g| (1/A); default dstarmax + 0.4")
    g.add_argument("--s-max", type=float, default=0.02, help="excitation-error limit for beams (1/A)")
    g.add_argument("--samples", type=int, default=32, help="tilt samples per frame (or precession azimuths)")
    g.add_argument("--rsg", type=float, default=0.66, help="score reflections with |s_g|/dS_g < RSG")
    g.add_argument("--dsg", type=float, default=0.0015, help="... and dS_g - |s_g| > DSG (1/A)")
    g.add_argument("--absorption", choices=["none", "proportional", "tds"], default="none")
    g.add_argument("--kappa", type=float, default=0.05, help="U'_g = kappa U_g for --absorption proportional")
    g.add_argument("--absorption-method", choices=["exact", "perturbative"], default="exact")
    g.add_argument("--instability", type=float, default=0.01, help="u in w = 1/(sigma^2 + (u Io)^2)")


def _model_settings(args):
    from .physics.diffraction import BeamSettings
    from .refine.model import ModelSettings
    for name in ("samples",):
        if getattr(args, name) < 1:
            raise InputError(f"--{name}", str(getattr(args, name)), "must be at least 1")
    beams = BeamSettings(g_max=args.g_max, s_max=args.s_max, n_samples=args.samples, rsg=args.rsg, dsg=args.dsg)
    return ModelSettings(beams=beams, absorption=args.absorption, kappa=args.kappa,
                         absorption_method=args.absorption_method, instability=args.instability)


def _load(structure: str, data: str):
    from .crystal.structure import crystal_from_record
    from .io.pets import read_pets
    from .io.structure_cif import read_structure
    rec = read_structure(structure)
    ds = read_pets(data)
    for i, name in enumerate(("a", "b", "c", "alpha", "beta", "gamma")):
        c, p = rec.cell[i], ds.cell[i]
        if abs(c - p) > 0.05 * abs(p):
            raise InputError(structure, f"_cell_{'length' if i < 3 else 'angle'}_{name}",
                             f"{c} differs from {p} in {data} by more than 5 %")
    try:
        crystal = crystal_from_record(rec)
    except ValueError as exc:
        raise InputError(structure, "atoms", str(exc)) from None
    return crystal, ds


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
        by_id = {}
        for i, r in enumerate(rows):
            try:
                by_id[int(r["frame"])] = (float(r["thickness"]), float(r.get("spread") or 0.0))
            except (KeyError, ValueError, TypeError):
                raise InputError(path, f"row {i + 2}", "needs numeric columns frame, thickness[, spread]") from None
        missing = [int(f) for f in ds.frames.ids if int(f) not in by_id]
        if missing:
            raise InputError(path, "frame", f"no thickness for frame id {missing[0]}")
        mean = np.array([by_id[int(f)][0] for f in ds.frames.ids])
        spread = np.array([by_id[int(f)][1] for f in ds.frames.ids])
    elif args.thickness_expr:
        mean = evaluate_profile(args.thickness_expr, ds.frames)
    else:
        mean = np.full(n, float(args.thickness))
    if args.thickness_spread:
        spread = np.full(n, float(args.thickness_spread)) if spread is None else spread
    if np.any(mean <= 0):
        raise InputError("--thickness", str(mean.min()), "thickness must be positive")
    return ThicknessSpec(mean=mean, spread=spread)


def cmd_simulate(args) -> int:
    import torch

    from .io.writers import atomic_write_text, format_pets, write_csv, write_json
    from .simulate import synthesize
    from .refine.model import ForwardModel

    if args.example:
        structure, data = _example_paths(args.example)
    else:
        if not args.structure or not args.data:
            raise InputError("command line", "simulate", "needs STRUCTURE.cif and DATA.cif_pets (or --example)")
        structure, data = args.structure, args.data
    t_start = time.perf_counter()
    crystal, ds = _load(structure, data)
    settings = _model_settings(args)
    out = Path(args.out)
    if args.write_pets:
        target = Path(args.write_pets)
        if target.exists() and not args.overwrite:
            raise InputError(target, "--write-pets", "exists already; choose another name or pass --overwrite")
        if args.thickness == "auto" and not (args.thickness_profile or args.thickness_expr):
            raise InputError("--thickness", "auto", "--write-pets needs a thickness (value, profile or expression)")
        spec = _thickness_spec(args, ds)
        rows, i_obs, sigma = synthesize(crystal, ds, spec, settings, noise=args.noise,
                                        max_counts=args.max_counts, seed=args.seed)
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

    model = ForwardModel(crystal, ds, settings)
    if args.thickness == "auto" and not (args.thickness_profile or args.thickness_expr):
        best, scan = model.best_thickness()
        spec = _thickness_spec(argparse.Namespace(**{**vars(args), "thickness": best}), ds)
    else:
        scan = None
        spec = _thickness_spec(args, ds)
    with torch.no_grad():
        ic = model.intensities(spec.frame_state(ds))
    fig = model.figures(ic)
    from .refine.objective import frame_scales, klar_weights
    k = frame_scales(model.io, ic, klar_weights(model.io, model.sigma, settings.instability), model.frame, model.n_frames)
    summary = {**fig.as_dict(), "n_beams_mean": model.n_beams_mean(),
               "elapsed_s": time.perf_counter() - t_start,
               "thickness": float(spec.mean.mean()) if spec.spread is None else spec.mean.tolist(),
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
    print(f"wrote {out / 'summary.json'} and {out / 'reflections.csv'} in {summary['elapsed_s']:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blochflow", description="Bloch-wave refinement of 3D-ED data")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("simulate", help="dynamical intensities of a structure on a dataset's geometry")
    s.add_argument("structure", nargs="?", help="structure CIF")
    s.add_argument("data", nargs="?", help="PETS2 .cif_pets file")
    s.add_argument("--example", help="use a bundled example dataset (quartz)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--thickness", default="auto", help="thickness in A, or 'auto' for the best single value")
    s.add_argument("--thickness-profile", help="CSV with columns frame, thickness[, spread] (A)")
    s.add_argument("--thickness-expr", help="per-frame expression, e.g. '800/cos(radians(alpha))'")
    s.add_argument("--thickness-spread", type=float, default=0.0, help="Gaussian spread per frame (A)")
    s.add_argument("--write-pets", help="write a synthetic .cif_pets with this name instead of comparing")
    s.add_argument("--noise", choices=["poisson", "gaussian", "none"], default="poisson")
    s.add_argument("--max-counts", type=float, default=1e5, help="counts of the strongest synthetic reflection")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="allow replacing an existing --write-pets file")
    _add_model_options(s)
    s.set_defaults(func=cmd_simulate)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "thickness", "auto") != "auto":
            try:
                args.thickness = float(args.thickness)
            except ValueError:
                raise InputError("--thickness", args.thickness, "not a number or 'auto'") from None
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
