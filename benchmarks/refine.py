"""Refinement benchmark: quartz experimental end to end, time per phase and iteration, peak memory;
and the cost of learned thickness distributions with 1, 8 and 32 points per frame.

    python benchmarks/refine.py [--start kinematical|reference] [--samples N] [--adam-steps A]
                                [--lm-iterations L] [--threads 2] [--set NAME=VALUE ...] [--json FILE]
    python benchmarks/refine.py --thickness-points 1,8,32 [--samples 8]
    python benchmarks/refine.py --kept-decompositions [--samples 24] [--repeat 3]
    python benchmarks/refine.py --tilt-search [--repeat 2]

The first form runs the same refinement as ``blochflow refine --example quartz`` (README's first
command: its settings unless flags or --set change them; orientation corrections, structure,
per-frame thickness, profiled scales) and reports the wall time of each phase, the time
per Adam step and per LM iteration, R values and the peak resident memory of the process. The
second times one Adam step (forward + backward), one Jacobian, one forward pass and their sum (the
least an LM iteration costs) of the quartz problem with a learned thickness distribution of Q points
per frame, as ratios to the single-thickness (per-frame) model measured in the same process. The
third times a trial forward pass and the Jacobian at that point, with the Jacobian solving its own
eigenproblems or taking those the forward pass kept (alternated in one process, best of --repeat).
The fourth times the tilt search coarse to fine against the whole grid at the point of the README
example's first 5 LM iterations (alternated, best of --repeat) and says whether they agree.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from blochflow.cli import REFINE_EXAMPLES
from blochflow.crystal.structure import crystal_from_record
from blochflow.data import example_path
from blochflow.io.pets import read_pets
from blochflow.io.structure_cif import read_structure
from blochflow.physics.device import default_device, set_default_device
from blochflow.refine.optimise import AdamState, adam_learning_rates, adam_step
from blochflow.refine.run import build_problem, refine, refined_index
from blochflow.refine.settings import RefineSettings, parse_setting, precision_dtype, settings_from_mapping


def _paths(start: str):
    name = {"kinematical": "quartz_kinematical.cif", "reference": "quartz_reference.cif"}[start]
    return example_path("quartz", name), example_path("quartz", "quartz.cif_pets")


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def full_refinement(args) -> dict:
    structure, data = _paths(args.start)
    flags = {"n_samples": args.samples, "adam_steps": args.adam_steps, "lm_iterations": args.lm_iterations}
    settings = settings_from_mapping({**REFINE_EXAMPLES["quartz"][2], **{k: v for k, v in flags.items() if v is not None},
                                      **dict(parse_setting(item) for item in args.set)}, "benchmark")
    t0 = time.perf_counter()
    problem = build_problem(crystal_from_record(read_structure(structure)), read_pets(data), settings)
    setup = time.perf_counter() - t0
    result = refine(problem, settings, log=print if args.log else (lambda s: None))
    pt = result.phase_times
    fig = result.figures
    return {"start": args.start, "n_samples": settings.n_samples, "threads": torch.get_num_threads(),
            "device": str(default_device()),
            "n_params": len(result.refined_index), "setup_s": setup, "adam_s": pt["adam_s"],
            "adam_per_step_s": pt["adam_s"] / max(result.adam_steps, 1), "lm_s": pt["lm_s"],
            "lm_per_iteration_s": pt["lm_s"] / max(result.lm.iteration, 1), "covariance_s": pt["covariance_s"],
            "other_phases_s": {k: v for k, v in pt.items() if k not in ("setup_s", "adam_s", "lm_s", "covariance_s")},
            "total_s": setup + result.elapsed_s, "lm_iterations": result.lm.iteration,
            "convergence": result.lm.reason,
            "converged": result.lm.converged, "R_obs": fig.R_obs, "wR2": fig.wR2, "GoF": fig.GoF,
            "R_obs_frame_mean": fig.R_obs_frame_mean, "wR2_frame_mean": fig.wR2_frame_mean,
            "R_free": None if result.figures_free is None else result.figures_free.R_obs,
            "kappa": float(result.problem.split(result.theta)["kappa"][0]) if "kappa" in result.problem.slots else None,
            "peak_rss_mb": peak_memory_mb()}


def thickness_points(args) -> list[dict]:
    structure, data = _paths("reference")
    crystal, ds = crystal_from_record(read_structure(structure)), read_pets(data)
    rows, base = [], None
    for q in [0] + [int(x) for x in args.thickness_points.split(",")]:
        model = "per-frame" if q == 0 else "learned"
        settings = RefineSettings(n_samples=args.samples or 8, samples_per_fringe=0.0, thickness=600.0, thickness_model=model,
                                  thickness_points=max(q, 1), thickness_distribution=args.distribution,
                                  refine_orientation=False)
        problem = build_problem(crystal, ds, settings)
        index = refined_index(problem, settings)
        lr = adam_learning_rates(problem, {"xyz": 1e-4, "adp": 1e-4, "thickness": 1e-3, "network": 1e-3})
        state = AdamState(0, torch.zeros_like(problem.theta0), torch.zeros_like(problem.theta0))
        adam_step(problem, problem.theta0, state, lr, 10)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            adam_step(problem, problem.theta0, state, lr, 10)
        t_adam = (time.perf_counter() - t0) / args.repeat
        problem.jacobian(problem.theta0, index)  # warm-up (the first call in a process pays for allocations)
        t0 = time.perf_counter()
        problem.jacobian(problem.theta0, index)
        t_jac = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.no_grad():  # a trial point's values, in double precision as LM evaluates them
            problem.intensities(problem.theta0 + 1e-9)
        t_fwd = time.perf_counter() - t0
        # an LM iteration is one Jacobian and at least one forward pass at the trial point
        row = {"model": model, "points": max(q, 1), "device": str(default_device()), "adam_step_s": t_adam, "jacobian_s": t_jac,
               "forward_s": t_fwd, "lm_iteration_s": t_jac + t_fwd, "n_params": len(index)}
        if q == 0:
            base = row
        for key in ("adam_step", "jacobian", "forward", "lm_iteration"):
            row[f"{key}_ratio"] = row[f"{key}_s"] / base[f"{key}_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def kept_decompositions(args) -> dict:
    """One LM iteration's solver work (a trial forward pass without gradient, then the Jacobian at
    that point) with and without the forward pass keeping its eigendecompositions for the Jacobian,
    alternated ``--repeat`` times in one process (README problem, its default settings)."""
    import blochflow.refine.problem as problem_mod

    structure, data = _paths(args.start)
    settings = settings_from_mapping({"n_samples": args.samples or 24, "samples_per_fringe": 0.0, **dict(parse_setting(s) for s in args.set)}, "benchmark")
    problem = build_problem(crystal_from_record(read_structure(structure)), read_pets(data), settings)
    index = refined_index(problem, settings)
    problem.jacobian_dtype = precision_dtype(settings.jacobian_precision)
    cap, share = problem_mod.KEEP_DECOMPOSITIONS_BYTES, problem_mod.KEEP_DECOMPOSITIONS_SHARE
    times = {"own": [], "kept": []}
    try:
        for i in range(2 * args.repeat + 2):  # the first pair warms up
            mode = "kept" if i % 2 else "own"
            problem_mod.KEEP_DECOMPOSITIONS_BYTES = cap if mode == "kept" else 0
            problem_mod.KEEP_DECOMPOSITIONS_SHARE = share if mode == "kept" else 0
            problem._last_decompositions = None
            theta = problem.theta0 + 1e-9 * (i + 1)
            t0 = time.perf_counter()
            with torch.no_grad():
                problem.intensities(theta)
            t1 = time.perf_counter()
            problem.jacobian(theta, index)
            t2 = time.perf_counter()
            if i >= 2:
                times[mode].append((t1 - t0, t2 - t1))
    finally:
        problem_mod.KEEP_DECOMPOSITIONS_BYTES, problem_mod.KEEP_DECOMPOSITIONS_SHARE = cap, share
    row = {}
    for mode, ts in times.items():
        row[f"{mode}_forward_s"] = min(t[0] for t in ts)
        row[f"{mode}_jacobian_s"] = min(t[1] for t in ts)
        row[f"{mode}_total_s"] = min(t[0] + t[1] for t in ts)
    row["jacobian_ratio"] = row["kept_jacobian_s"] / row["own_jacobian_s"]
    row["total_ratio"] = row["kept_total_s"] / row["own_total_s"]
    row["peak_rss_mb"] = peak_memory_mb()
    return row


def tilt_search_grids(args) -> dict:
    """The tilt search coarse to fine (every second grid tilt, then the two beside each frame's best)
    against the whole grid, alternated ``--repeat`` times in one process at the point LM reaches after
    the README example's first 5 iterations: the wall time of each and whether every frame got the
    same tilt and thickness."""
    import blochflow.refine.frame_search as frame_search

    structure, data = _paths(args.start)
    settings = settings_from_mapping({**REFINE_EXAMPLES["quartz"][2], "lm_iterations": 5,
                                      **dict(parse_setting(item) for item in args.set)}, "benchmark")
    problem = build_problem(crystal_from_record(read_structure(structure)), read_pets(data), settings)
    theta = refine(problem, settings, log=lambda s: None).theta
    stride = frame_search.TILT_SEARCH_COARSE_STRIDE
    times, results = {"coarse_to_fine": [], "whole_grid": []}, {}
    try:
        for i in range(2 * args.repeat):
            mode = "whole_grid" if i % 2 else "coarse_to_fine"
            frame_search.TILT_SEARCH_COARSE_STRIDE = 1 if mode == "whole_grid" else stride
            t0 = time.perf_counter()
            results[mode] = frame_search.search_frame_tilt(problem, theta, settings)
            times[mode].append(time.perf_counter() - t0)
    finally:
        frame_search.TILT_SEARCH_COARSE_STRIDE = stride
    (fine, moved, tilts, searched), (whole, moved_whole, _, _) = results["coarse_to_fine"], results["whole_grid"]
    best = {k: min(v) for k, v in times.items()}
    return {"tilts": len(tilts), "frames_searched": int(searched.sum()), "frames_moved": len(moved),
            "same_frames_moved": moved.tolist() == moved_whole.tolist(), "same_theta": bool(torch.equal(fine, whole)),
            "coarse_to_fine_s": best["coarse_to_fine"], "whole_grid_s": best["whole_grid"],
            "ratio": best["coarse_to_fine"] / best["whole_grid"], "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--start", choices=["kinematical", "reference"], default="kinematical")
    p.add_argument("--samples", type=int, help="tilt samples per frame (default: the README example's)")
    p.add_argument("--adam-steps", type=int, help="default: the README example's")
    p.add_argument("--lm-iterations", type=int, help="default: the README example's")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="where the Bloch solves run (cpu, cuda, auto)")
    p.add_argument("--thickness-points", help="comma list, e.g. 1,8,32: time learned distributions instead")
    p.add_argument("--distribution", choices=["mixture", "quantile"], default="mixture",
                   help="form of the learned distribution timed by --thickness-points")
    p.add_argument("--kept-decompositions", action="store_true",
                   help="time forward + Jacobian with and without the forward pass's decompositions kept")
    p.add_argument("--tilt-search", action="store_true",
                   help="time the tilt search coarse to fine against the whole grid (same choices?)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any refine setting")
    p.add_argument("--json")
    p.add_argument("--log", action="store_true", help="print the optimiser's progress lines")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_default_device(args.device)
    if args.kept_decompositions:
        out = kept_decompositions(args)
    elif args.tilt_search:
        out = tilt_search_grids(args)
    else:
        out = thickness_points(args) if args.thickness_points else full_refinement(args)
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
