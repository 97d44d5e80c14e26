"""Generate tests/oracle/abtem_quartz_reference.npz: Bloch-wave intensities of alpha-quartz from abTEM.

abTEM (https://github.com/abTEM/abTEM, GPL-3.0) is an independent TEM simulator with its own
Bloch-wave solver (``abtem.bloch.BlochWaves``). It is used here only as a test-time oracle: nothing
in blochflow imports it. Run (needs ``pip install abtem``, tested with abTEM 1.0.11)::

    OMP_NUM_THREADS=1 python tests/oracle/make_abtem_reference.py

The abTEM model is set up from the CIF without blochflow's crystal code: gemmi expands the
asymmetric unit to the full cell and ASE builds the cell (``a`` along x, ASE's frame). The
incident direction is defined in that frame, then stored both in lattice coordinates
(``incident_uvw``, a real-space direction) and in blochflow's Cartesian frame (``incident_cart``,
the frame of :func:`blochflow.crystal.cell.reciprocal_basis`, ``a*`` along x), converted through
the lattice coordinates only.

abTEM conventions matched by the comparison (read from abtem/bloch/dynamical.py and utils.py):

* Lobato & Van Dyck (2014) scattering factors (``parametrization='lobato'``), U_g prefactor
  sigma / (kappa lambda pi) = gamma / pi (agrees with blochflow's to 2e-9), structure factor
  F(h) = sum f exp(+2 pi i h.x) / Omega with A_ij = U(h_j - h_i): the same matrix as blochflow's
  A_gh = U_{g-h} with U_g ~ exp(-2 pi i g.x).
* Debye-Waller: exp(-2 pi^2 sigma^2 g^2) per atom (isotropic), or exp(-2 pi^2 sum sigma_a^2 g_a^2)
  with three Cartesian sigmas (ASE frame). So sigma^2 = U. No off-diagonal ADPs: cases use U = 0,
  the isotropic U_eq of the CIF atoms, or a uniaxial tensor diag(U_perp, U_perp, U_par) with the
  unique axis along c (invariant under every operator of P3_221, so it is the same for all copies).
* Incident wave vector K = (0, 0, 1/lambda) in the rotated frame; no mean inner potential
  (U_0 is dropped: the diagonal is 2 K s_g with s_g = (K^2 - |K + g|^2) / (2K)); relativistic
  wavelength and mass (gamma) factor.
* Beams: hkl with |g| <= g_max and |s_g| <= sg_max from a Miller grid of the structure factor,
  whose own g_max is 2 g_max so every difference h_i - h_j of two beams is present. We pass
  ``cutoff='hard'`` so no taper multiplies the scattering factors of those differences.
* Standard (non wave-equation) form: the generalized eigenproblem with B = diag(1 + g_z/K)
  (surface normal along the beam), symmetrised with M = B^(-1/2); the output amplitude is M C.
  At an exact zone axis every zero-layer beam has g_z = 0 and M = 1.
* Precision: abTEM computes in float32 by default; we set float64 (``abtem.config``), without
  which the reference itself is only good to ~1e-5 in intensity.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CIF = ROOT / "src" / "blochflow" / "data" / "examples" / "quartz" / "quartz_reference.cif"
OUTPUT = HERE / "abtem_quartz_reference.npz"

ENERGY_EV = 200e3
G_MAX = 2.0  # beam selection |g| <= G_MAX (1/A)
SG_MAX = 0.05  # beam selection |s_g| <= SG_MAX (1/A)
PRECISION = "float64"  # abTEM's own default is float32
THICKNESSES = (100.0, 300.0, 600.0, 1000.0)  # A

# Uniaxial ADP (A^2) for the 'uniaxial' Debye-Waller mode: (U perpendicular to c, U along c).
UNIAXIAL_U = {"Si": (0.0110, 0.0055), "O": (0.0180, 0.0120)}

# name, zone axis [uvw] (real space), tilt (mrad) about two axes normal to the zone axis, DW mode
CASES = (
    ("001_za", (0, 0, 1), (0.0, 0.0), "iso"),
    ("100_za", (1, 0, 0), (0.0, 0.0), "iso"),
    ("1-10_za", (1, -1, 0), (0.0, 0.0), "iso"),
    ("001_tilt", (0, 0, 1), (12.0, -7.0), "iso"),
    ("100_tilt_u0", (1, 0, 0), (-9.0, 15.0), "none"),
    ("1-10_tilt_uniaxial", (1, -1, 0), (6.0, 10.0), "uniaxial"),
)


def read_cif(path: Path = CIF):
    """Cell parameters, and the full unit cell (symbols, fractional xyz, isotropic U_eq) via gemmi."""
    import gemmi

    small = gemmi.read_small_structure(str(path))
    cellpar = (small.cell.a, small.cell.b, small.cell.c, small.cell.alpha, small.cell.beta, small.cell.gamma)
    # isotropic U: the CIF's _atom_site_U_iso_or_equiv (U_eq of the refined Uani)
    u_eq = {site.element.name: float(site.u_iso) for site in small.sites}
    sites = small.get_all_unit_cell_sites()
    symbols = [s.element.name for s in sites]
    frac = np.array([[s.fract.x, s.fract.y, s.fract.z] for s in sites]) % 1.0
    return cellpar, symbols, frac, u_eq


def ase_cell(cellpar) -> np.ndarray:
    """Rows a, b, c (A) in ASE's standard frame (a along x, b in the xy plane)."""
    from ase.cell import Cell

    return np.array(Cell.fromcellpar(list(cellpar)))


def blochflow_direct_basis(cellpar) -> np.ndarray:
    """Columns a, b, c in blochflow's Cartesian frame (a* along x): inverse transpose of B."""
    from blochflow.crystal.cell import reciprocal_basis

    return np.linalg.inv(reciprocal_basis(cellpar)).T


def incident_direction(cell_rows: np.ndarray, uvw, tilt_mrad) -> np.ndarray:
    """Unit incident direction: the zone axis [uvw] tilted by two small angles about normal axes."""
    k = np.asarray(uvw, float) @ cell_rows
    k /= np.linalg.norm(k)
    ref = np.array([0.0, 0.0, 1.0]) if abs(k[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(k, ref)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(k, e1)
    t1, t2 = (np.tan(1e-3 * t) for t in tilt_mrad)
    k = k + t1 * e1 + t2 * e2
    return k / np.linalg.norm(k)


def rotation_to_z(k: np.ndarray) -> np.ndarray:
    """A proper rotation R with R k = z (rows: e1, e2, k)."""
    ref = np.array([1.0, 0.0, 0.0]) if abs(k[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = ref - k * (ref @ k)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(k, e1)
    r = np.stack([e1, e2, k])
    assert np.isclose(np.linalg.det(r), 1.0)
    return r


def thermal_sigmas(symbols, mode: str, u_eq: dict):
    """abTEM thermal_sigma argument for a DW mode (sigma^2 = U)."""
    if mode == "none":
        return 0.0
    if mode == "iso":
        return np.array([np.sqrt(u_eq[s]) for s in symbols])
    if mode == "uniaxial":
        # ASE frame: c along z for this hexagonal cell (a, b in the xy plane)
        return np.array([[np.sqrt(UNIAXIAL_U[s][0])] * 2 + [np.sqrt(UNIAXIAL_U[s][1])] for s in symbols])
    raise ValueError(mode)


def run_case(uvw, tilt_mrad, dw_mode: str, thicknesses=THICKNESSES, energy=ENERGY_EV, g_max=G_MAX,
             sg_max=SG_MAX, cif: Path = CIF, parametrization: str = "lobato") -> dict:
    """One orientation with abTEM: beams (hkl), intensities (Q, N), incident directions."""
    import abtem
    from ase import Atoms
    from abtem.bloch import BlochWaves, StructureFactor

    # abTEM's default precision is float32; the Lobato sums for O cancel terms of size ~100, which
    # costs ~1e-5 in f(g) (and ~1e-5 in intensity) at float32.
    abtem.config.set({"precision": PRECISION})

    cellpar, symbols, frac, u_eq = read_cif(cif)
    rows = ase_cell(cellpar)
    atoms = Atoms(symbols=symbols, scaled_positions=frac, cell=rows, pbc=True)
    k_ase = incident_direction(rows, uvw, tilt_mrad)
    rot = rotation_to_z(k_ase)
    sf = StructureFactor(atoms, g_max=2 * g_max + 1e-6, parametrization=parametrization,
                         thermal_sigma=thermal_sigmas(symbols, dw_mode, u_eq), cutoff="hard", centering="P")
    bw = BlochWaves(sf, energy=energy, sg_max=sg_max, g_max=g_max, orientation_matrix=rot, centering="P")
    dp = bw.calculate_diffraction_patterns(list(thicknesses), lazy=False)
    hkl = np.asarray(dp.miller_indices, dtype=int)
    inten = np.asarray(dp.array, dtype=np.float64)
    # the same direction in lattice coordinates, then in blochflow's Cartesian frame
    uvw_dir = np.linalg.solve(rows.T, k_ase)
    k_bf = blochflow_direct_basis(cellpar) @ uvw_dir
    k_bf /= np.linalg.norm(k_bf)
    return {"hkl": hkl, "intensity": inten, "incident_uvw": uvw_dir / np.abs(uvw_dir).max(),
            "incident_cart": k_bf, "incident_ase": k_ase}


def main(out: Path = OUTPUT) -> None:
    import abtem

    arrays = {}
    names = []
    t0 = time.perf_counter()
    for name, uvw, tilt, dw in CASES:
        res = run_case(uvw, tilt, dw)
        names.append(name)
        arrays[f"{name}/hkl"] = res["hkl"].astype(np.int16)
        arrays[f"{name}/intensity"] = res["intensity"]
        arrays[f"{name}/incident_cart"] = res["incident_cart"]
        arrays[f"{name}/incident_uvw"] = res["incident_uvw"]
        arrays[f"{name}/zone_axis"] = np.array(uvw, dtype=np.int16)
        arrays[f"{name}/tilt_mrad"] = np.array(tilt, dtype=np.float64)
        arrays[f"{name}/dw_mode"] = np.array(dw)
        print(f"{name}: {len(res['hkl'])} beams, incident (blochflow frame) {np.round(res['incident_cart'], 6)}")
    _, _, _, u_eq = read_cif()
    settings = {
        "abtem_version": abtem.__version__, "energy_ev": ENERGY_EV, "g_max": G_MAX, "sg_max": SG_MAX,
        "structure_factor_g_max": 2 * G_MAX + 1e-6, "parametrization": "lobato", "cutoff": "hard",
        "use_wave_eq": False, "precision": PRECISION, "centering": "P", "mean_inner_potential": "not included (K = 1/lambda)",
        "u_eq": u_eq, "uniaxial_u": UNIAXIAL_U, "cif": "quartz_reference.cif",
    }
    arrays["cases"] = np.array(names)
    arrays["thickness"] = np.array(THICKNESSES)
    arrays["energy_ev"] = np.array(ENERGY_EV)
    arrays["u_eq_elements"] = np.array(sorted(u_eq))
    arrays["u_eq_values"] = np.array([u_eq[e] for e in sorted(u_eq)])
    arrays["uniaxial_elements"] = np.array(sorted(UNIAXIAL_U))
    arrays["uniaxial_values"] = np.array([UNIAXIAL_U[e] for e in sorted(UNIAXIAL_U)])
    arrays["settings_json"] = np.array(json.dumps(settings, sort_keys=True))
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} kB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT)
