"""Relativistic electron-optical constants (CODATA 2018)."""

from __future__ import annotations

import math

ELECTRON_REST_ENERGY_EV = 510998.95  # m0 c^2
HC_EV_A = 12398.419843320026  # h c in eV A


def wavelength_from_voltage(voltage_v: float) -> float:
    """Relativistic electron wavelength (A) for an accelerating voltage (V)."""
    e = voltage_v
    return HC_EV_A / math.sqrt(e * (2 * ELECTRON_REST_ENERGY_EV + e))


def voltage_from_wavelength(wavelength_a: float) -> float:
    """Accelerating voltage (V) that gives this relativistic wavelength (A)."""
    p = HC_EV_A / wavelength_a  # p c in eV
    return ELECTRON_REST_ENERGY_EV * (math.sqrt(1 + (p / ELECTRON_REST_ENERGY_EV) ** 2) - 1)


def lorentz_factor(wavelength_a: float) -> float:
    """gamma = 1 + e E / (m0 c^2) for the electron of this wavelength."""
    return 1 + voltage_from_wavelength(wavelength_a) / ELECTRON_REST_ENERGY_EV


def interaction_prefactor(wavelength_a: float, volume_a3: float) -> float:
    """gamma / (pi Omega) (1/A^3): U_g = prefactor * sum_j f_j T_j exp(-2 pi i g.r_j), f in A."""
    return lorentz_factor(wavelength_a) / (math.pi * volume_a3)


# The thickest crystal a setting or profile may give (A): 10 um, far beyond what fast electrons cross
# (3D-ED crystals are 100-5000 A); larger values are unit mistakes, and their rocking integrals would
# need millions of tilt samples
MAX_THICKNESS = 1e5
