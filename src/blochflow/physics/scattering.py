"""Elastic electron scattering factors of neutral atoms (Lobato & Van Dyck 2014).

The atomic scattering amplitude f(g) (Angstrom) sets the crystal potential coefficients
U_g = gamma / (pi Omega) sum_j f_j(|g|) T_j(g) exp(-2 pi i g.r_j). We use the parameterization of
I. Lobato & D. Van Dyck, Acta Cryst. A70 (2014) 636-649, which is accurate over the whole range
of g and keeps the exact limits (f(0) from <r^2>, Coulomb tail ~ Z / (2 pi^2 a0 g^2)):

    f(g) = sum_{i=1..5} a_i (2 + b_i g^2) / (1 + b_i g^2)^2,   g = |g| = 2 sin(theta) / lambda.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from importlib import resources

import gemmi
import torch

_SYMBOL = re.compile(r"^\s*([A-Za-z]{1,2})")


@functools.lru_cache(maxsize=1)
def _table() -> torch.Tensor:
    text = resources.files("blochflow.physics").joinpath("data").joinpath("lobato_2014.csv").read_text()
    rows = [r for r in csv.reader(io.StringIO(text)) if r and not r[0].startswith("#")]
    table = torch.zeros(104, 2, 5, dtype=torch.float64)
    for row in rows[1:]:  # rows[0] is the column header
        values = [float(x) for x in row[2:12]]
        table[int(row[0]), 0] = torch.tensor(values[:5], dtype=torch.float64)
        table[int(row[0]), 1] = torch.tensor(values[5:], dtype=torch.float64)
    return table


def load_lobato_table() -> torch.Tensor:
    """Lobato coefficients as a float64 tensor (104, 2, 5): row Z, [a (A), b (A^2)]; row 0 is zero.

    Read once from the packaged CSV and cached; a fresh copy is returned so callers cannot
    corrupt the cache.
    """
    return _table().clone()


def atomic_number(symbol: str) -> int:
    """Atomic number of an element symbol, case-insensitive; charges ('O2-', 'Fe3+') are ignored.

    Deuterium 'D' counts as hydrogen. Raises ``ValueError("unknown element '...'")`` otherwise.
    """
    match = _SYMBOL.match(symbol)
    z = gemmi.Element(match.group(1)).atomic_number if match else 0
    if not 1 <= z <= 103:
        raise ValueError(f"unknown element '{symbol}'")
    return z


def lobato_from_g2(coef: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """f (A) from coefficients ``coef`` (..., 2, 5) at squared lengths g2 (1/A^2), broadcasting.

    Working with g^2 keeps the function smooth at g = 0 (no square root to differentiate).
    """
    out = torch.zeros((), dtype=g2.dtype, device=g2.device)
    for i in range(coef.shape[-1]):  # (2 + x) / (1 + x)^2 = w + w^2 with w = 1 / (1 + x)
        w = 1 / (1 + coef[..., 1, i] * g2)
        out = out + coef[..., 0, i] * (w + w * w)
    return out


def electron_scattering_factor(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Elastic electron scattering factor f(g) (A) of neutral atoms, Lobato & Van Dyck (2014).

    z: atomic numbers (long, shape (...)); g: |g| = 1/d in 1/A, broadcastable against z.
    Non-relativistic amplitude (the relativistic factor gamma goes into the U_g prefactor) and
    no Debye-Waller factor. Differentiable in g; the result has g's floating dtype, but the sum
    is done in float64 because the fitted terms cancel strongly for some elements (e.g. Ca).
    """
    g = torch.as_tensor(g)
    dtype = g.dtype if g.is_floating_point() else torch.get_default_dtype()
    g64 = g.to(torch.float64)
    z = torch.as_tensor(z, dtype=torch.long, device=g.device)
    coef = _table().to(device=g.device)[z]  # (..., 2, 5)
    return lobato_from_g2(coef, g64 * g64).to(dtype)
