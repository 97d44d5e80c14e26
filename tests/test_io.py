"""Readers: tolerance of real-file quirks and one-line errors for bad input."""

import subprocess
import sys

import pytest

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
    assert r.returncode == 2 and "_cell_length_c" in r.stderr and "5 %" in r.stderr


def test_write_pets_refuses_to_overwrite(tmp_path, quartz_paths):
    target = tmp_path / "keep.cif_pets"
    target.write_text("precious")
    r = _cli("simulate", *quartz_paths, "--out", tmp_path / "o", "--thickness", "500", "--write-pets", target)
    assert r.returncode == 2 and target.read_text() == "precious"
