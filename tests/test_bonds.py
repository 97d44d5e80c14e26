"""Bond distances and angles with their s.u. and symmetry codes (the CIF's _geom_bond, _geom_angle)."""

import gemmi
import numpy as np
import pytest
import torch

from blochflow.crystal import cell as cellmod
from blochflow.crystal.bonds import geometry_table
from blochflow.crystal.parameters import StructureParameters
from blochflow.crystal.structure import AsymmetricUnit, Crystal, SymmetryOps, crystal_from_record
from blochflow.io.refined_cif import AtomResult, RefinementSummary, format_refined_cif
from blochflow.io.structure_cif import read_structure
from blochflow.report.outputs import _triplet


def _cart(crystal, label, code):
    """Cartesian position of ``label`` under a CIF symmetry code, by gemmi from the CIF's symop triplets."""
    sym = crystal.symmetry
    triplets = [_triplet(r, t) for r, t in zip(sym.rotations, sym.translations)]
    x = crystal.asu.xyz[crystal.asu.labels.index(label)].numpy()
    if code != ".":
        op, shift = code.split("_")
        x = np.array(gemmi.Op(triplets[int(op) - 1]).apply_to_xyz(list(x))) + [int(c) - 5 for c in shift]
    return np.array(gemmi.UnitCell(*crystal.cell).orthogonalize(gemmi.Fractional(*x)).tolist())


@pytest.mark.parametrize("start", ["quartz_reference.cif", "quartz_kinematical.cif"])
def test_quartz_bonds_and_angles_by_their_codes(quartz_paths, start):
    """Quartz: four Si-O bonds (1.605 and 1.617 A, two each), six O-Si-O angles near 109.5 deg and the
    Si-O-Si angle (143-144 deg); every value recomputed by gemmi from the labels and codes alone."""
    crystal = crystal_from_record(read_structure(quartz_paths[0].with_name(start)))
    sp = StructureParameters(crystal)
    bonds, angles, _ = geometry_table(sp, sp.theta0, None)
    assert [(b["label_1"], b["label_2"]) for b in bonds] == [("Si1", "O1")] * 4
    lengths = sorted(b["distance"] for b in bonds)
    assert lengths[0] == pytest.approx(lengths[1]) and lengths[2] == pytest.approx(lengths[3])
    assert 1.59 < lengths[0] < lengths[2] < 1.63
    for b in bonds:
        d = np.linalg.norm(_cart(crystal, b["label_2"], b["code_2"]) - _cart(crystal, b["label_1"], "."))
        assert d == pytest.approx(b["distance"], abs=1e-9) and b["su"] is None  # (no covariance given)
    assert len({b["code_2"] for b in bonds}) == 4
    assert sorted(a["label_2"] for a in angles) == ["O1"] + ["Si1"] * 6
    for a in angles:
        u = _cart(crystal, a["label_1"], a["code_1"]) - _cart(crystal, a["label_2"], ".")
        v = _cart(crystal, a["label_3"], a["code_3"]) - _cart(crystal, a["label_2"], ".")
        assert np.degrees(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v))) == pytest.approx(a["angle"])
    assert 143 < next(a for a in angles if a["label_2"] == "O1")["angle"] < 145
    assert all(106 < a["angle"] < 113 for a in angles if a["label_2"] == "Si1")


def _p1(atoms, cell=(10.0, 10.0, 10.0, 90, 90, 90)):
    a = cellmod.direct_basis(cell)
    asu = AsymmetricUnit([x[0] for x in atoms], [x[1] for x in atoms],
                         torch.tensor(np.array([np.linalg.solve(a, x[2]) for x in atoms])),
                         torch.ones(len(atoms), dtype=torch.float64),
                         torch.tensor(np.array([cellmod.u_iso_to_frac(0.02, cell) for _ in atoms])), [False] * len(atoms))
    return Crystal(cell=cell, symmetry=SymmetryOps.from_triplets(["x,y,z"]), asu=asu)


def test_su_of_a_distance_and_an_angle_follow_from_the_covariance():
    """Each coordinate with the same Cartesian s.u. sigma, uncorrelated: a bond's s.u. is sigma sqrt(2) and
    the angle's at a right angle between bonds of length r is sigma sqrt(4 / r^2) (radians): the
    end atoms' displacements normal to their bond, and the centre's, which moves both."""
    r, sigma = 1.4, 0.002
    crystal = _p1([("O1", "O", [5.0, 5.0, 5.0]), ("C1", "C", [5.0 + r, 5.0, 5.0]), ("N1", "N", [5.0, 5.0 + r, 5.0])])
    sp = StructureParameters(crystal, refine_adp=False)
    assert all(n.endswith((".x", ".y", ".z")) for n in sp.names) and len(sp) == 9
    cov = torch.eye(9, dtype=torch.float64) * sigma ** 2  # (position parameters are in A along a, b, c)
    bonds, angles, _ = geometry_table(sp, sp.theta0, cov)
    assert [(b["label_1"], b["label_2"]) for b in bonds] == [("O1", "C1"), ("O1", "N1")]
    for b in bonds:
        assert b["distance"] == pytest.approx(r, abs=1e-12) and b["su"] == pytest.approx(sigma * np.sqrt(2))
    (angle,) = angles
    assert angle["angle"] == pytest.approx(90.0)
    assert angle["su"] == pytest.approx(np.degrees(sigma * np.sqrt(4 / r ** 2)))
    # a correlated pair: O1 and C1 moving together along their bond leaves it exact; O1 along y moves O1-N1
    cov = torch.zeros(9, 9, dtype=torch.float64)
    cov[0, 0] = cov[3, 3] = cov[0, 3] = cov[3, 0] = cov[1, 1] = sigma ** 2  # and O1.y alone
    bonds, _, _ = geometry_table(sp, sp.theta0, cov)
    assert bonds[0]["su"] is None and bonds[1]["su"] == pytest.approx(sigma)


def test_geometry_loops_are_written_and_read_back_by_gemmi(quartz_paths):
    crystal = crystal_from_record(read_structure(quartz_paths[0]))
    sp = StructureParameters(crystal)
    cov = torch.eye(len(sp), dtype=torch.float64) * 1e-8
    bonds, angles, _ = geometry_table(sp, sp.theta0, cov)
    sym = crystal.symmetry
    summary = RefinementSummary(cell=crystal.cell, space_group="P 32 2 1",
                                symops=tuple(_triplet(r, t) for r, t in zip(sym.rotations, sym.translations)),
                                wavelength=0.0251, r_obs=0.04, wr2=0.08, gof=1.0, n_reflections=10, n_obs=5, n_params=3)
    atoms = [AtomResult(label=lab, element=el, xyz=tuple(x)) for lab, el, x in
             zip(crystal.asu.labels, crystal.asu.elements, crystal.asu.xyz.tolist())]
    block = gemmi.cif.read_string(format_refined_cif("q", summary, atoms, bonds, angles)).sole_block()
    table = block.find("_geom_bond_", ["atom_site_label_1", "atom_site_label_2", "distance", "site_symmetry_2"])
    assert len(table) == 4 and all("(" in row[2] for row in table)
    assert [row[3] for row in table] == [b["code_2"] for b in bonds]
    assert len(block.find("_geom_angle", ["", "_site_symmetry_1", "_site_symmetry_3"])) == 7
    assert block.find_value("_geom_special_details") is not None


def test_a_bond_between_images_of_one_atom_is_listed_once():
    """A helix along a two-fold screw axis (P2_1): each Se bonds to its images up and down the screw,
    one bond (i to g i is g^-1 i to i), and one Se-Se-Se angle between the two."""
    cell = (4.0, 4.0, 4.0, 90, 90, 90)
    asu = AsymmetricUnit(["Se1"], ["Se"], torch.tensor([[0.1, 0.0, 0.0]], dtype=torch.float64),
                         torch.ones(1, dtype=torch.float64), torch.tensor(np.array([cellmod.u_iso_to_frac(0.02, cell)])),
                         [False])
    crystal = Crystal(cell=cell, symmetry=SymmetryOps.from_triplets(["x,y,z", "-x,y+1/2,-z"]), asu=asu)
    sp = StructureParameters(crystal)
    bonds, angles, _ = geometry_table(sp, sp.theta0, None)
    assert len(bonds) == 1 and bonds[0]["distance"] == pytest.approx(np.hypot(0.8, 2.0))
    assert len(angles) == 1 and {angles[0]["code_1"], angles[0]["code_3"]} == {"2_555", "2_545"}


def test_hydrogen_bonds_by_the_platon_criteria():
    """O1-H1...O2 (H...A 1.83 A, nearly linear) and C1-H2...O3 (2.50 A) are hydrogen bonds; N1, 1.96 A
    from H1 but at 75 deg to O1-H1, is not. Values recomputed from the positions."""
    o1 = np.array([5.0, 5.0, 5.0])
    h1 = o1 + [0.97, 0, 0]
    c1 = np.array([12.0, 5.0, 5.0])
    h2 = c1 + [1.09, 0, 0]
    atoms = [("O1", "O", o1), ("H1", "H", h1), ("O2", "O", h1 + [1.80, 0.3, 0]), ("N1", "N", h1 + [-0.5, 1.9, 0]),
             ("C1", "C", c1), ("H2", "H", h2), ("O3", "O", h2 + [2.5, 0, 0])]
    crystal = _p1(atoms, cell=(20.0, 20.0, 20.0, 90, 90, 90))
    sp = StructureParameters(crystal, hydrogens="free", refine_adp=False)
    cov = torch.eye(len(sp), dtype=torch.float64) * 1e-6
    bonds, _, hbonds = geometry_table(sp, sp.theta0, cov)
    assert [(b["label_1"], b["label_2"]) for b in bonds] == [("O1", "H1"), ("C1", "H2")]
    assert [(h["label_d"], h["label_h"], h["label_a"]) for h in hbonds] == [("O1", "H1", "O2"), ("C1", "H2", "O3")]
    pos = dict((a[0], a[2]) for a in atoms)
    for h in hbonds:
        d, hh, a = pos[h["label_d"]], pos[h["label_h"]], pos[h["label_a"]]
        assert h["dh"] == pytest.approx(np.linalg.norm(hh - d)) and h["ha"] == pytest.approx(np.linalg.norm(a - hh))
        assert h["da"] == pytest.approx(np.linalg.norm(a - d))
        u, v = d - hh, a - hh
        assert h["angle"] == pytest.approx(np.degrees(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v))))
        assert h["code_d"] == h["code_a"] == "." and h["ha_su"] > 0
    text = format_refined_cif("h", RefinementSummary(cell=crystal.cell, space_group="P 1", symops=("x,y,z",),
                                                      wavelength=0.0251, r_obs=0.04, wr2=0.08, gof=1.0, n_reflections=10,
                                                      n_obs=5, n_params=3),
                              [AtomResult(label=a[0], element=a[1], xyz=(0.0, 0.0, 0.0)) for a in atoms], bonds, [],
                              hbonds)
    table = gemmi.cif.read_string(text).sole_block().find("_geom_hbond_", ["atom_site_label_A", "distance_HA",
                                                                            "site_symmetry_A"])
    assert [row[0] for row in table] == ["O2", "O3"] and table[0][1].startswith("1.82")
