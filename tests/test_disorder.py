"""Disorder groups (_atom_site_disorder_assembly / _group, SHELXL's PART): read and written, never bonded
across alternatives, riding H placed within their group, one refined occupancy per group."""

import numpy as np
import pytest
import torch

from blochflow.crystal import cell as cellmod
from blochflow.crystal.bonds import geometry_table
from blochflow.crystal.disorder import Disorder
from blochflow.crystal.parameters import StructureParameters
from blochflow.crystal.structure import AsymmetricUnit, Crystal, SymmetryOps, crystal_from_record
from blochflow.io.structure_cif import read_structure

P21C = ["x,y,z", "-x,y+1/2,-z+1/2", "-x,-y,-z", "x,-y+1/2,z+1/2"]
CELL = (6.9, 8.1, 10.9, 90.0, 101.0, 90.0)
# ethylammonium chloride, its methyl C over two sites (0.65 / 0.35), each with its own methyl and CH2 H
# (label, element, xyz, U_iso, occupancy, group); H at the riding geometry (N-H 1.01, C-H 1.09 A)
ETHYL = [
    ("N1", "N", (0.68573, 0.44225, 0.63080), 0.030, 1.0, ""), ("C1", "C", (0.88547, 0.41014, 0.70701), 0.035, 1.0, ""),
    ("H0N", "H", (0.69459, 0.44741, 0.53945), 0.045, 1.0, ""), ("H1N", "H", (0.63405, 0.55078, 0.65697), 0.045, 1.0, ""),
    ("H2N", "H", (0.59317, 0.35031, 0.64433), 0.045, 1.0, ""),
    ("H1A", "H", (0.87591, 0.40457, 0.80559), 0.042, 0.65, "1"), ("H1B", "H", (0.98536, 0.50936, 0.69241), 0.042, 0.65, "1"),
    ("H1C", "H", (0.94124, 0.29302, 0.67877), 0.042, 0.35, "2"), ("H1D", "H", (0.98536, 0.50936, 0.69241), 0.042, 0.35, "2"),
    ("C2A", "C", (0.96324, 0.24681, 0.66763), 0.045, 0.65, "1"),
    ("H2A", "H", (0.86334, 0.14760, 0.68223), 0.0675, 0.65, "1"), ("H2B", "H", (1.10936, 0.22333, 0.72338), 0.0675, 0.65, "1"),
    ("H2C", "H", (0.97279, 0.25239, 0.56905), 0.0675, 0.65, "1"),
    ("C2B", "C", (0.87214, 0.40237, 0.84448), 0.045, 0.35, "2"),
    ("H2D", "H", (0.81636, 0.51950, 0.87272), 0.0675, 0.35, "2"), ("H2E", "H", (1.01825, 0.37889, 0.90023), 0.0675, 0.35, "2"),
    ("H2F", "H", (0.77224, 0.30316, 0.85908), 0.0675, 0.35, "2"),
    ("Cl1", "Cl", (0.54418, 0.81372, 0.60893), 0.030, 1.0, ""),
]


def _ethyl(occupancy: float = 0.65, shift_A: float = 0.0, groups: bool = True, common_h: bool = False) -> Crystal:
    """The disordered ethylammonium chloride; ``occupancy`` of group 1 (group 2 has the rest); non-H atoms
    moved by ``shift_A`` in random directions, their H with them. ``common_h``: the CH2 H that both groups
    have on one site (H1B, H1D) as one H in no group."""
    rng = np.random.default_rng(4)
    a = cellmod.direct_basis(CELL)
    atoms = ([x for x in ETHYL if x[0] != "H1D"] if common_h else ETHYL)
    atoms = [x[:4] + (1.0, "") if common_h and x[0] == "H1B" else x for x in atoms]
    xyz = {lab: np.array(x) for lab, _, x, *_ in atoms}
    moved = {}
    for lab, el, *_ in atoms:
        if el != "H":
            d = rng.normal(size=3)
            moved[lab] = np.linalg.solve(a, d * shift_A / np.linalg.norm(d))
    parent = dict(H0N="N1", H1N="N1", H2N="N1", H1A="C1", H1B="C1", H1C="C1", H1D="C1", H2A="C2A", H2B="C2A",
                  H2C="C2A", H2D="C2B", H2E="C2B", H2F="C2B")
    for lab, *_ in atoms:
        xyz[lab] = xyz[lab] + moved[parent.get(lab, lab)]
    occ = [occupancy if g == "1" else 1 - occupancy if g == "2" else o for *_, o, g in atoms]
    asu = AsymmetricUnit([x[0] for x in atoms], [x[1] for x in atoms], torch.tensor(np.array(list(xyz.values()))),
                         torch.tensor(occ, dtype=torch.float64),
                         torch.tensor(np.array([cellmod.u_iso_to_frac(x[3], CELL) for x in atoms])),
                         [False] * len(atoms),
                         Disorder(tuple("A" if groups and x[5] else "" for x in atoms),
                                  tuple(x[5] if groups else "" for x in atoms)))
    return Crystal(cell=CELL, symmetry=SymmetryOps.from_triplets(P21C), asu=asu)


def test_alternatives_are_groups_of_one_assembly_and_a_negative_groups_other_images():
    d = Disorder(("", "A", "A", "B", "C"), ("", "1", "2", "1", "-1"))
    assert d.together(0, 1) and d.together(1, 1)
    assert not d.together(1, 2)  # two groups of one assembly
    assert d.together(1, 3)  # independent disorders
    assert d.together(4, 4, same_rotation=True) and not d.together(4, 4, same_rotation=False)
    assert d.together(1, 1, same_rotation=False)  # a positive group's symmetry images coexist
    assert not Disorder.none(3) and d
    assert d.parts() == {"A": {"1": [1], "2": [2]}, "B": {"1": [3]}, "C": {"-1": [4]}}


def test_disorder_columns_are_read(tmp_path):
    rows = ["C1 C 0.1 0.2 0.3 0.02 1 . .", "C2 C 0.2 0.2 0.3 0.02 0.6 A 1", "C3 C 0.3 0.2 0.3 0.02 0.4 A 2",
            "C4 C 0.4 0.2 0.3 0.02 1 . 0", "C5 C 0.0 0.0 0.1 0.02 0.5 . -1"]
    path = tmp_path / "s.cif"
    path.write_text("data_s\n_cell_length_a 10\n_cell_length_b 10\n_cell_length_c 10\n_cell_angle_alpha 90\n"
                    "_cell_angle_beta 90\n_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n"
                    + "".join(f"_atom_site_{t}\n" for t in ("label", "type_symbol", "fract_x", "fract_y", "fract_z",
                                                           "U_iso_or_equiv", "occupancy", "disorder_assembly",
                                                           "disorder_group")) + "\n".join(rows) + "\n")
    dis = crystal_from_record(read_structure(path)).asu.disorder
    assert dis.group == ("", "1", "2", "", "-1") and dis.assembly == ("", "A", "A", "", "")


def test_riding_hydrogens_ride_within_their_group():
    """Each H finds its parent and the parent's neighbours among atoms it can be present with: a CH2 H of
    group 1 is 0.43 A from the group-2 methyl C, and rides on C1 all the same; each group's methyl is a
    rotor and each group's CH2 a methylene. Placed from the truth, every H is where the truth has it."""
    cr = _ethyl()
    sp = StructureParameters(cr)
    lab = sp.labels
    assert {lab[h]: lab[j] for h, (j, _, _) in sp.riding.items()} == {
        "H0N": "N1", "H1N": "N1", "H2N": "N1", "H1A": "C1", "H1B": "C1", "H1C": "C1", "H1D": "C1",
        "H2A": "C2A", "H2B": "C2A", "H2C": "C2A", "H2D": "C2B", "H2E": "C2B", "H2F": "C2B"}
    groups = sorted((g.kind, tuple(lab[h] for h in g.hydrogens), tuple(lab[n[0]] for n in g.neighbours))
                    for g in sp.riding_groups)
    assert groups == [("methylene", ("H1A", "H1B"), ("N1", "C2A")), ("methylene", ("H1C", "H1D"), ("N1", "C2B")),
                      ("rotor", ("H0N", "H1N", "H2N"), ("C1",)), ("rotor", ("H2A", "H2B", "H2C"), ("C1",)),
                      ("rotor", ("H2D", "H2E", "H2F"), ("C1",))]
    a = cellmod.direct_basis(CELL)
    x = sp.physical(sp.theta0)[0].detach().numpy()
    assert np.abs((x - cr.asu.xyz.numpy()) @ a.T).max() < 5e-4
    assert [sp.u_factor[lab.index(h)] for h in ("H1A", "H2A", "H0N")] == [1.2, 1.5, 1.5]
    # without the groups, H1A rides on the group-2 methyl C 0.43 A away, and the methyls have no rule
    plain = StructureParameters(_ethyl(groups=False))
    assert lab[plain.riding[lab.index("H1A")][0]] == "C2B"
    assert not any(lab.index("H2A") in g.hydrogens for g in plain.riding_groups)


def test_neighbours_that_are_alternatives_leave_the_h_on_its_offset():
    """A CH2 H in no group (the site both groups' H share) sees both methyl sites: no one geometry, so it
    keeps its starting offset; its group partners in each group still ride as a methylene of one H."""
    cr = _ethyl(common_h=True)
    sp = StructureParameters(cr)
    i = cr.asu.labels.index("H1B")
    assert sp.labels[sp.riding[i][0]] == "C1"
    assert not any(i in g.hydrogens for g in sp.riding_groups)
    x = sp.physical(sp.theta0)[0].detach().numpy()
    assert np.allclose(x[i], cr.asu.xyz[i].numpy())


def test_one_occupancy_per_group_summing_to_the_start():
    cr = _ethyl(occupancy=0.5)
    sp = StructureParameters(cr)
    assert [n for n in sp.names if "occ" in n] == ["partA1.occ"]
    p = sp.names.index("partA1.occ")
    theta = sp.theta0.clone()
    theta[p] = 0.7
    occ = dict(zip(sp.labels, sp.physical(theta)[1].numpy()))
    assert occ["C2A"] == occ["H2A"] == occ["H1B"] == pytest.approx(0.7)
    assert occ["C2B"] == occ["H2F"] == occ["H1C"] == pytest.approx(0.3)
    assert occ["N1"] == occ["H0N"] == occ["Cl1"] == 1.0
    # s.u.: the group's, on every atom of both groups, riding H included
    cov = torch.zeros(len(sp), len(sp), dtype=torch.float64)
    cov[p, p] = 0.02 ** 2
    su = {a["label"]: a["occupancy_su"] for a in sp.standard_uncertainties(theta, cov)}
    assert su["C2A"] == su["C2B"] == su["H2D"] == pytest.approx(0.02) and su["N1"] == 0.0
    assert [n for n in StructureParameters(cr, refine_disorder=False).names if "occ" in n] == []
    assert "group 1 (6 atoms), group 2 (6 atoms)" in sp.disorder_details()


def test_no_bond_or_angle_joins_two_alternatives():
    cr = _ethyl()
    sp = StructureParameters(cr)
    bonds, angles, _ = geometry_table(sp, sp.theta0, None)
    pairs = {frozenset((b["label_1"], b["label_2"])) for b in bonds}
    assert {"C1", "C2A"} in map(set, pairs) and {"C1", "C2B"} in map(set, pairs)
    grp = dict(zip(cr.asu.labels, cr.asu.disorder.group))
    assert all(not (grp[x] and grp[y] and grp[x] != grp[y]) for x, y in map(tuple, pairs))
    assert all(not (grp[r["label_1"]] and grp[r["label_3"]] and grp[r["label_1"]] != grp[r["label_3"]])
               for r in angles)
    assert min(b["distance"] for b in bonds) > 0.9  # the 0.43 A H1A...C2B contact is no bond
    plain = StructureParameters(_ethyl(groups=False))
    assert min(b["distance"] for b in geometry_table(plain, plain.theta0, None)[0]) < 0.5


def test_a_negative_group_is_not_bonded_to_its_own_symmetry_images():
    """PART -1 (a molecule disordered about an inversion centre): C1 and its inversion image, 1 A apart,
    are alternatives; C1-C2 (same operator) is a bond. The group's occupancy (1/2, set by the symmetry)
    is not refined."""
    cell = (10.0, 10.0, 10.0, 90.0, 90.0, 90.0)
    xyz = torch.tensor([[0.05, 0.0, 0.0], [0.17, 0.05, 0.0]], dtype=torch.float64)
    u = torch.stack([torch.as_tensor(cellmod.u_iso_to_frac(0.02, cell))] * 2)

    def bonds(group):
        asu = AsymmetricUnit(["C1", "C2"], ["C", "C"], xyz, torch.full((2,), 0.5, dtype=torch.float64), u,
                             [False, False], Disorder(("", ""), (group, group)))
        sp = StructureParameters(Crystal(cell, SymmetryOps.from_triplets(["x,y,z", "-x,-y,-z"]), asu),
                                 refine_disorder=False)
        return sorted((b["label_1"], b["label_2"], b["code_2"]) for b in geometry_table(sp, sp.theta0, None)[0])

    assert bonds("") == [("C1", "C1", "2_555"), ("C1", "C2", ".")]
    assert not [n for n in StructureParameters(Crystal(cell, SymmetryOps.from_triplets(["x,y,z", "-x,-y,-z"]),
                AsymmetricUnit(["C1", "C2"], ["C", "C"], xyz, torch.full((2,), 0.5, dtype=torch.float64), u,
                               [False, False], Disorder(("", ""), ("-1", "-1"))))).names if "occ" in n]
    assert bonds("-1") == [("C1", "C2", ".")]
    assert bonds("1") == bonds("")


def test_refined_cif_keeps_the_groups_and_reads_back(tmp_path):
    from blochflow.io.refined_cif import AtomResult, RefinementSummary, format_refined_cif

    cr = _ethyl()
    sp = StructureParameters(cr)
    cov = torch.eye(len(sp), dtype=torch.float64) * 1e-6
    atoms = [AtomResult(label=a["label"], element=el, xyz=tuple(a["xyz"]), xyz_su=tuple(a["xyz_su"]),
                        occupancy=a["occupancy"], occupancy_su=a["occupancy_su"], u_iso=a["u_iso"],
                        calc_flag=a["calc_flag"], disorder_assembly=a["disorder_assembly"],
                        disorder_group=a["disorder_group"])
             for a, el in zip(sp.standard_uncertainties(sp.theta0, cov), cr.asu.elements)]
    summary = RefinementSummary(cell=CELL, space_group="P 1 21/c 1", symops=tuple(P21C), wavelength=0.0251,
                                r_obs=0.04, wr2=0.08, gof=1.0, n_reflections=10, n_obs=5, n_params=3,
                                special_details=sp.disorder_details())
    path = tmp_path / "refined.cif"
    path.write_text(format_refined_cif("e", summary, atoms))
    back = crystal_from_record(read_structure(path))
    assert back.asu.disorder == cr.asu.disorder
    assert np.allclose(back.asu.occupancy.numpy(), cr.asu.occupancy.numpy(), atol=1e-3)
    assert "Disorder assembly A" in path.read_text()
    plain = [AtomResult(label=a.label, element=a.element, xyz=a.xyz) for a in atoms]
    assert "_atom_site_disorder_group" not in format_refined_cif("e", summary, plain)


def test_known_truth_the_groups_occupancy_is_refined_back(tmp_path):
    """Data simulated from the disordered model (0.65 / 0.35); the start has 0.5 / 0.5 and its non-H atoms
    0.03 A off. One parameter takes the occupancies back to the truth within its s.u., the groups' sum
    held, and the atoms back to where they were (0.65, 0.002; 0.007 A rms, GoF 0.83); with the occupancies
    held at 0.5 the atoms go farther off to make up for them (0.064 A, GoF 7.9)."""
    from conftest import N_SAMPLES, rotation_frames, simulated

    from blochflow.refine.run import build_problem, refine
    from blochflow.refine.settings import RefineSettings

    truth = _ethyl()
    ds = simulated(rotation_frames(CELL, 6, 1.0), truth, 400.0, N_SAMPLES, seed=3)
    a = cellmod.direct_basis(CELL)
    heavy = [i for i, e in enumerate(truth.asu.elements) if e != "H"]

    results = []

    def fit(**extra):
        settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, adam_steps=0, lm_iterations=15,
                                  free_fraction=0.0, refine_adp=False, **extra)
        problem = build_problem(_ethyl(occupancy=0.5, shift_A=0.03), ds, settings)
        res = refine(problem, settings, log=lambda s: None)
        results.append((res, settings))
        xyz, occ, _ = problem.structure.physical(res.theta[:len(problem.structure)])
        d = np.linalg.norm((xyz.detach().numpy() - truth.asu.xyz.numpy()) @ a.T, axis=1)
        su = {x["label"]: x["occupancy_su"] for x in problem.structure.standard_uncertainties(
            res.theta[:len(problem.structure)], res.covariance[:len(problem.structure), :len(problem.structure)])}
        return dict(zip(truth.asu.labels, occ.detach().numpy())), su, float(np.sqrt(np.mean(d[heavy] ** 2))), res.figures.GoF

    occ, su, rmsd, gof = fit()
    assert abs(occ["C2A"] - 0.65) < max(3 * su["C2A"], 0.01) and occ["C2A"] + occ["C2B"] == pytest.approx(1.0)
    assert su["C2A"] > 0 and occ["H2A"] == occ["C2A"]
    assert rmsd < 0.01
    # the outputs: each group's occupancy in summary.json and the log line, the groups in refined.cif
    from blochflow.cli import disorder_line
    from blochflow.report.outputs import write_outputs

    summary = write_outputs(results[0][0], tmp_path, structure_path="s.cif", data_path="d.cif_pets",
                            settings=results[0][1])
    groups = {g["group"]: g for g in summary["disorder"]}
    assert groups["1"]["occupancy"] == pytest.approx(occ["C2A"]) and groups["1"]["refined"]
    assert groups["2"]["occupancy_su"] == pytest.approx(su["C2A"]) and not groups["2"]["refined"]
    assert disorder_line(summary["disorder"]).startswith("disorder occupancies: A:1 (C2A...) 0.6")
    assert crystal_from_record(read_structure(tmp_path / "refined.cif")).asu.disorder == truth.asu.disorder
    held, _, rmsd_held, gof_held = fit(refine_disorder=False)
    assert held["C2A"] == 0.5 and gof_held > 3 * gof and rmsd_held > 0.03


def test_independent_disorders_under_one_group_numbering_keep_their_own_sums():
    """SHELXL numbers every disorder PART 1 and 2 and writes no assembly; two disorders refined apart
    (free variables 0.62 and 0.71) are two sets: each pair keeps its sum of 1 as its occupancy moves, and a
    class with no partner (0.5) has its own parameter."""
    cell = (12.0, 12.0, 12.0, 90.0, 90.0, 90.0)
    rows = [("C1", 0.62, "1"), ("C2", 0.38, "2"), ("N1", 0.71, "1"), ("N2", 0.29, "2"), ("O1", 0.5, "1"),
            ("C3", 0.62, "1")]
    xyz = torch.tensor([[0.1 + 0.15 * k, 0.1, 0.1] for k in range(len(rows))], dtype=torch.float64)
    u = torch.stack([torch.as_tensor(cellmod.u_iso_to_frac(0.02, cell))] * len(rows))
    asu = AsymmetricUnit([r[0] for r in rows], [r[0][0] for r in rows], xyz,
                         torch.tensor([r[1] for r in rows], dtype=torch.float64), u, [False] * len(rows),
                         Disorder(("",) * len(rows), tuple(r[2] for r in rows)))
    sp = StructureParameters(Crystal(cell, SymmetryOps.from_triplets(["x,y,z"]), asu))
    occ_names = [n for n in sp.names if n.endswith("occ")]
    assert len(occ_names) == 3 and len(set(occ_names)) == 3
    theta = sp.theta0.clone()
    for n in occ_names:
        theta[sp.names.index(n)] += 0.05
    occ = dict(zip(sp.labels, sp.physical(theta)[1].numpy()))
    assert occ["C1"] + occ["C2"] == pytest.approx(1.0) and occ["N1"] + occ["N2"] == pytest.approx(1.0)
    assert occ["C1"] == occ["C3"] == pytest.approx(0.67) and occ["N1"] == pytest.approx(0.76)
    assert occ["O1"] == pytest.approx(0.55)
    assert sp.disorder_details().count("Disorder:") == 3
