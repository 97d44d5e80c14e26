"""The composed forward model on real PETS geometry."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from blochflow.crystal.structure import crystal_from_record, inverted
from blochflow.io.pets import read_pets
from blochflow.io.structure_cif import read_structure
from blochflow.physics.plan import BeamSettings, build_plan, distinct_rows, mark_differences
from blochflow.physics.geometry import frame_samples, fringe_sample_counts
from blochflow.refine.model import ForwardModel, ModelSettings

FAST = ModelSettings(beams=BeamSettings(g_max=1.4, s_max=0.015, n_samples=6, rsg=0.9))


@pytest.fixture(scope="module")
def quartz(quartz_paths):
    return crystal_from_record(read_structure(quartz_paths[0])), read_pets(quartz_paths[1])


def _mask(ds, frames):
    m = np.zeros(len(ds.frames), bool)
    m[list(frames)] = True
    return m


def test_orientation_convention_puts_observed_reflections_in_the_wedge(quartz_synthetic_path):
    ds = read_pets(quartz_synthetic_path)
    plan = build_plan(ds, BeamSettings(rsg=np.inf, dsg=-np.inf, n_samples=1))
    ratio = np.abs(plan.scored.excitation_error) / plan.scored.excitation_range
    assert np.mean(ratio < 1) > 0.95
    flipped = dataclasses.replace(ds, frames=dataclasses.replace(ds.frames, alpha_deg=-ds.frames.alpha_deg))
    plan2 = build_plan(flipped, BeamSettings(rsg=np.inf, dsg=-np.inf, n_samples=1))
    assert np.mean(np.abs(plan2.scored.excitation_error) / plan2.scored.excitation_range < 1) < 0.1


def test_orientation_convention_on_the_bundled_experimental_data(quartz_paths):
    """The same check on the bundled experimental quartz (runs without the shared data): PETS lists a
    reflection on the frames where it was integrated, so many lie inside their frame's wedge (44 % when
    measured; the wedge is narrow beside the spots' rocking width), and almost none with alpha's sign
    flipped (0.9 %)."""
    ds = read_pets(quartz_paths[1])
    inside = []
    for frames in (ds.frames, dataclasses.replace(ds.frames, alpha_deg=-ds.frames.alpha_deg)):
        plan = build_plan(dataclasses.replace(ds, frames=frames), BeamSettings(rsg=np.inf, dsg=-np.inf, n_samples=1))
        inside.append(np.mean(np.abs(plan.scored.excitation_error) / plan.scored.excitation_range < 1))
    assert inside[0] > 0.3 and inside[1] < 0.05


def test_batched_equals_looped(quartz):
    crystal, ds = quartz
    mask = _mask(ds, range(3))
    big = ForwardModel(crystal, ds, FAST, frame_mask=mask)
    small_settings = dataclasses.replace(FAST, beams=dataclasses.replace(FAST.beams, chunk_elements=1))
    small = ForwardModel(crystal, ds, small_settings, frame_mask=mask)
    assert len(small.plan.chunks) > len(big.plan.chunks)
    st = big.frame_state(400.0)
    assert torch.allclose(big.intensities(st), small.intensities(st), rtol=1e-10, atol=1e-14)


def test_reference_hand_fits_better_than_inverted(quartz):
    crystal, ds = quartz
    settings = dataclasses.replace(FAST, beams=dataclasses.replace(FAST.beams, n_samples=12))
    mask = _mask(ds, range(0, 99, 4))
    r = []
    for c in (crystal, inverted(crystal)):
        m = ForwardModel(c, ds, settings, frame_mask=mask)
        with torch.no_grad():
            r.append(m.figures(m.intensities(m.frame_state(450.0))).wR2)
    assert r[0] < r[1]


def test_gradients_reach_every_parameter(quartz):
    crystal, ds = quartz
    settings = dataclasses.replace(FAST, beams=dataclasses.replace(FAST.beams, g_max=1.0, n_samples=2))
    m = ForwardModel(crystal, ds, settings, frame_mask=_mask(ds, [10]))
    xyz = crystal.asu.xyz.clone().requires_grad_()
    uf = crystal.asu.u_frac.clone().requires_grad_()
    occ = crystal.asu.occupancy.clone().requires_grad_()
    st = m.frame_state(300.0)
    st.alpha.requires_grad_()
    st.thickness.requires_grad_()

    def f(xyz, uf, occ, alpha, thick):
        s = dataclasses.replace(st, alpha=alpha, thickness=thick)
        return m.intensities(s, m.potential(xyz, occ, uf))

    assert torch.autograd.gradcheck(f, (xyz, uf, occ, st.alpha, st.thickness), atol=1e-7, rtol=1e-4)


def test_absorption_reduces_intensity_and_methods_agree(quartz):
    crystal, ds = quartz
    mask = _mask(ds, [20, 21])
    out = {}
    for name, kw in {"none": {}, "exact": dict(absorption="proportional", kappa=0.05),
                     "pert": dict(absorption="proportional", kappa=0.05, absorption_method="perturbative"),
                     "tds": dict(absorption="tds")}.items():
        m = ForwardModel(crystal, ds, dataclasses.replace(FAST, **kw), frame_mask=mask)
        with torch.no_grad():
            out[name] = m.intensities(m.frame_state(600.0))
    assert out["exact"].sum() < out["none"].sum()
    assert out["tds"].sum() < out["none"].sum()
    rel = ((out["pert"] - out["exact"]).abs().sum() / out["exact"].sum()).item()
    assert rel < 0.02  # the measured first-order error at kappa = 0.05, 600 A


def test_linspace_rule_includes_both_ends_of_the_wedge():
    s = frame_samples(np.array([1.0, 0.5]), "continuous", 5, "linspace")
    offs = np.degrees(s.alpha_offset).reshape(2, 5)
    assert np.allclose(offs[0], [-1, -0.5, 0, 0.5, 1]) and np.allclose(offs[1], [-0.5, -0.25, 0, 0.25, 0.5])
    assert np.allclose(s.weight.reshape(2, 5).sum(1), 1.0)


def test_ub_conventions_differ_only_by_the_strain_of_u():
    from blochflow.crystal.cell import reciprocal_basis
    from blochflow.physics.geometry import orientation_ub
    b = reciprocal_basis((4.9, 4.9, 5.4, 90, 90, 120))
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    assert np.allclose(orientation_ub(rot @ b, b, "diffbloch"), rot @ b)  # orthonormal U: same
    strain = np.diag([1.01, 0.99, 1.02])
    ub = rot @ strain @ b
    assert np.allclose(orientation_ub(ub, b, "pets"), ub)
    assert np.allclose(orientation_ub(ub, b, "diffbloch"), rot @ np.linalg.inv(strain) @ b)
    with pytest.raises(ValueError, match="UB convention"):
        orientation_ub(ub, b, "xds")


def test_candidate_beams_are_cut_by_their_lab_frame_length():
    """g_max bounds |g| of the g the simulation uses (G h, G the orientation matrix), not |B h|:
    the two differ when U is not orthonormal, as in PETS UB matrices."""
    from blochflow.crystal.cell import reciprocal_basis
    from blochflow.physics.plan import _candidate_beams
    b = reciprocal_basis((4.9, 4.9, 5.4, 90, 90, 120))
    rot = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    g_matrix = rot @ np.diag([1.02, 0.99, 1.03]) @ b
    got = {tuple(h) for h in _candidate_beams(g_matrix, 1.2)}
    r = range(-12, 13)
    box = np.array([(h, k, l) for h in r for k in r for l in r if (h, k, l) != (0, 0, 0)])
    assert got == {tuple(h) for h in box[np.linalg.norm(box @ g_matrix.T, axis=1) <= 1.2]}
    assert got != {tuple(h) for h in box[np.linalg.norm(box @ b.T, axis=1) <= 1.2]}


def test_default_g_max_reaches_beyond_every_reflection(quartz):
    """The default beam limit is 0.4 1/A beyond the data: the header's dstarmax, or the largest
    reflection where a header understates it."""
    _, ds = quartz
    mask = _mask(ds, [0])
    settings = BeamSettings(n_samples=2)
    reach = np.linalg.norm(np.asarray(ds.reflections.hkl, float) @ np.asarray(ds.ub).T, axis=1).max()
    assert build_plan(ds, settings, frame_mask=mask).g_max == pytest.approx(max(ds.details.dstarmax, reach) + 0.4)
    short = dataclasses.replace(ds, details=dataclasses.replace(ds.details, dstarmax=1.0))
    assert build_plan(short, settings, frame_mask=mask).g_max == pytest.approx(reach + 0.4)
    tall = dataclasses.replace(ds, details=dataclasses.replace(ds.details, dstarmax=2.5))
    assert build_plan(tall, settings, frame_mask=mask).g_max == pytest.approx(2.9)


def test_paper_synthetic_data_fit_the_diffbloch_ub_convention(quartz_synthetic_path, quartz_paths):
    """The paper's synthetic quartz was simulated with g = U^-T B h and 42 linspace tilts: at the truth
    that convention fits far better than UB as written (each frame at its best thickness)."""
    ds = read_pets(quartz_synthetic_path)
    crystal = crystal_from_record(read_structure(quartz_paths[0].parent / "quartz_kinematical.cif"))
    frames = range(0, len(ds.frames), 25)
    r = {}
    for conv in ("pets", "diffbloch"):
        settings = dataclasses.replace(FAST, beams=dataclasses.replace(FAST.beams, ub_convention=conv, n_samples=42,
                                                                       sample_rule="linspace"))
        model = ForwardModel(crystal, ds, settings, frame_mask=_mask(ds, frames))
        grid = np.arange(600.0, 2400.0, 50.0)
        scan = model.thickness_scan(grid)
        best = grid[np.nanargmin(np.where(np.isnan(scan), np.inf, scan), 1)]
        r[conv] = model.figures(model.intensities(model.frame_state(torch.tensor(best)[:, None]))).R_obs
    assert r["diffbloch"] < 0.07 and r["diffbloch"] < 0.4 * r["pets"], r


def test_frame_samples_take_a_count_per_frame():
    s = frame_samples(np.array([1.0, 0.5, 2.0]), "continuous", np.array([3, 5, 1]))
    assert np.bincount(s.frame).tolist() == [3, 5, 1]
    assert np.allclose(np.bincount(s.frame, weights=s.weight), 1.0)
    assert np.allclose(np.degrees(s.alpha_offset[3:8]), 0.5 * (np.arange(5) + 0.5) / 5 * 2 - 0.5)
    p = frame_samples(np.array([1.0, 2.0]), "precession", np.array([4, 2]))
    assert np.allclose(np.bincount(p.frame, weights=p.weight), 1.0) and len(p.frame) == 6


def test_one_sample_per_pendelloesung_fringe_converges_the_rocking_integral(quartz):
    """The frame integral of a rocking curve has fringes of period 1/t in s: sampled more finely than
    one per fringe it matches a dense reference, sampled three times more coarsely it does not."""
    crystal, ds = quartz
    mask = _mask(ds, (0, 40, 80))
    t = 900.0

    m = ForwardModel(crystal, ds, FAST, frame_mask=mask)

    def at(counts):
        m.resample(counts)
        with torch.no_grad():
            return m.intensities(m.frame_state(t)).numpy()

    scored = m.plan.scored
    rule = fringe_sample_counts(scored.excitation_range, scored.frame, m.n_frames, 1.2 * t, m.plan.geometry, 2)
    ref = at(np.full(m.n_frames, 320))
    fine = at(rule)
    counts = m.samples_per_frame()[mask]
    sweep = np.array([2 * scored.excitation_range[scored.frame == f].max() for f in np.flatnonzero(mask)])
    assert np.all(counts == np.ceil(1.2 * t * sweep)) and counts.max() < 100
    coarse = at(np.full(m.n_frames, int(counts.max()) // 3))

    def r(x):
        return np.abs(np.sqrt(x) - np.sqrt(ref)).sum() / np.sqrt(ref).sum()

    assert r(fine) < 0.01 < 0.03 < r(coarse)


def test_one_sample_per_fringe_at_the_steepest_point_converges_the_precession_integral(quartz_paths, tmp_path):
    """Round a precession cone s = dS_g cos(phi) moves at up to dS_g per radian: the rule's count,
    2 pi t dS_g per fringe, matches a dense reference; 4 t dS_g (the distance s travels, one fringe
    per sample on average but pi/2 fringes where s moves fastest) does not."""
    text = quartz_paths[1].read_text().replace("geometry: continuous rotation", "geometry: precession")
    (tmp_path / "precession.cif_pets").write_text(text)
    ds = read_pets(tmp_path / "precession.cif_pets")
    crystal = crystal_from_record(read_structure(quartz_paths[0]))
    mask = _mask(ds, (0, 40, 80))
    t = 500.0
    m = ForwardModel(crystal, ds, FAST, frame_mask=mask)
    assert m.plan.geometry == "precession"

    def at(counts):
        m.resample(counts)
        with torch.no_grad():
            return np.sqrt(m.intensities(m.frame_state(t)).numpy())

    scored = m.plan.scored
    rule = fringe_sample_counts(scored.excitation_range, scored.frame, m.n_frames, 1.2 * t, m.plan.geometry, 1)
    amplitude = np.array([scored.excitation_range[scored.frame == f].max(initial=0) for f in range(m.n_frames)])
    assert np.array_equal(rule[mask], np.ceil(1.2 * t * 2 * np.pi * amplitude[mask]))
    ref = at(np.full(m.n_frames, 300))
    fine = at(rule)
    travelled = at(np.maximum(1, np.ceil(1.2 * t * 4 * amplitude)).astype(int))

    def r(x):
        return np.abs(x - ref).sum() / ref.sum()

    assert r(fine) < 0.001 < 0.003 < r(travelled), (r(fine), r(travelled))


def test_window_weights_taper_the_ends_of_the_wedge():
    from blochflow.physics.geometry import window_weights
    w = window_weights(42, 5) * 190  # 2 (1 + 2 + 3 + 4) + 5 * 34 windows-per-tilt in all
    assert np.allclose(w[:6], [1, 2, 3, 4, 5, 5]) and np.allclose(w[-5:], [5, 4, 3, 2, 1])
    assert np.allclose(window_weights(7, 1), 1 / 7) and np.allclose(window_weights(3, 5), 1 / 3)
    s = frame_samples(np.array([1.0, 0.5]), "continuous", 42, "linspace", window=5)
    assert np.allclose(s.weight[:42], window_weights(42, 5)) and np.allclose(s.weight[42:], s.weight[:42])


def test_rocking_axes_turn_the_crystal_about_the_stated_axis():
    """A tilt d inside a frame is a rotation by d about the goniometer axis R_z(omega - phi) x, or,
    with the fixed axis, about R_z(-phi) x whatever omega is."""
    from blochflow.physics.geometry import rocking_axis_lab, sample_orientations
    ub = torch.as_tensor(np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0])
    alpha, beta, omega = (torch.tensor([x], dtype=torch.float64) for x in (0.3, -0.1, 0.05))
    phi, d = 0.2, torch.tensor([0.02], dtype=torch.float64)
    for mode in ("goniometer", "fixed"):
        o0 = sample_orientations(ub, alpha, beta, omega, phi, torch.zeros_like(d), mode)[0]
        o1 = sample_orientations(ub, alpha, beta, omega, phi, d, mode)[0]
        rot = o1 @ torch.linalg.inv(o0)
        axis = rocking_axis_lab(omega, phi, mode)[0]
        assert torch.allclose(rot @ axis, axis, atol=1e-12)
        assert abs(math.acos((torch.trace(rot).item() - 1) / 2) - 0.02) < 1e-9
    assert not torch.allclose(rocking_axis_lab(omega, phi, "fixed"), rocking_axis_lab(omega, phi, "goniometer"))


def test_segment_coupling_cuts_rocking_tails_and_otherwise_agrees(quartz):
    crystal, ds = quartz
    mask = _mask(ds, (3, 50))
    # s_max wider than any scored reflection's sweep, one segment per tilt, the data's own g_max:
    # every scored reflection is coupled at every tilt and the two are one calculation
    wide = dataclasses.replace(FAST.beams, s_max=0.05, g_max=None)
    per_sample = ForwardModel(crystal, ds, dataclasses.replace(FAST, beams=wide), frame_mask=mask)
    segments = ForwardModel(crystal, ds, dataclasses.replace(FAST, beams=dataclasses.replace(
        wide, coupling="segments", n_segments=wide.n_samples)), frame_mask=mask)
    st = per_sample.frame_state(500.0)
    with torch.no_grad():
        assert torch.allclose(per_sample.intensities(st), segments.intensities(st), rtol=1e-10, atol=1e-14)

    # One segment per tilt with a small s_max: a reflection is solved only at tilts where it is excited.
    tight = dataclasses.replace(FAST.beams, s_max=0.004, coupling="segments", n_segments=FAST.beams.n_samples)
    m = ForwardModel(crystal, ds, dataclasses.replace(FAST, beams=tight), frame_mask=mask)
    plan = m.plan
    n_pairs = 0
    for ch in plan.chunks:
        tm = _chunk_terms_for(plan, ch, m, st)
        s_out = tm["sg"][ch.out_sample, ch.out_beam]
        assert torch.all(s_out.abs() < 0.004 + 1e-9)
        n_pairs += len(ch.out_refl)
    assert 0 < n_pairs < len(plan.scored.row) * FAST.beams.n_samples
    assert set(plan.scored.row) <= set(per_sample.plan.scored.row)
    # fewer tilts couple fewer reflections, but a resampled model keeps its observations
    fewer = build_plan(ds, dataclasses.replace(tight, n_samples=2), frame_mask=mask)
    assert len(fewer.scored.row) < len(plan.scored.row)
    rows = plan.scored.row.copy()
    m.resample(np.full(m.n_frames, 2))
    assert np.array_equal(m.plan.scored.row, rows) and m.samples_per_frame()[3] == 2


def _chunk_terms_for(plan, ch, model, state):
    from blochflow.physics.diffraction import _chunk_terms
    u, u_abs = model.potential()
    tm = _chunk_terms(plan, ch, u, u_abs, state)
    k = torch.sqrt(1.0 / plan.wavelength ** 2 + u[0].real)
    return {"sg": tm.diag / (2 * k)}


def test_paper_synthetic_data_fit_segment_coupling(quartz_synthetic_path, quartz_paths):
    """diffBloch simulated the paper's data with few beams (|s| < 0.01, lab-frame |g| < 1.9, just
    above the largest reflection) coupled per run of tilts and the rocking tails cut: at the truth that
    fits better than every scored reflection coupled at every tilt, and better than |g| < 2.05 (each
    frame at its best thickness)."""
    ds = read_pets(quartz_synthetic_path)
    crystal = crystal_from_record(read_structure(quartz_paths[0].parent / "quartz_kinematical.cif"))
    paper = dict(ub_convention="diffbloch", n_samples=42, sample_rule="linspace", rsg=0.66)
    r = {}
    for name, extra in (("sample", {}), ("segments", dict(coupling="segments", s_max=0.01, g_max=1.9)),
                        ("segments, g_max 2.05", dict(coupling="segments", s_max=0.01, g_max=2.05))):
        model = ForwardModel(crystal, ds, ModelSettings(beams=BeamSettings(**paper, **extra)),
                             frame_mask=_mask(ds, [*range(0, len(ds.frames), 20), 8]))
        grid = np.arange(600.0, 2600.0, 25.0)
        scan = model.thickness_scan(grid)
        best = grid[np.nanargmin(np.where(np.isnan(scan), np.inf, scan), 1)]
        with torch.no_grad():
            r[name] = model.figures(model.intensities(model.frame_state(torch.tensor(best)[:, None]))).R_obs
    # measured 2.2 % against 6.4 % (all tilts coupled) and 5.1 % (|g| < 2.05)
    assert r["segments"] < 0.5 * r["sample"] and r["segments"] < 0.6 * r["segments, g_max 2.05"], r


def test_bethe_perturbation_recovers_most_of_the_beams_it_leaves_out(quartz):
    """Weak beams folded in by second-order perturbation (Bethe potentials) bring the intensities of a
    small solved set most of the way to solving every beam out to the same excitation error."""
    crystal, ds = quartz
    mask = _mask(ds, (3, 50, 77))
    base = dataclasses.replace(FAST.beams, g_max=1.8, n_samples=4)

    def run(**kw):
        m = ForwardModel(crystal, ds, dataclasses.replace(FAST, beams=dataclasses.replace(base, **kw)), frame_mask=mask)
        with torch.no_grad():
            return m, m.intensities(m.frame_state(600.0)).numpy()

    full_m, full = run(s_max=0.05)
    small_m, small = run(s_max=0.01)
    bethe_m, bethe = run(s_max=0.01, s_bethe=0.05)
    assert np.array_equal(small_m.plan.scored.row, full_m.plan.scored.row)
    assert np.array_equal(small_m.plan.n_beams, bethe_m.plan.n_beams) and bethe_m.plan.n_weak.max() > 50

    def err(x):
        return np.abs(np.sqrt(x) - np.sqrt(full)).sum() / np.sqrt(full).sum()

    assert err(bethe) < 0.4 * err(small)  # measured 0.40 % against 1.72 %
    with pytest.raises(ValueError, match="s_bethe"):
        build_plan(ds, dataclasses.replace(base, s_max=0.02, s_bethe=0.01))


def test_thickness_scan_in_single_precision_ranks_thicknesses_as_double(quartz):
    """The scan solves in single precision (it only ranks grid thicknesses); its per-frame costs
    agree with a double-precision pass over the same grid, and every frame's best grid value is
    the same."""
    crystal, ds = quartz
    model = ForwardModel(crystal, ds, FAST, frame_mask=_mask(ds, range(0, 99, 9)))
    grid = np.arange(100.0, 2001.0, 50.0)
    table = model.thickness_scan(grid)
    with torch.no_grad():
        double = model.scan_costs(model.intensities(model.grid_state(grid), per_thickness=True))
    has = ~np.isnan(double[:, 0])
    assert has.sum() >= 5 and np.array_equal(np.isnan(table), np.isnan(double))
    rel = np.abs(table[has] - double[has]) / double[has]
    assert np.median(rel) < 1e-4 and rel.max() < 1e-2
    assert np.array_equal(np.argmin(table[has], 1), np.argmin(double[has], 1))
    assert len(set(np.argmin(double[has], 1).tolist())) > 1  # frames prefer different thicknesses


@pytest.mark.parametrize("geometry", ["continuous", "precession"])
def test_near_candidates_keep_every_beam_that_comes_within_s_max(geometry):
    """The candidates left out of a frame's excitation errors stay beyond the limit at every one of its
    samples (brute force over every candidate and sample, wedges and cones far wider than real ones)."""
    from blochflow.physics.plan import _abs_excitation, _near_candidates
    from blochflow.physics.geometry import sample_orientations

    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    ub = torch.as_tensor(q * 0.2)  # hkl -> 1/A, |a*| ~ 0.2
    cand = np.array([(h, k, l) for h in range(-8, 9) for k in range(-8, 9) for l in range(-8, 9)
                     if (h, k, l) != (0, 0, 0)])
    cand_t = torch.as_tensor(cand.T, dtype=torch.float64)
    samples = frame_samples(np.array([3.0]), geometry, 40)
    orient = sample_orientations(ub, torch.tensor([0.3] * 40, dtype=torch.float64), torch.zeros(40, dtype=torch.float64),
                                 torch.full((40,), 0.1, dtype=torch.float64), 0.2,
                                 torch.as_tensor(samples.alpha_offset)).numpy()
    for limit in (0.005, 0.02):
        near = _near_candidates(orient, samples.incident, cand, cand_t, 40.0, limit)
        reached = np.flatnonzero(_abs_excitation(orient, samples.incident, cand_t, 40.0).min(0) < limit)
        assert 0 < len(reached) and set(reached) <= set(near.tolist())
        assert len(near) < len(cand) / 2  # and most are left out


def test_centred_lattice_leaves_out_extinct_beams_with_the_same_intensities(quartz):
    """A body-centred crystal (x + 1/2 on the quartz cell) and the same crystal written in P1 with its
    centred images as atoms of their own: equal intensities, from about half the beams (the beams with
    h + k + l odd never couple to 000, so the centred description leaves them out, and does not score
    the reflections of that coset that these data list: P1 gives them zero intensity)."""
    from blochflow.crystal.structure import AsymmetricUnit, Crystal, SymmetryOps

    cell, ds = quartz[0].cell, quartz[1]
    xyz = torch.tensor([[0.31, 0.12, 0.21], [0.14, 0.43, 0.33]], dtype=torch.float64)
    u = torch.diag(torch.tensor([0.004, 0.005, 0.003], dtype=torch.float64)).expand(2, 3, 3).clone()

    def crystal(triplets, positions):
        n = len(positions)
        asu = AsymmetricUnit([f"A{i}" for i in range(n)], ["Si", "O"] * (n // 2), positions,
                             torch.ones(n, dtype=torch.float64), u.repeat(n // 2, 1, 1), [True] * n)
        return Crystal(cell, SymmetryOps.from_triplets(triplets), asu)

    centred = crystal(["x,y,z", "x+1/2,y+1/2,z+1/2"], xyz)
    listed = crystal(["x,y,z"], torch.cat([xyz, (xyz + 0.5) % 1.0]))
    assert centred.symmetry.centring_translations().tolist() == [[0.5, 0.5, 0.5]]
    assert len(listed.symmetry.centring_translations()) == 0
    mask = _mask(ds, range(2))
    a, b = (ForwardModel(c, ds, FAST, frame_mask=mask) for c in (centred, listed))
    hkl = np.concatenate([ch.hkl[ch.mask].numpy() for ch in a.plan.chunks]).astype(int)
    assert np.all(hkl.sum(1) % 2 == 0)  # the odd coset is neither solved nor scored
    extinct = b.plan.scored.hkl.sum(1) % 2 == 1  # these data list such reflections: P1 scores them at zero
    assert extinct.any() and np.array_equal(a.plan.scored.row, b.plan.scored.row[~extinct])
    solved = [plan.n_beams[plan.n_beams > 1].sum() for plan in (a.plan, b.plan)]  # (1: frames not simulated)
    assert 0.4 < solved[0] / solved[1] < 0.6
    with torch.no_grad():
        ia, ib = a.intensities(a.frame_state(400.0)), b.intensities(b.frame_state(400.0))
    assert float(ib.max()) > 0 and float(ib[extinct].max()) < 1e-20 * float(ib.max())
    assert torch.allclose(ia, ib[~extinct], rtol=1e-9, atol=1e-12 * float(ib.max()))
    from blochflow.refine.run import _log_centring_extinct

    lines = []
    _log_centring_extinct(centred, ds, lines.append)
    odd = int((ds.reflections.hkl.sum(1) % 2 == 1).sum())
    assert len(lines) == 1 and lines[0].startswith(f"{odd} of {len(ds.reflections.hkl)} reflection rows are extinct")
    _log_centring_extinct(listed, ds, lines.append)
    assert len(lines) == 1  # nothing to say without centring


def test_parallel_map_takes_a_generator_in_order_with_few_items_waiting():
    """Items made by a generator on the calling thread go to the workers as they are made; results
    come back in input order, and the generator runs at most two items per worker ahead of the
    solves (made items do not pile up in memory)."""
    import threading
    import time

    from blochflow.physics.workers import parallel_map

    made, solved, ahead = [], [], []
    lock = threading.Lock()

    def items():
        for i in range(20):
            with lock:
                ahead.append(len(made) - len(solved))
                made.append(i)
            yield i

    def solve(i):
        time.sleep(0.002 * (i % 3))
        with lock:
            solved.append(i)
        return i * i, threading.current_thread().name

    out = parallel_map(solve, items(), workers=2)
    assert [v for v, _ in out] == [i * i for i in range(20)]
    assert {name.split("_")[0] for _, name in out} == {"blochflow-solve"}
    assert max(ahead) <= 2 * 2 + 1


def test_potential_contraction_bins_every_pair_on_its_distinct_entry():
    """G[s, i, m] = sum over pairs (k, l) with entry uniq[s, m] of left[s, i, k] right[s, l, i], the
    distinct entries in increasing order and padded with the largest (G zero there), also when the
    entries' range makes the rank tables run over the samples in blocks."""
    from blochflow.physics.diffraction import _potential_contraction

    gen = torch.Generator().manual_seed(3)
    for b, n, top in ((7, 30, 5000), (5, 20, 1_500_000)):  # the second: tables for 2 samples at a time
        idx = torch.randint(0, top, (b, n, n), generator=gen)
        left = torch.randn((b, n, n), dtype=torch.complex128, generator=gen)
        right = torch.randn((b, n, n), dtype=torch.complex128, generator=gen)
        g, uniq = _potential_contraction(left, right, idx)
        for s in range(b):
            values, inverse = torch.unique(idx[s].reshape(-1), return_inverse=True)
            expected = torch.zeros((n, len(values)), dtype=torch.complex128).index_add_(
                1, inverse, (left[s][:, :, None] * right[s].mT[:, None, :]).reshape(n, n * n))
            assert torch.equal(uniq[s, :len(values)], values)
            assert bool((uniq[s, len(values):] == values[-1]).all())
            assert float((g[s, :, :len(values)] - expected).abs().max()) < 1e-12
            assert float(g[s, :, len(values):].abs().sum()) == 0.0


def test_distinct_rows_is_numpys_unique_of_rows():
    """The hashed row deduplication returns np.unique's first rows (in its sorted order) and inverse."""
    rng = np.random.default_rng(3)
    base = rng.integers(-3, 4, size=(7, 40))
    rows = base[rng.integers(0, 7, size=60)]
    rows[5, 0] = -9  # one row of its own
    first, which = distinct_rows(rows)
    _, ref_first, ref_which = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    assert np.array_equal(first, ref_first) and np.array_equal(which, ref_which.reshape(-1))
    assert np.array_equal(rows[first][which], rows)


def test_mark_differences_marks_every_pair_of_every_set():
    """Forming only the pairs with a member new since the set before marks what every set's full
    table of differences marks, and nothing else (beam sets that drift as tilt samples do, some repeated)."""
    rng = np.random.default_rng(5)
    centre, size = 500, 1001
    pool = rng.choice(np.arange(-200, 201), 120, replace=False)
    a_sets, b_sets, start = [], [], 0
    for k in range(25):
        start += int(rng.integers(0, 4))
        a_sets.append(np.concatenate([[0], pool[start:start + 30]]))
        b_sets.append(pool[60 + (k % 5):80 + (k % 7)] if k % 3 else pool[:0])
    a_sets.append(a_sets[3])  # back to an earlier set
    b_sets.append(b_sets[3])
    for pairs in ((a_sets, a_sets), (a_sets, b_sets)):
        used = np.zeros(size, bool)
        mark_differences(used, *pairs, centre)
        ref = np.zeros(size, bool)
        for a, b in zip(*pairs):
            ref[(a[:, None] - b[None, :] + centre).ravel()] = True
        assert np.array_equal(used, ref) and ref.sum() > 100


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_grid_phases_in_blocks_equal_the_direct_phases(dtype, tol):
    """A uniform thickness grid's phase factors built in blocks (one factor at each block's start times
    one per offset) equal exp(i pi t lam / K) formed directly, to rounding; an uneven grid is formed
    directly (the same expression the forward pass uses)."""
    from blochflow.physics.diffraction import GRID_BLOCK_MIN, _grid_phases

    rng = np.random.default_rng(8)
    lam = torch.as_tensor(rng.normal(0, 0.05, size=(5, 30)), dtype=dtype)
    kn = torch.as_tensor(rng.uniform(39.0, 40.0, size=5), dtype=torch.float64)
    grid = torch.arange(100.0, 3001.0, 25.0, dtype=torch.float64)[None, :].expand(5, -1)
    assert grid.shape[1] >= GRID_BLOCK_MIN

    def direct(t):
        phase = (math.pi * t.double() / kn[:, None])[:, :, None] * lam.double()[:, None, :]
        return torch.polar(torch.ones_like(phase), phase)

    blocks = _grid_phases(grid, kn, lam)
    assert blocks.shape == (5, grid.shape[1], 30) and blocks.dtype == (torch.complex64 if dtype == torch.float32
                                                                        else torch.complex128)
    assert float((blocks.to(torch.complex128) - direct(grid)).abs().max()) < tol
    uneven = grid.clone()
    uneven[:, 7] += 3.0
    plain = (math.pi * uneven / kn[:, None]).to(dtype)[:, :, None] * lam[:, None, :]
    assert torch.equal(_grid_phases(uneven, kn, lam), torch.complex(torch.cos(plain), torch.sin(plain)))


def test_passes_over_several_thicknesses_repeat_to_the_bit(quartz):
    """A scan's intensities (several thicknesses per sample, float32, two solver threads) come out the same
    on every call: the pieces' repeated rows are summed on one thread (on two, index_put_'s float32 sums
    changed from call to call, and the refinement's rescans and searches with them)."""
    crystal, ds = quartz
    model = ForwardModel(crystal, ds, FAST, frame_mask=_mask(ds, range(0, 99, 9)))
    grid = np.arange(100.0, 2001.0, 50.0)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tables = [model.thickness_scan(grid) for _ in range(4)]
        with torch.no_grad():
            pot = tuple(None if x is None else x.to(torch.complex64) for x in model.potential())
            st = model.grid_state(grid).to(torch.float32)
            passes = [model.intensities(st, pot, per_thickness=True) for _ in range(4)]
    finally:
        torch.set_num_threads(previous)
    assert all(np.array_equal(t, tables[0], equal_nan=True) for t in tables[1:])
    assert all(torch.equal(p, passes[0]) for p in passes[1:])


def test_a_plan_too_large_for_the_memory_is_refused_before_it_is_allocated(quartz, monkeypatch):
    """Sizes that would exhaust the machine's memory (tilt samples of an absurd thickness, a frame's excitation
    table, one sample's structure matrix) are one-line InputErrors naming the data file and the sizes, raised
    before the arrays exist; the same plan within the memory builds."""
    from blochflow.io.errors import InputError
    from blochflow.physics import plan as plan_mod

    _, ds = quartz
    keep = np.zeros(len(ds.frames.ids), bool)
    keep[:2] = True
    settings = BeamSettings(n_samples=2, s_max=0.01)
    assert build_plan(ds, settings, frame_mask=keep).n_beams.max() > 1
    with pytest.raises(InputError, match=r"problem size: 20000000000 tilt samples over \d+ frames need about"):
        build_plan(ds, settings, frame_mask=keep, samples_per_frame=np.full(len(ds.frames.ids), 2e10 / len(ds.frames.ids)))
    # a machine of 200 MB: 3000 samples per frame fit, their excitation tables (~4900 candidates) do not
    monkeypatch.setattr(plan_mod, "device_memory", lambda device: 2e8)
    with pytest.raises(InputError, match="the excitation errors of 3000 tilt samples of a frame for"):
        build_plan(ds, BeamSettings(n_samples=3000, s_max=0.01), frame_mask=keep)
    # a machine of 4 MB: the candidates' box (1.3 MB) and the plan at s_max 0.01 (40 beams) fit; at s_max 0.1
    # one sample's matrices (336 beams, 7 MB) do not
    monkeypatch.setattr(plan_mod, "device_memory", lambda device: 4e6)
    assert build_plan(ds, settings, frame_mask=keep).n_beams.max() == 40
    with pytest.raises(InputError, match=r"structure matrices of 336 beams \(one sample's\) need about") as err:
        build_plan(ds, BeamSettings(n_samples=2, s_max=0.1), frame_mask=keep)
    assert str(ds.path) in str(err.value) and "\n" not in str(err.value)
