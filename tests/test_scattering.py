"""Elastic electron scattering factors: Lobato & Van Dyck (2014) table and evaluation."""

import csv
import io
import math
from importlib import resources

import gemmi
import pytest
import torch

from blochflow.physics.scattering import (atomic_number, electron_scattering_factor,
                                          load_lobato_table)

BOHR_A = 0.529177210903


def _csv_rows():
    text = resources.files("blochflow.physics").joinpath("data").joinpath("lobato_2014.csv").read_text()
    rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
    return rows[0], rows[1:]


def test_csv_has_all_103_elements_with_symbols():
    header, rows = _csv_rows()
    assert header == ["Z", "symbol"] + [f"a{i}" for i in range(1, 6)] + [f"b{i}" for i in range(1, 6)]
    assert [int(r[0]) for r in rows] == list(range(1, 104))
    assert all(r[1] == gemmi.Element(int(r[0])).name for r in rows)
    assert all(len(r) == 12 for r in rows)


def test_table_shape_and_zero_row():
    t = load_lobato_table()
    assert t.shape == (104, 2, 5) and t.dtype == torch.float64
    assert torch.all(t[0] == 0)
    assert torch.all(t[1:, 1] > 0)  # every b_i > 0
    t[1] = 0  # a copy: the cache must be unaffected
    assert torch.all(load_lobato_table()[1] != 0)


def test_coulomb_tail_constraint_all_elements():
    # Lobato's fit enforces f(g) -> Z / (2 pi^2 a0 g^2): sum_i a_i / b_i = Z / (2 pi^2 a0).
    # Every coefficient enters, so this is also a checksum of the transcribed table.
    t = load_lobato_table()[1:]
    z = torch.arange(1, 104, dtype=torch.float64)
    ratio = (t[:, 0] / t[:, 1]).sum(-1) / (z / (2 * math.pi ** 2 * BOHR_A))
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=1e-8, atol=0)


def test_hydrogen_forward_factor_is_bohr_radius():
    # Mott-Bethe: f(0) = Z <r^2> / (3 a0); hydrogen 1s has <r^2> = 3 a0^2, so f(0) = a0 exactly.
    f0 = electron_scattering_factor(torch.tensor(1), torch.tensor(0.0, dtype=torch.float64))
    assert f0.item() == pytest.approx(BOHR_A, rel=1e-6)


def test_positive_and_decreasing_for_all_elements():
    z = torch.arange(1, 104)[:, None]
    g = torch.linspace(0, 6, 301, dtype=torch.float64)[None, :]
    f = electron_scattering_factor(z, g)
    assert f.shape == (103, 301)
    assert torch.all(f > 0)
    assert torch.all(f[:, 1:] < f[:, :-1])
    assert torch.allclose(f[:, 0], 2 * load_lobato_table()[1:, 0].sum(-1))


@pytest.mark.parametrize("symbol", ["H", "C", "N", "O", "Mg", "Al", "Si", "S", "Ca", "Ti", "Fe",
                                    "Cu", "Zn", "Ge", "Sr", "Ag", "Ba", "W", "Au", "U"])
def test_agrees_with_international_tables(symbol):
    # Second source: International Tables Vol. C Table 4.3.2.2 (five-Gaussian fits of Peng et al.
    # 1996, valid for s = g/2 < 2 1/A), as shipped in gemmi. Independent Hartree-Fock(-like)
    # calculations and fits: agreement to a few percent is expected.
    el = gemmi.Element(symbol)
    g = [0.0, 0.5, 1.0, 2.0]
    ours = electron_scattering_factor(torch.tensor(el.atomic_number), torch.tensor(g, dtype=torch.float64))
    ref = torch.tensor([el.c4322.calculate_sf((x / 2) ** 2) for x in g], dtype=torch.float64)
    assert torch.allclose(ours, ref, rtol=0.05, atol=0)


def test_known_values():
    # f(0) of Si, Cu, Au from the Lobato coefficients (2 sum a_i), and ITC 4.3.2.2 at g = 1 1/A.
    g = torch.tensor([0.0, 1.0], dtype=torch.float64)
    si, cu, au = (electron_scattering_factor(torch.tensor(z), g) for z in (14, 29, 79))
    assert si[0].item() == pytest.approx(5.836, abs=2e-3)
    assert cu[0].item() == pytest.approx(5.601, abs=2e-3)
    assert au[0].item() == pytest.approx(10.576, abs=2e-3)
    for f, sym in ((si, "Si"), (cu, "Cu"), (au, "Au")):
        assert f[1].item() == pytest.approx(gemmi.Element(sym).c4322.calculate_sf(0.25), rel=0.03)


def test_dtype_follows_g_and_broadcasts():
    z, g = torch.tensor([14, 8]), torch.tensor([[0.1], [0.2], [0.3]])
    f32 = electron_scattering_factor(z, g)
    assert f32.dtype == torch.float32 and f32.shape == (3, 2)
    f64 = electron_scattering_factor(z, g.double())
    assert f64.dtype == torch.float64
    assert torch.allclose(f32.double(), f64, rtol=1e-6)


def test_gradcheck_in_g():
    z = torch.tensor([[1], [14], [79]])
    g = torch.tensor([[0.0, 0.3, 1.1, 2.5]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: electron_scattering_factor(z, x), (g,))


@pytest.mark.parametrize("symbol,z", [("Si", 14), ("SI", 14), ("si", 14), ("O2-", 8), ("Fe3+", 26),
                                      ("D", 1), ("H", 1), ("Lr", 103), (" Cu", 29)])
def test_atomic_number(symbol, z):
    assert atomic_number(symbol) == z


@pytest.mark.parametrize("symbol", ["X", "Xx", "", "12", "Rf", "Uuo"])
def test_unknown_element(symbol):
    with pytest.raises(ValueError, match=f"^unknown element '{symbol}'$"):
        atomic_number(symbol)
