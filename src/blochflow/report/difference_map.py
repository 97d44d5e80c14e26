"""Difference map of a refined model: where the data want potential the model lacks (a missing
hydrogen, a disordered site) or has too much.

A dynamical refinement has no kinematical F_obs, so the map is not a Fourier synthesis of
F_obs - F_calc. It is the gradient of the refinement's own objective (the weighted sum of squares
of the work reflections, frame scales held) with respect to the crystal potential, computed through
the Bloch-wave model by one reverse pass: D(x) = -Re sum_h (dchi^2 / dU_h*) exp(2 pi i h.x), over the
potential coefficients the model uses, averaged over the space group's operators (a symmetric change of
potential is the only one the structure can make). Where adding potential at x would lower chi^2, D(x) > 0. In
the kinematical limit this is the weighted difference Fourier map. Dynamical coupling blurs it, so
each of the 12 highest peaks is then tried: a hydrogen placed there (U_iso 0.03 A^2), its occupancy
fitted by one Gauss-Newton step along its potential (a forward-mode tangent through the model), gives
the fall of chi^2 an atom there would bring. Peaks are ranked by that fall; the map is given in units
of its rms (sigma), as map viewers show it.

The CIF's residual density (_refine_diff_density_max/min/rms) is the conventional map a kinematical
program gives, on the same absolute scale: :func:`residual_potential_map` is the Fourier synthesis of
F_o - F_c with the model's phases, where F_c is the model's kinematical structure factor (electron
scattering factors in A) and F_o is its dynamically corrected observed counterpart,
|F_o| = |F_c| sqrt(y), y the least-squares ratio of observed to calculated (dynamical, frame-scaled)
intensities over a reflection's symmetry equivalents and frames. In the kinematical limit y is
|F_obs|^2 / |F_c|^2 and the map is the usual difference Fourier map.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..crystal import cell as cellmod
from ..crystal.structure import AsymmetricUnit, Crystal
from ..physics.diffraction import simulate_frames_jvp
from ..physics.plan import frame_subplan
from ..physics.structure_factors import crystal_potential, potential_plan
from ..refine.objective import klar_weights
from ..refine.problem import equivalence_keys

PROBE_U_ISO = 0.03  # A^2, the trial hydrogen's
# structure-matrix elements (samples x beams^2) per reverse pass of the gradient: paracetamol's 402 beams at
# 84 tilts, one frame a pass, peak memory about 3 GB
REVERSE_BUDGET = 1e7


def gradient_map(problem, theta: torch.Tensor, spacing_A: float = 0.25,
                 dtype: torch.dtype = torch.complex64) -> tuple[np.ndarray, dict]:
    """D(x) on a grid (N1, N2, N3) over the cell (about ``spacing_A`` apart, finer where the
    potential's orders need it), in units of its rms; and what the probes need (potential, state,
    residuals, weights). The solves run in ``dtype`` (complex64 by default; the tests compare it with
    complex128)."""
    model = problem.model
    theta = torch.as_tensor(theta, dtype=torch.float64).detach()
    raw = {k: v.detach() for k, v in problem.split(theta).items()}
    with torch.no_grad():
        pot, pot_abs = problem.potential(raw)
        state = problem.state(raw)
        ic = problem.intensities(theta)  # remembered by the problem when theta was its last point
    k = problem.scales(ic).detach()[model.frame]
    w = klar_weights(model.io, model.sigma, model.settings.instability)
    work = problem.work
    chi2 = torch.sum((w * (model.io - k * ic) ** 2)[work])
    # the reverse pass in batches of frames (chi^2 is a sum over frames once the scales are held), each
    # holding at most REVERSE_BUDGET elements of structure matrices; solved in single precision, as the
    # Adam phase's gradients are (the map is read to a tenth of its rms)
    decompositions = problem.decompositions_at(theta)  # the last pass's, when it was at theta: for the probes
    pot = pot.detach().to(dtype).requires_grad_(True)
    pot_abs32 = None if pot_abs is None else pot_abs.to(dtype)
    state32 = state.to(pot.real.dtype)
    per_frame = max(float(np.mean(model.samples_per_frame())) * model.n_beams_mean() ** 2, 1.0)
    step = max(1, int(REVERSE_BUDGET / per_frame))
    for first in range(0, model.n_frames, step):
        frames = torch.zeros(model.n_frames, dtype=torch.bool)
        frames[first:first + step] = True
        rows = work & frames[model.frame]
        if not bool(rows.any()):
            continue
        sub = frame_subplan(model.plan, frames)[0]
        ic_b = model.intensities(state32, potential=(pot, pot_abs32), plan=sub).to(torch.float64)
        torch.sum((w * (model.io - k * ic_b) ** 2)[rows]).backward()
    grad = pot.grad.detach().cpu().numpy().astype(np.complex128)
    hkl = np.asarray(model.plan.potential_hkl)
    crystal = problem.structure.crystal_at(raw["structure"])
    coef = about_cell_origin(hkl, -grad, crystal)
    coef[np.all(hkl == 0, axis=1)] = 0.0
    orders, coef = symmetrised_coefficients(hkl, coef, crystal.symmetry.rotations, crystal.symmetry.translations)
    values = fourier_synthesis(orders, coef, crystal.cell, spacing_A)
    rms = float(np.sqrt(np.mean(values ** 2)))
    context = {"crystal": crystal, "potential": (pot.detach(), pot_abs32), "state": state32, "hkl": hkl, "k": k,
               "weight": w, "chi2": float(chi2), "decompositions": decompositions}
    return values / rms if rms > 0 else values, context


def about_cell_origin(hkl: np.ndarray, coef: np.ndarray, crystal: Crystal) -> np.ndarray:
    """Fourier coefficients over ``hkl`` of the model's potential (or of a function of it), which is taken
    about the inversion centre where there is one (structure_factors.potential_plan), moved to the
    cell's origin."""
    centre = crystal.symmetry.inversion_centre()
    if centre is None:
        return coef
    return coef * np.exp(-2j * np.pi * (np.asarray(hkl) @ np.asarray(centre, float)))


def fourier_synthesis(orders: np.ndarray, coef: np.ndarray, cell, spacing_A: float) -> np.ndarray:
    """Re sum_h c_h exp(2 pi i h.x) on a grid over the cell about ``spacing_A`` apart (finer where the
    orders need it; orders closed under the symmetry give equal sizes on equivalent axes)."""
    a = cellmod.direct_basis(cell)
    n = [max(2 * int(np.abs(orders[:, i]).max(initial=0)) + 1, int(math.ceil(np.linalg.norm(a[:, i]) / spacing_A)))
         for i in range(3)]
    grid = np.zeros(n, complex)
    np.add.at(grid, tuple((np.asarray(orders) % n).T), coef)
    return np.real(np.fft.ifftn(grid)) * grid.size


def residual_potential_map(problem, theta: torch.Tensor, ic: torch.Tensor | None = None,
                           spacing_A: float = 0.25) -> tuple[np.ndarray, dict]:
    """The residual potential (A^-2: structure factors in A over the cell volume in A^3, what kinematical
    programs report for electron data as residual density) on a grid over the cell, and its summary:
    max, min, rms, the number of unique reflections in it, its highest peaks and deepest holes.

    Each Laue-class group of work reflections gives y = sum w kIc Io / sum w (kIc)^2 over its members
    (Klar weights, frame scales k at theta; ``ic`` the model's intensities at theta when known), the
    ratio a kinematical |F_o|^2 / |F_c|^2 would have; every equivalent h of the group then contributes
    (sqrt(max(y, 0)) - 1) F_c(h) exp(2 pi i h.x) / V, F_c(h) the model's elastic kinematical structure
    factor. Free reflections stay out of the map, as of the fit."""
    model = problem.model
    theta = torch.as_tensor(theta, dtype=torch.float64).detach()
    raw = {k: v.detach() for k, v in problem.split(theta).items()}
    with torch.no_grad():
        ic = problem.intensities(theta) if ic is None else ic.detach()
        xyz, occ, u_frac = problem.structure.physical(raw["structure"])
    ic = ic.to(torch.float64)
    kic = (problem.scales(ic).detach()[model.frame] * ic).cpu().numpy()
    w = klar_weights(model.io, model.sigma, model.settings.instability).cpu().numpy()
    io, work = model.io.cpu().numpy(), problem.work.cpu().numpy()
    crystal = problem.structure.crystal_at(raw["structure"])
    sym = crystal.symmetry
    hkl = np.asarray(model.plan.scored.hkl, np.int64)[work]
    keys, member = np.unique(equivalence_keys(hkl, sym.rotations), axis=0, return_inverse=True)
    member = member.reshape(-1)
    num = np.bincount(member, (w * kic * io)[work], len(keys))
    den = np.bincount(member, (w * kic ** 2)[work], len(keys))
    has = den > 0
    keys, ratio = keys[has], num[has] / den[has]
    # every equivalent of each group (point group with inversion: a real map), once
    ops = np.concatenate([sym.rotations, -sym.rotations]).astype(np.int64)
    images = np.einsum("gj,sji->gsi", keys, ops).reshape(-1, 3)
    orders, first = np.unique(images, axis=0, return_index=True)
    group_ratio = np.repeat(ratio, len(ops))[first]
    fplan = potential_plan(orders, model.crystal, model.dataset.wavelength)
    with torch.no_grad():
        u_g, _ = crystal_potential(fplan, xyz, occ, u_frac)
    f_calc = about_cell_origin(orders, u_g.cpu().numpy() / fplan.prefactor, crystal)  # A
    coef = (np.sqrt(np.clip(group_ratio, 0.0, None)) - 1.0) * f_calc / crystal.volume
    values = fourier_synthesis(orders, coef, crystal.cell, spacing_A)
    summary = {"max": float(values.max()), "min": float(values.min()), "rms": float(np.sqrt(np.mean(values ** 2))),
               "units": "A^-2", "n_unique": int(len(keys)),
               "peaks": map_peaks(values, crystal, 3),
               "holes": [{**q, "height": -q["height"]} for q in map_peaks(-values, crystal, 3)]}
    return values, summary


def symmetrised_coefficients(hkl: np.ndarray, coef: np.ndarray, rotations: np.ndarray, translations: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Fourier coefficients (hkl (M, 3), coef (M,)) of the map averaged over the space group's operators,
    D_sym(x) = mean over (R, t) of D(R x + t): each operator puts c_h exp(2 pi i h.t) at R^T h. The raw
    gradient is not symmetric (equivalent reflections are seen by different frames, so their dchi^2/dU
    differ); its average is the gradient with respect to a potential change that keeps the symmetry, the
    only kind the structure can make. Returns the distinct indices and their summed coefficients."""
    hkl = np.asarray(hkl, np.int64)
    moved = np.concatenate([hkl @ np.asarray(r, np.int64) for r in rotations])  # (R^T h) as rows: h^T R
    values = np.concatenate([coef * np.exp(2j * np.pi * (hkl @ np.asarray(t, float))) for t in translations])
    unique, where = np.unique(moved, axis=0, return_inverse=True)
    summed = np.zeros(len(unique), complex)
    np.add.at(summed, where.ravel(), values / len(rotations))
    return unique, summed


def map_values_at(hkl: np.ndarray, coef: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """D(x) = Re sum_h c_h exp(2 pi i h.x) at fractional points xyz (P, 3), without a grid."""
    return np.real(np.exp(2j * np.pi * (np.asarray(xyz, float) @ np.asarray(hkl, float).T)) @ coef)


def map_peaks(values: np.ndarray, crystal: Crystal, count: int = 10, min_separation_A: float = 0.5) -> list[dict]:
    """The highest local maxima of a periodic map over the cell (each once under the symmetry, none within
    ``min_separation_A`` of a higher one), positions refined by a parabola per axis, with the nearest
    atom (label, distance in A)."""
    n = np.array(values.shape)
    is_max = np.ones(values.shape, bool)
    for shift in np.ndindex(3, 3, 3):
        if shift != (1, 1, 1):
            is_max &= values >= np.roll(values, tuple(np.array(shift) - 1), axis=(0, 1, 2))
    idx = np.argwhere(is_max & (values > 0))
    idx = idx[np.argsort(-values[tuple(idx.T)], kind="stable")]
    a = cellmod.direct_basis(crystal.cell)
    sym = crystal.symmetry
    xyz = crystal.asu.xyz.detach().cpu().numpy()
    out: list[dict] = []
    for p in idx:
        frac = p.astype(float)
        for ax in range(3):  # a parabola through the neighbours along each axis
            lo, hi = p.copy(), p.copy()
            lo[ax], hi[ax] = (p[ax] - 1) % n[ax], (p[ax] + 1) % n[ax]
            y0, y1, y2 = values[tuple(lo)], values[tuple(p)], values[tuple(hi)]
            curv = y0 - 2 * y1 + y2
            if curv < 0:
                frac[ax] += 0.5 * (y0 - y2) / curv
        frac = (frac / n) % 1.0
        if any(sym.images_around(np.array(q["xyz"]), frac, a)[0].min() < min_separation_A for q in out):
            continue
        dist = [sym.images_around(x, frac, a)[0].min() for x in xyz]
        near = int(np.argmin(dist))
        out.append({"xyz": [float(v) for v in frac], "height": float(values[tuple(p)]),
                    "nearest": crystal.asu.labels[near], "distance": float(dist[near])})
        if len(out) == count:
            break
    return out


def probe_peaks(problem, context: dict, peaks: list[dict]) -> list[dict]:
    """Each peak with the fall of chi^2 (fraction) a hydrogen there would bring and its fitted occupancy
    (one Gauss-Newton step along its potential), strongest fall first."""
    if not peaks:
        return []
    crystal = context["crystal"]
    model = problem.model
    u_frac = torch.as_tensor(cellmod.u_iso_to_frac(PROBE_U_ISO, crystal.cell), dtype=torch.float64)[None]
    tangents = []
    for q in peaks:
        probe = Crystal(crystal.cell, crystal.symmetry,
                        AsymmetricUnit(["probe"], ["H"], torch.tensor([q["xyz"]], dtype=torch.float64),
                                       torch.ones(1, dtype=torch.float64), u_frac, [False]))
        d_pot, _ = crystal_potential(potential_plan(context["hkl"], probe, model.dataset.wavelength),
                                     probe.asu.xyz, probe.asu.occupancy, probe.asu.u_frac)
        tangents.append((d_pot.to(context["potential"][0].dtype), None, tuple(None for _ in context["state"].tensors())))
    pot, pot_abs = context["potential"]  # (single precision, as the gradient; the last pass's decompositions when kept)
    with torch.no_grad():
        ic, d_ic = simulate_frames_jvp(model.plan, pot, pot_abs, context["state"], tangents,
                                       absorption_method=model.settings.absorption_method,
                                       decompositions=context.get("decompositions"))
    ic, d_ic = ic.to(torch.float64), d_ic.to(torch.float64)
    work = problem.work
    k, w = context["k"][work], context["weight"][work]
    resid = (model.io - context["k"] * ic)[work]
    d = k[:, None] * d_ic[work]
    g = (w[:, None] * resid[:, None] * d).sum(0)
    h = (w[:, None] * d ** 2).sum(0).clamp_min(1e-300)
    out = [{**q, "h_occupancy": float(gi / hi), "chi2_fall": float(gi ** 2 / hi) / max(context["chi2"], 1e-300)}
           for q, gi, hi in zip(peaks, g, h)]
    return sorted(out, key=lambda q: -q["chi2_fall"])


def write_map(path: str | Path, values: np.ndarray, cell) -> None:
    """The map as a CCP4 file (P 1, the whole cell), written atomically."""
    import gemmi
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    ccp4 = gemmi.Ccp4Map()
    ccp4.grid = gemmi.FloatGrid(np.ascontiguousarray(values, dtype=np.float32), gemmi.UnitCell(*cell),
                                gemmi.SpaceGroup("P 1"))
    ccp4.update_ccp4_header()
    try:
        ccp4.write_ccp4_map(str(tmp))
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written map left behind
        tmp.unlink(missing_ok=True)
        raise


def difference_map(problem, theta: torch.Tensor, count: int = 12, report: int = 10,
                   holes: int = 6) -> tuple[np.ndarray, dict]:
    """The map (in sigma) and its summary: rms-scaled extremes, the ``report`` strongest of the ``count``
    highest peaks by the fall of chi^2 a hydrogen there would bring, and the ``holes`` deepest minima
    tried the same way (their fitted occupancy negative: the model has too much potential there, a
    wrong element or an over-occupied site), strongest first."""
    values, context = gradient_map(problem, theta)
    crystal = context["crystal"]
    tried = probe_peaks(problem, context, map_peaks(values, crystal, count) +
                        [{**q, "height": -q["height"], "hole": True} for q in map_peaks(-values, crystal, holes)])
    peaks = [q for q in tried if not q.get("hole")]
    dips = [{k: v for k, v in q.items() if k != "hole"} for q in tried if q.get("hole")]
    return values, {"max_sigma": float(values.max()), "min_sigma": float(values.min()), "peaks": peaks[:report],
                    "holes": dips[:3]}
