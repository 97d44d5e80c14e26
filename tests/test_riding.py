"""Idealised riding hydrogens: placed from the parent's neighbours as the structure moves."""

import gemmi
import numpy as np
import pytest
import torch

from blochflow.crystal import cell as cellmod
from blochflow.crystal.parameters import StructureParameters
from blochflow.crystal.riding import TETRAHEDRAL, XH_DISTANCE_A
from blochflow.crystal.structure import AsymmetricUnit, Crystal, SymmetryOps

CELL = (30.0, 30.0, 30.0, 90, 90, 90)
TET = np.degrees(TETRAHEDRAL)


def _tetra_dirs():
    return np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float) / np.sqrt(3)


def _molecules():
    """Five fragments far apart in a P1 box, with hydrogens placed roughly (0.05-0.15 A off ideal)."""
    rng = np.random.default_rng(4)
    atoms = []

    def add(label, el, cart):
        jitter = rng.normal(0, 0.08, 3) if el == "H" else 0
        atoms.append((label, el, np.asarray(cart, float) + jitter))

    t = _tetra_dirs()
    # sp2 C-H: C1 with C2, C3 at 120 degrees in the xy plane
    o = np.array([3.0, 3.0, 3.0])
    add("C1", "C", o)
    add("C2", "C", o + 1.39 * np.array([1, 0, 0]))
    add("C3", "C", o + 1.39 * np.array([-0.5, np.sqrt(3) / 2, 0]))
    add("H1", "H", o + 1.0 * np.array([-0.5, -np.sqrt(3) / 2, 0]))
    # CH2: C4 with C5, C6 along two tetrahedral directions
    o = np.array([10.0, 3.0, 3.0])
    add("C4", "C", o)
    add("C5", "C", o + 1.53 * t[0])
    add("C6", "C", o + 1.53 * t[1])
    add("H2", "H", o + 1.0 * t[2])
    add("H3", "H", o + 1.0 * t[3])
    # tertiary CH: C7 with C8, C9, C10
    o = np.array([17.0, 3.0, 3.0])
    add("C7", "C", o)
    for k, lab in enumerate(("C8", "C9", "C10")):
        add(lab, "C", o + 1.53 * t[k])
    add("H4", "H", o + 1.0 * t[3])
    # methyl C11 on C12, which is bonded to C13 (the torsion reference)
    o = np.array([3.0, 12.0, 3.0])
    add("C11", "C", o)
    add("C12", "C", o + 1.53 * t[0])
    add("C13", "C", o + 1.53 * t[0] + 1.53 * -t[1])
    for k, lab in zip((1, 2, 3), ("H5", "H6", "H7")):
        add(lab, "H", o + 1.0 * t[k])
    # hydroxyl O1 on C14, which is bonded to C15
    o = np.array([12.0, 12.0, 3.0])
    add("O1", "O", o)
    add("C14", "C", o + 1.43 * t[0])
    add("C15", "C", o + 1.43 * t[0] + 1.53 * -t[1])
    add("H8", "H", o + 0.9 * t[2])
    return _crystal(atoms, ["x,y,z"])


def _angle(a, b, c):
    u, v = a - b, c - b
    return np.degrees(np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))


def _torsion(a, b, c, d):
    b1, b2, b3 = b - a, c - b, d - c
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    return np.degrees(np.arctan2(np.linalg.norm(b2) * b1 @ n2, n1 @ n2))


def _positions(sp, theta):
    xyz = sp.physical(theta)[0].detach().numpy()
    return {lab: sp._a @ x for lab, x in zip(sp.labels, xyz)}


def _moved(sp, seed):
    g = torch.Generator().manual_seed(seed)
    idx = sp.groups["xyz"]
    th = sp.theta0.clone()
    th[idx] += 0.15 * (2 * torch.rand(len(idx), generator=g, dtype=torch.float64) - 1)
    return th


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_idealised_riding_geometry_follows_the_moving_structure(seed):
    cr = _molecules()
    sp = StructureParameters(cr)
    kinds = {tuple(sp.labels[h] for h in g.hydrogens): g.kind for g in sp.riding_groups}
    assert kinds == {("H1",): "bisector", ("H2", "H3"): "methylene", ("H4",): "tertiary",
                     ("H5", "H6", "H7"): "rotor", ("H8",): "rotor"}
    assert not any(n.startswith("H") for n in sp.names)  # riding hydrogens add no parameters
    p = _positions(sp, sp.theta0 if seed is None else _moved(sp, seed))
    ch, oh = XH_DISTANCE_A["C"], XH_DISTANCE_A["O"]
    for h, parent in (("H1", "C1"), ("H2", "C4"), ("H3", "C4"), ("H4", "C7"), ("H5", "C11"), ("H6", "C11"),
                      ("H7", "C11")):
        assert abs(np.linalg.norm(p[h] - p[parent]) - ch) < 1e-12, h
    assert abs(np.linalg.norm(p["H8"] - p["O1"]) - oh) < 1e-12
    # sp2: in the plane, equal angles to both neighbours
    assert abs(_angle(p["C2"], p["C1"], p["H1"]) - _angle(p["C3"], p["C1"], p["H1"])) < 1e-9
    assert abs(np.linalg.det(np.stack([p["C2"] - p["C1"], p["C3"] - p["C1"], p["H1"] - p["C1"]]))) < 1e-9
    # CH2: H-C-H tetrahedral, each H at equal angles to both carbons, the two H mirror images
    assert abs(_angle(p["H2"], p["C4"], p["H3"]) - TET) < 1e-9
    for h in ("H2", "H3"):
        assert abs(_angle(p["C5"], p["C4"], p[h]) - _angle(p["C6"], p["C4"], p[h])) < 1e-9
    # tertiary: equal angles to the three carbons
    angles = [_angle(p[c], p["C7"], p["H4"]) for c in ("C8", "C9", "C10")]
    assert np.ptp(angles) < 1e-9
    # methyl: tetrahedral on the C-C bond, H-C-H tetrahedral
    for h in ("H5", "H6", "H7"):
        assert abs(_angle(p["C12"], p["C11"], p[h]) - TET) < 1e-9
    for a, b in (("H5", "H6"), ("H6", "H7"), ("H5", "H7")):
        assert abs(_angle(p[a], p["C11"], p[b]) - TET) < 1e-9
    assert abs(_angle(p["C14"], p["O1"], p["H8"]) - TET) < 1e-9


def test_rotor_torsions_are_those_of_the_start():
    cr = _molecules()
    sp = StructureParameters(cr)
    a = sp._a
    start = {lab: a @ x for lab, x in zip(sp.labels, cr.asu.xyz.numpy())}
    p0, p1 = _positions(sp, sp.theta0), _positions(sp, _moved(sp, 3))
    for q in (p0, p1):  # the hydroxyl keeps its starting torsion as the atoms move
        assert abs(_torsion(q["C15"], q["C14"], q["O1"], q["H8"])
                   - _torsion(start["C15"], start["C14"], start["O1"], start["H8"])) < 1e-6
    # the methyl's three torsions are 120 degrees apart, each within the jitter of its start
    tors = [_torsion(p0["C13"], p0["C12"], p0["C11"], p0[h]) for h in ("H5", "H6", "H7")]
    diffs = sorted(np.mod(np.subtract(tors, tors[0]), 360))
    np.testing.assert_allclose(diffs, [0, 120, 240], atol=1e-6)
    for h, t in zip(("H5", "H6", "H7"), tors):
        t0 = _torsion(start["C13"], start["C12"], start["C11"], start[h])
        assert abs((t - t0 + 180) % 360 - 180) < 15


def test_idealised_riding_is_differentiable():
    cr = _molecules()
    sp = StructureParameters(cr)
    th = _moved(sp, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sp.physical(t)[0], (th,))


def test_offset_riding_keeps_the_start():
    cr = _molecules()
    off = StructureParameters(cr, riding_geometry="offset")
    assert not off.riding_groups
    assert torch.allclose(off.physical(off.theta0)[0], cr.asu.xyz, atol=1e-14)
    with pytest.raises(ValueError, match="riding_geometry"):
        StructureParameters(cr, riding_geometry="ideal")


def _rigid_groups():
    """A free water, an NH4+, a water bonded to Mg, a lone hydroxide and a disordered water (four half H),
    far apart in a P1 box, their hydrogens 0.05-0.1 A and a few degrees off ideal."""
    rng = np.random.default_rng(7)
    atoms = []

    def add(label, el, cart, jitter=0.0):
        atoms.append((label, el, np.asarray(cart, float) + rng.normal(0, jitter, 3)))

    o = np.array([4.0, 4.0, 4.0])
    add("O9", "O", o)
    add("H91", "H", o + 0.92 * np.array([np.sin(0.9), 0.2, np.cos(0.9)]), 0.05)
    add("H92", "H", o + 0.95 * np.array([-np.sin(0.9), -0.1, np.cos(0.9)]), 0.05)
    o = np.array([14.0, 4.0, 4.0])
    add("N1", "N", o)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    for k, v in enumerate(_tetra_dirs()[[0, 1, 3, 2]]):  # an odd order: no proper turn maps the ideal's onto it
        add(f"H1{k}", "H", o + 1.03 * (q @ v), 0.05)
    o = np.array([4.0, 14.0, 4.0])  # water on Mg (Mg-O 2.08 A bonds by the radii)
    add("O8", "O", o)
    add("Mg1", "Mg", o + [0, 0, -2.08])
    add("H81", "H", o + 0.97 * np.array([np.sin(0.95), 0, np.cos(0.95)]), 0.05)
    add("H82", "H", o + 0.97 * np.array([-np.sin(0.95), 0, np.cos(0.95)]), 0.05)
    o = np.array([14.0, 14.0, 4.0])  # a lone hydroxide: it turns about two axes normal to its O-H
    add("O7", "O", o)
    add("H71", "H", o + [0.0, 0.2, 0.95])
    o = np.array([24.0, 4.0, 4.0])  # a disordered water, two orientations of half H: no rigid group of four
    add("O6", "O", o)
    for k, v in enumerate(_tetra_dirs()):
        add(f"H6{k}", "H", o + 0.97 * v)
    return _crystal(atoms, ["x,y,z"])


def test_water_and_ammonium_are_rigid_groups_of_ideal_shape_at_the_start_orientation():
    cr = _rigid_groups()
    sp = StructureParameters(cr)
    kinds = {tuple(sp.labels[h] for h in g.hydrogens): g.kind for g in sp.riding_groups}
    assert kinds == {("H91", "H92"): "rigid", ("H10", "H11", "H12", "H13"): "rigid", ("H81", "H82"): "rigid",
                     ("H71",): "rigid"}
    p = _positions(sp, sp.theta0)
    start = {lab: sp._a @ x for lab, x in zip(cr.asu.labels, cr.asu.xyz.numpy())}
    for h in ("H60", "H61", "H62", "H63"):  # the disordered water rides on its offset
        assert np.allclose(p[h], start[h], atol=1e-12)
    oh = p["H71"] - p["O7"]  # the hydroxide: on its start direction at 0.97 A
    assert np.allclose(oh, XH_DISTANCE_A["O"] * (start["H71"] - start["O7"]) / np.linalg.norm(start["H71"] - start["O7"]))
    for o, hs in (("O9", ("H91", "H92")), ("O8", ("H81", "H82"))):
        for h in hs:
            assert abs(np.linalg.norm(p[h] - p[o]) - XH_DISTANCE_A["O"]) < 1e-12
        assert abs(_angle(p[hs[0]], p[o], p[hs[1]]) - 104.5) < 1e-9
        # the ideal water lies in the start's H-O-H plane, on its bisector: the best-fitting turn
        s0, s1 = (start[h] - start[o] for h in hs)
        bis = s0 / np.linalg.norm(s0) + s1 / np.linalg.norm(s1)
        w0, w1 = (p[h] - p[o] for h in hs)
        assert np.allclose(np.cross(bis, w0 + w1), 0, atol=1e-12) and bis @ (w0 + w1) > 0
        assert abs(np.cross(s0, s1) @ (w0 - w1)) < 1e-12
    hn = [f"H1{k}" for k in range(4)]
    for a in hn:
        assert abs(np.linalg.norm(p[a] - p["N1"]) - XH_DISTANCE_A["N"]) < 1e-12
        for b in hn:
            assert a == b or abs(_angle(p[a], p["N1"], p[b]) - TET) < 1e-9
        assert _angle(p[a], p["N1"], start[a]) < 10.0  # each H near its own start H
    # rotating groups: U_iso = 1.5 U_eq of the parent (water on O, NH4+ as NH3 and CH3)
    assert all(sp.u_factor[sp.labels.index(h)] == 1.5 for h in hn + ["H91", "H81"])
    # a moved parent takes its group along; no parameters without riding torsions
    assert not any(".turn_" in n for n in sp.names)
    th = _moved(sp, 3)
    q = _positions(sp, th)
    assert np.allclose(q["H91"] - q["O9"], p["H91"] - p["O9"], atol=1e-12)


def test_rigid_groups_turn_by_three_refined_angles_and_keep_their_shape():
    """With riding torsions each rigid group has three angles (radians, about the Cartesian x, y, z),
    a lone hydroxide two (about axes normal to its O-H); zero is the start's placement, a turn moves
    every H of its group about the parent and nothing else, and the placement is differentiable."""
    cr = _rigid_groups()
    fixed, sp = StructureParameters(cr), StructureParameters(cr, refine_torsions=True)
    names = [n for n in sp.names if ".turn_" in n]
    assert names == [f"{h}.turn_{a}" for h in ("H91", "H10", "H81") for a in "xyz"] + ["H71.turn_1", "H71.turn_2"]
    assert len(sp) == len(fixed) + 11
    axes = next(g.turn_axes for g in sp.riding_groups if len(g.hydrogens) == 1)
    oh = cr.asu.xyz[cr.asu.labels.index("H71")] - cr.asu.xyz[cr.asu.labels.index("O7")]
    assert np.allclose(axes @ (sp._a @ oh.numpy()), 0, atol=1e-12)  # both normal to the O-H
    assert torch.allclose(sp.physical(sp.theta0)[0], fixed.physical(fixed.theta0)[0], atol=1e-14)
    p0 = _positions(sp, sp.theta0)
    th = sp.theta0.clone()
    th[sp.names.index("H91.turn_z")] = np.radians(30.0)
    th[sp.names.index("H10.turn_x")] = np.radians(-20.0)
    th[sp.names.index("H10.turn_y")] = np.radians(15.0)
    th[sp.names.index("H71.turn_2")] = np.radians(25.0)
    p1 = _positions(sp, th)
    assert abs(_angle(p1["H71"], p1["O7"], p0["H71"]) - 25.0) < 1e-9  # about an axis normal to O-H
    c, s = np.cos(np.radians(30.0)), np.sin(np.radians(30.0))
    for h in ("H91", "H92"):
        assert np.allclose(p1[h] - p1["O9"], np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ (p0[h] - p0["O9"]), atol=1e-12)
    hn = [f"H1{k}" for k in range(4)]
    a, b = np.radians(-20.0), np.radians(15.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    for h in hn:  # R_y after R_x
        assert np.allclose(p1[h] - p1["N1"], ry @ rx @ (p0[h] - p0["N1"]), atol=1e-12)
    for a in hn:
        assert abs(np.linalg.norm(p1[a] - p1["N1"]) - XH_DISTANCE_A["N"]) < 1e-12
        for b in hn:
            assert abs(np.linalg.norm(p1[a] - p1[b]) - np.linalg.norm(p0[a] - p0[b])) < 1e-12
    for lab in sp.labels:
        if lab not in ("H91", "H92", "H71", *hn):
            assert np.allclose(p1[lab], p0[lab], atol=1e-12), lab
    assert torch.autograd.gradcheck(lambda t: sp.physical(t)[0], (th.requires_grad_(True),))
    # the turns are independent directions of every group at zero (a full-rank Jacobian)
    jac = torch.autograd.functional.jacobian(lambda t: sp.physical(t)[0], sp.theta0)
    cols = [sp.names.index(n) for n in names]
    assert torch.linalg.matrix_rank(jac.reshape(-1, len(sp))[:, cols]) == 11


def test_rigid_groups_on_symmetry_elements_turn_only_as_their_site_allows():
    """A water on a two-fold axis (one H of two in the asymmetric unit), one in a mirror, one across a
    mirror (its H images of each other), and an NH4+ on a -43m site: each is ideal (O-H 0.97 A, H-O-H
    104.5 deg with the images; N-H 1.01 A), and each water turns by one angle, about the two-fold or
    the mirror's normal, which keeps its symmetry; the NH4+ has no turn."""
    c, s = np.cos(0.2), np.sin(0.2)
    ha, hb = (np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]) @ v for v in _tetra_dirs()[:2])  # NH4+ with two H of four
    axis = [("O9", "O", [0.0, 15.0, 0.0]), ("H91", "H", [0.75, 15.6, 0.1]),  # on the two-fold along y
            ("N1", "N", [0.0, 22.0, 0.0]), ("H1", "H", [0, 22, 0] + 0.98 * ha), ("H2", "H", [0, 22, 0] + 1.04 * hb)]
    sp = StructureParameters(_crystal(axis, ["x,y,z", "-x,y,-z"]), refine_torsions=True)
    assert [g.kind for g in sp.riding_groups] == ["rigid"] * 2
    assert [n for n in sp.names if "turn" in n] == ["H91.turn", "H1.turn"]
    assert np.allclose(np.abs(sp.riding_groups[0].turn_axes), [[0, 1, 0]], atol=1e-12)
    p = _positions(sp, sp.theta0)
    hn = [p["H1"], p["H2"], p["H1"] * [-1, 1, -1], p["H2"] * [-1, 1, -1]]  # with their images (N1 at x = z = 0)
    for k, a in enumerate(hn):
        assert abs(np.linalg.norm(a - p["N1"]) - XH_DISTANCE_A["N"]) < 1e-12
        assert all(abs(_angle(a, p["N1"], b) - TET) < 1e-9 for b in hn[k + 1:])
    for h, v in (("H1", ha), ("H2", hb)):  # each H on its own start direction (an ideal start, turned about y)
        assert np.allclose((p[h] - p["N1"]) / XH_DISTANCE_A["N"], v, atol=1e-9)
    for turn in (0.0, 0.5):
        th = sp.theta0.clone()
        th[sp.names.index("H91.turn")] = turn
        p = _positions(sp, th)
        image = p["H91"] * [-1, 1, -1]
        assert abs(np.linalg.norm(p["H91"] - p["O9"]) - XH_DISTANCE_A["O"]) < 1e-12
        assert abs(_angle(p["H91"], p["O9"], image) - 104.5) < 1e-9
    assert np.linalg.norm(p["H91"] - _positions(sp, sp.theta0)["H91"]) > 0.3
    in_plane = [("O1", "O", [12.0, 0.0, 12.0]), ("H11", "H", [12.76, 0.0, 12.6]), ("H12", "H", [11.25, 0.0, 12.58]),
                ("O2", "O", [20.0, 0.0, 12.0]), ("H21", "H", [20.05, 0.77, 12.58])]
    sp = StructureParameters(_crystal(in_plane, ["x,y,z", "x,-y,z"]), refine_torsions=True)
    assert [n for n in sp.names if "turn" in n] == ["H11.turn", "H21.turn"]
    th = sp.theta0.clone()
    th[sp.names.index("H11.turn")], th[sp.names.index("H21.turn")] = 0.4, -0.6
    p0, p = _positions(sp, sp.theta0), _positions(sp, th)
    assert abs(p["H11"][1]) < 1e-12 and abs(p["H12"][1]) < 1e-12  # still in the mirror
    assert abs(_angle(p["H11"], p["O1"], p["H12"]) - 104.5) < 1e-9
    assert abs(_angle(p["H21"], p["O2"], p["H21"] * [1, -1, 1]) - 104.5) < 1e-9
    assert min(np.linalg.norm(p[h] - p0[h]) for h in ("H11", "H12", "H21")) > 0.2
    assert torch.autograd.gradcheck(lambda t: sp.physical(t)[0], (th.requires_grad_(True),))
    cubic = [op.triplet() for op in gemmi.SpaceGroup("P -4 3 m").operations()]
    sp = StructureParameters(_crystal([("N1", "N", [0.0, 0.0, 0.0]), ("H1", "H", [0.6, 0.6, 0.6])], cubic),
                             refine_torsions=True)
    assert [g.kind for g in sp.riding_groups] == ["rigid"] and len(sp.riding_groups[0].turn_axes) == 0
    assert not [n for n in sp.names if "turn" in n]
    h = _positions(sp, sp.theta0)["H1"]
    assert np.allclose(h, XH_DISTANCE_A["N"] / np.sqrt(3), atol=1e-12)


def test_refined_rotor_torsions_turn_each_group_about_its_bond():
    """With riding_torsions, each rotor (the methyl and the hydroxyl) gets one parameter, in radians:
    zero is the start's placement; a turn moves every H of the group by that angle about the X-P bond
    and keeps bond lengths and angles; no other group moves; differentiable."""
    cr = _molecules()
    fixed, sp = StructureParameters(cr), StructureParameters(cr, refine_torsions=True)
    names = [n for n in sp.names if n.endswith(".torsion")]
    assert names == ["H5.torsion", "H8.torsion"] and len(sp) == len(fixed) + 2
    assert torch.allclose(sp.physical(sp.theta0)[0], fixed.physical(fixed.theta0)[0], atol=1e-14)
    th = sp.theta0.clone()
    th[sp.names.index("H5.torsion")] = np.radians(40.0)
    th[sp.names.index("H8.torsion")] = np.radians(-25.0)
    p0, p1 = _positions(sp, sp.theta0), _positions(sp, th)
    for h in ("H5", "H6", "H7"):
        turned = _torsion(p1["C13"], p1["C12"], p1["C11"], p1[h]) - _torsion(p0["C13"], p0["C12"], p0["C11"], p0[h])
        assert abs((turned - 40.0 + 180) % 360 - 180) < 1e-9
        assert abs(_angle(p1["C12"], p1["C11"], p1[h]) - TET) < 1e-9
        assert abs(np.linalg.norm(p1[h] - p1["C11"]) - XH_DISTANCE_A["C"]) < 1e-12
    turned = _torsion(p1["C15"], p1["C14"], p1["O1"], p1["H8"]) - _torsion(p0["C15"], p0["C14"], p0["O1"], p0["H8"])
    assert abs((turned + 25.0 + 180) % 360 - 180) < 1e-9
    for lab in sp.labels:
        if lab not in ("H5", "H6", "H7", "H8"):
            assert np.allclose(p1[lab], p0[lab], atol=1e-12), lab
    assert torch.autograd.gradcheck(lambda t: sp.physical(t)[0], (th.requires_grad_(True),))


def _crystal(atoms, triplets, cell=CELL):
    """A crystal of (label, element, Cartesian A) atoms, U_iso 0.02, under these symmetry operators."""
    a = cellmod.direct_basis(cell)
    frac = [np.linalg.solve(a, np.asarray(c, float)) for *_, c in atoms]
    uf = [cellmod.u_iso_to_frac(0.02, cell) for _ in atoms]
    asu = AsymmetricUnit([x[0] for x in atoms], [x[1] for x in atoms], torch.tensor(np.array(frac)),
                         torch.ones(len(atoms), dtype=torch.float64), torch.tensor(np.array(uf)), [False] * len(atoms))
    return Crystal(cell=cell, symmetry=SymmetryOps.from_triplets(triplets), asu=asu)


def _hydroxyl(o, out_of_plane):
    """C-C-O-H with the H turned ``out_of_plane`` degrees out of the C-C-O plane (the xz plane here)."""
    o = np.asarray(o, float)
    c14 = o + 1.43 * np.array([1.0, 0, 0])
    c15 = c14 + 1.53 * np.array([np.cos(np.radians(70)), 0, np.sin(np.radians(70))])
    t, phi = np.radians(180 - TET), np.radians(out_of_plane)
    h = o + 0.9 * np.array([-np.cos(t), np.sin(t) * np.sin(phi), -np.sin(t) * np.cos(phi)])
    return c14, c15, h


def test_only_tetrahedral_rotors_off_special_positions_turn():
    """A torsion is refined for OH, SH, CH3, NH3 only: a planar NH2 stays in its plane, a C-H on a
    triple bond on its axis, and an OH whose H lies on a mirror with its O-C-C stays there (urea's
    NH2 on a mirror was turned off it: the H 0.03 A off the mirror, counted as two half atoms)."""
    atoms = []
    o = np.array([3.0, 3.0, 3.0])  # amide C16(=O2)-N2H2, planar
    atoms += [("N2", "N", o), ("C16", "C", o + [1.33, 0, 0]), ("O2", "O", o + [1.33 + 0.62, 1.07, 0]),
              ("H9", "H", o + [-0.5, 0.87, 0.02]), ("H10", "H", o + [-0.5, -0.87, -0.02])]
    o = np.array([3.0, 12.0, 3.0])  # H-C17#C18-C19
    atoms += [("C17", "C", o), ("C18", "C", o + [1.20, 0, 0]), ("C19", "C", o + [2.66, 0, 0]),
              ("H11", "H", o + [-1.0, 0.02, 0])]
    c14, c15, h = _hydroxyl([12.0, 12.0, 3.0], 60.0)  # a hydroxyl in general
    atoms += [("O1", "O", [12.0, 12.0, 3.0]), ("C14", "C", c14), ("C15", "C", c15), ("H8", "H", h)]
    sp = StructureParameters(_crystal(atoms, ["x,y,z"]), refine_torsions=True)
    assert [n for n in sp.names if n.endswith(".torsion")] == ["H8.torsion"]
    assert [g.hydrogens for g in sp.rotor_groups] == [[atoms.index(a) for a in atoms if a[0] == "H8"]]
    # Pm: one hydroxyl with every atom on the mirror y = 0, one off it
    on = [("O3", "O", [12.0, 0.0, 12.0]), *zip(("C20", "C21", "H12"), "CCH", _hydroxyl([12.0, 0.0, 12.0], 0.0))]
    off = [("O4", "O", [20.0, 7.0, 12.0]), *zip(("C22", "C23", "H13"), "CCH", _hydroxyl([20.0, 7.0, 12.0], 60.0))]
    sp = StructureParameters(_crystal(on + off, ["x,y,z", "x,-y,z"]), refine_torsions=True)
    assert [n for n in sp.names if n.endswith(".torsion")] == ["H13.torsion"]
    h12 = _positions(sp, sp.theta0)["H12"]
    assert abs(h12[1]) < 1e-9  # still on the mirror


def test_hydrogens_on_symmetry_elements_keep_their_site():
    """A methyl on a three-fold axis (one H of three in the asymmetric unit) is no C-H on a triple
    bond (it was put on the axis, C-C-H 180 deg): it is a tetrahedral rotor of three, its images
    109.47 deg apart, U 1.5 U_eq. An O-H whose H lies on a mirror, placed from a C whose other bonds
    leave the mirror, stays on the mirror as the structure moves."""
    hexagonal = (30.0, 30.0, 30.0, 90, 90, 120)
    a = cellmod.direct_basis(hexagonal)
    t = np.radians(180 - TET)
    c1 = a @ np.array([0.0, 0.0, 0.2])  # on the three-fold axis of P3
    c2 = c1 + [0, 0, 1.53]
    atoms = [("C1", "C", c1), ("C2", "C", c2), ("C3", "C", c2 + 1.53 * np.array([np.sin(t), 0, np.cos(t)])),
             ("H1", "H", c1 + 1.0 * np.array([np.sin(t), 0, -np.cos(t)]))]
    sp = StructureParameters(_crystal(atoms, ["x,y,z", "-y,x-y,z", "-x+y,-x,z"], hexagonal))
    assert [(g.hydrogens, g.angle) for g in sp.riding_groups] == [([3], TETRAHEDRAL)] and sp.u_factor[3] == 1.5
    three = [np.eye(3), np.array([[0, -1, 0], [1, -1, 0], [0, 0, 1]]), np.array([[-1, 1, 0], [-1, 0, 0], [0, 0, 1]])]
    for th in (sp.theta0, _moved(sp, 3), _moved(sp, 4)):
        p = _positions(sp, th)
        assert abs(_angle(p["C2"], p["C1"], p["H1"]) - TET) < 1e-9
        assert abs(np.linalg.norm(p["H1"] - p["C1"]) - XH_DISTANCE_A["C"]) < 1e-12
        h_images = [a @ (r @ np.linalg.solve(a, p["H1"])) for r in three]
        assert abs(_angle(h_images[0], p["C1"], h_images[1]) - TET) < 1e-9
    # Pm: O3-H12 and C20 on the mirror y = 0, C20's other neighbours C21 and its image off it
    o = np.array([12.0, 0.0, 12.0])
    c20 = o + [1.43, 0, 0]
    c21 = c20 + 1.53 * np.array([np.cos(np.radians(70)) * 0.5, 0.8, np.sin(np.radians(70)) * 0.5])
    h12 = o + 0.9 * np.array([-np.cos(t), 0, -np.sin(t)])
    sp = StructureParameters(_crystal([("O3", "O", o), ("C20", "C", c20), ("C21", "C", c21), ("H12", "H", h12)],
                                      ["x,y,z", "x,-y,z"]))
    assert [g.hydrogens for g in sp.riding_groups] == [[3]]
    for seed in (1, 2, 3):
        p = _positions(sp, _moved(sp, seed))
        assert abs(p["H12"][1]) < 1e-12 and abs(p["O3"][1]) < 1e-12
        assert abs(np.linalg.norm(p["H12"] - p["O3"]) - XH_DISTANCE_A["O"]) < 0.01
    assert torch.autograd.gradcheck(lambda t: sp.physical(t)[0], (_moved(sp, 1).requires_grad_(True),))


def test_rotors_on_linear_chains_are_placed():
    """A methyl on C#N and the C-H of a terminal alkyne have only collinear reference atoms (the
    torsion frame was 0/0: NaN positions, a crash in the refinement): they are placed from a fixed
    direction normal to the chain, the methyl tetrahedral with its start torsion, the alkyne H on the
    axis, and both follow the moving structure, differentiably; sideways noise in the collinear atom
    does not turn the methyl."""
    t = np.radians(180 - TET)
    z = np.array([0.0, 0.0, 1.0])
    o = np.array([3.0, 3.2, 3.1])  # H3C1-C2#N1
    hs = [o + 1.09 * np.array([np.sin(t) * np.cos(f), np.sin(t) * np.sin(f), -np.cos(t)]) for f in (0.3, 2.39, 4.49)]
    o2 = np.array([12.0, 3.0, 3.0])  # H9-C5#C4-C3 (C3 bonded to C4 only: a methyl-free chain end)
    atoms = [("C1", "C", o), ("C2", "C", o + 1.46 * z), ("N1", "N", o + 2.62 * z + [0.02, -0.01, 0]),
             *[(f"H{k}", "H", h) for k, h in zip((1, 2, 3), hs)],
             ("C3", "C", o2), ("C4", "C", o2 + 1.46 * z), ("C5", "C", o2 + 2.66 * z), ("H9", "H", o2 + 3.72 * z)]
    sp = StructureParameters(_crystal(atoms, ["x,y,z"]), refine_torsions=True)
    assert sorted(len(g.hydrogens) for g in sp.riding_groups) == [1, 3]
    for th in (sp.theta0, _moved(sp, 1), _moved(sp, 2)):
        p = _positions(sp, th)
        assert all(np.isfinite(v).all() for v in p.values())
        for h in ("H1", "H2", "H3"):
            assert abs(_angle(p["C2"], p["C1"], p[h]) - TET) < 1e-9
        assert abs(_angle(p["C4"], p["C5"], p["H9"]) - 180.0) < 1e-4  # (arccos near -1: 1e-6 deg is rounding)
    p0 = _positions(sp, sp.theta0)
    for h, start in zip(("H1", "H2", "H3"), hs):  # the start's torsion kept (to 0.1 A: the idealised shape)
        assert np.linalg.norm(p0[h] - start) < 0.1
    assert torch.autograd.gradcheck(lambda q: sp.physical(q)[0], (_moved(sp, 1).requires_grad_(True),))


def test_a_methyl_on_a_mirror_is_a_tetrahedral_rotor_of_three():
    """Pm: a methyl C1 and its C2-C3 on the mirror y = 0, one H on the mirror and one off it (its
    image is the third). The pair was taken for a planar =CH2 (120 deg); it is a tetrahedral rotor
    of three, evenly spaced with the image whatever the start's torsions: every H-C-H 109.47 deg, the
    mirror H on the mirror, no torsion (the mirror fixes it), U 1.5 U_eq; as the structure moves too."""
    t = np.radians(180 - TET)
    c1 = np.array([12.0, 0.0, 12.0])
    c2 = c1 + [0, 0, 1.53]
    c3 = c2 + 1.53 * np.array([np.sin(t), 0, np.cos(t)])
    h = [c1 + 1.09 * np.array([np.sin(t) * np.cos(f), np.sin(t) * np.sin(f), -np.cos(t)])
         for f in (np.pi, np.pi / 3 + np.radians(10))]  # the start's off-mirror H 10 deg from its ideal torsion
    sp = StructureParameters(_crystal([("C1", "C", c1), ("C2", "C", c2), ("C3", "C", c3), ("H1", "H", h[0]),
                                       ("H2", "H", h[1])], ["x,y,z", "x,-y,z"]), refine_torsions=True)
    assert [len(g.hydrogens) for g in sp.riding_groups] == [2] and sp.riding_groups[0].angle == TETRAHEDRAL
    assert not [n for n in sp.names if n.endswith(".torsion")] and sp.u_factor[3] == sp.u_factor[4] == 1.5
    for th in (sp.theta0, _moved(sp, 1), _moved(sp, 2)):
        p = _positions(sp, th)
        image = p["H2"] * [1, -1, 1]
        assert abs(p["H1"][1]) < 1e-12
        for a, b in (("H1", "H2"), ("H1", None), ("H2", None)):
            assert abs(_angle(p[a], p["C1"], p[b] if b else image) - TET) < 1e-6, (a, b)


# a made-up hydrate (P2_1/c; half an oxalic-acid-like molecule on the inversion centre, one water),
# fractional coordinates and U_iso (the water H at 0.97 A, H-O-H 104.5 degrees)
HYDRATE_CELL = (6.12, 3.61, 12.06, 90.0, 106.3, 90.0)
HYDRATE = [("C1", "C", (-0.11177, 0.10931, -0.00944), 0.018), ("O1", "O", (-0.16630, 0.35081, -0.08152), 0.025),
           ("O2", "O", (-0.22955, 0.00674, 0.05868), 0.025), ("H1", "H", (-0.36785, 0.15295, 0.04307), 0.0375),
           ("O3", "O", (0.71392, 0.51837, 0.20890), 0.025), ("H2", "H", (0.61614, 0.61906, 0.25236), 0.0375),
           ("H3", "H", (0.73509, 0.26109, 0.23270), 0.0375)]


def _hydrate(turn_deg: float = 0.0) -> Crystal:
    """The hydrate, its water's hydrogens turned by ``turn_deg`` through O3 about an axis between the
    normal of the water's plane and its H-H direction."""
    a = cellmod.direct_basis(HYDRATE_CELL)
    xyz = {lab: np.array(x) for lab, _, x, _ in HYDRATE}
    v2, v3 = (a @ (xyz[h] - xyz["O3"]) for h in ("H2", "H3"))
    k = np.cross(v2, v3) / np.linalg.norm(np.cross(v2, v3)) + 0.4 * (v2 - v3) / np.linalg.norm(v2 - v3)
    k /= np.linalg.norm(k)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.radians(turn_deg)
    rot = np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx
    for h in ("H2", "H3"):
        xyz[h] = xyz["O3"] + np.linalg.solve(a, rot @ (a @ (xyz[h] - xyz["O3"])))
    asu = AsymmetricUnit([x[0] for x in HYDRATE], [x[1] for x in HYDRATE], torch.tensor(np.array(list(xyz.values()))),
                         torch.ones(len(HYDRATE), dtype=torch.float64),
                         torch.tensor(np.array([cellmod.u_iso_to_frac(x[3], HYDRATE_CELL) for x in HYDRATE])),
                         [False] * len(HYDRATE))
    return Crystal(cell=HYDRATE_CELL, symmetry=SymmetryOps.from_triplets(
        ["x,y,z", "-x,y+1/2,-z+1/2", "-x,-y,-z", "x,-y+1/2,z+1/2"]), asu=asu)


def test_a_water_turned_in_the_start_is_turned_back_by_its_rigid_group():
    """Known truth: data simulated from the hydrate; the start's water H are turned by 20 degrees
    (0.33 A off). Its rigid group turns them back to the truth, and the heavy atoms end where they
    should; riding on the start's orientation keeps the H wrong and pulls the water O and the fit."""
    from conftest import N_SAMPLES, rotation_frames, simulated

    from blochflow.refine.run import build_problem, refine
    from blochflow.refine.settings import RefineSettings

    truth = _hydrate()
    ds = simulated(rotation_frames(HYDRATE_CELL, 6, 1.2), truth, 400.0, N_SAMPLES, seed=2)
    a = cellmod.direct_basis(HYDRATE_CELL)

    def errors(turn_deg, **extra):
        settings = RefineSettings(samples_per_fringe=0.0, n_samples=N_SAMPLES, adam_steps=0, lm_iterations=15,
                                  free_fraction=0.0, refine_adp=False, **extra)
        problem = build_problem(_hydrate(turn_deg), ds, settings)
        res = refine(problem, settings, log=lambda s: None)
        xyz = problem.structure.physical(res.theta[:len(problem.structure)])[0].detach().numpy()
        d = np.linalg.norm((xyz - truth.asu.xyz.numpy()) @ a.T, axis=1)
        return dict(zip(truth.asu.labels, d)), res.figures.GoF

    start = np.linalg.norm((_hydrate(20.0).asu.xyz - truth.asu.xyz).numpy() @ a.T, axis=1)
    assert min(start[5:]) > 0.3
    turned, gof = errors(20.0)
    assert max(turned["H2"], turned["H3"]) < 0.02 and turned["O3"] < 0.005, turned
    kept, gof_kept = errors(20.0, riding_torsions=False)
    assert min(kept["H2"], kept["H3"]) > 0.25 and gof_kept > 1.5 * gof


def test_the_hydrogen_treatment_is_described_for_the_cif():
    """_refine_special_details names each kind of riding group with its H count, and free H."""
    cr = _rigid_groups()
    text = StructureParameters(cr, refine_torsions=True).hydrogen_details()
    assert "13 H riding" in text and "rigid water, NH4+, H3O+ groups (turns refined) 9" in text
    assert "on the start's offset from the parent 4" in text and "1.5 on O" in text
    assert StructureParameters(cr, hydrogens="free").hydrogen_details().startswith("13 H refined freely")
    assert "Idealised" not in StructureParameters(cr, riding_geometry="offset").hydrogen_details()
    assert "turns refined" not in StructureParameters(cr, refine_torsions=False).hydrogen_details()
    assert StructureParameters(_crystal([("C1", "C", [1.0, 1.0, 1.0])], ["x,y,z"])).hydrogen_details() == ""


def test_half_occupied_hydrogens_of_a_whole_parent_are_no_rigid_group():
    """A hydroxyl H disordered over two half-occupied sites reads as an O with two H: no water (it keeps
    its offset); a half-occupied water (O and H at 0.5) is a rigid group like any water."""
    o1, o2 = np.array([4.0, 4.0, 4.0]), np.array([14.0, 4.0, 4.0])
    atoms = [("O1", "O", o1), ("C1", "C", o1 + [1.43, 0, 0]), ("C2", "C", o1 + [1.43 + 0.5, 1.45, 0]),
             ("H1A", "H", o1 + [-0.3, 0.8, 0.45]), ("H1B", "H", o1 + [-0.3, -0.8, 0.45]),
             ("O2", "O", o2), ("H2A", "H", o2 + [0.76, 0.0, 0.59]), ("H2B", "H", o2 + [-0.76, 0.0, 0.59])]
    cr = _crystal(atoms, ["x,y,z"])
    cr.asu.occupancy = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    sp = StructureParameters(cr, refine_torsions=True)
    assert [[sp.labels[h] for h in g.hydrogens] for g in sp.riding_groups] == [["H2A", "H2B"]]
    p = _positions(sp, sp.theta0)
    start = {lab: sp._a @ x for lab, x in zip(cr.asu.labels, cr.asu.xyz.numpy())}
    assert np.allclose(p["H1A"], start["H1A"], atol=1e-12) and np.allclose(p["H1B"], start["H1B"], atol=1e-12)
    assert abs(_angle(p["H2A"], p["O2"], p["H2B"]) - 104.5) < 1e-9


def test_a_strongly_h_bonded_neighbours_h_does_not_count_as_the_parents():
    """A water's H 1.30 A from a hydroxyl O (a strong hydrogen bond, within bonding distance): the
    hydroxyl is still a rotor of one H, and the water a rigid group."""
    c14, c15, h8 = _hydroxyl([12.0, 12.0, 3.0], 60.0)
    o1 = np.array([12.0, 12.0, 3.0])
    away = (o1 - h8) / np.linalg.norm(o1 - h8)  # the water on the side opposite H8
    side = np.cross(away, [0.0, 0.0, 1.0])
    side /= np.linalg.norm(side)
    h2a = o1 + 1.30 * away
    o2 = h2a + 0.97 * away
    h2b = o2 + 0.97 * (np.cos(np.radians(75.5)) * away + np.sin(np.radians(75.5)) * side)
    atoms = [("O1", "O", o1), ("C14", "C", c14), ("C15", "C", c15), ("H8", "H", h8),
             ("O2", "O", o2), ("H2A", "H", h2a), ("H2B", "H", h2b)]
    sp = StructureParameters(_crystal(atoms, ["x,y,z"]), refine_torsions=True)
    kinds = {tuple(sp.labels[h] for h in g.hydrogens): g.kind for g in sp.riding_groups}
    assert kinds == {("H8",): "rotor", ("H2A", "H2B"): "rigid"}


def test_a_strongly_h_bonded_neighbours_h_does_not_raise_the_parents_u_factor():
    """An NH2 with a water's H 1.30 A from its N: the N has two H, U_iso 1.2 U_eq (three would make 1.5)."""
    n = np.array([12.0, 12.0, 3.0])
    up = np.array([0.0, 0.0, 1.0])
    atoms = [("N1", "N", n), ("C1", "C", n + [1.35, 0, 0]), ("C2", "C", n + [2.1, 1.2, 0]),
             ("H1", "H", n + 1.01 * np.array([np.cos(2.094), np.sin(2.094), 0])),
             ("H2", "H", n + 1.01 * np.array([np.cos(4.189), np.sin(4.189), 0])),
             ("H3", "H", n + 1.30 * up), ("O1", "O", n + 2.27 * up),
             ("H4", "H", n + 2.27 * up + 0.97 * np.array([0.97, 0, 0.24]))]
    sp = StructureParameters(_crystal(atoms, ["x,y,z"]))
    assert sp.labels[sp.riding[5][0]] == "O1"
    assert sp.u_factor[3] == sp.u_factor[4] == 1.2 and sp.u_factor[5] == 1.5


def test_a_hydrogen_too_far_to_ride_names_its_nearest_atom_and_the_remedies():
    """A start whose H lies 1.5 A from its carbon (beyond riding_max_distance 1.3 A): the error names the H, the
    nearest non-H atom and its distance, and the two ways on (a wider search, or free hydrogens, which work)."""
    cell = (10.0, 10.0, 10.0, 90.0, 90.0, 90.0)
    asu = AsymmetricUnit(["C1", "H1"], ["C", "H"], torch.tensor([[0.2, 0.2, 0.2], [0.35, 0.2, 0.2]], dtype=torch.float64),
                         torch.ones(2, dtype=torch.float64),
                         torch.tensor(np.array([cellmod.u_iso_to_frac(0.02, cell)] * 2)), [False, False])
    crystal = Crystal(cell=cell, symmetry=SymmetryOps.from_triplets(["x,y,z"]), asu=asu)
    with pytest.raises(ValueError, match=r"hydrogen H1: no non-H atom within 1.3 A to ride on \(the nearest, C1, is "
                                         r"1.50 A away\); raise riding_max_distance .* or refine hydrogens free"):
        StructureParameters(crystal)
    assert StructureParameters(crystal, riding_max_A=1.6).riding[1][0] == 0  # rides on C1
    StructureParameters(crystal, hydrogens="free")
