"""Files a refinement leaves in --out: refined.cif, summary.json, frames.csv, fcf, plots."""

from __future__ import annotations

import textwrap
from pathlib import Path

import gemmi
import numpy as np
import torch

from ..crystal.bonds import geometry_table
from ..crystal.cell import reciprocal_basis
from ..crystal.restraints import restraint_rows, rigid_bond_test
from ..crystal.structure import formula_units
from ..io.refined_cif import AtomResult, RefinementSummary, write_fcf, write_refined_cif
from ..io.writers import write_csv, write_json
from ..physics.geometry import rotation_axis_lab
from ..refine.objective import data_chi2, figures_of_merit, klar_weights
from ..refine.problem import equivalence_keys
from ..refine.frame_search import rotation_order
from ..refine.run import RefinementResult
from .difference_map import difference_map, residual_potential_map, write_map
from .plots import fo_fc_svg, thickness_svg


def _triplet(rot, trans) -> str:
    """Operator triplet ('-y,x-y,z+2/3') of x' = R x + t, written by gemmi."""
    op = gemmi.Op()
    op.rot = [[int(round(v * gemmi.Op.DEN)) for v in row] for row in np.asarray(rot)]
    op.tran = [int(round(v * gemmi.Op.DEN)) % gemmi.Op.DEN for v in np.asarray(trans)]
    return op.triplet()


def _space_group_name(crystal) -> str:
    ops = gemmi.GroupOps([gemmi.Op(_triplet(r, t)) for r, t in zip(crystal.symmetry.rotations,
                                                                    crystal.symmetry.translations)])
    sg = gemmi.find_spacegroup_by_ops(ops)
    return sg.hm if sg is not None else "P 1"


def frame_standard_uncertainties(result: RefinementResult) -> dict[str, np.ndarray]:
    """(F,) s.u. of each frame's mean thickness (A) and orientation corrections (mrad) from the
    refinement's covariance, by first-order propagation through the thickness model (so global,
    per-frame, slab and learned models alike); NaN where nothing refined moves the value or no
    covariance was taken. A thin frame's thickness that the data barely determine shows here."""
    pr = result.problem
    n = pr.model.n_frames
    nan = np.full(n, np.nan)
    out = {"thickness_mean_su": nan.copy(), "orientation_x_su_mrad": nan.copy(), "orientation_y_su_mrad": nan.copy()}
    index = result.refined_index
    if result.covariance is None or not len(index):
        return out
    cov = result.covariance[index[:, None], index[None, :]]

    def mean_thickness(theta_refined):
        theta = result.theta.detach().clone().index_put((index,), theta_refined)
        t, w = pr.frames.thickness.path_length(pr.split(theta), pr.frames.ctx)
        return (t * w).sum(-1)

    jac = torch.autograd.functional.jacobian(mean_thickness, result.theta.detach()[index])  # (F, R)
    var = torch.einsum("fp,pq,fq->f", jac, cov, jac).clamp_min(0)
    moved = (jac != 0).any(1)
    out["thickness_mean_su"] = np.where(moved.numpy(), var.sqrt().numpy(), np.nan)
    if "orientation" in pr.slots:
        st = pr.slots["orientation"]
        diag = torch.full((pr.n_params,), float("nan"), dtype=torch.float64)
        diag[index] = torch.diagonal(cov)
        sd = diag[st.start:st.stop].reshape(n, 2).sqrt().numpy()
        out["orientation_x_su_mrad"], out["orientation_y_su_mrad"] = sd[:, 0], sd[:, 1]
    return out


def frame_table(result: RefinementResult) -> dict[str, np.ndarray]:
    """Per-frame values: id, angles, scale, thickness statistics, orientation corrections and their
    s.u., R."""
    pr = result.problem
    ds = pr.model.dataset
    raw = pr.split(result.theta)
    k = pr.scales(result.ic).numpy()
    desc = pr.frames.thickness.describe(raw, pr.frames.ctx)
    orient = raw["orientation"].detach().numpy() if "orientation" in raw else np.zeros((pr.model.n_frames, 2))
    n_refl = np.bincount(pr.model.frame.numpy(), minlength=pr.model.n_frames)
    integration = {} if result.integration is None else result.integration["per_frame"]
    su = frame_standard_uncertainties(result)
    return {"frame": ds.frames.ids, "alpha_deg": ds.frames.alpha_deg, "scale": k, "n_reflections": n_refl,
            **desc, "thickness_mean_su": su["thickness_mean_su"],
            "orientation_x_mrad": orient[:, 0], "orientation_x_su_mrad": su["orientation_x_su_mrad"],
            "orientation_y_mrad": orient[:, 1], "orientation_y_su_mrad": su["orientation_y_su_mrad"],
            "holdout": pr.holdout_frame.numpy().astype(int),
            **({} if ds.frames.dataset is None else {"dataset": ds.frames.dataset + 1,  # counted from 1, as the log
                                                      "dataset_frame": ds.frames.dataset_frame}),
            **{("tilt_samples" if n == "samples" else n): v for n, v in integration.items()}}


def _data_items(result: RefinementResult, kic: torch.Tensor) -> dict:
    """The reflections' items of refined.cif: measurement method, Bragg-angle range and index limits of
    the scored reflections, and wR2 of the observed ones (I > 3 sigma, the work set's weights; ``kic`` the
    calculated intensities at their frame scales)."""
    pr = result.problem
    model = pr.model
    ds = model.dataset
    hkl = np.asarray(model.plan.scored.hkl)
    d_star = np.linalg.norm(hkl @ reciprocal_basis(ds.cell).T, axis=1)
    theta = np.degrees(np.arcsin(np.clip(ds.wavelength * d_star / 2, 0, 1)))
    w = klar_weights(model.io, model.sigma, model.settings.instability)
    gt = pr.work & (model.io > 3 * model.sigma)
    den = float(torch.sum((w * model.io ** 2)[gt]))
    method = {"continuous": "continuous-rotation 3D electron diffraction",
              "precession": "precession-assisted 3D electron diffraction"}.get(ds.details.geometry, "")
    return {"measurement": method, "n_measured": len(hkl), "n_measured_gt": int((model.io > 3 * model.sigma).sum()),
            "d_min": float(1 / d_star.max()) if len(d_star) and d_star.max() > 0 else None,
            "theta_range": (float(theta.min()), float(theta.max())) if len(theta) else None,
            "hkl_limits": tuple((int(hkl[:, i].min()), int(hkl[:, i].max())) for i in range(3)) if len(hkl) else None,
            "wr2_gt": float(np.sqrt(float(torch.sum((w * (model.io - kic) ** 2)[gt])) / den)) if den > 0 else None}


AXIS_JUMP_SU = 3.0  # a jump between neighbouring frames' corrections about the rotation axis beyond this many s.u.


def axis_jumps(result: RefinementResult, frames: dict) -> dict | None:
    """How often the refined corrections about the rotation axis jump between neighbouring frames (in
    alpha, within one dataset) by more than AXIS_JUMP_SU times their combined s.u.: the mark of frames
    in different minima of a thick crystal's tilt landscape (docs/refinement.md "Thick crystals"). None
    without orientation corrections or their s.u."""
    pr = result.problem
    if "orientation_x_su_mrad" not in frames or not pr.frames.refine_orientation:
        return None
    ctx = pr.frames.ctx
    axis = rotation_axis_lab(ctx.omega, ctx.axis_azimuth).numpy()[:, :2]  # lab x, y of each frame's axis
    corr = np.stack([frames["orientation_x_mrad"], frames["orientation_y_mrad"]], 1)
    su = np.stack([frames["orientation_x_su_mrad"], frames["orientation_y_su_mrad"]], 1)
    along = np.sum(corr * axis, 1)
    along_su = np.sqrt(np.sum((su * axis) ** 2, 1))
    pairs = jumps = 0
    use = np.isfinite(along_su) & (along_su > 0) & (frames["n_reflections"] > 0)
    for idx in rotation_order(pr.model.dataset.frames, use):
        if len(idx) < 2:
            continue
        d = np.abs(np.diff(along[idx])) / np.sqrt(along_su[idx][1:] ** 2 + along_su[idx][:-1] ** 2)
        pairs, jumps = pairs + len(d), jumps + int(np.sum(d > AXIS_JUMP_SU))
    return {"pairs": pairs, "jumps": jumps} if pairs else None


def dataset_figures(result: RefinementResult, scales: torch.Tensor) -> list[dict]:
    """Several datasets refined together: per dataset, its file, frames and the work reflections' R_obs,
    wR2 and counts at the refined frame ``scales`` ([] for one dataset)."""
    pr = result.problem
    ds = pr.model.dataset
    if ds.frames.dataset is None:
        return []
    ic = result.ic.detach()
    of_frame = torch.as_tensor(ds.frames.dataset)[pr.model.frame]
    out = []
    for n, path in enumerate(ds.extra.get("datasets", [])):
        m = pr.work & (of_frame == n)
        if not bool(m.any()):
            continue
        f = figures_of_merit(pr.model.io[m], pr.model.sigma[m], ic[m], pr.model.frame[m], pr.model.n_frames,
                             instability=pr.model.settings.instability, scale=scales)
        out.append({"dataset": n + 1, "path": path, "n_frames": int(np.sum(ds.frames.dataset == n)), "R_obs": f.R_obs,
                    "wR2": f.wR2, "n_obs": f.n_obs, "n_all": f.n_all})
    return out


def frame_model_record(result: RefinementResult) -> dict:
    """The refined frame model (kind, constructor values, raw parameters) for ``simulate --frame-model``."""
    pr = result.problem
    raw = pr.split(result.theta)
    ds = pr.model.dataset
    return {"format": "blochflow-frame-model-1", "thickness_model": pr.frames.thickness.config(),
            "refine_orientation": pr.frames.refine_orientation,
            "raw": {n: v.detach().reshape(-1).tolist() for n, v in raw.items() if n != "structure" and n != "kappa"},
            "frame_ids": [int(f) for f in ds.frames.ids], "alpha_deg": ds.frames.alpha_deg.tolist(),
            "ub": ds.ub.tolist()}  # the crystal's orientation matrix: says which crystal the values belong to


# fewer unique reflections than this behind R_free, and it is too noisy to judge over-fitting
MIN_FREE_GROUPS = 10


def free_groups(result: RefinementResult) -> int:
    """How many symmetry-independent reflections R_free rests on (each free group counts once,
    however many frames and equivalents observe it)."""
    pr = result.problem
    free = pr.free.numpy()
    if not free.any():
        return 0
    keys = equivalence_keys(pr.model.plan.scored.hkl[free], pr.model.crystal.symmetry.rotations)
    return len(np.unique(keys, axis=0))


def abs_structure_details(hands: dict | None, inverted: bool, centrosymmetric: bool = False) -> str:
    """_refine_ls_abs_structure_details for a model of the --enantiomer comparison: which hand this file
    holds, which the data prefer, and by how much (Klar et al. 2023's comparison of the two refined
    hands); without one, 'not determined' in a non-centrosymmetric group, '' in a centrosymmetric one."""
    if not hands:
        return "" if centrosymmetric else ("Not determined: only the start hand was refined (blochflow refine "
                                           "--enantiomer refines both and says which the data prefer).")
    this, other = ("inverted", "model") if inverted else ("model", "inverted")
    return textwrap.fill(f"Absolute structure from dynamical refinement of both hands (the start model and its inversion), "
            f"each with the same settings. This file holds the {'inverted' if inverted else 'start'} hand. "
            f"wR2 {hands[f'wR2_{this}']:.4f} here against {hands[f'wR2_{other}']:.4f} for the other hand; the data's "
            f"chi2 difference in units of the better hand's GoF^2 is {abs(hands['delta_chi2_scaled']):.1f}, "
            f"P(start hand) = {hands['probability_model_hand']:.4f}. The data prefer the "
            f"{'start' if hands['chosen'] == 'model' else 'inverted'} hand"
            f"{' (this one).' if hands['chosen'] == this else ' (the other file).'}", width=78)


def refinement_details(result: RefinementResult, n_params: int, prior_rows: int, residual: bool = False) -> str:
    """The opening of _refine_special_details: what the observations are (unmerged intensities, one per
    reflection and frame, fitted by dynamical theory), how the parameters split between the structure
    and the frames, the free set and the frames' priors, so the counts of the CIF read right."""
    pr = result.problem
    n_structure = int(((result.refined_index >= pr.slots["structure"].start)
                       & (result.refined_index < pr.slots["structure"].stop)).sum())
    n_free, n_hold = int(pr.free.sum()), int(pr.holdout.sum())
    priors = ([f"orientation corrections about zero within {pr.frames.orientation_sigma:g} mrad"]
              if pr.frames.orientation_sigma > 0 and "orientation" in pr.slots else [])
    priors += ["smoothness of the thickness over the rotation"] if pr.frames.thickness.kind == "learned" else []
    text = (f"Dynamical refinement (Bloch waves, blochflow) against unmerged intensities: one observation per "
            f"reflection and frame ({pr.model.n_frames} frames), so _refine_ls_number_reflns counts reflection-frame "
            f"pairs. Of the {n_params} parameters {n_structure} describe the structure; the rest belong to the frame "
            f"model ({pr.frames.thickness.kind} thickness{', orientation corrections' if 'orientation' in pr.slots else ''}); "
            f"the frame scales are profiled (least-squares optimal at every step) and not counted."
            + (f" {n_free} reflection-frame pairs (whole symmetry-equivalence groups) are a free set left out of the fit "
               f"(R_free in _blochflow_refine_R_free; _refln_refinement_status excl in the fcf)." if n_free else "")
            + (f" {n_hold} pairs on held-out frames are left out too." if n_hold else "")
            + (f" The restraints include {prior_rows} prior rows of the frame model ({'; '.join(priors)}), counted in "
               f"_refine_ls_restrained_S_all and in the s.u." if prior_rows else "")
            + (" _refine_diff_density_* are of the F_o - F_c Fourier map of the electrostatic potential in A^-2 "
               "(electron scattering factors in A over the cell volume, as kinematical programs give electron data), "
               "with the model's kinematical F_c and phases and |F_o| = |F_c| (I_o / I_c)^1/2^, the least-squares "
               "ratio of observed to dynamically calculated intensities over a reflection's equivalents and frames "
               "(residual_potential.ccp4)." if residual else ""))
    return textwrap.fill(text, width=100)


def _map_file(path: Path, make, cell) -> dict:
    """A derived map: ``make()`` gives (values, summary); the values are written to ``path`` and the summary
    returned with its file name. Should it fail, the refinement's own outputs are still written: the
    summary is then {"error": "Type: first line of the message"}."""
    try:
        values, summary = make()
        write_map(path, values, cell)
        return {**summary, "file": path.name}
    except Exception as exc:  # noqa: BLE001 (any failure of a derived product is reported, not raised)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def write_outputs(result: RefinementResult, out: Path, *, structure_path: str, data_path: str, settings,
                  extra: dict | None = None) -> dict:
    """Write every output file; returns the summary dictionary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pr = result.problem
    crystal = pr.structure.crystal_at(pr.split(result.theta)["structure"])
    n_s = len(pr.structure)
    cov_s = (result.covariance[:n_s, :n_s] if result.covariance is not None
             else torch.zeros((n_s, n_s), dtype=torch.float64))
    atoms_su = pr.structure.standard_uncertainties(result.theta[:n_s], cov_s)
    atoms = []
    for a, el in zip(atoms_su, crystal.asu.elements):
        atoms.append(AtomResult(label=a["label"], element=el, xyz=tuple(a["xyz"]), xyz_su=tuple(a["xyz_su"]),
                                occupancy=a["occupancy"], occupancy_su=a["occupancy_su"], adp_type=a["adp_type"],
                                u_iso=a["u_iso"], u_iso_su=a["u_iso_su"],
                                u_aniso=None if a["u_aniso"] is None else tuple(a["u_aniso"]),
                                u_aniso_su=None if a["u_aniso_su"] is None else tuple(a["u_aniso_su"]),
                                calc_flag=a["calc_flag"], symmetry_order=a["symmetry_order"],
                                disorder_assembly=a["disorder_assembly"], disorder_group=a["disorder_group"]))
    formula, z_units = formula_units(crystal)
    scales = pr.scales(result.ic.detach())  # the work set's frame scales: refined.cif, the fcf, per dataset
    kic = scales[pr.model.frame] * result.ic.detach()
    fig, ffree = result.figures, result.figures_free
    frames = frame_table(result)
    mean_t = float(np.nanmean(frames["thickness_mean"][frames["n_reflections"] > 0]))
    sym = crystal.symmetry
    symops = tuple(_triplet(r, t) for r, t in zip(sym.rotations, sym.translations))
    n_params = len(result.refined_index)
    with torch.no_grad():  # the frames' priors (orientation) are restraints too: rows of the least squares
        prior_rows = int(pr.frames.prior_residuals(pr.split(result.theta)).numel())
        prior_cost = float(pr.prior_cost(result.theta))
    n_restraints = restraint_rows(pr.restraints) + prior_rows
    chi2 = data_chi2(fig, n_params)
    restrained_s = float(np.sqrt((chi2 + prior_cost) / max(fig.n_all + n_restraints - n_params, 1)))
    # the F_o - F_c Fourier map: the CIF's residual density
    residual = _map_file(out / "residual_potential.ccp4", lambda: residual_potential_map(pr, result.theta, result.ic),
                         crystal.cell)
    summary_cif = RefinementSummary(
        cell=tuple(crystal.cell), space_group=_space_group_name(crystal), symops=symops,
        wavelength=pr.model.dataset.wavelength, r_obs=fig.R_obs, wr2=fig.wR2, gof=fig.GoF,
        n_reflections=fig.n_all, n_obs=fig.n_obs, n_params=n_params, n_restraints=n_restraints,
        restrained_s=restrained_s if n_restraints else None,
        refinement_details=refinement_details(result, n_params, prior_rows, residual="error" not in residual),
        diff_density=None if "error" in residual else (residual["max"], residual["min"], residual["rms"]),
        max_shift_su=result.lm.max_shift_su, r_free=None if ffree is None else ffree.R_obs, thickness=mean_t,
        r_all=fig.R_all, weighting=f"w = 1/[sigma^2^(Io) + ({pr.model.settings.instability:g} Io)^2^]",
        special_details="\n".join(t for t in (pr.structure.hydrogen_details(), pr.structure.disorder_details()) if t),
        formula=formula, z=z_units, abs_structure=abs_structure_details(
            (extra or {}).get("enantiomer"), (extra or {}).get("hand") == "inverted",
            centrosymmetric=crystal.symmetry.inversion_centre() is not None),
        **_data_items(result, kic))
    bonds, angles, hbonds = geometry_table(pr.structure, result.theta[:n_s],
                                           None if result.covariance is None else cov_s)
    block = "blochflow_refined" + ("_inverted" if (extra or {}).get("hand") == "inverted" else "")
    write_refined_cif(out / "refined.cif", block, summary_cif, atoms, bonds=bonds, angles=angles,
                      hbonds=hbonds)
    rigid = rigid_bond_test(pr.structure, result.theta[:n_s], None if result.covariance is None else cov_s)
    diff = (_map_file(out / "difference_map.ccp4", lambda: difference_map(pr, result.theta), crystal.cell)
            if getattr(settings, "difference_map", False) else None)

    # reflections (all scored, with the work scales)
    kic = kic.numpy()
    io, sigma = pr.model.io.numpy(), pr.model.sigma.numpy()
    refl = pr.model.dataset.reflections
    rows = pr.model.plan.scored.row
    fcf_rows = np.column_stack([refl.frame_id[rows], refl.hkl[rows], kic, io, sigma])
    write_fcf(out / "reflections.fcf", fcf_rows, summary_cif, included=pr.work.numpy())
    fo_fc_svg(out / "fo_fc.svg", io, kic, sigma, f"Fo vs Fc: R_obs {100 * fig.R_obs:.2f} % (work set)",
              included=pr.work.numpy())
    spread_lo = frames.get("thickness_q10", frames["thickness_mean"])
    spread_hi = frames.get("thickness_q90", frames["thickness_mean"])
    has = frames["n_reflections"] > 0
    thickness_svg(out / "thickness.svg", frames["alpha_deg"][has], frames["thickness_mean"][has], spread_lo[has],
                  spread_hi[has], "thickness per frame (\u00c5): mean \u00b1 s.u., band 10-90 %", su=frames["thickness_mean_su"][has])
    names = list(frames)
    write_csv(out / "frames.csv", names, (list(row) for row in zip(*[frames[n] for n in names])))
    write_json(out / "frame_model.json", frame_model_record(result))
    fhold = result.figures_holdout

    summary = {
        **fig.as_dict(),
        "R_free": None if ffree is None else ffree.R_obs,
        "wR2_free": None if ffree is None else ffree.wR2,
        "n_free": 0 if ffree is None else ffree.n_all,
        "n_free_obs": 0 if ffree is None else ffree.n_obs,
        "n_free_groups": free_groups(result),
        "R_holdout": None if fhold is None else fhold.R_obs,
        "wR2_holdout": None if fhold is None else fhold.wR2,
        "n_holdout_frames": int(pr.holdout_frame.sum()),
        "n_params": len(result.refined_index),
        "n_beams_mean": pr.model.n_beams_mean(),
        "iterations": {"adam": result.adam_steps, "lm": result.lm.iteration},
        "converged": bool(result.lm.converged and not result.interrupted),
        "convergence": ("interrupted (--resume continues the run)" if result.interrupted and not result.lm.converged
                        else result.lm.reason),
        "interrupted": result.interrupted,
        "max_shift_su": result.lm.max_shift_su,
        "start": None if result.start_figures is None else result.start_figures.as_dict(),
        "thickness": mean_t,
        "thickness_model": pr.frames.thickness.kind,
        "warm_start": pr.warm_start,
        "integration": None if result.integration is None else {
            n: v for n, v in result.integration.items() if n != "per_frame"},  # per frame: in "frames"
        "frames": {n: np.asarray(v).tolist() for n, v in frames.items()},
        "strong_correlations": result.correlations,
        "lm_history": result.lm.history,
        "phase_times_s": result.phase_times,
        "elapsed_s": result.elapsed_s,
        "device": str(pr.model.device),
        "structure": structure_path, "data": data_path,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
        "atoms": atoms_su,
        # per disorder group (a class of one start occupancy where a group holds several): its atoms (non-H
        # first), refined occupancy and s.u. (its first atom's)
        "disorder": [{"assembly": assembly, "group": group, "atoms": [atoms_su[i]["label"] for i in sorted(
                          members, key=lambda i: pr.structure.elements[i].capitalize() in ("H", "D"))],
                      "occupancy": atoms_su[members[0]]["occupancy"],
                      "occupancy_su": atoms_su[members[0]]["occupancy_su"], "refined": param is not None,
                      "set": k} for assembly, group, members, param, k in pr.structure.disorder_parts],
        "rigid_bond_test": rigid,
        "difference_map": diff,
        "residual_potential": residual,
        "datasets": dataset_figures(result, scales),
        "axis_jumps": axis_jumps(result, frames),
        "adp_at_bound": [atoms_su[a]["label"] for a in pr.structure.adp_at_bound(result.theta[:n_s])],
        "undetermined": [name for a in atoms_su for name in a["undetermined"]],
    }
    if extra:
        summary.update(extra)
    write_json(out / "summary.json", summary)
    return summary
