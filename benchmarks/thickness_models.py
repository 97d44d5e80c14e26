"""Thickness-model study: synthetic cases with a known thickness distribution, every model refined.

Cases (quartz reference structure on a subset of the experimental geometry, data written with
``blochflow simulate --write-pets``, Poisson noise):
  a  constant thickness
  b  a slab seen at changing angles (path t0 / |cos|, surface normal tilted off the beam)
  c  a wedge: a uniform distribution whose centre and width grow with the tilt angle
  d  two-peaked on the frames at alpha > 10 deg, single elsewhere
Each is refined from a displaced start (positions 0.03 A, Uiso 0.03; Uij refined) with the global, per-frame,
slab and learned thickness models; 10 % of the frames are held out. Reported per run: R_obs, wR2
(work), R_holdout, position RMSD and mean |dU| against the truth, the mean per-frame error of the
mean thickness and the mean Wasserstein-1 distance between the fitted and true distributions.

    python benchmarks/thickness_models.py --out /tmp/thick [--cases abcd] [--models ...] [--frames-step 4]
        [--set thickness_smoothness=0.1 --set thickness_basis=12 ...] [--threads 1]

``--set NAME=VALUE`` (repeatable) passes any RefineSettings value to every refinement of the run
(the learned model's warm-start fit included), as ``blochflow refine --set`` does.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from blochflow.cli import main as cli
from blochflow.crystal.structure import Crystal, crystal_from_record, displaced, structure_deviation
from blochflow.data import example_path
from blochflow.io.pets import every_nth_frame_mask, read_pets, select_frames
from blochflow.io.structure_cif import read_structure
from blochflow.io.writers import atomic_write_text, format_pets, write_json
from blochflow.refine.run import build_problem, refine
from blochflow.refine.settings import RefineSettings, parse_setting, settings_from_mapping

SLAB_T0, SLAB_NORMAL = 350.0, (0.35, 0.10)  # A; rad tilt of the normal at zero goniometer angle


def example_paths():
    return example_path("quartz", "quartz_reference.cif"), example_path("quartz", "quartz.cif_pets")


def true_distribution(case: str, alpha_deg: np.ndarray, q: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(F, Q) thickness points (A, along the beam) and weights of each case (slab: see true_slab)."""
    a = np.radians(alpha_deg)
    u = (np.arange(q) + 0.5) / q
    if case == "a":
        pts = np.full((len(a), q), 450.0)
    elif case == "c":
        centre = 450.0 / np.cos(a)
        width = 150.0 + 500.0 * np.abs(np.sin(a))
        pts = centre[:, None] + (u[None, :] - 0.5) * width[:, None]
    elif case == "d":
        two = alpha_deg > 10.0
        pts = np.where(two[:, None], np.where(u[None, :] < 0.5, 300.0, 800.0), 500.0)
    else:
        raise ValueError(case)
    return pts, np.full_like(pts, 1.0 / q)


def slab_record(ds) -> dict:
    return {"format": "blochflow-frame-model-1", "refine_orientation": False,
            "thickness_model": {"kind": "slab", "thickness": SLAB_T0, "normal": list(SLAB_NORMAL)},
            "raw": {"thickness": [math.log(SLAB_T0 / 1000.0)], "surface_normal": list(SLAB_NORMAL)},
            "frame_ids": [int(f) for f in ds.frames.ids], "alpha_deg": ds.frames.alpha_deg.tolist()}


def make_case(case: str, ds_path: Path, structure: str, work: Path, n_samples: int, seed: int) -> Path:
    ds = read_pets(str(ds_path))
    target = work / f"case_{case}.cif_pets"
    args = ["simulate", structure, str(ds_path), "--out", str(work / f"sim_{case}"), "--samples", str(n_samples),
            "--samples-per-fringe", "0",
            "--write-pets", str(target), "--overwrite", "--max-counts", "2e5", "--seed", str(seed)]
    if case == "b":
        spec = work / "slab_frame_model.json"
        write_json(spec, slab_record(ds))
        args += ["--frame-model", str(spec)]
    else:
        pts, w = true_distribution(case, ds.frames.alpha_deg)
        table = work / f"case_{case}.csv"
        rows = ["frame,thickness,weight"] + [f"{int(f)},{t:.3f},{x:.6f}" for f, tp, wp in zip(ds.frames.ids, pts, w)
                                             for t, x in zip(tp, wp)]
        table.write_text("\n".join(rows) + "\n")
        args += ["--thickness-profile", str(table)]
    assert cli(args) == 0
    return target


def truth_points(case: str, problem) -> tuple[np.ndarray, np.ndarray]:
    alpha = problem.model.dataset.frames.alpha_deg
    if case != "b":
        return true_distribution(case, alpha)
    from blochflow.experiment.frames import SlabThickness
    slab = SlabThickness(SLAB_T0, SLAB_NORMAL)
    t, w = slab.path_length(slab.initial(), problem.frames.ctx)
    return t.numpy(), w.numpy()


def wasserstein1(t1, w1, t2, w2, n: int = 400) -> np.ndarray:
    """Per-frame W1 between two discrete distributions: the mean |Q1(u) - Q2(u)| over quantile levels."""
    u = (np.arange(n) + 0.5) / n
    out = []
    for a, wa, b, wb in zip(t1, w1, t2, w2):
        qa = np.sort(a)[np.searchsorted(np.cumsum(wa[np.argsort(a)]), u * wa.sum()).clip(max=len(a) - 1)]
        qb = np.sort(b)[np.searchsorted(np.cumsum(wb[np.argsort(b)]), u * wb.sum()).clip(max=len(b) - 1)]
        out.append(np.mean(np.abs(qa - qb)))
    return np.array(out)


def run_one(case: str, spec: str, data: Path, truth: Crystal, args) -> dict:
    """Refine one case with one model; ``spec`` is a model name, for the learned model optionally
    with its warm start (``learned/scan``, ``learned/per-frame``, ``learned/slab``)."""
    ds = read_pets(str(data))
    model, _, warm = spec.partition("/")
    values = dict(n_samples=args.samples, samples_per_fringe=0.0,  # the samples the data were simulated with
                  thickness_model=model, adam_steps=args.adam_steps,
                  lm_iterations=args.lm_iterations, refine_orientation=False, adp="aniso",
                  holdout_frames=0.1, thickness_points=args.points,
                  learned_warm_start=warm or RefineSettings.learned_warm_start)
    values.update(dict(parse_setting(item) for item in args.set))  # --set overrides the above
    settings = settings_from_mapping(values, "--set")
    t0 = time.perf_counter()
    problem = build_problem(displaced(truth, 0.03, 0.03, seed=1), ds, settings)
    result = refine(problem, settings, log=lambda s: None)
    elapsed = time.perf_counter() - t0
    raw = problem.split(result.theta)
    dev = structure_deviation(problem.structure.crystal_at(raw["structure"]), truth)
    t_fit, w_fit = (x.detach().numpy() for x in problem.frames.thickness.path_length(raw, problem.frames.ctx))
    t_true, w_true = truth_points(case, problem)
    has = np.bincount(problem.model.frame.numpy(), minlength=problem.model.n_frames) > 0
    mean_err = np.abs((t_fit * w_fit).sum(1) - (t_true * w_true).sum(1))[has]
    w1 = wasserstein1(t_fit, w_fit, t_true, w_true)[has]
    fh = result.figures_holdout
    w1_all = wasserstein1(t_fit, w_fit, t_true, w_true)
    frames = [{"alpha_deg": float(a), "has_reflections": bool(h), "holdout": bool(ho), "mean_fit": float((tf * wf).sum()), "mean_true": float((tt * wt).sum()),
               "sd_fit": float(np.sqrt((wf * (tf - (tf * wf).sum()) ** 2).sum())),
               "sd_true": float(np.sqrt((wt * (tt - (tt * wt).sum()) ** 2).sum())), "w1": float(x)}
              for a, h, ho, tf, wf, tt, wt, x in zip(problem.model.dataset.frames.alpha_deg, has,
                                                      problem.holdout_frame.numpy(), t_fit, w_fit, t_true, w_true, w1_all)]
    return {"case": case, "model": spec, "set": list(args.set), "R_obs": result.figures.R_obs, "wR2": result.figures.wR2,
            "GoF": result.figures.GoF, "R_holdout": None if fh is None else fh.R_obs,
            "rmsd_A": dev["rmsd_A"], "mean_abs_dU": dev["mean_abs_dUeq"],
            "thickness_mean_error_A": float(np.mean(mean_err)),
            "wasserstein1_A": float(np.mean(w1)), "time_s": elapsed, "lm_iterations": result.lm.iteration,
            "lm_jacobians": sum(not h.get("jacobian_reused", False) for h in result.lm.history),
            "converged": result.lm.converged, "frames": frames}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default="abcd")
    p.add_argument("--models", default="global,per-frame,slab,learned",
                   help="comma list; learned/scan, learned/per-frame, learned/slab choose its warm start")
    p.add_argument("--frames-step", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--points", type=int, default=16)
    p.add_argument("--adam-steps", type=int, default=20)
    p.add_argument("--lm-iterations", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any RefineSettings value for every refinement (repeatable; overrides the options above)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, the cores)")
    args = p.parse_args()
    settings_from_mapping(dict(parse_setting(item) for item in args.set), "--set")
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    structure, data = example_paths()
    ds = read_pets(data)
    sub = select_frames(ds, every_nth_frame_mask(len(ds.frames), args.frames_step))
    geometry = work / "geometry.cif_pets"
    atomic_write_text(geometry, format_pets(sub, sub.reflections.hkl, sub.reflections.intensity,
                                            sub.reflections.sigma, sub.reflections.frame_id), overwrite=True)
    truth = crystal_from_record(read_structure(structure))
    results = []
    for case in args.cases:
        # the noise seed follows the case letter, so --cases d gives the same data as the full run
        target = make_case(case, geometry, structure, work, args.samples, seed=10 + "abcd".index(case))
        for model in args.models.split(","):
            res = run_one(case, model, target, truth, args)
            results.append(res)
            print(json.dumps(res), flush=True)
            write_json(work / "results.json", results)
    if args.set:
        print("\nsettings: " + " ".join(args.set))
    print("\n| case | model | R_obs | wR2 | R_holdout | RMSD (A) | mean abs dU (A^2) | mean t error (A) | W1 (A) | LM its (Jacobians) | time (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rh = "-" if r["R_holdout"] is None else f"{100 * r['R_holdout']:.1f} %"
        print(f"| {r['case']} | {r['model']} | {100 * r['R_obs']:.2f} % | {100 * r['wR2']:.2f} % | {rh} | "
              f"{r['rmsd_A']:.4f} | {r['mean_abs_dU']:.4f} | {r['thickness_mean_error_A']:.0f} | "
              f"{r['wasserstein1_A']:.0f} | {r['lm_iterations']} ({r['lm_jacobians']}){', converged' if r['converged'] else ''} | "
              f"{r['time_s']:.0f} |")


if __name__ == "__main__":
    main()
