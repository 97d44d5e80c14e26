"""Refined CIF / fcf writers, s.u. formatting and SVG plots."""

import re
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import gemmi
import numpy as np
import pytest
import torch

from blochflow.io.errors import InputError
from blochflow.io.refined_cif import (AtomResult, RefinementSummary, format_su, u_equiv, write_fcf,
                                      write_refined_cif)
from blochflow.io.structure_cif import read_structure
from blochflow.io.writers import atomic_write_text
from blochflow.report.plots import fo_fc_svg, thickness_svg

QUARTZ = Path(__file__).parents[1] / "src" / "blochflow" / "data" / "examples" / "quartz" / "quartz_reference.cif"  # bundled
SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("value,su,expected", [
    (0.123456, 0.000234, "0.1235(2)"), (0.123456, 0.000123, "0.12346(12)"), (1.5, 0, "1.5"),
    (1.5, None, "1.5"), (1.5, float("nan"), "1.5"), (12.3456, 1.4, "12.3(14)"), (123.4, 25, "123(25)"),
    (-0.123456, 0.000234, "-0.1235(2)"), (0.5, 0.0996, "0.50(10)"), (0.5, 0.0199, "0.50(2)"),
    (0.333333, None, "0.333333"), (float("nan"), 0.1, "?"), (-4.09894e-05, None, "-0.0000409894"),
    (2.3e-9, 0, "0.0000000023"), (-1e-12, None, "-0.000000000001"),
    # an s.u. beyond 1e6 x max(1, |value|) says nothing (an undetermined parameter): the value alone; below, kept
    (0.5, 1e300, "0.5"), (0.5, 2e6, "0.5"), (0.5, 9e5, "1(900000)"), (1234.5, 3e8, "1235(300000000)"),
])
def test_format_su_cases(value, su, expected):
    assert format_su(value, su) == expected


def _parse_su(text):
    m = re.fullmatch(r"(-?\d+(?:\.(\d+))?)\((\d+)\)", text)
    assert m, text
    ndec = len(m.group(2) or "")
    return float(m.group(1)), int(m.group(3)), 10.0 ** -ndec


def test_format_su_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        value = rng.normal() * 10 ** rng.uniform(-2, 2)
        su = 10 ** rng.uniform(-6, 0.2)  # keeps the last digit below the units place
        v, s_int, unit = _parse_su(format_su(value, su))
        assert abs(v - value) <= unit / 2 + 1e-12
        assert 2 <= s_int <= 19  # 2 digits iff leading digits <= 19
        assert abs(s_int * unit - su) <= unit / 2 + 1e-12
        # the kept digits are those of su rounded at that place
        assert s_int == int(Decimal(repr(su / unit)).quantize(Decimal(1), "ROUND_HALF_UP"))


@pytest.fixture(scope="module")
def quartz():
    if not QUARTZ.exists():
        pytest.skip("shared data not present")
    return read_structure(QUARTZ)


def _results(st):
    atoms = []
    for i, a in enumerate(st.atoms):
        if i == 0:  # anisotropic with full s.u.s, one special-position coordinate fixed
            atoms.append(AtomResult(a.label, a.element, a.xyz, (0.00012, 0.0, 0.000034), 1.0, None, "Uani",
                                    float("nan"), 0.00011, a.u_aniso, (0.0002,) * 6, symmetry_order=2))
        else:
            atoms.append(AtomResult(a.label, a.element, a.xyz, (0.0003, 0.00025, 0.0002), 0.98, 0.012,
                                    "Uiso", a.u_iso, 0.0004))
    atoms.append(AtomResult("H1", "H", (0.1, 0.2, 0.3), None, 1.0, None, "Uiso", 0.02, None, calc_flag="R"))
    summary = RefinementSummary(st.cell, "P 32 2 1", st.symops, 0.0251, r_obs=0.0612, wr2=0.1534, gof=1.07,
                                n_reflections=4321, n_obs=2100, n_params=57, n_restraints=3,
                                max_shift_su=0.002, r_free=0.071, thickness=612.5, r_all=0.0815,
                                special_details="1 H riding: tertiary C-H 1.\nU_iso(H) = 1.2 U_eq of the parent.")
    return summary, atoms


def test_u_equiv(quartz):
    o1 = quartz.atoms[1]  # the file's U_eq for O1 is consistent with its U_ij
    assert u_equiv(quartz.cell, o1.u_aniso) == pytest.approx(o1.u_iso, abs=2e-6)
    assert u_equiv((5, 6, 7, 90, 90, 90), (0.01, 0.02, 0.03, 0, 0, 0)) == pytest.approx(0.02)


def test_refined_cif_round_trip(quartz, tmp_path):
    summary, atoms = _results(quartz)
    path = tmp_path / "refined.cif"
    write_refined_cif(path, "quartz refined", summary, atoms)
    block = gemmi.cif.read(str(path)).sole_block()
    small = gemmi.make_small_structure_from_block(block)
    assert [s.label for s in small.sites] == ["Si1", "O1", "H1"]
    assert gemmi.cif.as_string(block.find_value("_refine_special_details")).strip().splitlines() == \
        ["1 H riding: tertiary C-H 1.", "U_iso(H) = 1.2 U_eq of the parent."]
    table = block.find("_atom_site_", ["label", "site_symmetry_order", "calc_flag", "refinement_flags_posn"])
    assert [list(r) for r in table] == [["Si1", "2", "d", "S"], ["O1", "1", "d", "."], ["H1", "1", "calc", "R"]]
    for site, ref in zip(small.sites, atoms):
        assert np.allclose(site.fract.tolist(), ref.xyz, atol=1e-3)
    assert small.sites[1].u_iso == pytest.approx(atoms[1].u_iso, abs=1e-3)
    assert small.sites[1].occ == pytest.approx(0.98)
    si = small.sites[0]
    assert si.aniso.nonzero()
    u = atoms[0].u_aniso
    assert [si.aniso.u11, si.aniso.u22, si.aniso.u33, si.aniso.u12, si.aniso.u13, si.aniso.u23] == \
        pytest.approx(u, abs=1e-3)
    assert si.u_iso == pytest.approx(u_equiv(summary.cell, u), abs=1e-4)
    assert small.spacegroup is not None and small.spacegroup.number == 154
    # s.u. items are written and parse
    table = block.find("_atom_site_", ["label", "fract_x", "fract_y", "fract_z", "U_iso_or_equiv",
                                       "occupancy", "calc_flag"])
    rows = {r[0]: list(r) for r in table}
    assert rows["Si1"][2] == format_su(atoms[0].xyz[1], None) and "(" not in rows["Si1"][2]
    assert rows["Si1"][1].endswith("(12)") and rows["O1"][5] == "0.980(12)"
    assert rows["H1"][1] == "0.1" and rows["H1"][6] == "calc" and rows["O1"][6] == "d"
    assert gemmi.cif.as_number(rows["O1"][4]) == pytest.approx(atoms[1].u_iso, abs=1e-3)
    aniso = block.find("_atom_site_aniso_", ["label", "U_11", "U_23"])
    assert len(aniso) == 1 and aniso[0][1].endswith("(2)")
    # R values under the standard tags
    num = lambda tag: gemmi.cif.as_number(block.find_value(tag))  # noqa: E731
    assert num("_refine_ls_R_factor_gt") == pytest.approx(0.0612)
    assert num("_refine_ls_R_factor_all") == pytest.approx(0.0815)
    assert num("_refine_ls_wR_factor_ref") == pytest.approx(0.1534)
    assert num("_refine_ls_goodness_of_fit_ref") == pytest.approx(1.07)
    assert num("_refine_ls_number_reflns") == 4321 and num("_reflns_number_gt") == 2100
    assert num("_refine_ls_number_parameters") == 57 and num("_refine_ls_number_restraints") == 3
    assert num("_refine_ls_shift/su_max") == pytest.approx(0.002)
    assert gemmi.cif.as_string(block.find_value("_refine_ls_hydrogen_treatment")) == "constr"  # H1 rides
    assert num("_blochflow_refine_R_free") == pytest.approx(0.071)
    assert num("_diffrn_radiation_wavelength") == pytest.approx(0.0251)
    assert gemmi.cif.as_string(block.find_value("_diffrn_radiation_type")) == "electron"
    assert gemmi.cif.as_string(block.find_value("_refine_ls_structure_factor_coef")) == "Fsqd"
    assert len(block.find_values("_space_group_symop_operation_xyz")) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["refined.cif"]  # no temp files left
    with pytest.raises(InputError):
        write_refined_cif(path, "x", summary, atoms, overwrite=False)


def test_fcf(tmp_path):
    rng = np.random.default_rng(1)
    n = 500
    io = rng.gamma(1.0, 50.0, n) - 5
    sig = np.full(n, 4.0)
    hkl = rng.integers(-9, 10, (n, 3))
    arr = np.column_stack([rng.integers(1, 40, n), hkl, io * 1.1, io, sig])
    path = tmp_path / "refined.fcf"
    write_fcf(path, arr)
    block = gemmi.cif.read(str(path)).sole_block()
    t = block.find("_refln_", ["index_h", "index_k", "index_l", "F_squared_calc", "F_squared_meas",
                               "F_squared_sigma", "observed_status", "blochflow_frame"])
    assert len(t) == n
    status = np.array([r[6] for r in t])
    assert (status == "o").sum() == (io > 3 * sig).sum() and set(status) <= {"o", "<"}
    assert [int(t[3][i]) for i in (0, 1, 2)] == hkl[3].tolist()
    assert float(t[3][4]) == pytest.approx(io[3], rel=1e-6) and int(t[3][7]) == int(arr[3, 0])
    # dict rows with explicit obs flags, and the cell/symmetry header
    rows = [dict(frame=1, h=1, k=0, l=0, ic=10.0, io=9.0, sigma=1.0, obs=False),
            dict(frame=2, h=0, k=1, l=-1, ic=1.0, io=0.5, sigma=1.0, obs=True)]
    summary = RefinementSummary((4.9, 4.9, 5.4, 90, 90, 120), "P 32 2 1", ("x,y,z", "-y,x-y,z+2/3"), 0.0251,
                                0.1, 0.2, 1.0, 2, 1, 5)
    write_fcf(path, rows, summary=summary)
    block = gemmi.cif.read(str(path)).sole_block()
    assert list(block.find_values("_refln_observed_status")) == ["<", "o"]
    assert gemmi.cif.as_number(block.find_value("_cell_length_c")) == pytest.approx(5.4)
    with pytest.raises(InputError):
        write_fcf(path, rows, overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["refined.fcf"]


def test_fo_fc_svg(tmp_path):
    rng = np.random.default_rng(2)
    n = 3000
    ic = rng.gamma(1.0, 100.0, n)
    io = ic + rng.normal(0, 10, n)
    sig = np.full(n, 10.0)
    io[0] = np.nan
    path = tmp_path / "fofc.svg"
    fo_fc_svg(path, io, ic, sig, "Fo vs Fc <quartz & co>")
    root = ET.parse(path).getroot()
    assert root.tag == SVG + "svg"
    groups = {g.get("class"): g for g in root.iter(SVG + "g")}
    n_obs = len(groups["obs"].findall(SVG + "circle"))
    n_unobs = len(groups["unobs"].findall(SVG + "circle"))
    assert n_obs + n_unobs == n - 1 and n_obs == int((io[1:] > 30).sum())
    assert groups["unobs"].get("fill") == "none" and groups["obs"].get("fill") != "none"
    assert any("quartz & co" in (t.text or "") for t in root.iter(SVG + "text"))
    assert [p.name for p in tmp_path.iterdir()] == ["fofc.svg"]
    free = np.arange(n) % 10 == 0  # a free set: drawn apart and counted apart from the work rows
    fo_fc_svg(path, io, ic, sig, "with a free set", included=~free)
    root = ET.parse(path).getroot()
    groups = {g.get("class"): len(g.findall(SVG + "circle")) for g in root.iter(SVG + "g")}
    assert groups["free-obs"] + groups["free-unobs"] == free[1:].sum() and groups["obs"] + groups["unobs"] == (~free).sum()
    assert any(f"free set ({free[1:].sum()})" in (t.text or "") for t in root.iter(SVG + "text"))


def test_thickness_svg(tmp_path):
    ang = np.linspace(-30, 30, 61)
    mean = 500 + 100 / np.cos(np.radians(ang))
    path = tmp_path / "thickness.svg"
    thickness_svg(path, ang, mean, mean - 20, mean + 25, "thickness", truth=mean + 5)
    root = ET.parse(path).getroot()
    lines = {p.get("class"): p for p in root.iter(SVG + "polyline")}
    assert len(lines["mean"].get("points").split()) == 61
    assert "stroke-dasharray" in lines["truth"].attrib
    band = next(root.iter(SVG + "polygon"))
    assert len(band.get("points").split()) == 122
    thickness_svg(path, ang, mean, mean - 20, mean + 25, "no truth")
    root = ET.parse(path).getroot()
    assert {p.get("class") for p in root.iter(SVG + "polyline")} == {"mean"}
    assert not list(root.iter(SVG + "path"))
    su = np.full(61, 30.0)
    su[5], su[7] = np.nan, 1e5  # no bar; a bar cut at the plot's edges, which stay where they were
    thickness_svg(path, ang, mean, mean - 20, mean + 25, "s.u.", su=su)
    root = ET.parse(path).getroot()
    bars = next(root.iter(SVG + "path")).get("d")
    assert bars.count("M") == 60
    ys = [float(v) for part in bars.split("M")[1:] for v in part.replace("V", " ").split()[1:]]
    from blochflow.report.plots import H, MB, MT
    assert min(ys) >= MT - 0.1 and max(ys) <= H - MB + 0.1  # inside the axes box
    thickness_svg(path, [], [], [], [], "empty")  # still a valid document
    ET.parse(path)
    assert [p.name for p in tmp_path.iterdir()] == ["thickness.svg"]
    with pytest.raises(InputError):
        atomic_write_text(path, "x", overwrite=False)


def test_json_is_strict(tmp_path):
    """R over no observed reflection is NaN: written as null, never as the non-JSON NaN or Infinity."""
    import json
    import math

    from blochflow.io.writers import write_json
    write_json(tmp_path / "s.json", {"R_free": math.nan, "wR2_free": math.inf, "list": [1.0, -math.inf],
                                     "array": np.array([0.5, np.nan])})
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text) == {"R_free": None, "wR2_free": None, "list": [1.0, None], "array": [0.5, None]}


def test_outputs_get_the_permissions_of_a_plain_open(tmp_path):
    """Atomic writes go through a private temporary file; the result has the mode open() would give
    under the user's umask (0644 under 022), not the temporary file's 0600."""
    import os

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_frame_means_leave_out_a_frame_without_intensity():
    """A frame whose Io are all 0 (every reflection systematically absent) has no wR2 (0/0): the frame
    means are over the other frames, not NaN."""
    from blochflow.refine.objective import figures_of_merit

    io = torch.tensor([10.0, 20.0, 30.0, 0.0, 0.0])
    ic = torch.tensor([11.0, 19.0, 30.0, 0.5, 0.2])
    frame = torch.tensor([0, 0, 0, 1, 1])
    fig = figures_of_merit(io, torch.ones(5), ic, frame, 2)
    alone = figures_of_merit(io[:3], torch.ones(3), ic[:3], frame[:3], 1)
    assert fig.wR2_frame_mean == pytest.approx(alone.wR2_frame_mean)
    assert fig.R_obs_frame_mean == pytest.approx(alone.R_obs_frame_mean)
    assert fig.wR2_diffbloch_frame_mean == pytest.approx(alone.wR2_diffbloch_frame_mean)


def test_wr2_diffbloch_is_diffblochs_weighted_r2_at_its_best_scale():
    """wR2_diffbloch is the figure diffBloch reports, written here its way: w = 1 / sqrt(sigma_sqrtI^2 +
    u^2 Io) on intensity differences, sqrt(sum (w (k Ic - Io))^2 / sum (w Io)^2), with sigma_sqrtI =
    sigma / (2 sqrt(Io)) or 5 sqrt(sigma) for Io < 0.01 sigma, and the scale searched on a grid per
    frame (diffBloch's way of fitting it). The grid's minimum is never below ours (ours is the exact
    minimum) and within its resolution of it. R_all is R_obs over every reflection."""
    from blochflow.refine.objective import figures_of_merit

    gen = torch.Generator().manual_seed(3)
    n, n_frames = 240, 3
    ic = torch.rand(n, generator=gen, dtype=torch.float64) * 50 + 0.1
    sigma = 1.0 + torch.rand(n, generator=gen, dtype=torch.float64) * 3
    io = 7.0 * ic * (1 + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64))
    io[:20] = torch.randn(20, generator=gen, dtype=torch.float64) * 0.5  # weak and negative observations
    frame = torch.arange(n) % n_frames
    fig = figures_of_merit(io, sigma, ic, frame, n_frames)

    def theirs(calc, obs, sig, mu=0.01):
        root = torch.sqrt(obs.clamp(min=1e-12))
        s_root = torch.where(obs < 0.01 * sig, 5 * torch.sqrt(sig), 0.5 * sig / root)
        w = 1 / torch.sqrt(s_root ** 2 + (mu * root) ** 2)
        return torch.sqrt(((w * (calc - obs)) ** 2).sum(-1) / ((w * obs) ** 2).sum(-1))

    best = []
    for f in range(n_frames):
        m = frame == f
        grid = torch.linspace(0.5, 1.5, 20001, dtype=torch.float64)[:, None] * (io[m].sum() / ic[m].sum())
        vals = theirs(grid * ic[m], io[m].expand(len(grid), -1), sigma[m].expand(len(grid), -1))
        best.append(float(vals.min()))
    assert fig.wR2_diffbloch_frame_mean == pytest.approx(np.mean(best), rel=1e-6)
    assert fig.wR2_diffbloch_frame_mean <= np.mean(best) + 1e-12
    obs = io > 3 * sigma
    assert (~obs).sum() >= 20 and fig.R_all != pytest.approx(fig.R_obs)
    everything = figures_of_merit(io[obs], sigma[obs], ic[obs], frame[obs], n_frames)
    assert everything.R_all == pytest.approx(everything.R_obs)


def test_progress_log_draws_one_status_line_on_a_terminal(tmp_path):
    """On a terminal the iteration messages redraw one status line with a bar and other messages print
    above it; every message goes to the log file as a plain line; off a terminal, plain lines."""
    import io

    from blochflow.report.progress import ProgressLog, progress_line

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_line("lm     15/30  wR2(work) 0.0878  max shift/su 1.03", 200) == \
        "lm   [##########..........] 15/30  wR2(work) 0.0878  max shift/su 1.03"
    assert progress_line("thickness rescan at LM iteration 5", 200) is None
    term = Terminal()
    ticks = iter([0.0, 10.0, 12.0, 14.0, 15.0, 17.5])  # construction, then one reading per message
    log = ProgressLog(tmp_path / "refine.log", term, clock=lambda: next(ticks))
    for text in ("model: 311 parameters", "lm      1/30  wR2(work) 0.1297", "lm      2/30  wR2(work) 0.1176",
                 "thickness rescan at LM iteration 5: 18 frames moved", "lm      3/30  wR2(work) 0.1089"):
        log(text)
    log.close()
    shown = term.getvalue()
    assert shown.count("\n") == 4 and shown.count("\r") == 3  # three redraws, the rescan on its own line
    # the phase starts at the message before its first iteration (t = 10): 2 s, 2 s, then (17.5 - 10) / 3
    assert "\r" + progress_line("lm      2/30  wR2(work) 0.1176  [2 s/it, <= 56 s left]", 200) in shown
    assert progress_line("lm      2/30  wR2(work) 0.1176  [2 s/it, <= 56 s left]", 200) == \
        "lm   [#...................] 2/30  [2 s/it, <= 56 s left]  wR2(work) 0.1176"  # timing next to the bar
    assert (tmp_path / "refine.log").read_text().splitlines()[1:] == [
        "lm      1/30  wR2(work) 0.1297  [2 s/it, <= 58 s left]", "lm      2/30  wR2(work) 0.1176  [2 s/it, <= 56 s left]",
        "thickness rescan at LM iteration 5: 18 frames moved", "lm      3/30  wR2(work) 0.1089  [2.5 s/it, <= 68 s left]"]
    plain = io.StringIO()
    ticks = iter([0.0, 1.0, 121.0, 9000.0])
    log = ProgressLog(None, plain, clock=lambda: next(ticks))
    log("adam    1/20  wR(F)(work) 0.4")  # Adam's count is exact: no bound
    log("lm      1/30  wR2(work) 0.1297")
    log("lm      2/30  wR2(work) 0.1176")  # a slow run's remaining time in minutes, then hours
    log.close()
    assert plain.getvalue().splitlines() == ["adam    1/20  wR(F)(work) 0.4  [1 s/it, 19 s left]",
                                             "lm      1/30  wR2(work) 0.1297  [2 min/it, <= 58 min left]",
                                             "lm      2/30  wR2(work) 0.1176  [75 min/it, <= 35.0 h left]"]


def test_formula_z_and_density(tmp_path, quartz_paths):
    """The formula unit and Z from the cell's content: quartz O2 Si, Z 3 (Si on a two-fold axis), density
    2.64 g/cm^3; a partial site leaves a fractional formula; refined.cif carries them."""
    import dataclasses

    from blochflow.crystal.structure import crystal_from_record, formula_units

    quartz = crystal_from_record(read_structure(quartz_paths[0]))
    formula, z = formula_units(quartz)
    assert formula == {"O": 2.0, "Si": 1.0} and z == 3
    half = dataclasses.replace(quartz, asu=quartz.asu.clone())
    half.asu.occupancy = torch.tensor([1.0, 0.9], dtype=torch.float64)
    formula, z = formula_units(half)
    assert formula == pytest.approx({"O": 1.8, "Si": 1.0}) and z == 3  # m = 2 makes Si whole, O never
    summary = RefinementSummary(quartz.cell, "P 32 2 1", ("x,y,z",), 0.0251, r_obs=0.04, wr2=0.08, gof=1.0,
                                n_reflections=10, n_obs=5, n_params=3, formula={"O": 2.0, "Si": 1.0}, z=3)
    write_refined_cif(tmp_path / "r.cif", "q", summary, [AtomResult("Si1", "Si", (0.47, 0.0, 0.0))])
    block = gemmi.cif.read(str(tmp_path / "r.cif")).sole_block()
    assert gemmi.cif.as_string(block.find_value("_chemical_formula_sum")) == "O2 Si"
    assert float(block.find_value("_chemical_formula_weight")) == pytest.approx(60.08, abs=0.01)
    assert float(block.find_value("_exptl_crystal_density_diffrn")) == pytest.approx(2.64, abs=0.01)
    assert block.find_value("_cell_formula_units_Z") == "3"
    assert block.find_value("_space_group_crystal_system") == "trigonal"


def test_a_full_disk_names_the_file_and_leaves_no_part_of_it(tmp_path, monkeypatch):
    """A write that fails part-way (ENOSPC has no file name of its own) raises an OSError naming the file
    it was writing, and neither the file nor its temporary copy is left; an earlier version stays whole."""
    import errno
    import os

    from blochflow.io import writers

    target = tmp_path / "refined.cif"
    atomic_write_text(target, "old")
    real = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    with pytest.raises(OSError) as err:
        atomic_write_text(target, "new")
    assert err.value.filename == str(target) and err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refined.cif"] and target.read_text() == "old"
