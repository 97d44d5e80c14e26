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
from blochflow.io.pets import read_pets
from blochflow.io.structure_cif import read_structure
from blochflow.io.writers import write_json
from blochflow.physics.diffraction import FrameState
from blochflow.refine.objective import klar_weights
from blochflow.refine.run import build_problem, parse_setting, refine, settings_from_mapping
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


def r_obs(io: np.ndarray, ic: np.ndarray) -> float:
    a, b = np.sqrt(np.clip(io, 0, None)), np.sqrt(np.clip(ic, 0, None))
    return float(np.abs(a - b).sum() / a.sum())


def scan_frames(problem, grid: np.ndarray) -> dict:
    """Per frame: best single grid thickness and the NNLS distribution on the grid."""
    m = problem.model
    base = m.frame_state(1.0)
    state = FrameState(base.alpha, base.beta, base.omega, torch.as_tensor(grid)[None, :].expand(m.n_frames, -1),
                       torch.full((m.n_frames, len(grid)), 1.0 / len(grid), dtype=torch.float64),
                       base.surface_normal, base.orientation_correction)
    with torch.no_grad():
        ic = m.intensities(state, m.potential(), per_thickness=True).numpy()  # (R, Q)
    io, frame = m.io.numpy(), m.frame.numpy()
    w = klar_weights(m.io, m.sigma, m.settings.instability).numpy()
    single_fit, rows = np.zeros(len(io)), []
    for f in np.unique(frame):
        s = frame == f
        ws, x = w[s], ic[s]
        k = (ws[:, None] * io[s, None] * x).sum(0) / np.maximum((ws[:, None] * x * x).sum(0), 1e-300)
        cost = (ws[:, None] * (io[s, None] - k * x) ** 2).sum(0)
        j = int(np.argmin(cost))
        single_fit[s] = k[j] * x[:, j]
        sw = np.sqrt(ws)
        coef = nnls(x * sw[:, None], io[s] * sw)
        mix = x @ coef
        cost_mix = float((ws * (io[s] - mix) ** 2).sum())
        support = [(float(grid[i]), float(coef[i] / coef.sum())) for i in np.flatnonzero(coef > 0.02 * coef.max())]
        rows.append({"frame": int(f), "n": int(s.sum()), "thickness_A": float(grid[j]),
                     "R_obs_single": r_obs(io[s], single_fit[s]), "chi2_single": float(cost[j] / s.sum()),
                     "R_obs_distribution": r_obs(io[s], mix), "chi2_distribution": cost_mix / s.sum(),
                     "distribution": support})
    u = m.plan.scored.excitation_error / m.plan.scored.excitation_range
    bins = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (u >= lo) & (u < hi)
        if sel.any():
            bins.append({"lo": lo, "hi": hi, "n": int(sel.sum()), "R_obs": r_obs(io[sel], single_fit[sel]),
                         "sum_Io_over_Ic": float(io[sel].sum() / single_fit[sel].sum())})
    return {"frames": rows, "R_obs_single": r_obs(io, single_fit), "excitation_bins": bins}


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
    mask = np.zeros(len(ds.frames), bool)
    mask[::args.frames_step] = True
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
