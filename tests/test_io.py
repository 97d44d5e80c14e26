"""Readers: tolerance of real-file quirks and one-line errors for bad input."""

import re
import subprocess
import sys
from pathlib import Path

import gemmi
import numpy as np
import pytest

from blochflow.crystal.structure import crystal_from_record
from blochflow.io.errors import InputError
from blochflow.io.pets import read_pets
from blochflow.io.structure_cif import read_structure


def test_reads_quartz_example(quartz_paths):
    ds = read_pets(quartz_paths[1])
    assert ds.cell[:3] == (4.9226, 4.9226, 5.4003)
    assert ds.details.geometry == "continuous" and ds.details.rotation_axis_deg == pytest.approx(0.484)
    assert len(ds.frames) == 99 and len(ds.reflections) == 6666
    assert (ds.reflections.intensity < 0).any()  # negative intensities are kept
    rec = read_structure(quartz_paths[0])
    assert [a.element for a in rec.atoms] == ["Si", "O"] and len(rec.symops) == 6
    assert rec.atoms[0].u_aniso is not None


def test_crlf_duplicated_tags_and_reduction_process_tag(tmp_path, quartz_paths):
    text = quartz_paths[1].read_text()
    text = text.replace("_diffrn_measurement_details", "_diffrn_reflns_reduction_process")
    text = text.replace("_cell_volume                     113.328",
                        "_cell_volume 1.0\n_cell_volume                     113.328")
    p = tmp_path / "crlf.cif_pets"
    p.write_bytes(text.replace("\n", "\r\n").encode())
    ds = read_pets(p)
    assert ds.details.rotation_axis_deg == pytest.approx(0.484) and len(ds.reflections) == 6666


def test_a_frame_loop_without_zone_axis_or_scale_columns_reads(tmp_path, quartz_paths):
    """The zone axis (u v w) and PETS's frame scale are not used: a file without them reads with the
    same frames (u v w 0, scale 1)."""
    lines = quartz_paths[1].read_text().splitlines()
    start = lines.index("_diffrn_zone_axis_scale") + 1
    out = [ln for ln in lines[:start] if ln.strip() not in (
        "_diffrn_zone_axis_u", "_diffrn_zone_axis_v", "_diffrn_zone_axis_w", "_diffrn_zone_axis_scale")]
    k = start
    while lines[k].split() and lines[k].split()[0].isdigit():
        f = lines[k].split()
        out.append(" ".join([f[0], *f[4:8]]))
        k += 1
    p = tmp_path / "no_uvw.cif_pets"
    p.write_text("\n".join(out + lines[k:]) + "\n")
    full, bare = read_pets(quartz_paths[1]), read_pets(p)
    assert len(bare.frames) == 99 and len(bare.reflections) == len(full.reflections)
    for name in ("ids", "half_angle_deg", "alpha_deg", "beta_deg", "omega_deg"):
        assert np.array_equal(getattr(bare.frames, name), getattr(full.frames, name)), name
    assert not bare.frames.uvw.any() and (bare.frames.scale == 1).all()


def _mutate(tmp_path, quartz_paths, old, new, name="bad.cif_pets"):
    text = quartz_paths[1].read_text()
    assert old in text
    p = tmp_path / name
    p.write_text(text.replace(old, new, 1))
    return p


@pytest.mark.parametrize("old,new,expect", [
    ("   2  -2  -8      -28.50      163.17     1", "   2  -2  -8      -28.50      -1.0     1", "sigma"),
    ("   2  -2  -8      -28.50      163.17     1", "   2  -2  -8      abc      163.17     1", "not a number"),
    ("   2  -2  -8      -28.50      163.17     1", "   2  -2  -8      -28.50      163.17   500", "frame id 500"),
    ("_refln_index_h", "_refln_index_hh", "missing"),
    ("_diffrn_radiation_wavelength 0.02510", "_diffrn_radiation_wavelength x", "not a number"),
    ("   2  -2  -8      -28.50      163.17     1", "   2  -2  -8      3e20      163.17     1", "beyond 1e+15"),
    ("   2  -2  -8      -28.50      163.17     1", "   2  -2  -8      -28.50      2e16     1", "beyond 1e+15"),
])
def test_pets_errors_name_file_item_problem(tmp_path, quartz_paths, old, new, expect):
    p = _mutate(tmp_path, quartz_paths, old, new)
    with pytest.raises(InputError) as err:
        read_pets(p)
    msg = str(err.value)
    assert str(p) in msg and expect in msg and "\n" not in msg


def test_unknown_element(tmp_path, quartz_paths):
    p = tmp_path / "bad.cif"
    p.write_text(quartz_paths[0].read_text().replace("O1 O 0.854729", "O1 Xq 0.854729"))
    with pytest.raises(InputError, match="unknown element 'Xq'"):
        read_structure(p)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "blochflow.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_error_exit_code_and_one_line(tmp_path, quartz_paths):
    bad = _mutate(tmp_path, quartz_paths, "   2  -2  -8      -28.50      163.17     1",
                  "   2  -2  -8      -28.50      0.0     1")
    r = _cli("simulate", quartz_paths[0], bad, "--out", tmp_path / "o", "--thickness", "500")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and "sigma" in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_cell_mismatch(tmp_path, quartz_paths):
    cif = tmp_path / "big.cif"
    cif.write_text(quartz_paths[0].read_text().replace("_cell_length_c 5.40030", "_cell_length_c 6.0"))
    r = _cli("simulate", cif, quartz_paths[1], "--out", tmp_path / "o", "--thickness", "500")
    assert r.returncode == 2 and "_cell_length_c" in r.stderr and "5 %" in r.stderr and "not of one crystal" in r.stderr


def test_write_pets_refuses_to_overwrite(tmp_path, quartz_paths):
    target = tmp_path / "keep.cif_pets"
    target.write_text("precious")
    r = _cli("simulate", *quartz_paths, "--out", tmp_path / "o", "--thickness", "500", "--write-pets", target)
    assert r.returncode == 2 and target.read_text() == "precious"


_OPS_BLOCK = """loop_
_symmetry_equiv_pos_site_id
_symmetry_equiv_pos_as_xyz
1 x,y,z
2 -y,x-y,z+2/3
3 -x+y,-x,z+1/3
4 y,x,-z
5 x-y,-y,-z+1/3
6 -x,-x+y,-z+2/3
"""


def _structure(tmp_path, quartz_paths, old, new, name="s.cif"):
    text = quartz_paths[0].read_text()
    assert old in text
    p = tmp_path / name
    p.write_text(text.replace(old, new))
    return p


def _ops(rec):
    import gemmi
    return sorted(gemmi.Op(t).wrap().triplet() for t in rec.symops)


@pytest.mark.parametrize("symmetry", [
    "_space_group_name_Hall 'P 32 2\"'",  # P 32 2 1: the Hall symbol alone
    "_space_group_IT_number 154",
    "_space_group.name_H-M_alt 'P 32 2 1'",
    "_space_group_name_H-M_alt 'P 32 2 1'",
])
def test_space_group_from_a_symbol_when_no_operators_are_listed(tmp_path, quartz_paths, symmetry):
    """Without an operator loop the group comes from the Hall symbol, the H-M symbol or the IT
    number, never silently P 1."""
    reference = read_structure(quartz_paths[0])
    text = quartz_paths[0].read_text().replace(_OPS_BLOCK, "")
    text = text.replace("_symmetry_space_group_name_H-M 'P3221'\n_symmetry_Int_Tables_number 154\n", symmetry + "\n")
    p = tmp_path / "sym.cif"
    p.write_text(text)
    rec = read_structure(p)
    assert len(rec.symops) == 6 and _ops(rec) == _ops(reference)
    assert rec.symops[0] == "x,y,z"
    bare = tmp_path / "bare.cif"
    bare.write_text(text.replace(symmetry + "\n", ""))
    with pytest.raises(InputError, match="symmetry: none given"):
        read_structure(bare)


def test_operators_that_are_not_a_group_are_refused(tmp_path, quartz_paths):
    p = _structure(tmp_path, quartz_paths, "6 -x,-x+y,-z+2/3\n", "")
    with pytest.raises(InputError, match="not a group"):
        read_structure(p)
    p = _structure(tmp_path, quartz_paths, "6 -x,-x+y,-z+2/3\n", "6 -x,-x+y,-z+2/3\n7 x+1/3,y,z\n")
    with pytest.raises(InputError, match="not a group"):
        read_structure(p)


@pytest.mark.parametrize("old, new, message", [
    ("O1 O 0.854729", "Si1 O 0.854729", "label used by more than one"),
    ("O1 0.013019", "O2 0.013019", "'O2': no _atom_site row"),
    ("0.009208 Uani", "-0.009208 Uiso", None),  # Si1 keeps its Uani: the negative Uiso is not used
    ("O1 O 0.854729 0.585819 0.618682 0.015829 Uani", "O1 O 0.854729 0.585819 0.618682 -0.02 Uiso\n", None),
])
def test_atom_table_errors(tmp_path, quartz_paths, old, new, message):
    p = _structure(tmp_path, quartz_paths, old, new)
    if message is None:
        text = p.read_text()
        if "-0.02 Uiso" in text:  # O1 isotropic with a negative U: drop its aniso row
            p.write_text(text.replace("O1 0.013019 0.019950 0.016200 0.004034 -0.002570 0.009504\n", ""))
            with pytest.raises(InputError, match="U_iso -0.02 is negative"):
                read_structure(p)
        else:  # Si1's U is its aniso row's, as in the unchanged file, whatever its Uiso column says
            original = next(a for a in read_structure(quartz_paths[0]).atoms if a.label == "Si1")
            si = next(a for a in read_structure(p).atoms if a.label == "Si1")
            assert si.u_aniso is not None and si.u_aniso == pytest.approx(original.u_aniso, abs=1e-12)
            assert np.allclose(crystal_from_record(read_structure(p)).asu.u_frac[0],
                               crystal_from_record(read_structure(quartz_paths[0])).asu.u_frac[0], atol=1e-15)
        return
    with pytest.raises(InputError, match=message):
        read_structure(p)


def test_occupancy_above_one_and_aniso_b_and_labels_without_types(tmp_path, quartz_paths):
    text = quartz_paths[0].read_text()
    occ = tmp_path / "occ.cif"
    occ.write_text(text.replace("_atom_site_U_iso_or_equiv\n", "_atom_site_U_iso_or_equiv\n_atom_site_occupancy\n")
                   .replace("0.009208 Uani", "0.009208 1.5 Uani").replace("0.015829 Uani", "0.015829 1 Uani"))
    with pytest.raises(InputError, match="occupancy '1.5'"):
        read_structure(occ)
    # a refined occupancy above 1 within 3 s.u. (as refined.cif writes one) is read as 1; beyond, refused
    for value, ok in (("1.004(3)", True), ("1.05(1)", False), ("1.004", False), ("0.98(2)", True)):
        occ.write_text(text.replace("_atom_site_U_iso_or_equiv\n", "_atom_site_U_iso_or_equiv\n_atom_site_occupancy\n")
                       .replace("0.009208 Uani", f"0.009208 {value} Uani").replace("0.015829 Uani", "0.015829 1 Uani"))
        if ok:
            assert min(float(value.split("(")[0]), 1.0) in [a.occupancy for a in read_structure(occ).atoms]  # at most 1
        else:
            with pytest.raises(InputError, match=f"occupancy '{re.escape(value)}'"):
                read_structure(occ)
    # B_ij are U_ij x 8 pi^2
    u = read_structure(quartz_paths[0])
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("_atom_site_aniso_U_"):
            lines[i] = line.replace("_U_", "_B_")
        parts = line.split()
        if len(parts) == 7 and parts[0] in ("Si1", "O1") and parts[1] not in ("Si", "O"):
            lines[i] = " ".join([parts[0]] + [f"{float(v) * 8 * 3.141592653589793 ** 2:.8f}" for v in parts[1:]])
    b_file = tmp_path / "b.cif"
    b_file.write_text("\n".join(lines))
    b = read_structure(b_file)
    for x, y in zip(u.atoms, b.atoms):
        assert y.u_aniso == pytest.approx(x.u_aniso, abs=1e-8)
    # the element of a label is its leading letters: O1S is oxygen, C1A carbon, Ca1 calcium
    from blochflow.io.structure_cif import _element_symbol
    assert [_element_symbol(s) for s in ("O1S", "C1A", "N1B", "Ca1", "CL2", "OW", "O2-", "Ti4+", "H12A")] == \
        ["O", "C", "N", "Ca", "Cl", "O", "O", "Ti", "H"]


def test_the_block_with_atoms_is_read_and_two_are_refused(tmp_path, quartz_paths):
    text = quartz_paths[0].read_text()
    p = tmp_path / "global.cif"
    p.write_text("data_global\n_publ_section_title 'x'\n_cell_length_a 10.0\n\n" + text)
    assert len(read_structure(p).atoms) == 2
    two = tmp_path / "two.cif"
    two.write_text(text + "\n" + text.replace("data_data_refined", "data_second"))
    with pytest.raises(InputError, match="2 blocks hold atoms"):
        read_structure(two)


def test_labels_with_quotes_round_trip_through_written_pets(tmp_path, quartz_paths):
    """CIF 1.1 allows ' inside a bare word (O1'): the data written by simulate read back."""
    cif = _structure(tmp_path, quartz_paths, "O1 O 0.854729", "O1' O 0.854729")
    cif.write_text(cif.read_text().replace("O1 0.013019", "O1' 0.013019"))
    syn = tmp_path / "prime.cif_pets"
    r = _cli("simulate", cif, quartz_paths[1], "--out", tmp_path / "o", "--thickness", "300", "--samples", "2",
             "--samples-per-fringe", "0", "--g-max", "1.2", "--write-pets", syn)
    assert r.returncode == 0, r.stderr
    ds = read_pets(syn)
    assert ds.atoms is not None and "O1'" in list(ds.atoms.labels)


def test_no_scored_reflection_is_a_one_line_error(tmp_path, quartz_paths):
    text = quartz_paths[1].read_text()
    lines = text.split("\n")
    for i, line in enumerate(lines):
        parts = line.split()
        if len(parts) == 9 and parts[0].isdigit():  # a frame row: wedge half-angle 0
            parts[4] = "0.000"
            lines[i] = " ".join(parts)
    p = tmp_path / "flat.cif_pets"
    p.write_text("\n".join(lines))
    for cmd in (["simulate"], ["refine", "--lm-iterations", "1", "--adam-steps", "1"]):
        r = _cli(cmd[0], quartz_paths[0], p, "--out", tmp_path / cmd[0], *cmd[1:])
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no reflection is scored" in r.stderr, r.stderr
    # segment coupling scores only reflections within g_max: a g_max below every one says so, rather
    # than pointing at the geometry
    r = _cli("refine", quartz_paths[0], quartz_paths[1], "--out", tmp_path / "gmax", "--set", "g_max=0.1",
             "--set", "coupling=segments")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "none lies within g_max 0.1 1/A" in r.stderr, r.stderr
    assert not (tmp_path / "gmax" / "refined.cif").exists()


def test_non_positive_definite_u_is_simulated_as_given_and_refined_from_isotropic(tmp_path, quartz_paths, capsys):
    from blochflow.cli import _load
    from blochflow.crystal import cell as cellmod
    npd = _structure(tmp_path, quartz_paths, "O1 0.013019 0.019950 0.016200 0.004034 -0.002570 0.009504",
                     "O1 0.013019 0.019950 0.016200 0.004034 -0.002570 0.030000")
    given, _ = _load(str(npd), str(quartz_paths[1]))
    assert "simulated as given" in capsys.readouterr().out
    u = cellmod.u_frac_to_cif(given.asu.u_frac[1].numpy(), given.cell)
    assert u[3:] == pytest.approx([0.030000, -0.002570, 0.004034], abs=1e-9)  # U12 U13 U23 untouched
    start, _ = _load(str(npd), str(quartz_paths[1]), refining=True)
    assert "isotropic U of their U_eq" in capsys.readouterr().out
    u = cellmod.u_frac_to_cif(start.asu.u_frac[1].numpy(), start.cell)
    iso = cellmod.u_frac_to_cif(cellmod.u_iso_to_frac(u[0], start.cell), start.cell)
    assert u == pytest.approx(iso) and u[0] > 0


def _cif(tmp_path, name, cell, symmetry, atoms):
    p = tmp_path / f"{name}.cif"
    p.write_text(f"data_{name}\n" + "".join(f"_cell_{k} {v}\n" for k, v in zip(
        ("length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma"), cell))
        + symmetry + "\nloop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n"
        "_atom_site_fract_z\n_atom_site_U_iso_or_equiv\n" + "".join(f"{a}\n" for a in atoms))
    return p


def _sites_per_cell(rec) -> int:
    from blochflow.crystal.structure import crystal_from_record
    c = crystal_from_record(rec)
    sites = set()
    for x in c.asu.xyz.numpy():
        for r, t in zip(c.symmetry.rotations, c.symmetry.translations):
            sites.add(tuple(np.round((r @ x + t) % 1.0, 4) % 1.0))
    return len(sites)


def test_space_group_settings_from_a_symbol_follow_the_cell_or_are_asked_for(tmp_path):
    """A symbol with two origin choices and no operators is refused (they put the same coordinates on
    different sites); with the choice given it is read. A rhombohedral group in a rhombohedral cell
    gets the rhombohedral operators, not the hexagonal ones."""
    si = ["Si1 Si 0.125 0.125 0.125 0.005"]
    cubic = (5.431, 5.431, 5.431, 90, 90, 90)
    for symmetry in ("_symmetry_space_group_name_H-M 'F d -3 m'", "_space_group_IT_number 227"):
        with pytest.raises(InputError, match="two origin choices"):
            read_structure(_cif(tmp_path, "si", cubic, symmetry, si))
    rec = read_structure(_cif(tmp_path, "si2", cubic, "_symmetry_space_group_name_H-M 'F d -3 m :2'", si))
    assert _sites_per_cell(rec) == 8  # diamond: 8 Si per cubic cell
    corundum = ["Al1 Al 0.3523 0.3523 0.3523 0.004", "O1 O 0.5564 -0.0564 0.25 0.005"]
    rhombohedral = (5.128, 5.128, 5.128, 55.28, 55.28, 55.28)
    rec = read_structure(_cif(tmp_path, "al2o3", rhombohedral, "_symmetry_space_group_name_H-M 'R -3 c'", corundum))
    assert len(rec.symops) == 12 and _sites_per_cell(rec) == 10  # Al4O6 in the rhombohedral cell
    hexagonal = (4.759, 4.759, 12.99, 90, 90, 120)
    rec = read_structure(_cif(tmp_path, "al2o3h", hexagonal, "_symmetry_space_group_name_H-M 'R -3 c'",
                              ["Al1 Al 0 0 0.3523 0.004", "O1 O 0.3064 0 0.25 0.005"]))
    assert len(rec.symops) == 36 and _sites_per_cell(rec) == 30


def test_a_cell_listed_whole_under_its_space_group_is_refused(tmp_path, quartz_paths):
    """Quartz with a second Si on a symmetry image of the first (as when a cell's whole content is
    listed under P3_221): a one-line error naming both atoms. A mixed site (two species whose
    occupancies sum to 1) passes."""
    cell = (4.9226, 4.9226, 5.4003, 90, 90, 120)
    sym = "_symmetry_space_group_name_H-M 'P 32 2 1'"
    whole = ["Si1 Si 0.4697 0 0.33333 0.005", "Si2 Si 0 0.4697 0 0.005", "O1 O 0.4135 0.2669 0.2144 0.006"]
    p = _cif(tmp_path, "whole", cell, sym, whole)
    r = subprocess.run([sys.executable, "-m", "blochflow.cli", "simulate", str(p), str(quartz_paths[1]), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "atoms 'Si1' and 'Si2' sit on the same site" in r.stdout + r.stderr
    from blochflow.crystal.structure import crystal_from_record
    text = p.read_text().replace("_atom_site_U_iso_or_equiv\n", "_atom_site_U_iso_or_equiv\n_atom_site_occupancy\n")
    text = text.replace("0.33333 0.005", "0.33333 0.005 0.6").replace("Si2 Si 0 0.4697 0 0.005", "Ge1 Ge 0 0.4697 0 0.005 0.4")
    text = text.replace("0.2144 0.006", "0.2144 0.006 1")
    (tmp_path / "mixed.cif").write_text(text)
    assert len(crystal_from_record(read_structure(tmp_path / "mixed.cif")).asu.labels) == 3


def test_elements_guessed_from_ambiguous_labels_are_reported(tmp_path):
    """Without type symbols 'HO1' reads as holmium (a two-letter element), which may be the H of O1:
    the record carries a note the command line prints as a warning; 'Si1' and 'O1' raise none."""
    text = ("data_x\n_cell_length_a 4.9\n_cell_length_b 4.9\n_cell_length_c 5.4\n_cell_angle_alpha 90\n"
            "_cell_angle_beta 90\n_cell_angle_gamma 120\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n"
            "_atom_site_label\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_U_iso_or_equiv\n"
            "Si1 0 0 0 0.01\nO1 0.3 0.3 0.3 0.01\n")
    (tmp_path / "plain.cif").write_text(text)
    assert read_structure(tmp_path / "plain.cif").notes == ()
    (tmp_path / "h.cif").write_text(text + "HO1 0.4 0.4 0.4 0.02\n")
    rec = read_structure(tmp_path / "h.cif")
    assert rec.atoms[-1].element == "Ho" and "HO1 as Ho" in rec.notes[0]


def test_operators_must_keep_the_cells_metric(tmp_path, quartz_paths):
    """Operators of another setting than the cell's are refused in one line: quartz with a != b under
    its trigonal operators, and corundum's hexagonal operators on its rhombohedral cell."""
    text = quartz_paths[0].read_text()
    assert "_cell_length_a 4.9226" in text
    p = tmp_path / "ab.cif"
    p.write_text(text.replace("_cell_length_a 4.9226", "_cell_length_a 5.1"))
    with pytest.raises(InputError, match="does not have the symmetry of operator"):
        read_structure(p)
    hexagonal_ops = "loop_\n_space_group_symop_operation_xyz\n" + "".join(
        f"'{op.triplet()}'\n" for op in gemmi.SpaceGroup("R -3 c:H").operations())
    p = _cif(tmp_path, "rh", (5.128, 5.128, 5.128, 55.28, 55.28, 55.28), hexagonal_ops,
             ["Al1 Al 0.3523 0.3523 0.3523 0.004"])
    with pytest.raises(InputError, match="_cell_\\* and symmetry"):
        read_structure(p)


def test_frame_selection_names_frames_by_id_and_rejects_what_selects_nothing():
    from blochflow.io.pets import frame_selection

    ids = np.array([3, 4, 5, 6, 7, 8, 9, 10, 20])
    assert frame_selection(ids, "").all()
    assert list(ids[frame_selection(ids, "4-6, 20")]) == [4, 5, 6, 20]
    assert list(ids[frame_selection(ids, "3-10:3")]) == [3, 6, 9]  # every 3rd, counted from the range's first
    assert list(ids[frame_selection(ids, "1-4:2,9")]) == [3, 9]  # a range may start before the first id
    assert list(ids[frame_selection(ids, "7")]) == [7]
    # every n-th by position: the same frames as a range over all ids, also where ids are not contiguous
    from blochflow.io.pets import every_nth_frame_mask
    for n in (1, 2, 3, 4):
        assert np.array_equal(every_nth_frame_mask(len(ids), n), frame_selection(ids, f"3-20:{n}"))
    assert list(ids[every_nth_frame_mask(len(ids), 4)]) == [3, 7, 20]
    for spec, words in (("11-19", "selects no frame"), ("6-4", "lower id"), ("3-10:0", "at least 1"),
                        ("x", "is not a frame id"), ("1-2-3", "is not a frame id"), ("4,", "is not a frame id")):
        with pytest.raises(ValueError, match=words):
            frame_selection(ids, spec)


def test_out_folders_keep_the_users_files_and_bad_places_get_one_line(tmp_path, quartz_paths, capsys):
    """Nothing of the user's is replaced unasked: a folder holding files of an output's name (not
    only a finished run) is refused; --out at a file, --write-pets inside a file and a frame selection
    without reflection rows are one-line errors."""
    from blochflow.cli import main

    paths = [str(p) for p in quartz_paths]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "refined.cif").write_text("precious model")
    (mine / "summary.json").write_text("precious summary")
    afile = tmp_path / "afile"
    afile.write_text("x")
    text = quartz_paths[1].read_text()
    no_rows = tmp_path / "no_rows.cif_pets"
    no_rows.write_text(re.sub(r"(?m)^\s*-?\d+\s+-?\d+\s+-?\d+\s+\S+\s+\S+\s+11\s*\n", "", text))
    assert len(read_pets(no_rows).reflections) < len(read_pets(quartz_paths[1]).reflections)
    cases = [(["refine", *paths, "--out", str(mine), "--frames", "50"], "refined.cif"),
             (["simulate", *paths, "--out", str(mine), "--frames", "50", "--thickness", "300"], "summary.json"),
             (["refine", *paths, "--out", str(afile)], "is a file"),
             (["simulate", *paths, "--out", str(tmp_path / "o"), "--thickness", "300",
               "--write-pets", str(afile / "x.cif_pets")], "is a file"),
             (["simulate", paths[0], str(no_rows), "--out", str(tmp_path / "o"), "--frames", "11", "--thickness", "300"],
              "no row of the reflection loop"),
             (["simulate", paths[0], str(no_rows), "--out", str(tmp_path / "o"), "--thickness", "300",
               "--write-pets", str(no_rows), "--overwrite"], "is the input data file")]
    for argv, words in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert (mine / "refined.cif").read_text() == "precious model"
    assert (mine / "summary.json").read_text() == "precious summary"
    assert afile.read_text() == "x"


_MG_HCP = """data_mg
_space_group_name_H-M_alt 'P 63/m m c'
_cell_length_a 3.2094
_cell_length_b 3.2094
_cell_length_c 5.2108
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 120
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
_atom_site_U_iso_or_equiv
Mg1 Mg {x} {y} 0.25 1 0.015
O9 O 0.12 0.31 0.264 {occ} 0.02
"""


def test_atoms_near_a_special_position_are_moved_onto_it(tmp_path):
    """hcp Mg written as 0.33 0.67 (0.02 A off the 2c site): moved onto it with a note, so that its
    12 coinciding images count once (they counted three times); 0.3333 is moved without a note; an atom
    of occupancy 0.5 near a mirror is two half atoms (disorder about the site) and stays."""
    from blochflow.crystal.structure import crystal_from_record

    weights = {}
    for name, x, y in (("exact", "0.333333", "0.666667"), ("four", "0.3333", "0.6667"), ("two", "0.33", "0.67")):
        path = tmp_path / f"{name}.cif"
        path.write_text(_MG_HCP.format(x=x, y=y, occ=0.5))
        rec = read_structure(path)
        mg = rec.atoms[0]
        np.testing.assert_allclose(mg.xyz, (1 / 3, 2 / 3, 0.25), atol=1e-12)
        assert [n for n in rec.notes if "special position" in n] == ([] if name != "two" else [rec.notes[-1]])
        weights[name] = crystal_from_record(rec).site_multiplicity_weights().tolist()
        assert rec.atoms[1].xyz == (0.12, 0.31, 0.264)  # 0.15 A from its mirror image, half occupied: kept
    assert "Mg1" in rec.notes[-1] and "0.019 A" in rec.notes[-1] and "order 12" in rec.notes[-1]
    assert weights["two"] == weights["exact"] == weights["four"] and weights["exact"][0] == pytest.approx(1 / 12)
    path = tmp_path / "full.cif"
    path.write_text(_MG_HCP.format(x="0.333333", y="0.666667", occ=1))
    o9 = read_structure(path).atoms[1]  # a whole atom cannot have an image 0.15 A away: on the mirror
    np.testing.assert_allclose(o9.xyz, (0.12, 0.31, 0.25), atol=1e-12)


def test_symmetry_items_that_disagree_or_leave_the_setting_open_are_noted(tmp_path, quartz_paths):
    """The operators win over an H-M symbol that names another group, and the note says so; an IT
    number alone for a group with several settings is read in the standard one, noted; consistent
    items give no note."""
    assert not [n for n in read_structure(quartz_paths[0]).notes if "symmetry" in n or "setting" in n]
    p = _structure(tmp_path, quartz_paths, "_symmetry_space_group_name_H-M 'P3221'", "_symmetry_space_group_name_H-M 'P3121'")
    rec = read_structure(p)
    assert _ops(rec) == _ops(read_structure(quartz_paths[0]))
    assert any("'P3121' disagrees" in n and "P 32 2 1" in n and "operator loop" in n for n in rec.notes), rec.notes
    mono = tmp_path / "mono.cif"
    mono.write_text("data_m\n_cell_length_a 5\n_cell_length_b 6\n_cell_length_c 7\n_cell_angle_alpha 90\n"
                    "_cell_angle_beta 100\n_cell_angle_gamma 90\n_space_group_IT_number 14\nloop_\n_atom_site_label\n"
                    "_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n"
                    "_atom_site_U_iso_or_equiv\nC1 C 0.1 0.2 0.3 0.02\n")
    rec = read_structure(mono)
    assert len(rec.symops) == 4 and any("IT number alone (14)" in n and "P 1 21/c 1" in n for n in rec.notes)


def test_quirks_of_real_files_and_numbers_that_mean_nothing(tmp_path, quartz_paths, capsys):
    """A UTF-8 byte-order mark, a '?' type symbol (element from the label, noted), a non-integer
    frame id, a short reflection row (named by its own line), all intensities zero, an element
    beyond the scattering table, non-finite settings and a misspelt setting."""
    from blochflow.cli import main

    text = quartz_paths[0].read_text()
    bom = tmp_path / "bom.cif"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [a.xyz for a in read_structure(bom).atoms] == [a.xyz for a in read_structure(quartz_paths[0]).atoms]
    rec = read_structure(_structure(tmp_path, quartz_paths, "O1 O 0.854729", "O1 ? 0.854729", "q.cif"))
    assert rec.atoms[1].element == "O" and any("O1 as O" in n for n in rec.notes)
    row = "   2  -2  -8      -28.50      163.17     1"
    lines = quartz_paths[1].read_text().splitlines()
    number = lines.index(row) + 1
    for new, expect in ((row + ".5", "frame id 1.5 is not an integer"), (row[:-6], f"near line {number})")):
        with pytest.raises(InputError, match=re.escape(expect)):
            read_pets(_mutate(tmp_path, quartz_paths, row, new))
    zero = re.sub(r"(?m)^(\s*-?\d+\s+-?\d+\s+-?\d+\s+)\S+(\s+\S+\s+\d+\s*)$", r"\g<1>0.0\g<2>", quartz_paths[1].read_text())
    (tmp_path / "zero.cif_pets").write_text(zero)
    with pytest.raises(InputError, match="no intensity is positive"):
        read_pets(tmp_path / "zero.cif_pets")
    heavy = _structure(tmp_path, quartz_paths, "O1 O 0.854729", "O1 Og 0.854729", "og.cif")
    paths = [str(quartz_paths[0]), str(quartz_paths[1])]
    twin = tmp_path / "copy.cif_pets"  # the same data under another name
    twin.write_bytes(quartz_paths[1].read_bytes())
    half_ub = tmp_path / "half_ub.cif_pets"
    half_ub.write_text(re.sub(r"(_diffrn_orient_matrix_UB_\d\d\s+)(\S+)", lambda m: f"{m.group(1)}{float(m.group(2)) / 2:.6f}",
                              quartz_paths[1].read_text()))
    for argv, words in (([str(heavy), paths[1], "--thickness", "300"], "element Og"),
                        ([*paths, "--set", "orientation_sigma=nan"], "not a finite number"),
                        ([*paths, "--s-max", "inf"], "not a finite number"),
                        ([*paths, "--set", "samples=8"], "did you mean n_samples"),
                        ([*paths, "--thickness", "300", "--write-pets", str(tmp_path / "w.cif_pets"), "--max-counts", "0"],
                         "must be positive"),
                        ([*paths, "--thickness", "300", "--write-pets", str(tmp_path / "w.cif_pets"), "--max-counts", "1e30"],
                         "at most 1e+15"),
                        ([*paths, "--set", "thickness=1e9"], "at most 100000 (10 um)"),
                        ([*paths, str(twin)], "given twice"),
                        ([paths[0], str(half_ub)], "the UB matrix and the cell do not belong together"),
                        ([paths[1], paths[0]], "looks like the data"),
                        ([str(tmp_path), paths[1], "--thickness", "300"], "is a directory"),
                        ([*paths, "--frames", " "], "is empty"),
                        (["--example", "quartz", paths[0]], "brings its own structure and data"),
                        ([*paths, "--thickness", "2e5", "--frames", "1-3"], "thickness above 100000 A"),
                        ([str(_structure(tmp_path, quartz_paths, "_atom_site_fract_z", "_atom_site_fract_zz", "noz.cif")),
                          paths[1], "--thickness", "300"], "_atom_site_fract_z: missing")):
        command = "simulate" if "--thickness" in argv else "refine"
        capsys.readouterr()
        assert main([command, *argv, "--out", str(tmp_path / "o")]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_empty_loops_are_one_line_errors_and_what_the_reader_assumed_is_noted(tmp_path, quartz_paths):
    """A frame or reflection loop with its tags but no rows is a one-line error naming the loop; a
    header without the rotation-axis azimuth, zero-count rows and rows repeating another's hkl and
    frame are read, each with a note that names the file (the refinement logs them)."""
    lines = quartz_paths[1].read_text().splitlines()
    frames_end, refl_tags = lines.index("_diffrn_zone_axis_scale") + 1, lines.index("_refln_zone_axis_id") + 1
    for name, text, expect in (("no_refl.cif_pets", lines[:refl_tags], "reflection loop: no reflections"),
                               ("no_frames.cif_pets", lines[:frames_end] + lines[frames_end + 99:],  # 99 frame rows
                                "frame loop: no frames")):
        (tmp_path / name).write_text("\n".join(text) + "\n")
        with pytest.raises(InputError) as err:
            read_pets(tmp_path / name)
        assert expect in str(err.value) and name in str(err.value), str(err.value)
    assert read_pets(quartz_paths[1]).extra["notes"] == []
    row = "   2  -2  -8      -28.50      163.17     1"
    text = quartz_paths[1].read_text().replace("rotation axis position:    0.484\n", "")
    text = text.replace(row, f"{row}\n{row}\n   1   1   1    0.0    0.0    1", 1)
    (tmp_path / "odd.cif_pets").write_text(text)
    ds = read_pets(tmp_path / "odd.cif_pets")
    notes = ds.extra["notes"]
    assert ds.details.rotation_axis_deg == 0.0 and len(notes) == 3, notes
    assert all(str(tmp_path / "odd.cif_pets") in n for n in notes)
    assert "rotation axis is taken at 0 deg" in notes[0] and "1 reflection rows with I = 0" in notes[1]
    assert "1 reflection rows repeat another row's hkl and frame" in notes[2]


def test_ionic_types_and_u_values_that_look_like_b_are_noted(tmp_path, quartz_paths):
    """Type symbols with a charge (Si4+) are read as the neutral atom, said in a note; a U above
    LARGE_U (a B typed into a U item) is read as given, with a note naming the atom."""
    plain = read_structure(quartz_paths[0])
    assert not any("ionic" in n or "U above" in n for n in plain.notes)
    text = quartz_paths[0].read_text().replace("Si1 Si 1.000000", "Si1 Si4+ 1.000000").replace(
        "O1 O 0.854729", "O1 O2- 0.854729").replace("O1 0.013019", "O1 1.33")
    (tmp_path / "odd.cif").write_text(text)
    rec = read_structure(tmp_path / "odd.cif")
    assert [a.element for a in rec.atoms] == ["Si", "O"]
    assert any("ionic type symbols read as neutral atoms" in n and "Si1 Si4+, O1 O2-" in n for n in rec.notes)
    assert any("U above 0.5 A^2" in n and "O1 1.33" in n and "B value" in n for n in rec.notes), rec.notes


def test_adp_type_that_disagrees_with_the_adps_read_is_noted(tmp_path):
    """The ADPs come from the U/B items alone; an _atom_site_adp_type that is no CIF value (a column
    a script shifted: '0.05') or says Uani without an aniso row is noted; Uiso/Uani as read is not."""
    head = ("data_x\n_cell_length_a 4.9\n_cell_length_b 4.9\n_cell_length_c 5.4\n_cell_angle_alpha 90\n"
            "_cell_angle_beta 90\n_cell_angle_gamma 120\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n"
            "_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n"
            "_atom_site_U_iso_or_equiv\n_atom_site_adp_type\n")
    aniso = "loop_\n_atom_site_aniso_label\n_atom_site_aniso_U_11\n_atom_site_aniso_U_22\n_atom_site_aniso_U_33\n" \
            "_atom_site_aniso_U_12\n_atom_site_aniso_U_13\n_atom_site_aniso_U_23\nSi1 0.01 0.01 0.01 0.005 0 0\n"
    cases = {"fine": ("Uani", "Uiso", aniso, None), "shifted": ("0.05", "0.05", "", "Si1 '0.05', O1 '0.05'"),
             "no_aniso": ("Uani", "Uiso", "", "Si1 'Uani' without an _atom_site_aniso row")}
    for name, (si, o, tail, expect) in cases.items():
        (tmp_path / f"{name}.cif").write_text(head + f"Si1 Si 0 0 0 0.01 {si}\nO1 O 0.3 0.3 0.3 0.01 {o}\n" + tail)
        notes = [n for n in read_structure(tmp_path / f"{name}.cif").notes if "adp_type" in n]
        assert (notes == []) if expect is None else (len(notes) == 1 and expect in notes[0]), (name, notes)


def test_structure_cifs_saved_with_old_mac_line_ends_or_in_utf16_read_as_the_original(tmp_path, quartz_paths):
    """CR-only line ends (old Mac editors) and UTF-16 with its byte-order mark (some Windows editors) give
    the same structure as the file itself, and the same for the data file in UTF-16."""
    text = quartz_paths[0].read_text()
    cr, u16 = tmp_path / "cr.cif", tmp_path / "u16.cif"
    cr.write_bytes(text.replace("\n", "\r").encode())
    u16.write_bytes(text.encode("utf-16"))
    ref = read_structure(quartz_paths[0])
    for p in (cr, u16):
        rec = read_structure(p)
        assert rec.cell == ref.cell and [a.label for a in rec.atoms] == [a.label for a in ref.atoms]
        assert np.allclose([a.xyz for a in rec.atoms], [a.xyz for a in ref.atoms])
    data16 = tmp_path / "u16.cif_pets"
    data16.write_bytes(quartz_paths[1].read_text().encode("utf-16"))
    a, b = read_pets(quartz_paths[1]), read_pets(data16)
    assert np.array_equal(a.reflections.hkl, b.reflections.hkl) and np.array_equal(a.ub, b.ub)


def test_an_aniso_row_of_another_type_than_its_atom_is_noted(tmp_path):
    """An _atom_site_aniso row whose type symbol is not its atom's element (rows from another model, or
    a shifted column) is read with the atom's own type and noted; the example's matching rows are not."""
    from blochflow.data import example_path

    text = Path(example_path("quartz", "quartz_kinematical.cif")).read_text()
    assert not [n for n in read_structure(example_path("quartz", "quartz_kinematical.cif")).notes if "aniso_type" in n]
    p = tmp_path / "odd.cif"
    p.write_text(text.replace(" O1 O 0.017(2)", " O1 Si 0.017(2)"))
    rec = read_structure(p)
    assert [a.element for a in rec.atoms] == ["Si", "O"]
    assert any("_atom_site_aniso_type_symbol disagrees with the atom's type: O1 'Si' (atom: O)" in n for n in rec.notes)
