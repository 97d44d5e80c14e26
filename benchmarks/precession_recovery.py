"""Structure recovery on precession frames whose truth is known exactly, through the command line.

The bundled quartz dataset's frames are declared precession frames (its
``_diffrn_zone_axis_precession_angle`` of 1 deg becomes the cone's semi-angle); ``blochflow
simulate --write-pets`` writes Poisson-noise data from ``quartz_kinematical.cif`` at a thickness
that varies with the frame's angle (``--thickness``), and ``blochflow refine`` (defaults) refines a displaced start
against them. Reported: position RMSD, ADP errors, R values, each frame's refined thickness
against the truth (ratio, and error in s.u.), the orientation corrections over their s.u. (their
truth is zero), the frames below one sample per fringe, wall time.

    python benchmarks/precession_recovery.py [--data-root ../shared/data] [--start 02] [--threads 2]
        [--geometry precession|continuous] [--thickness MEAN,AMPLITUDE] [--set NAME=VALUE ...]
        [--work DIR] [--json FILE]

``--geometry continuous`` keeps the frames rocking frames: the same known-truth case for them.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from blochflow.crystal.structure import crystal_from_record, structure_deviation
from blochflow.io.structure_cif import read_structure

EXAMPLE = Path(__file__).resolve().parents[1] / "src" / "blochflow" / "data" / "examples" / "quartz"
THICKNESS = (900.0, 300.0)  # A: mean + amplitude * sin(alpha) per frame (720-1130 A over the dataset's -49..+49 deg)


def thickness_truth(alpha_deg: np.ndarray, mean: float, amplitude: float) -> np.ndarray:
    return mean + amplitude * np.sin(np.radians(alpha_deg))


def blochflow(threads: int, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "blochflow.cli", "--threads", str(threads), *args], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--start", default="02", help="quartz synthetic start (01, 02, 03)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work", help="folder for the data and the refinement (default: a temporary one)")
    p.add_argument("--geometry", choices=("precession", "continuous"), default="precession",
                   help="declare the frames precession frames (default) or keep them rocking frames")
    p.add_argument("--thickness", default=",".join(f"{v:g}" for v in THICKNESS), metavar="MEAN,AMPLITUDE",
                   help="true thickness MEAN + AMPLITUDE sin(alpha) in A (default 900,300; 1800,300 is a thick crystal)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a refine setting (repeatable)")
    p.add_argument("--json")
    args = p.parse_args()
    mean, amplitude = (float(v) for v in args.thickness.split(","))
    root = Path(args.data_root)
    truth_cif = root / "quartz" / "experimental" / "quartz_kinematical.cif"
    start_cif = root / "quartz" / "synthetic" / f"quartz_{args.start}_displacement.cif"
    work = Path(args.work or tempfile.mkdtemp(prefix="precession_"))
    work.mkdir(parents=True, exist_ok=True)
    text = (EXAMPLE / "quartz.cif_pets").read_text()
    assert "geometry: continuous rotation" in text
    template = work / "precession_template.cif_pets"
    if args.geometry == "precession":
        text = text.replace("geometry: continuous rotation", "geometry: precession")
    template.write_text(text)
    data = work / "precession_truth.cif_pets"
    blochflow(args.threads, "simulate", str(truth_cif), str(template), "--thickness-expr",
              f"{mean:g}+{amplitude:g}*sin(radians(alpha))",
              "--write-pets", str(data), "--noise", "poisson", "--seed", str(args.seed), "--overwrite",
              "--out", str(work / "simulate"))
    t0 = time.perf_counter()
    blochflow(args.threads, "refine", str(start_cif), str(data), "--out", str(work / "refine"), "--overwrite",
              *[a for item in args.set for a in ("--set", item)])
    wall = time.perf_counter() - t0
    truth = crystal_from_record(read_structure(str(truth_cif)))
    before = structure_deviation(crystal_from_record(read_structure(str(start_cif))), truth)
    after = structure_deviation(crystal_from_record(read_structure(str(work / "refine" / "refined.cif"))), truth)
    summary = json.loads((work / "refine" / "summary.json").read_text())
    rows = list(csv.DictReader(open(work / "refine" / "frames.csv")))
    col = {k: np.array([float(r[k]) for r in rows]) for k in (
        "alpha_deg", "thickness_mean", "thickness_mean_su", "samples_per_fringe", "orientation_x_mrad",
        "orientation_x_su_mrad", "orientation_y_mrad", "orientation_y_su_mrad")}
    true_t = thickness_truth(col["alpha_deg"], mean, amplitude)
    ratio = col["thickness_mean"] / true_t
    z = (col["thickness_mean"] - true_t) / col["thickness_mean_su"]
    oz = np.concatenate([col[f"orientation_{a}_mrad"] / col[f"orientation_{a}_su_mrad"] for a in "xy"])
    res = {"geometry": args.geometry, "start": args.start, "thickness_mean_amplitude_A": [mean, amplitude],
           "start_rmsd_A": before["rmsd_A"], **after,
           **{k: summary.get(k) for k in ("R_obs", "wR2", "GoF", "R_obs_frame_mean", "R_free", "converged",
                                          "iterations")},
           "thickness_ratio_percentiles_0_5_50_95_100": np.percentile(ratio, [0, 5, 50, 95, 100]).round(3).tolist(),
           "frames_off_by_20_percent": int(np.sum(np.abs(ratio - 1) > 0.2)),
           "thickness_error_su_median": float(np.median(z)),
           "thickness_error_su_sd": float(np.std(z)),
           # the truth of every orientation correction is zero: refined value / s.u. should be about N(0, 1)
           "orientation_error_su_sd": float(np.std(oz)),
           "orientation_error_su_worst": float(np.max(np.abs(oz))),
           "frames_below_one_sample_per_fringe": int(np.sum(col["samples_per_fringe"] < 1)),
           "wall_s": wall, "work": str(work)}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
