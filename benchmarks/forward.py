"""Forward-model benchmark: quartz experimental at default settings, and cost growth with beam count.

Reports, per frame: matrix size, solves, forward and forward+backward time, and the ratio of that
time to bare torch.linalg.eigh on the same batch of matrices (the linear-algebra floor), measured in
this process. Usage: python benchmarks/forward.py [--samples N] [--threads T] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from blochflow.crystal.structure import crystal_from_record
from blochflow.data import example_path
from blochflow.io.pets import read_pets
from blochflow.io.structure_cif import read_structure
from blochflow.physics.bloch import propagate
from blochflow.physics.diffraction import BeamSettings
from blochflow.refine.model import ForwardModel, ModelSettings


def _time(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def quartz_case(n_samples: int, dtype_note: str = "complex128") -> dict:
    crystal = crystal_from_record(read_structure(example_path("quartz", "quartz_reference.cif")))
    ds = read_pets(example_path("quartz", "quartz.cif_pets"))
    settings = ModelSettings(beams=BeamSettings(n_samples=n_samples))
    t0 = time.perf_counter()
    model = ForwardModel(crystal, ds, settings)
    t_plan = time.perf_counter() - t0
    n_frames = len(ds.frames)
    xyz = crystal.asu.xyz.clone().requires_grad_()
    uf = crystal.asu.u_frac.clone().requires_grad_()
    state = model.frame_state(600.0)

    def fwd():
        with torch.no_grad():
            model.intensities(state)

    def fwd_bwd():
        ic = model.intensities(state, model.potential(xyz=xyz, u_frac=uf))
        (ic.sum()).backward()

    t_fwd = _time(fwd)
    t_fb = _time(fwd_bwd)
    # bare eigh of the same batch (same padded sizes)
    mats = [torch.randn(len(ch.sample), ch.hkl.shape[1], ch.hkl.shape[1], dtype=torch.complex128) for ch in model.plan.chunks]
    mats = [(m + m.mH) / 2 for m in mats]
    t_eigh = _time(lambda: [torch.linalg.eigh(m) for m in mats])
    return {
        "case": "quartz experimental", "n_frames": n_frames, "samples_per_frame": n_samples,
        "solves_per_frame": n_samples, "beams_mean": float(np.mean(model.plan.n_beams)),
        "beams_max": int(np.max(model.plan.n_beams)), "n_scored": int(len(model.plan.scored.row)),
        "plan_s": t_plan, "forward_ms_per_frame": 1e3 * t_fwd / n_frames,
        "forward_backward_ms_per_frame": 1e3 * t_fb / n_frames,
        "bare_eigh_ms_per_frame": 1e3 * t_eigh / n_frames,
        "ratio_fwd_bwd_to_eigh": t_fb / t_eigh, "ratio_fwd_to_eigh": t_fwd / t_eigh, "dtype": dtype_note,
    }


def beam_scaling(sizes=(50, 100, 200, 400, 700), batch=4) -> list[dict]:
    """Cost of one solve (eigh + propagation + backward) against N, on structure-matrix-like input."""
    out = []
    k = 40.0
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(batch, n, n, dtype=torch.complex128, generator=g) * 0.01
        a = (x + x.mH) / 2 + torch.diag_embed(torch.linspace(-1, 1, n, dtype=torch.float64)).to(torch.complex128)
        t = torch.full((batch, 1), 600.0, dtype=torch.float64)
        inv_k = torch.full((batch,), 1 / k, dtype=torch.float64)

        def fb():
            ar = a.clone().requires_grad_()
            psi = propagate(ar, t, inv_k)
            (psi.abs() ** 2).sum().backward()

        t_fb = _time(fb, repeat=2) / batch
        t_e = _time(lambda: torch.linalg.eigh(a), repeat=2) / batch
        out.append({"beams": n, "fwd_bwd_ms_per_solve": 1e3 * t_fb, "eigh_ms_per_solve": 1e3 * t_e,
                    "ratio": t_fb / t_e, "per_frame_60_tilts_s": 60 * t_fb})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = {"threads": torch.get_num_threads(), "quartz": quartz_case(args.samples), "beam_scaling": beam_scaling()}
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
