"""A thickness scan (every 2nd frame of the README example at its settings, the thickness grid 100-3000 A
every 25 A: what each of the tilt search's tilts costs) with the phase factors of the uniform grid built
in blocks (now) and formed directly (before), alternated in one process, best of --repeat each, and the
two cost tables compared.

    python benchmarks/thickness_scan.py [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import blochflow.physics.diffraction as diffraction
from blochflow.cli import REFINE_EXAMPLES
from blochflow.crystal.structure import crystal_from_record
from blochflow.data import example_path
from blochflow.io.pets import read_pets
from blochflow.io.structure_cif import read_structure
from blochflow.refine.frame_search import _grid_costs
from blochflow.refine.run import build_problem
from blochflow.refine.settings import settings_from_mapping


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    settings = settings_from_mapping(dict(REFINE_EXAMPLES["quartz"][2]), "benchmark")
    problem = build_problem(crystal_from_record(read_structure(example_path("quartz", "quartz_kinematical.cif"))),
                            read_pets(example_path("quartz", "quartz.cif_pets")), settings)
    problem.forward_dtype = torch.float32
    frames = torch.zeros(problem.model.n_frames, dtype=torch.bool)
    frames[::2] = True
    block_min = diffraction.GRID_BLOCK_MIN
    times, tables = {"blocks": [], "direct": []}, {}
    try:
        for i in range(2 * args.repeat + 2):  # the first pair warms up
            mode = "blocks" if i % 2 else "direct"
            diffraction.GRID_BLOCK_MIN = block_min if mode == "blocks" else 10 ** 9
            t0 = time.perf_counter()
            _, tables[mode] = _grid_costs(problem, problem.theta0, settings, frames=frames)
            if i >= 2:
                times[mode].append(time.perf_counter() - t0)
    finally:
        diffraction.GRID_BLOCK_MIN = block_min
    ok = np.isfinite(tables["direct"])
    rel = np.abs(tables["blocks"][ok] - tables["direct"][ok]) / tables["direct"][ok]
    row = {"frames": int(frames.sum()), "samples": int(problem.model.samples_per_frame()[frames.numpy()].sum()),
           "grid_points": int(tables["direct"].shape[1]), "direct_s": min(times["direct"]),
           "blocks_s": min(times["blocks"]), "ratio": min(times["blocks"]) / min(times["direct"]),
           "cost_rel_diff_max": float(rel.max()),
           "same_best_thickness": bool(np.array_equal(np.argmin(np.where(ok, tables["blocks"], np.inf), 1),
                                                      np.argmin(np.where(ok, tables["direct"], np.inf), 1)))}
    print(json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(row, fh, indent=1)


if __name__ == "__main__":
    main()
