"""Plan building: the table of potential coefficients a dataset's beam pairs need, and the distinct beam
sets whose pair indices are cached, by the rules build_plan uses now (``mark_differences``: only the
pairs with a beam new since the sample before; ``distinct_rows``: hashed rows) against the rules before
(every sample's full N x N table of differences; ``np.unique`` of the padded rows), run in one process
on the same beam sets, with the results compared.

    python benchmarks/plan.py [--frames 6] [--json FILE]

Cases: the README example (quartz, diffBloch's beam sets, 38 beams per solve), quartz at the default
beams, and paracetamol at the default beams (1105 per solve) on its first ``--frames`` frames.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from blochflow.cli import REFINE_EXAMPLES
from blochflow.crystal.structure import crystal_from_record
from blochflow.data import example_path
from blochflow.io.pets import read_pets, select_frames
from blochflow.io.structure_cif import read_structure
from blochflow.physics.plan import distinct_rows, mark_differences
from blochflow.refine.run import build_problem
from blochflow.refine.settings import settings_from_mapping

PARACETAMOL = ("../shared/data/paracetamol/synthetic/paracetamol_01_displacement.cif",
               "../shared/data/paracetamol/synthetic/paracetamol_paper_data.cif_pets")


def beam_sets(plan):
    """Each solved sample's beams (hkl, (N, 3) int) in sample order, and each chunk's padded (hkl, mask)."""
    beams = {}
    for ch in plan.chunks:
        for j, s in enumerate(ch.sample.tolist()):
            beams[s] = ch.hkl[j][ch.mask[j]].numpy().astype(np.int64)
    return [beams[s] for s in sorted(beams)], [(ch.hkl.numpy().astype(np.int64), ch.mask.numpy()) for ch in plan.chunks]


def box(sets):
    hmax = np.max(np.abs(np.concatenate(sets)), axis=0) * 2
    shape = tuple(int(2 * m + 1) for m in hmax)
    strides = np.array([shape[1] * shape[2], shape[2], 1], np.int64)
    return int(np.prod(shape)), strides, int(hmax @ strides)


def used_before(chunks, size, strides, centre):
    """The rule before: per chunk, np.unique of the padded rows, then every distinct set's N x N differences."""
    used = np.zeros(size, bool)
    used[centre] = True
    for hkl, mask in chunks:
        rows = np.concatenate([hkl.reshape(len(hkl), -1), mask.astype(np.int64)], 1)
        _, first, which = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        a = hkl[first] @ strides
        ok = mask[first][:, :, None] & mask[first][:, None, :]
        used[(a[:, :, None] - a[:, None, :] + centre)[ok]] = True
    return used


def used_now(sets, chunks, size, strides, centre):
    used = np.zeros(size, bool)
    used[centre] = True
    positions = [s @ strides for s in sets]
    mark_differences(used, positions, positions, centre)
    for hkl, mask in chunks:  # the distinct sets (build_plan forms them only when it caches pair indices)
        distinct_rows(np.concatenate([hkl.reshape(len(hkl), -1), mask.astype(np.int64)], 1))
    return used


def case(name, cif, pets, settings, frames=None) -> dict:
    ds = read_pets(pets)
    if frames:
        keep = np.zeros(len(ds.frames.ids), bool)
        keep[:frames] = True
        ds = select_frames(ds, keep)
    problem = build_problem(crystal_from_record(read_structure(cif)), ds, settings_from_mapping(
        {"thickness": 600.0, **settings}, "benchmark"))
    sets, chunks = beam_sets(problem.model.plan)
    size, strides, centre = box(sets)
    t0 = time.perf_counter()
    before = used_before(chunks, size, strides, centre)
    t1 = time.perf_counter()
    now = used_now(sets, chunks, size, strides, centre)
    t2 = time.perf_counter()
    row = {"case": name, "samples": len(sets), "beams_mean": float(np.mean([len(s) for s in sets])),
           "before_s": t1 - t0, "now_s": t2 - t1, "ratio": (t2 - t1) / (t1 - t0),
           "same_table": bool(np.array_equal(before, now)), "coefficients": int(now.sum())}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=6, help="paracetamol frames (from the first)")
    p.add_argument("--json")
    args = p.parse_args()
    quartz = example_path("quartz", "quartz_kinematical.cif"), example_path("quartz", "quartz.cif_pets")
    rows = [case("quartz, README example", *quartz, REFINE_EXAMPLES["quartz"][2]),
            case("quartz, default beams", *quartz, {}),
            case(f"paracetamol, default beams, {args.frames} frames", *PARACETAMOL, {}, args.frames)]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
