"""Forward-model benchmark: quartz experimental at default settings, and cost growth with beam count.

Reports, per frame: matrix size, solves, forward and forward+backward time, and the ratio of that
time to bare torch.linalg.eigh on the same batch of matrices (the linear-algebra floor), measured in
this process. Then, each as a ratio to its baseline in this process: solves split over T threads
against one batched call per chunk on T threads (forward, forward+backward, LM Jacobian); the
potential's tangents from per-atom tables against forward-mode differentiation; and the Jacobian's
potential contraction against one matrix product per tangent (quartz, and paracetamol when the
shared data are present); and, with ``--only real``, the real symmetric solver that centrosymmetric
crystals get against the complex one (paracetamol at the paper's beams and at the defaults; the
non-centrosymmetric quartz as the control, whose only cost is the test).

    python benchmarks/forward.py [--samples N] [--threads T] [--data-root DIR] [--json FILE] [--only precision|real]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from blochflow.crystal.structure import crystal_from_record
from blochflow.data import example_path
from blochflow.io.pets import every_nth_frame_mask, read_pets
from blochflow.io.structure_cif import read_structure
import blochflow.physics.diffraction as diffraction
from blochflow.physics.bloch import propagate
from blochflow.physics.plan import BeamSettings
from blochflow.physics.workers import fixed_workers
from blochflow.refine.model import ForwardModel, ModelSettings
from blochflow.refine.run import build_problem, refined_index
from blochflow.refine.settings import settings_from_mapping


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


def precision_and_beams(n_samples: int, thickness: float = 545.0) -> list[dict]:
    """Quartz per frame at the default beams (s_max 0.02) and at diffBloch's (0.01), in double and
    single precision: forward and forward+backward time, and the error R = sum |sqrt(I) - sqrt(I_ref)|
    / sum sqrt(I_ref) against a reference with every beam to |s| < 0.03 in double precision (same
    tilts, reference structure, one thickness). The times are measured in this process, so their
    ratios to the first row are the figures to compare; diffBloch's 41-55 ms per frame (42 tilts,
    ~73 beams, complex64 matrix exponential, 2-core machine) is the issue's figure, not measured here."""
    crystal = crystal_from_record(read_structure(example_path("quartz", "quartz_reference.cif")))
    ds = read_pets(example_path("quartz", "quartz.cif_pets"))
    n_frames = len(ds.frames)

    def model_for(s_max):
        return ForwardModel(crystal, ds, ModelSettings(beams=BeamSettings(n_samples=n_samples, s_max=s_max)))

    def intensities(model, single, grad=False):
        xyz = crystal.asu.xyz.clone().requires_grad_(grad)
        uf = crystal.asu.u_frac.clone().requires_grad_(grad)
        u, _ = model.potential(xyz=xyz, u_frac=uf)
        state = model.frame_state(thickness)
        if single:
            u = u.to(torch.complex64)
            state = diffraction.FrameState(*[None if x is None else x.to(torch.float32) for x in state.tensors()])
        return model.intensities(state, (u, None)), (xyz, uf)

    reference_model = model_for(0.03)
    with torch.no_grad():
        reference = np.sqrt(np.maximum(intensities(reference_model, False)[0].numpy(), 0))
    rows = []
    for s_max, single in ((0.02, False), (0.02, True), (0.01, False), (0.01, True)):
        model = model_for(s_max)
        assert np.array_equal(model.plan.scored.row, reference_model.plan.scored.row)

        def fwd():
            with torch.no_grad():
                return intensities(model, single)[0]

        def fwd_bwd():
            ic, leaves = intensities(model, single, grad=True)
            torch.autograd.grad(ic.sum(), leaves)

        ic = fwd().double().numpy()
        err = float(np.abs(np.sqrt(np.maximum(ic, 0)) - reference).sum() / reference.sum())
        t_f, t_fb = _time(fwd, repeat=2), _time(fwd_bwd, repeat=2)
        rows.append({"s_max": s_max, "precision": "complex64" if single else "complex128",
                     "beams_mean": float(np.mean(model.plan.n_beams)), "forward_ms_per_frame": 1e3 * t_f / n_frames,
                     "forward_backward_ms_per_frame": 1e3 * t_fb / n_frames, "error_vs_reference": err})
    for r in rows:
        r["forward_backward_vs_first_row"] = r["forward_backward_ms_per_frame"] / rows[0]["forward_backward_ms_per_frame"]
    return rows


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


def threads_case(n_samples: int) -> dict:
    """The README example's problem (quartz, kinematical start): forward, forward+backward and the LM
    Jacobian with the solves split over T worker threads, against one batched call per chunk."""
    settings = settings_from_mapping({"n_samples": n_samples, "samples_per_fringe": 0.0, "thickness": 600.0}, "benchmark")
    problem = build_problem(crystal_from_record(read_structure(example_path("quartz", "quartz_kinematical.cif"))),
                            read_pets(example_path("quartz", "quartz.cif_pets")), settings)
    theta, index = problem.theta0, refined_index(problem, settings)

    def fwd():
        with torch.no_grad():
            problem.intensities(theta)

    def fwd_bwd():
        th = theta.clone().requires_grad_(True)
        torch.autograd.grad(problem.objective(th), th)

    def jac():
        problem.jacobian(theta, index)

    out = {"threads": torch.get_num_threads(), "n_params": len(index)}
    for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd), ("jacobian", jac)):
        with fixed_workers(1):
            base = _time(fn, repeat=2)
        split = _time(fn, repeat=2)
        out[name] = {"one_call_s": base, "split_s": split, "speedup": base / split}
    return out


def _paracetamol_problem(root: Path, step: int = 40, overrides: dict | None = None):
    data = root / "paracetamol" / "synthetic" / "paracetamol_paper_data.cif_pets"
    start = root / "paracetamol" / "synthetic" / "paracetamol_01_displacement.cif"
    if not data.exists():
        return None
    ds = read_pets(str(data))
    settings = settings_from_mapping({"n_samples": 42, "samples_per_fringe": 0.0, "sample_rule": "linspace", "ub_convention": "diffbloch",
                                      "coupling": "segments", "s_max": 0.01, "thickness": 1000.0, **(overrides or {})},
                                     "benchmark")
    mask = every_nth_frame_mask(len(ds.frames), step)
    return build_problem(crystal_from_record(read_structure(str(start))), ds, settings, frame_mask=mask), settings


def jacobian_rules(root: Path) -> list[dict]:
    """Potential tangents (tables against forward mode) and the Bloch part of the Jacobian (potential
    contraction against one product per tangent), on quartz (24 samples) and paracetamol (2 frames)."""
    from torch.func import jvp, vmap

    cases = [("quartz", build_problem(crystal_from_record(read_structure(example_path("quartz", "quartz_kinematical.cif"))),
                                      read_pets(example_path("quartz", "quartz.cif_pets")),
                                      settings_from_mapping({"n_samples": 24, "samples_per_fringe": 0.0, "thickness": 600.0}, "benchmark")))]
    para = _paracetamol_problem(root)
    if para is not None:
        cases.append(("paracetamol (2 frames)", para[0]))
    out = []
    for name, problem in cases:
        st = problem.slots["structure"]
        n_struct = st.stop - st.start
        raw = problem.split(problem.theta0)
        xyz, occ, uf = problem.structure.physical(raw["structure"])
        eye = torch.eye(n_struct, dtype=torch.float64)
        d_phys = vmap(lambda d: jvp(problem.structure.physical, (raw["structure"],), (d,))[1])(eye)

        def tables():
            problem.model.potential_jvp(xyz, occ, uf, None, *d_phys)

        def forward_mode():
            vmap(lambda a, b, c: jvp(lambda x, o, u: problem.model.potential(x, o, u)[0], (xyz, occ, uf),
                                     (a, b, c)))(*d_phys)

        t_tables, t_fm = _time(tables, repeat=2), _time(forward_mode)
        times = {}
        for rule, threshold in (("contraction", 1), ("one_product_per_tangent", 10 ** 9)):
            saved = diffraction.CONTRACTION_MIN_TANGENTS
            diffraction.CONTRACTION_MIN_TANGENTS = threshold
            try:
                times[rule] = _time(lambda: problem.jacobian(problem.theta0), repeat=2)
            finally:
                diffraction.CONTRACTION_MIN_TANGENTS = saved
        out.append({"case": name, "structure_tangents": n_struct, "beams_max": int(np.max(problem.model.plan.n_beams)),
                    "potential_tangents_tables_s": t_tables, "potential_tangents_forward_mode_s": t_fm,
                    "potential_speedup": t_fm / t_tables, "jacobian_contraction_s": times["contraction"],
                    "jacobian_one_product_per_tangent_s": times["one_product_per_tangent"],
                    "contraction_speedup": times["one_product_per_tangent"] / times["contraction"],
                    "default_rule": "contraction" if n_struct >= diffraction.contraction_threshold(
                        problem.model.crystal.symmetry.inversion_centre() is not None) else "one_product_per_tangent"})
    return out


def real_solver(root: Path, repeat: int = 2) -> list[dict]:
    """Forward pass (double, no gradient), an Adam pass (single precision, objective and gradient) and
    the LM Jacobian with the real symmetric solver for real structure matrices against the complex
    solver for all (bloch.REAL_TOLERANCE_EPS < 0), alternated in this process, best of ``repeat``."""
    import blochflow.physics.bloch as bloch

    cases = [("quartz (non-centrosymmetric control)", build_problem(
        crystal_from_record(read_structure(example_path("quartz", "quartz_kinematical.cif"))),
        read_pets(example_path("quartz", "quartz.cif_pets")),
        settings_from_mapping({"n_samples": 24, "samples_per_fringe": 0.0, "thickness": 600.0}, "benchmark")))]
    para = _paracetamol_problem(root)
    if para is not None:
        cases.append(("paracetamol, 2 frames, paper's beams (Pbca), riding H (44 structure tangents: one product each)",
                      para[0]))
        default = _paracetamol_problem(root, step=50, overrides={"n_samples": 8, "coupling": "sample", "s_max": 0.02})
        cases.append(("paracetamol, 1 frame, default beams, 8 tilts", default[0]))
        free = _paracetamol_problem(root, overrides={"hydrogens": "free"})
        cases.append(("paracetamol, 2 frames, paper's beams, free H (80 structure tangents: the contraction)",
                      free[0]))
    out = []
    saved = bloch.REAL_TOLERANCE_EPS
    for name, problem in cases:
        theta = problem.theta0.clone()

        def forward():
            problem._last_decompositions = None
            with torch.no_grad():
                problem.intensities(theta)

        def adam_pass():
            problem.forward_dtype = torch.float32
            try:
                th = theta.clone().requires_grad_(True)
                problem.objective(th, "amplitude").backward()
            finally:
                problem.forward_dtype = torch.float64

        def jacobian():
            problem._last_decompositions = None
            problem.jacobian(theta)

        row = {"case": name, "beams_mean": problem.model.n_beams_mean(), "n_params": problem.n_params}
        for part, fn in (("forward", forward), ("adam_pass", adam_pass), ("jacobian", jacobian)):
            best = {"real": float("inf"), "complex": float("inf")}
            try:
                for _ in range(repeat):
                    for mode, tol in (("real", saved), ("complex", -1.0)):
                        bloch.REAL_TOLERANCE_EPS = tol
                        best[mode] = min(best[mode], _time(fn))
            finally:
                bloch.REAL_TOLERANCE_EPS = saved
            row[f"{part}_real_s"], row[f"{part}_complex_s"] = best["real"], best["complex"]
            row[f"{part}_speedup"] = best["complex"] / best["real"]
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--json", default=None)
    p.add_argument("--only", choices=["precision", "real"], default=None, help="run only this part")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only == "precision":
        print(json.dumps(precision_and_beams(args.samples), indent=2))
        return
    if args.only == "real":
        res = {"threads": torch.get_num_threads(), "real_solver": real_solver(Path(args.data_root))}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=2)
        return
    res = {"threads": torch.get_num_threads(), "quartz": quartz_case(args.samples),
           "precision_and_beams": precision_and_beams(args.samples), "beam_scaling": beam_scaling(),
           "solves_on_threads": threads_case(24), "jacobian_rules": jacobian_rules(Path(args.data_root))}
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
