"""How well does the forward model reproduce synthetic data at the structure they were made from?

Before asking a refinement to recover a known structure, check that the physics settings can fit
the data at the truth. Per frame this reports the best single thickness (grid scan, WLS frame
scale) and the best thickness *distribution* on the same grid (non-negative least squares over
the per-thickness intensities, convex and exact), then R_obs binned by each reflection's signed
excitation error at the frame centre over its excitation range across the wedge (s / range): a
trend across those bins is a geometry mismatch (wedge, rocking axis, orientation), not a thickness
or structure one. ``--refine-frames`` also refines the frame parameters (thickness, scale and,
with ``--set refine_orientation=true``, orientation corrections) with the structure held at the
truth, and reports the figures of merit.

    python benchmarks/model_at_truth.py --dataset paracetamol --frames-step 10 [--set NAME=VALUE ...]
        [--refine-frames] [--grid 20,3000,20] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from blochflow.crystal.structure import crystal_from_record
from blochflow.io.pets import every_nth_frame_mask, read_pets
from blochflow.io.structure_cif import read_structure
from blochflow.io.writers import write_json
from blochflow.refine.objective import frame_scales, klar_weights, r_obs
from blochflow.refine.run import build_problem, refine
from blochflow.refine.settings import parse_setting, settings_from_mapping
from synthetic_recovery import DATASET_PHYSICS, DATASETS, PAPER_PHYSICS

BINS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 500) -> np.ndarray:
    """Lawson-Hanson active-set solution of min |a x - b| subject to x >= 0."""
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, bool)
    for _ in range(max_iter):
        grad = a.T @ (b - a @ x)
        if passive.all() or grad[~passive].max(initial=-np.inf) <= 1e-12 * max(1.0, np.abs(grad).max()):
            break
        passive[np.flatnonzero(~passive)[np.argmax(grad[~passive])]] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            bad = passive & (z <= 0)
            step = np.min(x[bad] / (x[bad] - z[bad]))
            x = x + step * (z - x)
            passive &= x > 1e-15
    return x


def scan_frames(problem, grid: np.ndarray) -> dict:
    """Per frame: best single grid thickness and the NNLS distribution on the grid. R_obs as
    reported everywhere (observed reflections, Io > 3 sigma; WLS frame scales)."""
    m = problem.model
    with torch.no_grad():
        ic = m.intensities(m.grid_state(grid), m.potential(), per_thickness=True)  # (R, Q)
    costs = m.scan_costs(ic)  # (F, Q); NaN for frames without reflections
    best = np.argmin(np.nan_to_num(costs, nan=np.inf), 1)  # (F,) each frame's best column
    ic_best = ic[torch.arange(len(m.io)), torch.as_tensor(best)[m.frame]]
    w = klar_weights(m.io, m.sigma, m.settings.instability)
    single_fit = frame_scales(m.io, ic_best, w, m.frame, m.n_frames)[m.frame] * ic_best
    obs = m.io > 3 * m.sigma
    io, frame, ic_np, w_np = m.io.numpy(), m.frame.numpy(), ic.numpy(), w.numpy()
    rows = []
    for f in np.unique(frame):
        s = frame == f
        sw = np.sqrt(w_np[s])
        coef = nnls(ic_np[s] * sw[:, None], io[s] * sw)
        mix = torch.as_tensor(ic_np[s] @ coef)
        support = [(float(grid[i]), float(coef[i] / coef.sum())) for i in np.flatnonzero(coef > 0.02 * coef.max())]
        rows.append({"frame": int(f), "n": int(s.sum()), "thickness_A": float(grid[best[f]]),
                     "R_obs_single": r_obs(m.io[s], single_fit[s], obs[s]), "chi2_single": float(costs[f, best[f]] / s.sum()),
                     "R_obs_distribution": r_obs(m.io[s], mix, obs[s]),
                     "chi2_distribution": float((w_np[s] * (io[s] - mix.numpy()) ** 2).sum() / s.sum()),
                     "distribution": support})
    u = torch.as_tensor(m.plan.scored.excitation_error / m.plan.scored.excitation_range)
    bins = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (u >= lo) & (u < hi)
        if sel.any():
            bins.append({"lo": lo, "hi": hi, "n": int(sel.sum()), "R_obs": r_obs(m.io[sel], single_fit[sel], obs[sel]),
                         "sum_Io_over_Ic": float(m.io[sel].sum() / single_fit[sel].sum())})
    return {"frames": rows, "R_obs_single": r_obs(m.io, single_fit, obs), "excitation_bins": bins}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--dataset", choices=sorted(DATASETS), default="quartz")
    p.add_argument("--frames-step", type=int, default=10)
    p.add_argument("--grid", default="20,3000,20", help="start,stop,step of the thickness grid (A)")
    p.add_argument("--refine-frames", action="store_true", help="also refine the frame parameters by LM")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data, truth_path, _ = DATASETS[args.dataset]
    root = Path(args.data_root)
    ds = read_pets(str(root / data))
    truth = crystal_from_record(read_structure(str(root / truth_path)))
    overrides = dict(parse_setting(item) for item in args.set)
    frame_only = {"refine_xyz": False, "refine_adp": False, "refine_orientation": False, "adam_steps": 0,
                  "lm_iterations": 12, "integration_check": False}
    settings = settings_from_mapping({**PAPER_PHYSICS, **DATASET_PHYSICS[args.dataset], **frame_only, **overrides},
                                     "model_at_truth")
    mask = every_nth_frame_mask(len(ds.frames), args.frames_step)
    t0 = time.perf_counter()
    problem = build_problem(truth, ds, settings, frame_mask=mask)
    lo, hi, step = (float(v) for v in args.grid.split(","))
    out = {"dataset": args.dataset, "frames_step": args.frames_step, "settings": overrides,
           **scan_frames(problem, np.arange(lo, hi + 0.5 * step, step))}
    if args.refine_frames:
        result = refine(problem, settings, log=lambda s: None)
        out["refined"] = {**result.figures.as_dict(), "lm_iterations": result.lm.iteration,
                          "converged": bool(result.lm.converged)}
    out["time_s"] = time.perf_counter() - t0
    print(json.dumps(out))
    if args.json:
        write_json(Path(args.json), out)
    print("\n| frame | n | best t (A) | R_obs, one thickness | R_obs, best distribution |")
    print("|---|---|---|---|---|")
    for r in out["frames"]:
        print(f"| {r['frame']} | {r['n']} | {r['thickness_A']:.0f} | {100 * r['R_obs_single']:.1f} % | "
              f"{100 * r['R_obs_distribution']:.1f} % |")
    print("\n| s / range | n | R_obs | sum Io / sum Ic |\n|---|---|---|---|")
    for b in out["excitation_bins"]:
        print(f"| {b['lo']:+.2f} .. {b['hi']:+.2f} | {b['n']} | {100 * b['R_obs']:.1f} % | {b['sum_Io_over_Ic']:.3f} |")
    if "refined" in out:
        r = out["refined"]
        print(f"\nframe parameters refined: R_obs {100 * r['R_obs']:.2f} %, wR2 {100 * r['wR2']:.2f} %, "
              f"GoF {r['GoF']:.2f}, {r['lm_iterations']} LM iterations, converged {r['converged']}")


if __name__ == "__main__":
    main()
