"""CUDA against the CPU in one process: the eigensolver, the physics passes and an LM iteration.

    python benchmarks/device.py [--part eigh,physics] [--samples 24] [--repeat 3] [--json FILE]

``eigh``: the Hermitian eigendecompositions of the largest chunk of the quartz example's structure
matrices (real matrices of the README refinement), on the CPU (torch's threads) and on CUDA with
each backend of ``BLOCHFLOW_CUDA_EIGH`` (torch's own, which solves batches of matrices above 32 one
at a time; MAGMA's batched solver; CuPy's when installed), complex128 and complex64.
``physics``: on the README refinement problem (kinematical start, its sample counts), a forward
pass without gradient (double, keeping its decompositions), a Jacobian at that point (single
precision, the default), one without kept decompositions, and a forward + backward pass in single
precision (an Adam step), each on the CPU and with the plan on CUDA; best of ``--repeat``. Device
times include the transfers in and out. ``profile``: where an LM iteration's time goes on CUDA.
``paracetamol``: the paper's synthetic paracetamol data (200-300 beams, ``--data-root``,
``--frames-step``) with each CUDA eigensolver backend against the CPU. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import torch

from blochflow.crystal.structure import crystal_from_record
from blochflow.data import example_path
from blochflow.io.pets import every_nth_frame_mask, read_pets
from blochflow.io.structure_cif import read_structure
from blochflow.physics.bloch import CUDA_EIGH_BACKENDS, cuda_eigh_backend, hermitian_eigh
from blochflow.physics.diffraction import _chunk_matrices, _chunk_terms
from blochflow.refine.run import build_problem
from blochflow.refine.settings import settings_from_mapping


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best(fn, repeat: int) -> float:
    fn()  # warm-up
    _sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def _problem(samples: int):
    settings = settings_from_mapping({"n_samples": samples, "adam_steps": 0, "lm_iterations": 10}, "benchmark")
    structure = crystal_from_record(read_structure(example_path("quartz", "quartz_kinematical.cif")))
    return build_problem(structure, read_pets(example_path("quartz", "quartz.cif_pets")), settings)


def eigh_part(args) -> list[dict]:
    problem = _problem(args.samples)
    plan = problem.model.plan
    raw = problem.split(problem.theta0)
    with torch.no_grad():
        u, u_abs = problem.potential(raw)
        state = problem.state(raw)
    ch = max(plan.chunks, key=lambda c: c.hkl.shape[0] * c.hkl.shape[1] ** 3)
    a_mat = _chunk_matrices(_chunk_terms(plan, ch, u, u_abs, state), "exact")[0]
    rows = []
    for dtype in (torch.complex128, torch.complex64):
        a = a_mat.to(dtype)
        base = _best(lambda: torch.linalg.eigh(a), args.repeat)
        row = {"dtype": str(dtype), "batch": a.shape[0], "n": a.shape[-1], "cpu_threads": torch.get_num_threads(),
               "cpu_s": base}
        a_gpu = a.to("cuda")
        for backend in CUDA_EIGH_BACKENDS:
            os.environ["BLOCHFLOW_CUDA_EIGH"] = backend
            try:
                t = _best(lambda: hermitian_eigh(a_gpu), args.repeat)
                lam = hermitian_eigh(a_gpu)[0].cpu()
                err = float((lam - torch.linalg.eigvalsh(a)).abs().max() / a.abs().max())
                row[f"cuda_{backend}_s"], row[f"cuda_{backend}_speedup"], row[f"cuda_{backend}_eig_err"] = t, base / t, err
            except Exception as exc:  # a backend that is missing or fails: say so, go on
                row[f"cuda_{backend}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        os.environ.pop("BLOCHFLOW_CUDA_EIGH", None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def physics_part(args) -> list[dict]:
    problem = _problem(args.samples)
    theta = problem.theta0.clone()
    cpu_plan = problem.model.plan
    rows = []
    for device in ("cpu", "cuda"):
        problem.model.plan = cpu_plan.to(device)
        problem._last_decompositions = None
        problem.jacobian_dtype = torch.float32

        def forward():
            with torch.no_grad():
                problem.intensities(theta)

        def jacobian_kept():
            problem.jacobian(theta)

        def jacobian_own():
            problem._last_decompositions = None
            problem.jacobian(theta)

        def adam_pass():
            problem.forward_dtype = torch.float32
            th = theta.clone().requires_grad_(True)
            problem.objective(th).backward()
            problem.forward_dtype = torch.float64

        row = {"device": device, "threads": torch.get_num_threads(), "samples": int(len(cpu_plan.samples.frame)),
               "n_params": problem.n_params}
        row["forward_s"] = _best(forward, args.repeat)
        forward()
        row["jacobian_kept_s"] = _best(jacobian_kept, args.repeat)
        row["jacobian_own_s"] = _best(jacobian_own, args.repeat)
        row["adam_pass_s"] = _best(adam_pass, args.repeat)
        row["lm_iteration_s"] = row["forward_s"] + row["jacobian_kept_s"]
        if device == "cuda":
            row["eigh_backend"] = cuda_eigh_backend()
            row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
            for key in ("forward_s", "jacobian_kept_s", "jacobian_own_s", "adam_pass_s", "lm_iteration_s"):
                row[key.replace("_s", "_speedup")] = rows[0][key] / row[key]
        rows.append(row)
        print(json.dumps(row), flush=True)
    problem.model.plan = cpu_plan
    return rows


def paracetamol_part(args) -> list[dict]:
    """The paracetamol synthetic data (every ``--frames-step``-th frame, the paper's physics: 42 tilts,
    200-300 beams) with each CUDA eigensolver backend: a forward pass in double, one in single with
    its backward pass (an Adam step's solves) and a Jacobian, against the CPU. The quartz figures
    above are at 90 beams; this checks the solvers where the matrices are 3-4x larger."""
    from pathlib import Path

    from synthetic_recovery import DATASET_PHYSICS, DATASETS, PAPER_PHYSICS

    root = Path(args.data_root)
    data, _, pattern = DATASETS["paracetamol"]
    ds = read_pets(str(root / data))
    start = crystal_from_record(read_structure(str(root / pattern.format(start="01"))))
    settings = settings_from_mapping({**PAPER_PHYSICS, **DATASET_PHYSICS["paracetamol"], "hydrogens": "free",
                                      "refine_orientation": False}, "benchmark")
    mask = every_nth_frame_mask(len(ds.frames), args.frames_step)
    problem = build_problem(start, ds, settings, frame_mask=mask)
    cpu_plan = problem.model.plan
    theta = problem.theta0.clone()
    problem.jacobian_dtype = torch.float32
    rows = []
    for device, backend in [("cpu", None), ("cuda", "jax"), ("cuda", "cupy"), ("cuda", "magma")]:
        if backend is not None:
            os.environ["BLOCHFLOW_CUDA_EIGH"] = backend
        problem._last_decompositions = None

        def forward():
            with torch.no_grad():
                problem.intensities(theta)

        def adam_pass():
            problem.forward_dtype = torch.float32
            th = theta.clone().requires_grad_(True)
            problem.objective(th, "amplitude").backward()
            problem.forward_dtype = torch.float64

        def jacobian():
            problem._last_decompositions = None
            problem.jacobian(theta)

        row = {"device": device, "backend": backend, "frames": int(mask.sum()), "n_params": problem.n_params,
               "beams_mean": problem.model.n_beams_mean()}
        try:
            problem.model.plan = cpu_plan.to(device)
            row["forward_s"] = _best(forward, 1)
            row["adam_pass_s"] = _best(adam_pass, 1)
            row["jacobian_s"] = _best(jacobian, 1)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.environ.pop("BLOCHFLOW_CUDA_EIGH", None)
    problem.model.plan = cpu_plan
    return rows


def profile_part(args) -> dict:
    """Where an LM iteration's time goes on CUDA: cProfile of a forward pass and the Jacobian at it."""
    import cProfile
    import io
    import pstats

    problem = _problem(args.samples)
    problem.model.plan = problem.model.plan.to("cuda")
    problem.jacobian_dtype = torch.float32
    theta = problem.theta0.clone()

    def iteration():
        with torch.no_grad():
            problem.intensities(theta + 1e-9)
        problem.jacobian(theta + 1e-9)
        _sync()

    iteration()
    prof = cProfile.Profile()
    prof.enable()
    iteration()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue()[-6000:], flush=True)
    return {"profile": text.getvalue()[-6000:]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="eigh,physics", help="comma-separated: eigh, physics, profile, paracetamol")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                   help="the shared data (paracetamol part)")
    p.add_argument("--frames-step", type=int, default=10, help="paracetamol part: every n-th frame")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/device.py needs a CUDA device")
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                      "cpu_threads": torch.get_num_threads()}), flush=True)
    out = {}
    for part in args.part.split(","):
        try:
            out[part] = {"eigh": eigh_part, "physics": physics_part, "profile": profile_part,
                         "paracetamol": paracetamol_part}[part](args)
        except Exception:
            traceback.print_exc()
            out[part] = {"error": traceback.format_exc()[-2000:]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
