"""A heavy-atom crystal: a CsPbBr3-like perovskite model (Pnma, a = 8.244, b = 11.735, c = 8.198 A; Pb on
4b, Cs and Br1 on 4c, Br2 on 8d) on the made-up rocking geometry of ``large_cell.py``.

    python benchmarks/heavy_atoms.py [--frame-step 1] [--thickness 400] [--threads 2] [--work DIR] [--json FILE]

Writes Poisson data from the model (``blochflow simulate --write-pets``) and refines a start displaced
by 0.06 A in every coordinate free on its site, U_iso 0.02, with ``blochflow refine`` defaults; reports
the position RMSD and U errors against the truth, R values and time. Pb (Z = 82) makes the scattering
strongly dynamical, and the sites test the special-position constraints of a centrosymmetric group.
The coordinates approximate the orthorhombic perovskite (octahedra tilted, Pb-Br 2.96-2.97 A); they
are a test model, not a reference.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from large_cell import geometry_pets, refine_case, report, structure_cif

CELL = (8.244, 11.735, 8.198)
GROUP = "P n m a"
ATOMS = [("Pb1", "Pb", 0.0, 0.0, 0.5, 0.012), ("Cs1", "Cs", 0.030, 0.25, 0.990, 0.030),
         ("Br1", "Br", 0.005, 0.25, 0.545, 0.030), ("Br2", "Br", 0.205, 0.030, 0.795, 0.030)]
# direction of the start's displacement in each coordinate free on its site (Pb on 4b has none)
FREE = {"Pb1": (0, 0, 0), "Cs1": (1, 0, -1), "Br1": (-1, 0, 1), "Br2": (1, -1, 1)}
SHIFT = 0.06  # A


def write_inputs(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    cif = {"group": GROUP, "cell": CELL, "name": "cspbbr3_like"}
    (work / "truth.cif").write_text(structure_cif(ATOMS, **cif))
    start = [(lab, el, *(c + SHIFT / length * d for c, d, length in zip((x, y, z), FREE[lab], CELL)), 0.02)
             for lab, el, x, y, z, _ in ATOMS]
    (work / "start.cif").write_text(structure_cif(start, **cif))
    (work / "geometry.cif_pets").write_text(geometry_pets(GROUP, CELL))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frame-step", type=int, default=1, help="every Nth of the 21 frames")
    p.add_argument("--thickness", type=float, default=400.0, help="A, of the simulated data")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", help="folder for the files (default: a temporary one)")
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        write_inputs(work)
        result = refine_case(args, work)
    report(result, args.json)


if __name__ == "__main__":
    main()
