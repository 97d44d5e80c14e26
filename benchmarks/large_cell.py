"""A large, F-centred cell: an LTA-like zeolite model (Fm-3c, a = 24.61 A, 192 operators) on a made-up
continuous-rotation geometry, to measure how blochflow scales beyond quartz and paracetamol.

    python benchmarks/large_cell.py [--frames 1] [--samples 8] [--threads 2] [--json FILE]
    python benchmarks/large_cell.py --refine [--frames 6] [--work DIR] [--threads 2]

The first form times one forward pass (no gradient) over the first ``--frames`` frames for the
crystal as written (Fm-3c: the beams extinct by the F centring are left out, and the potential sums
48 coset operators) against the same crystal written in P1 (every image an atom of its own: all
beams, one operator), each in its own process so that its peak memory is its own; the intensities
must agree. The second writes Poisson data from the model (``blochflow simulate --write-pets``, 600 A)
and refines a start displaced by 0.0025 in each free coordinate with U_iso 0.02 (``blochflow
refine`` defaults, every 4th frame of 21) and reports the position RMSD from the truth, R values and
time. The coordinates approximate dehydrated Na-A; they are a test model, not a reference.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gemmi
import numpy as np

A = 24.61
ATOMS = [("Si1", "Si", 0.0, 0.0921, 0.1857, 0.008), ("Al1", "Al", 0.0, 0.1876, 0.0892, 0.008),
         ("O1", "O", 0.0, 0.1131, 0.2456, 0.015), ("O2", "O", 0.0, 0.1466, 0.1474, 0.015),
         ("O3", "O", 0.0535, 0.0566, 0.1716, 0.015), ("Na1", "Na", 0.0995, 0.0995, 0.0995, 0.020)]
# displacement of the start in each coordinate that is free on its site (0.06 A)
FREE = {"Si1": (0, 1, -1), "Al1": (0, -1, 1), "O1": (0, 1, 1), "O2": (0, -1, -1), "O3": (1, -1, 1), "Na1": (1, 1, 1)}
SHIFT = 0.0025
WAVELENGTH = 0.02508
DSTARMAX = 1.0
HALF_ANGLE = 0.5  # deg
ALPHAS = np.arange(-30.0, 31.0, 3.0)  # 21 frames


def structure_cif(atoms, group: str = "F m -3 c", cell=(A, A, A), name: str = "lta_like") -> str:
    """A structure CIF (U_iso) of atoms (label, element, x, y, z, U) in an orthogonal cell."""
    lines = [f"data_{name}", *(f"_cell_length_{x} {v}" for x, v in zip("abc", cell)), *(f"_cell_angle_{x} 90" for x in
             ("alpha", "beta", "gamma")), f"_symmetry_space_group_name_H-M '{group}'", "loop_", "_atom_site_label",
             "_atom_site_type_symbol", "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z",
             "_atom_site_U_iso_or_equiv"]
    lines += [f"{lab} {el} {x:.6f} {y:.6f} {z:.6f} {u}" for lab, el, x, y, z, u in atoms]
    return "\n".join(lines) + "\n"


def p1_atoms():
    """Every image of the Fm-3c atoms in the cell, each an atom of its own (for the P1 description)."""
    ops = gemmi.SpaceGroup("F m -3 c").operations()
    out = []
    for lab, el, x, y, z, u in ATOMS:
        seen = []
        for op in ops:
            p = np.array(op.apply_to_xyz([x, y, z])) % 1.0
            if not any(np.all(np.abs((p - q + 0.5) % 1.0 - 0.5) < 1e-6) for q in seen):
                seen.append(p)
        out += [(f"{lab}_{i}", el, *p, u) for i, p in enumerate(seen)]
    return out


def _rotation(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r if axis != 1 else r.T


def geometry_pets(group: str = "F m -3 c", cell=(A, A, A)) -> str:
    """A .cif_pets header, frame loop and reflection list (I = sigma = 1) for the reflections near
    their Bragg condition in each frame (beam along -z, rotation axis x, |s_g| within 0.9 of the
    wedge's reach), for an orthogonal cell."""
    uc = gemmi.UnitCell(*cell, 90, 90, 90)
    ub = _rotation(2, 0.3) @ _rotation(0, 0.7) @ _rotation(1, 0.2) @ np.array(uc.frac.mat.tolist()).T
    ops = gemmi.SpaceGroup(group).operations()
    k = 1.0 / WAVELENGTH
    n = int(DSTARMAX * max(cell)) + 1
    grid = np.stack(np.meshgrid(*[np.arange(-n, n + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[(np.linalg.norm(grid @ ub.T, axis=1) < DSTARMAX) & np.any(grid != 0, axis=1)]
    grid = grid[[not ops.is_systematically_absent([int(v) for v in h]) for h in grid]]
    rows = []
    for fid, alpha in enumerate(ALPHAS, 1):
        g = grid @ (_rotation(0, math.radians(alpha)) @ ub).T
        s = (k ** 2 - np.sum((g + [0.0, 0.0, -k]) ** 2, 1)) / (2 * k)
        near = np.abs(s) < 0.9 * np.abs(g[:, 1]) * math.radians(HALF_ANGLE) + 1e-4
        rows += [f"{h} {kk} {l} 1 1 {fid}" for h, kk, l in grid[near]]
    head = ["data_pets", *(f"_cell_length_{x} {v}" for x, v in zip("abc", cell)),
            *(f"_cell_angle_{x} 90" for x in ("alpha", "beta", "gamma")), f"_diffrn_radiation_wavelength {WAVELENGTH}"]
    head += [f"_diffrn_orient_matrix_UB_{i + 1}{j + 1} {ub[i, j]:.8f}" for i in range(3) for j in range(3)]
    head += ["_diffrn_measurement_details", ";", "data collection geometry: continuous rotation",
             f"dstarmax:  {DSTARMAX:.3f}", "RC width:  0.00100", "mosaicity:  0.050", "rotation axis position:    0.000",
             ";", "", "loop_", *(f"_diffrn_zone_axis_{x}" for x in ("id", "u", "v", "w", "precession_angle", "alpha",
                                                                   "beta", "omega", "scale"))]
    head += [f"{i} 0 0 1 {HALF_ANGLE} {a:.2f} 0 0 1" for i, a in enumerate(ALPHAS, 1)]
    head += ["", "loop_", *(f"_refln_{x}" for x in ("index_h", "index_k", "index_l", "intensity_meas",
                                                    "intensity_sigma", "zone_axis_id"))]
    return "\n".join(head + rows) + "\n"


def write_inputs(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "truth.cif").write_text(structure_cif(ATOMS))
    start = [(lab, el, *(c + SHIFT * d for c, d in zip((x, y, z), FREE[lab])), 0.02) for lab, el, x, y, z, _ in ATOMS]
    (work / "start.cif").write_text(structure_cif(start))
    (work / "p1.cif").write_text(structure_cif(p1_atoms(), "P 1"))
    (work / "geometry.cif_pets").write_text(geometry_pets())


def forward_once(work: Path, which: str, frames: int, samples: int, threads: int) -> dict:
    """One forward pass in this process: time, beams and peak memory (the caller runs it alone)."""
    import torch

    from blochflow.crystal.structure import crystal_from_record
    from blochflow.io.pets import frame_selection, read_pets, select_frames
    from blochflow.io.structure_cif import read_structure
    from blochflow.physics.plan import BeamSettings
    from blochflow.refine.model import ForwardModel, ModelSettings

    torch.set_num_threads(threads)
    ds = read_pets(work / "geometry.cif_pets")
    ds = select_frames(ds, frame_selection(ds.frames.ids, f"1-{frames}"))
    crystal = crystal_from_record(read_structure(work / ("truth.cif" if which == "centred" else "p1.cif")))
    t0 = time.perf_counter()
    model = ForwardModel(crystal, ds, ModelSettings(beams=BeamSettings(n_samples=samples)))
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        ic = model.intensities(model.frame_state(600.0))
    return {"description": which, "operators": len(crystal.symmetry), "atoms": len(crystal.asu.labels),
            "beams_per_solve": float(np.mean(model.plan.n_beams[model.plan.n_beams > 1])),
            "potential_rows": len(model.plan.potential_hkl), "setup_s": setup, "forward_s": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "intensities": ic.tolist()}


def compare(args, work: Path) -> dict:
    rows = {}
    for which in ("centred", "p1"):
        out = subprocess.run([sys.executable, __file__, "--work", str(work), "--one", which, "--frames", str(args.frames),
                              "--samples", str(args.samples), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        rows[which] = json.loads(out.strip().splitlines()[-1])
    a, b = (np.array(rows[w].pop("intensities")) for w in ("centred", "p1"))
    return {**rows, "max_relative_difference": float(np.abs(a - b).max() / np.abs(b).max()),
            "forward_ratio": rows["p1"]["forward_s"] / rows["centred"]["forward_s"],
            "memory_ratio": rows["p1"]["peak_rss_mb"] / rows["centred"]["peak_rss_mb"]}


def refine_case(args, work: Path) -> dict:
    def run(*cli):
        subprocess.run([sys.executable, "-m", "blochflow.cli", "--threads", str(args.threads), *cli], check=True,
                       stdout=subprocess.DEVNULL)

    run("simulate", str(work / "truth.cif"), str(work / "geometry.cif_pets"), "--write-pets", str(work / "data.cif_pets"),
        "--overwrite", "--thickness", str(getattr(args, "thickness", 600.0)), "--out", str(work / "sim"))
    t0 = time.perf_counter()
    run("refine", str(work / "start.cif"), str(work / "data.cif_pets"), "--out", str(work / "refined"), "--overwrite",
        "--frames", f"1-21:{args.frame_step}")
    wall = time.perf_counter() - t0
    from blochflow.crystal.structure import crystal_from_record, structure_deviation
    from blochflow.io.structure_cif import read_structure

    truth = crystal_from_record(read_structure(work / "truth.cif"))
    summary = json.loads((work / "refined" / "summary.json").read_text())
    dev = {}
    for name in ("start.cif", "refined/refined.cif"):
        dev[name] = structure_deviation(crystal_from_record(read_structure(work / name)), truth)
    return {"summary": {k: summary.get(k) for k in ("R_obs", "wR2", "GoF", "R_free", "iterations", "converged",
                                                    "n_params", "convergence")},
            "deviation": {k: {kk: float(vv) for kk, vv in v.items() if np.ndim(vv) == 0} for k, v in dev.items()},
            "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=1, help="frames in the forward comparison (first N of 21)")
    p.add_argument("--samples", type=int, default=8, help="tilts per frame in the forward comparison")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--refine", action="store_true", help="simulate data and refine a displaced start")
    p.add_argument("--frame-step", type=int, default=4, help="--refine: every Nth of the 21 frames")
    p.add_argument("--work", help="folder for the files (default: a temporary one)")
    p.add_argument("--one", choices=("centred", "p1"), help=argparse.SUPPRESS)
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if args.one:
            print(json.dumps(forward_once(work, args.one, args.frames, args.samples, args.threads)))
            return
        write_inputs(work)
        result = refine_case(args, work) if args.refine else compare(args, work)
    report(result, args.json)


def report(result: dict, json_path: str | None) -> None:
    """Print the result as JSON, and write it to ``json_path`` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")


if __name__ == "__main__":
    main()
