"""Analytic limits and solver agreement for the Bloch propagation."""

import math

import pytest
import torch

from blochflow.physics.bloch import propagate, propagate_expm, propagate_perturbative, two_beam_intensity

K = 1 / 0.02508


def _random_hermitian(b, n, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, n, dtype=torch.complex128, generator=g) * scale
    return (x + x.mH) / 2


@pytest.mark.parametrize("s_g", [0.0, 0.002, -0.004])
def test_two_beam_pendelloesung(s_g):
    u_g = 0.012 * complex(0.6, 0.8)
    a = torch.tensor([[[0, u_g], [u_g.conjugate(), 2 * K * s_g]]], dtype=torch.complex128)
    t = torch.linspace(0, 2000, 41, dtype=torch.float64)[None]
    psi = propagate(a, t, torch.tensor([1 / K], dtype=torch.float64))
    expected = two_beam_intensity(abs(u_g), K, s_g, t[0])
    assert torch.allclose(psi[0, :, 1].abs() ** 2, expected, atol=1e-12)
    assert torch.allclose((psi[0].abs() ** 2).sum(-1), torch.ones(41, dtype=torch.float64), atol=1e-12)


def test_kinematic_limit_thin_crystal():
    a = _random_hermitian(1, 12)
    a[0].diagonal().zero_()  # every beam at s_g = 0
    t = torch.tensor([[0.1, 0.2, 0.4]], dtype=torch.float64)
    psi = propagate(a, t, torch.tensor([1 / K], dtype=torch.float64))
    kin = (math.pi * t[0, :, None] * a[0, 1:, 0].abs()[None] / K) ** 2
    rel = ((psi[0, :, 1:].abs() ** 2 - kin).abs() / kin).max(-1).values
    assert rel[0] < 0.01 and rel[0] < rel[1] < rel[2]  # error grows with t: a true limit


def test_flux_conservation_and_expm_agree():
    a = _random_hermitian(5, 30)
    a = a + torch.diag_embed(torch.linspace(-0.5, 0.5, 30, dtype=torch.float64).to(a.dtype))
    t = torch.tensor([50.0, 400.0, 1500.0], dtype=torch.float64).expand(5, 3)
    inv_k = torch.full((5,), 1 / K, dtype=torch.float64)
    psi = propagate(a, t, inv_k)
    assert torch.allclose((psi.abs() ** 2).sum(-1), torch.ones(5, 3, dtype=torch.float64), atol=1e-10)
    assert (psi - propagate_expm(a, t, inv_k)).abs().max() < 1e-9


def test_absorption_exact_against_expm_and_perturbative_error():
    a = _random_hermitian(4, 25) + torch.diag_embed(torch.linspace(-0.3, 0.3, 25, dtype=torch.float64).to(torch.complex128))
    a_abs = 0.1 * _random_hermitian(4, 25, seed=1)
    a_abs = a_abs + torch.diag_embed(torch.full((4, 25), 0.004, dtype=torch.float64).to(torch.complex128))
    t = torch.tensor([200.0, 800.0], dtype=torch.float64).expand(4, 2)
    inv_k = torch.full((4,), 1 / K, dtype=torch.float64)
    exact = propagate(a + 1j * a_abs, t, inv_k, hermitian=False)
    ref = propagate_expm(a + 1j * a_abs, t, inv_k)
    assert (exact - ref).abs().max() < 1e-9
    flux = (exact.abs() ** 2).sum(-1)
    assert torch.all(flux < 1)  # absorption removes flux

    def pert_error(scale):
        ex = propagate(a + 1j * scale * a_abs, t, inv_k, hermitian=False).abs() ** 2
        pe = propagate_perturbative(a, scale * a_abs, t, inv_k).abs() ** 2
        return ((pe - ex).abs().sum(-1) / ex.sum(-1)).max()

    # first-order absorption is an approximation whose error falls as absorption weakens
    strong, weak = pert_error(1.0), pert_error(0.2)
    assert 1e-8 < weak < strong / 3 and strong < 0.2


def test_gradcheck_solver_hermitian_and_general():
    a = _random_hermitian(2, 5)
    t = torch.tensor([[120.0, 700.0], [300.0, 50.0]], dtype=torch.float64, requires_grad=True)
    inv_k = torch.full((2,), 1 / K, dtype=torch.float64)
    re = a.real.clone().requires_grad_()
    im = a.imag.clone().requires_grad_()

    def herm(re, im, t):
        m = torch.complex(re, im)
        return propagate((m + m.mH) / 2, t, inv_k).abs() ** 2

    def general(re, im, t):
        return propagate(torch.complex(re, im), t, inv_k, hermitian=False).abs() ** 2

    assert torch.autograd.gradcheck(herm, (re, im, t))
    assert torch.autograd.gradcheck(general, (re, (0.3 * im).detach().requires_grad_(), t))


def test_gradient_finite_and_correct_at_exact_degeneracy():
    # a zone-axis-like matrix: several beams share an exactly equal diagonal and couple weakly
    n = 7
    a = torch.zeros(1, n, n, dtype=torch.complex128)
    a[0, 0, 1:4] = 0.01
    a[0, 1:4, 0] = 0.01
    a[0].diagonal()[4:] = torch.tensor([0.02, 0.02, 0.3], dtype=torch.complex128)
    t = torch.tensor([[500.0]], dtype=torch.float64)
    inv_k = torch.tensor([1 / K], dtype=torch.float64)
    re = a.real.clone().requires_grad_()
    im = a.imag.clone().requires_grad_()

    def f(re, im):
        m = torch.complex(re, im)
        return (propagate((m + m.mH) / 2, t, inv_k).abs() ** 2)[0, 0, 1:4].sum()

    f(re, im).backward()
    assert torch.isfinite(re.grad).all() and torch.isfinite(im.grad).all()
    assert torch.autograd.gradcheck(f, (re.detach().requires_grad_(), im.detach().requires_grad_()))
    # torch's own eigh backward is not finite here: the case is a real one
    lam, vec = torch.linalg.eigh((torch.complex(re, im) + torch.complex(re, im).mH) / 2)
    loss = (vec[..., 0].abs() ** 2).sum() + lam.sum()
    g = torch.autograd.grad(loss, re)[0]
    assert not torch.isfinite(g).all()
