"""Thick crystal whose frame orientations really are off: recovery through the command line.

A known-truth case built from scratch (docs/refinement.md, "Thick crystals"): ZnO (P6_3mc), 41
continuous-rotation frames 1 deg apart, each a 2 deg wedge (neighbours overlap by half, as PETS
virtual frames do), thickness 1500 / cos(alpha) x (1 + 0.1 sin(f / 6)) A (1360-1680 A), and smooth
true orientation corrections: about x (the rotation axis) 0.8 + 1.5 sin(2 pi f / 40 + 0.5) mrad,
about y -0.15 + 0.45 cos(2 pi f / 30) mrad. ``blochflow simulate --write-pets`` writes Poisson data
from the true structure and this frame model, and ``blochflow refine`` (defaults, plus ``--set``)
refines a displaced start (z 0.0076 / 0.3763, U twice the truth) against them. Reported: GoF (the
truth's too), the errors of the corrections about x and y (rms, and rms over their s.u.), the
thickness error, z(O) - z(Zn) against the truth, U_eq, wall time.

    python benchmarks/thick_orientation.py [--threads 2] [--set NAME=VALUE ...] [--work DIR] [--json FILE]

``--set tilt_search=false`` gives the run without the tilt search.
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

from blochflow.io.structure_cif import read_structure

CELL = (3.2496, 3.2496, 5.2042, 90.0, 90.0, 120.0)
N_FRAMES = 41
TRUTH_Z = (0.0, 0.3819)
ATOMS = """loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_adp_type
_atom_site_U_iso_or_equiv
Zn1 Zn 0.333333 0.666667 {z_zn} Uani 0.0055
O1 O 0.333333 0.666667 {z_o} Uani 0.0070
loop_
_atom_site_aniso_label
_atom_site_aniso_U_11
_atom_site_aniso_U_22
_atom_site_aniso_U_33
_atom_site_aniso_U_12
_atom_site_aniso_U_13
_atom_site_aniso_U_23
Zn1 {u_zn}
O1 {u_o}
"""


def structure_cif(z_zn: float, z_o: float, u_factor: float) -> str:
    u_zn = np.array([0.0056, 0.0056, 0.0053, 0.0028, 0, 0]) * u_factor
    u_o = np.array([0.0068, 0.0068, 0.0074, 0.0034, 0, 0]) * u_factor
    head = ["data_zno", "_symmetry_space_group_name_H-M 'P 63 m c'"]
    head += [f"_cell_length_{n} {v}" for n, v in zip("abc", CELL[:3])]
    head += [f"_cell_angle_{n} {v}" for n, v in zip(("alpha", "beta", "gamma"), CELL[3:])]
    return "\n".join(head) + "\n" + ATOMS.format(z_zn=f"{z_zn:.6f}", z_o=f"{z_o:.6f}",
                                                 u_zn=" ".join(f"{u:.5f}" for u in u_zn),
                                                 u_o=" ".join(f"{u:.5f}" for u in u_o))


def geometry_pets(alphas: np.ndarray, g_max: float = 2.0) -> str:
    """A .cif_pets with the frames and every reflection within g_max listed on each (simulate
    --write-pets keeps those each frame excites)."""
    a, b, c, al, be, ga = CELL[:3] + tuple(np.radians(CELL[3:]))
    direct = np.array([[a, 0, 0], [b * np.cos(ga), b * np.sin(ga), 0], [0, 0, 0]])
    cx, cy = c * np.cos(be), c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    direct[2] = [cx, cy, np.sqrt(c * c - cx * cx - cy * cy)]
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    ub = q @ np.linalg.inv(direct)
    lines = ["data_pets"] + [f"_cell_length_{n} {v:.4f}" for n, v in zip("abc", CELL[:3])]
    lines += [f"_cell_angle_{n} {v:.3f}" for n, v in zip(("alpha", "beta", "gamma"), CELL[3:])]
    lines.append("_diffrn_radiation_wavelength 0.02508")
    lines += [f"_diffrn_orient_matrix_UB_{i + 1}{j + 1} {ub[i, j]:.6f}" for i in range(3) for j in range(3)]
    lines += ["_diffrn_measurement_details", ";", "data collection geometry: continuous rotation",
              f"dstarmax:  {g_max:.3f}", "RC width:  0.00100", "mosaicity:  0.050", "rotation axis position:    0.484",
              ";", "loop_"]
    lines += ["_diffrn_zone_axis_" + t for t in "id u v w precession_angle alpha beta omega scale".split()]
    lines += [f"{k + 1} 1 0 0 1.000 {a_:.3f} 0.0 0.3 1.0" for k, a_ in enumerate(alphas)]
    lines += ["loop_"] + ["_refln_" + t for t in "index_h index_k index_l intensity_meas intensity_sigma zone_axis_id".split()]
    metric = np.linalg.inv(direct @ direct.T)
    n = [int(g_max * x) + 1 for x in CELL[:3]]
    hkl = [(h, k, l) for h in range(-n[0], n[0] + 1) for k in range(-n[1], n[1] + 1) for l in range(-n[2], n[2] + 1)
           if (h, k, l) != (0, 0, 0) and np.sqrt(np.array([h, k, l]) @ metric @ np.array([h, k, l])) < g_max]
    lines += [f"{h} {k} {l} 100.0 10.0 {f + 1}" for f in range(len(alphas)) for h, k, l in hkl]
    return "\n".join(lines) + "\n"


def true_frame_model(alphas: np.ndarray) -> dict:
    f = np.arange(len(alphas))
    thickness = 1500 / np.cos(np.radians(alphas)) * (1 + 0.1 * np.sin(f / 6.0))
    corrections = np.stack([0.8 + 1.5 * np.sin(2 * np.pi * f / 40 + 0.5), -0.15 + 0.45 * np.cos(2 * np.pi * f / 30)], 1)
    return {"format": "blochflow-frame-model-1", "thickness_model": {"kind": "per-frame", "thickness": [1000.0] * len(f)},
            "refine_orientation": True,
            "raw": {"thickness": np.log(thickness / 1000.0).tolist(), "orientation": corrections.reshape(-1).tolist()},
            "frame_ids": (f + 1).tolist(), "alpha_deg": [round(float(a), 3) for a in alphas]}


def blochflow(threads: int, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "blochflow.cli", "--threads", str(threads), *args], check=True,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--work", help="folder for the data and the refinement (default: a temporary one)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a refine setting (repeatable)")
    p.add_argument("--json")
    args = p.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bf_thick_"))
    work.mkdir(parents=True, exist_ok=True)
    alphas = np.linspace(-20, 20, N_FRAMES)
    (work / "truth.cif").write_text(structure_cif(*TRUTH_Z, 1.0))
    (work / "start.cif").write_text(structure_cif(0.0076, 0.376329, 2.0))
    (work / "geometry.cif_pets").write_text(geometry_pets(alphas))
    model = true_frame_model(alphas)
    (work / "truth_frame_model.json").write_text(json.dumps(model))
    data = work / "data.cif_pets"
    blochflow(args.threads, "simulate", str(work / "truth.cif"), str(work / "geometry.cif_pets"), "--out",
              str(work / "sim"), "--frame-model", str(work / "truth_frame_model.json"), "--write-pets", str(data),
              "--noise", "poisson", "--seed", str(args.seed), "--overwrite")
    blochflow(args.threads, "simulate", str(work / "truth.cif"), str(data), "--out", str(work / "at_truth"),
              "--frame-model", str(work / "truth_frame_model.json"), "--overwrite")
    truth_gof = json.loads((work / "at_truth" / "summary.json").read_text())["GoF"]
    out = work / "refine"
    sets = [x for s in args.set for x in ("--set", s)]
    t0 = time.perf_counter()
    blochflow(args.threads, "refine", str(work / "start.cif"), str(data), "--out", str(out), "--overwrite", *sets)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader(open(out / "frames.csv")))
    corr = np.array([[float(r["orientation_x_mrad"]), float(r["orientation_y_mrad"])] for r in rows])
    su = np.array([[float(r["orientation_x_su_mrad"]), float(r["orientation_y_su_mrad"])] for r in rows])
    thick = np.array([float(r["thickness_mean"]) for r in rows])
    true_corr = np.array(model["raw"]["orientation"]).reshape(-1, 2)
    true_thick = 1000.0 * np.exp(np.array(model["raw"]["thickness"]))
    err = corr - true_corr
    atoms = read_structure(out / "refined.cif").atoms
    z = {a.label: float(a.xyz[2]) for a in atoms}
    u_eq = {a.label: float(a.u_iso) for a in atoms}
    c = CELL[2]
    result = {
        "GoF": summary["GoF"], "GoF_truth": truth_gof, "R_obs": summary["R_obs"], "wR2": summary["wR2"],
        "lm_iterations": summary["iterations"]["lm"], "converged": summary["converged"],
        "x_error_rms_mrad": float(np.sqrt(np.mean(err[:, 0] ** 2))),
        "y_error_rms_mrad": float(np.sqrt(np.mean(err[:, 1] ** 2))),
        "x_error_over_su_rms": float(np.sqrt(np.mean((err[:, 0] / su[:, 0]) ** 2))),
        "y_error_over_su_rms": float(np.sqrt(np.mean((err[:, 1] / su[:, 1]) ** 2))),
        "thickness_error_rms_A": float(np.sqrt(np.mean((thick - true_thick) ** 2))),
        "dz_O_Zn_error_A": ((z["O1"] - z["Zn1"]) - (TRUTH_Z[1] - TRUTH_Z[0])) * c,
        "U_eq": u_eq, "wall_s": wall, "settings": args.set, "work": str(work),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
