"""Analytic limits and solver agreement for the Bloch propagation."""

import math

import pytest
import torch
from torch.func import jacfwd, jvp, vmap

from blochflow.physics import bloch as bloch_mod
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


# --- the rules' sums over thickness points by matrix products against the elementwise reference ---
#
# Reference: the previous solver, which built the divided-difference matrix G_qij for every thickness
# point elementwise. The new rules must give the same derivatives (backward and forward mode) at
# generic, exactly degenerate, nearly degenerate and non-Hermitian spectra.


def _divided_exp_reference(lam, c, expo):
    d = lam[:, None, :, None] - lam[:, None, None, :]  # (B,1,N,N)
    cc = c[:, :, None, None]
    x = cc * d
    ei = expo[:, :, :, None]
    ej = expo[:, :, None, :]
    close = x.abs() < 1e-4
    safe_d = torch.where(close, torch.ones_like(d), d)
    quotient = (ei - ej) / safe_d
    series = cc * ei * (1 - x / 2 + x * x / 6)
    return torch.where(close, series, quotient)


class _PropagateReference(bloch_mod._Propagate):
    """The previous solver's gradient rules verbatim (G_qij built elementwise for every thickness
    point, in blocks of Q_BLOCK points); the forward pass is the solver's own."""

    Q_BLOCK = 4

    @staticmethod
    def backward(ctx, gpsi, *_):
        lam, vec, vinv, expo, thickness, inv_kn = ctx.saved_tensors
        w = vinv[:, :, 0]
        c = (1j * math.pi) * thickness.to(vec.dtype) * inv_kn[:, None].to(vec.dtype)
        grad_a = grad_t = grad_kn = None
        b = torch.einsum("bij,bqi->bqj", vec.conj(), gpsi)
        if ctx.needs_input_grad[0]:
            y = torch.zeros_like(vec)
            for q0 in range(0, c.shape[1], _PropagateReference.Q_BLOCK):
                sl = slice(q0, q0 + _PropagateReference.Q_BLOCK)
                g = _divided_exp_reference(lam, c[:, sl], expo[:, sl])
                y = y + torch.einsum("bqi,bqij->bij", b[:, sl].conj(), g)
            y = y * w[:, None, :]
            grad_a = (vec @ y.transpose(-1, -2) @ vinv).mH
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dpsi_dc = torch.einsum("bij,bqj->bqi", vec, lam[:, None, :] * expo * w[:, None, :])
            gc = torch.sum(gpsi.conj() * dpsi_dc, dim=-1)
            if ctx.needs_input_grad[1]:
                grad_t = torch.real(gc * (1j * math.pi) * inv_kn[:, None].to(c.dtype))
            if ctx.needs_input_grad[2]:
                grad_kn = torch.real(torch.sum(gc * (1j * math.pi) * thickness.to(c.dtype), dim=-1))
        return grad_a, grad_t, grad_kn, None

    @staticmethod
    def jvp(ctx, da, dt, dkn, *_):
        lam, vec, vinv, expo, thickness, inv_kn = ctx.saved_tensors
        w = vinv[..., :, 0]
        ctype = vec.dtype
        c = (1j * math.pi) * thickness.to(ctype) * inv_kn[..., None].to(ctype)
        dpsi = None
        if da is not None:
            m = vinv @ da @ vec
            parts = []
            for q0 in range(0, c.shape[-1], _PropagateReference.Q_BLOCK):
                sl = slice(q0, q0 + _PropagateReference.Q_BLOCK)
                g = _divided_exp_reference(lam, c[..., sl], expo[..., sl, :])
                parts.append(torch.einsum("bqij,bij,bj->bqi", g, m, w))
            dpsi = torch.einsum("bij,bqj->bqi", vec, torch.cat(parts, -2))
        dc = None
        if dt is not None:
            dc = (1j * math.pi) * dt.to(ctype) * inv_kn[..., None].to(ctype)
        if dkn is not None:
            extra = (1j * math.pi) * thickness.to(ctype) * dkn[..., None].to(ctype)
            dc = extra if dc is None else dc + extra
        if dc is not None:
            dpsi_c = torch.einsum("bij,bqj->bqi", vec, lam[..., None, :] * expo * w[..., None, :] * dc[..., None])
            dpsi = dpsi_c if dpsi is None else dpsi + dpsi_c
        if dpsi is None:
            dpsi = torch.zeros_like(expo)
        return dpsi, None, None, None, None


def _reference(a_mat, thickness, inv_kn, hermitian=True):
    return _PropagateReference.apply(a_mat, thickness, inv_kn, hermitian)[0]


def _new(a_mat, thickness, inv_kn, hermitian=True):
    return propagate(a_mat, thickness, inv_kn, hermitian=hermitian)


def _rel(x, ref):
    """max |x - ref| / max |ref| (absolute where ref vanishes identically, e.g. at zero thickness)."""
    scale = float(ref.abs().max())
    return float((x - ref).abs().max()) / (scale if scale > 0 else 1.0)


def _unitary(n, seed, dtype=torch.complex128):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, n, dtype=dtype, generator=g)
    q, r = torch.linalg.qr(z)
    return q * (r.diagonal() / r.diagonal().abs())[None]


def _from_spectrum(spectra, seed=0):
    """Hermitian matrices U diag(l) U^H with prescribed eigenvalues (B,N) real."""
    mats = []
    for k, lam in enumerate(spectra):
        u = _unitary(lam.shape[0], seed + k)
        mats.append(u @ torch.diag(lam.to(u.dtype)) @ u.mH)
    out = torch.stack(mats)
    return (out + out.mH) / 2


def _zone_axis(b=2):
    n = 7
    a = torch.zeros(b, n, n, dtype=torch.complex128)
    a[:, 0, 1:4] = 0.01
    a[:, 1:4, 0] = 0.01
    a[:, 4:, 4:] = torch.diag(torch.tensor([0.02, 0.02, 0.3], dtype=torch.complex128))
    return a


def _thickness(b, q, seed=0, low=20.0, high=2500.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(b, q, dtype=torch.float64, generator=g)


def _derivatives(fn, a, t, inv_k, hermitian, seed=1, n_tan=4):
    """Gradients (A, t, 1/K_n) of a real loss; one jvp; jvps along n_tan tangents by vmap; jacfwd."""
    g = torch.Generator().manual_seed(seed)
    b, q, n = a.shape[0], t.shape[1], a.shape[-1]

    def randn(*shape, dtype=t.dtype):  # drawn in double, so that both precisions see the same data
        wide = torch.complex128 if dtype.is_complex else torch.float64
        return torch.randn(*shape, dtype=wide, generator=g).to(dtype)

    wts = randn(b, q, n, dtype=a.dtype)
    wr = torch.rand(b, q, n, dtype=torch.float64, generator=g).to(t.dtype)

    def tangent():
        x = randn(b, n, n, dtype=a.dtype)
        return (x + x.mH) / 2 if hermitian else x

    a_, t_, k_ = (x.clone().requires_grad_() for x in (a, t, inv_k))
    psi = fn(a_, t_, k_, hermitian)
    loss = (psi * wts).real.sum() + (psi.abs() ** 2 * wr).sum()
    ga, gt, gk = torch.autograd.grad(loss, (a_, t_, k_))

    def f(a, t, k):
        return fn(a, t, k, hermitian)

    tans = (tangent(), randn(b, q), randn(b))
    _, d1 = jvp(f, (a, t, inv_k), tans)
    da = torch.stack([tangent() for _ in range(n_tan)])
    dt = randn(n_tan, b, q)
    dk = randn(n_tan, b)
    dv = vmap(lambda x, y, z: jvp(f, (a, t, inv_k), (x, y, z))[1])(da, dt, dk)
    # Jacobian wrt a few real coordinates of A through jacfwd (vmapped jvp inside)
    basis = torch.stack([tangent() for _ in range(3)])
    jac = jacfwd(lambda p: torch.view_as_real(f(a + torch.einsum("p,pbij->bij", p.to(a.dtype), basis), t, inv_k)))(
        torch.zeros(3, dtype=t.dtype))
    return {"grad_A": ga, "grad_t": gt, "grad_kn": gk, "jvp": d1, "jvp_vmap": dv, "jacfwd": jac}


def _compare(a, t, inv_k, hermitian=True, tol=1e-11):
    new = _derivatives(_new, a, t, inv_k, hermitian)
    ref = _derivatives(_reference, a, t, inv_k, hermitian)
    errs = {k: _rel(new[k], ref[k]) for k in ref}
    assert all(torch.isfinite(v).all() for v in new.values())
    assert max(errs.values()) < tol, errs
    return errs


@pytest.mark.parametrize("q", [1, 5, 33])
def test_rules_match_reference_generic_hermitian(q):
    a = _random_hermitian(3, 12, seed=q)
    spread = 0.3 * torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(q))
    a = a + torch.diag_embed(spread).to(a.dtype)
    t = _thickness(3, q, seed=q)
    inv_k = torch.tensor([1 / K, 1.1 / K, 0.9 / K], dtype=torch.float64)
    _compare(a, t, inv_k)


@pytest.mark.parametrize("q", [1, 5, 33])
def test_rules_match_reference_exact_degeneracy(q):
    # repeated eigenvalues in a random basis, and the zone-axis structure (equal diagonals)
    spec = torch.tensor([[-0.2, -0.2, -0.2, 0.05, 0.05, 0.3, 0.31, 0.7],
                         [0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.2, 0.4]], dtype=torch.float64)
    t = _thickness(2, q, seed=10 + q)
    inv_k = torch.full((2,), 1 / K, dtype=torch.float64)
    _compare(_from_spectrum(spec, seed=3), t, inv_k)
    _compare(_zone_axis(2), t, inv_k)


@pytest.mark.parametrize("split", [1e-9, 1e-6, 1e-3])
@pytest.mark.parametrize("q", [1, 5, 33])
def test_rules_match_reference_near_degeneracy(split, q):
    base = torch.tensor([-0.3, 0.0, 0.0, 0.0, 0.12, 0.12, 0.5, 0.9], dtype=torch.float64)
    spec = torch.stack([base + split * torch.tensor([0, 0, 1, 2, 0, -1, 0, 0.5], dtype=torch.float64),
                        base + split * torch.tensor([0, -1, 0, 1.5, 3, 0, 1, 0], dtype=torch.float64)])
    t = _thickness(2, q, seed=20 + q)
    inv_k = torch.full((2,), 1 / K, dtype=torch.float64)
    # at split 1e-6 the reference's quotient for |c d| just above its 1e-4 switch carries ~1e-12 of
    # cancellation error (see the matrix_exp comparison below): the difference is the reference's
    _compare(_from_spectrum(spec, seed=7), t, inv_k, tol=3e-11)


@pytest.mark.parametrize("q", [1, 5, 33])
def test_rules_match_reference_general_eig(q):
    a = _random_hermitian(3, 10, seed=30 + q) + torch.diag_embed(
        torch.linspace(-0.3, 0.3, 10, dtype=torch.float64).to(torch.complex128))
    a_abs = 0.1 * _random_hermitian(3, 10, seed=40 + q) + 0.004 * torch.eye(10, dtype=torch.complex128)
    t = _thickness(3, q, seed=50 + q)
    inv_k = torch.full((3,), 1 / K, dtype=torch.float64)
    _compare(a + 1j * a_abs, t, inv_k, hermitian=False)
    # nearly degenerate complex spectrum: absorbing zone axis
    za = _zone_axis(3) + 1j * (0.004 * torch.eye(7, dtype=torch.complex128) + 0.001 * _zone_axis(3))
    za[1, 2, 2] += 1e-7
    _compare(za, t, inv_k, hermitian=False)


@pytest.mark.parametrize("split", [1e-7, 1e-6])
def test_rules_match_expm_autograd_near_degeneracy(split):
    # an independent reference: torch's matrix_exp backward on the same functions. With splittings
    # ~1e-6 (|c d| ~ 1e-4) the elementwise reference itself loses ~3e-12 to cancellation; the series
    # for close pairs does not.
    spec = torch.tensor([[-0.3, 0.0, split, 2 * split, 0.12, 0.12 + 100 * split, 0.5, 0.9]], dtype=torch.float64)
    a0 = _from_spectrum(spec, seed=11)
    t = _thickness(1, 6, seed=4)
    inv_k = torch.tensor([1 / K], dtype=torch.float64)
    wts = torch.randn(1, 6, 8, dtype=torch.complex128, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (propagate, propagate_expm):
        re, im = a0.real.clone().requires_grad_(), a0.imag.clone().requires_grad_()
        m = torch.complex(re, im)
        psi = fn((m + m.mH) / 2, t, inv_k)
        grads.append(torch.cat([x.flatten() for x in torch.autograd.grad((psi * wts).real.sum(), (re, im))]))
    assert _rel(grads[0], grads[1]) < 3e-13


def test_close_pairs_decided_per_matrix_and_zero_thickness():
    # one batch element thin (all pairs effectively close), one thick; thickness 0 included
    a = _random_hermitian(2, 9, seed=5) + torch.diag_embed(
        torch.linspace(-0.4, 0.4, 9, dtype=torch.float64)).to(torch.complex128)
    t = torch.tensor([[0.0, 0.01, 0.2, 1.0], [0.0, 30.0, 900.0, 4000.0]], dtype=torch.float64)
    inv_k = torch.full((2,), 1 / K, dtype=torch.float64)
    _compare(a, t, inv_k)
    _compare(a, torch.zeros(2, 3, dtype=torch.float64), inv_k)


def test_single_precision_agrees_with_double():
    a = _random_hermitian(3, 16, seed=8) + torch.diag_embed(
        torch.linspace(-0.4, 0.4, 16, dtype=torch.float64)).to(torch.complex128)
    a[:, 3, 3] = a[:, 4, 4]  # an exact diagonal coincidence as well
    t = _thickness(3, 9, seed=9)
    inv_k = torch.full((3,), 1 / K, dtype=torch.float64)
    for herm in (True, False):
        absorption = 0.004 * torch.eye(16, dtype=torch.complex128) + 0.05 * _random_hermitian(3, 16, seed=12)
        aa = a if herm else a + 1j * absorption
        d64 = _derivatives(_new, aa, t, inv_k, herm)
        d32 = _derivatives(_new, aa.to(torch.complex64), t.float(), inv_k.float(), herm)
        errs = {k: _rel(d32[k].to(d64[k].dtype), d64[k]) for k in d64}
        # single-precision eig of this non-normal matrix already moves psi itself by ~8e-5
        psi_err = _rel(_new(aa.to(torch.complex64), t.float(), inv_k.float(), herm).to(aa.dtype),
                       _new(aa, t, inv_k, herm))
        assert psi_err < (2e-5 if herm else 1e-4)
        assert max(errs.values()) < (1e-4 if herm else 3e-4), (herm, errs)


def test_gradcheck_forward_and_reverse_near_degeneracy():
    spec = torch.tensor([[-0.1, 0.0, 1e-6, 0.2, 0.2]], dtype=torch.float64)
    a = _from_spectrum(spec, seed=13)
    t = torch.tensor([[150.0, 900.0, 2400.0]], dtype=torch.float64, requires_grad=True)
    inv_k = torch.tensor([1 / K], dtype=torch.float64, requires_grad=True)
    re = a.real.clone().requires_grad_()
    im = a.imag.clone().requires_grad_()

    def herm(re, im, t, k):
        m = torch.complex(re, im)
        return propagate((m + m.mH) / 2, t, k).abs() ** 2

    def general(re, im, t, k):
        m = torch.complex(re, im)
        return propagate(m + 0.3j * torch.eye(5, dtype=m.dtype) * 0.01, t, k, hermitian=False).abs() ** 2

    for fn in (herm, general):
        assert torch.autograd.gradcheck(fn, (re, im, t, inv_k), check_forward_ad=True)


def test_close_pair_interpolation_accuracy():
    # the separable form of exp(-c u d) behind the close-pair rule, against the exact divided
    # difference, over the whole close range |c d| < tau (real and complex d) and |c| <= max |c|
    for dtype, tol in ((torch.complex128, 1e-15), (torch.complex64, 1e-7)):
        order = bloch_mod._interpolation_order(dtype)
        c = 1j * torch.linspace(-1, 1, 40, dtype=torch.float64).to(torch.complex128)  # s = 1, c != 0
        d = bloch_mod._TAU * torch.linspace(-1, 1, 41, dtype=torch.float64)[:, None] * torch.tensor(
            [1, (1 + 0.3j) / abs(1 + 0.3j)], dtype=torch.complex128)
        lam = torch.cat([torch.zeros(1, dtype=torch.complex128), d.flatten()])[None]  # pairs (0, j)
        weights, left, right = bloch_mod._close_factors(lam, c[None], torch.ones(1, dtype=torch.float64), order)
        # G_q0j / (c_q e_q0) = sum_r alpha_r(g_q) left_0r right_jr  vs  (1 - exp(-c_q d)) / (c_q d)
        approx = torch.einsum("qr,r,jr->qj", weights[0] / c[:, None], left[0, 0], right[0])
        x = c[:, None] * (lam[0, 0] - lam[0])[None, :]
        series = torch.zeros_like(x)
        for k in range(30, -1, -1):  # exact to double precision for |x| <= 0.1
            series = 1 / math.factorial(k + 1) - x * series
        err = float((approx - series).abs().max())
        assert err < tol, (dtype, err)


def test_jvp_rule_accepts_leading_tangent_dimensions():
    # the rule itself with tangents carrying a leading dimension equals one call per tangent
    a = _random_hermitian(3, 9, seed=21) + torch.diag_embed(
        torch.linspace(-0.3, 0.3, 9, dtype=torch.float64)).to(torch.complex128)
    a[:, 2, 2] = a[:, 3, 3]
    t = _thickness(3, 4, seed=22)
    inv_k = torch.full((3,), 1 / K, dtype=torch.float64)
    out = bloch_mod._Propagate.forward(a, t, inv_k, True)

    class Ctx:
        saved_tensors = out[1:] + (t, inv_k)

    g = torch.Generator().manual_seed(23)
    da = torch.randn(5, 3, 9, 9, dtype=torch.complex128, generator=g)
    dt = torch.randn(5, 3, 4, dtype=torch.float64, generator=g)
    dk = torch.randn(5, 3, dtype=torch.float64, generator=g)
    # (tangent, carries the leading dimension) for dA, dt, d(1/K_n); the last case mixes both kinds
    cases = [((da, True), (dt, True), (dk, True)), ((da, True), (None, False), (None, False)),
             ((None, False), (dt, True), (dk, True)), ((da, True), (dt[0], False), (None, False))]
    for case in cases:
        batched = bloch_mod._Propagate.jvp(Ctx, *(x for x, _ in case), None, None)[0]
        single = torch.stack([bloch_mod._Propagate.jvp(Ctx, *(x[i] if lead else x for x, lead in case), None, None)[0]
                              for i in range(5)])
        assert batched.shape == (5, 3, 4, 9)
        assert _rel(batched, single) < 1e-14


@pytest.mark.parametrize("n_beams", [2, 9])
def test_tangents_mapped_to_a_few_beams_equal_the_full_rule(n_beams):
    """Tangents mapped to a few output beams (fewer or more than the thickness points) equal the
    tangents of all beams, picked."""
    a = _random_hermitian(3, 9, seed=31) + torch.diag_embed(
        torch.linspace(-0.3, 0.3, 9, dtype=torch.float64)).to(torch.complex128)
    a[:, 2, 2] = a[:, 3, 3]  # a degenerate pair: close pairs take part
    t = _thickness(3, 6, seed=32)
    inv_k = torch.full((3,), 1 / K, dtype=torch.float64)
    _, lam, vec, vinv, expo = bloch_mod._Propagate.forward(a, t, inv_k, True)
    g = torch.Generator().manual_seed(33)
    da = torch.randn(4, 3, 9, 9, dtype=torch.complex128, generator=g)
    dt = torch.randn(4, 3, 6, dtype=torch.float64, generator=g)
    beams = torch.stack([torch.randperm(9, generator=g)[:n_beams] for _ in range(3)])
    picked = bloch_mod.propagate_tangents(lam, vec, vinv, expo, t, inv_k, da, dt, None, beams)
    full = bloch_mod.propagate_tangents(lam, vec, vinv, expo, t, inv_k, da, dt, None)
    expected = torch.gather(full, -1, beams[None, :, None, :].expand(4, 3, 6, n_beams))
    assert picked.shape == (4, 3, 6, n_beams)
    assert _rel(picked, expected) < 1e-13


@pytest.mark.parametrize("n_points", [1, 6])
def test_tangent_given_in_the_eigenbasis_equals_the_matrix_tangent(n_points):
    """propagate_tangents with the matrix tangent already in the eigenbasis, (V^-1 dA V) w, gives what
    it gives for dA itself, at one thickness point and at several."""
    a = _random_hermitian(3, 9, seed=41) + torch.diag_embed(
        torch.linspace(-0.3, 0.3, 9, dtype=torch.float64)).to(torch.complex128)
    a[:, 2, 2] = a[:, 3, 3]
    t = _thickness(3, n_points, seed=42)
    inv_k = torch.full((3,), 1 / K, dtype=torch.float64)
    _, lam, vec, vinv, expo = bloch_mod._Propagate.forward(a, t, inv_k, True)
    g = torch.Generator().manual_seed(43)
    da = torch.randn(4, 3, 9, 9, dtype=torch.complex128, generator=g)
    dt = torch.randn(4, 3, n_points, dtype=torch.float64, generator=g)
    basis = vinv @ da @ (vec * vinv[:, None, :, 0])
    from_basis = bloch_mod.propagate_tangents(lam, vec, vinv, expo, t, inv_k, None, dt, None, basis_tangent=basis)
    from_matrix = bloch_mod.propagate_tangents(lam, vec, vinv, expo, t, inv_k, da, dt, None)
    assert from_basis.shape == (4, 3, n_points, 9)
    assert _rel(from_basis, from_matrix) < 1e-12


def test_folded_divided_differences_match_the_quotient_form():
    """x G^T from the sinc form (real eigenvalues) equals x G^T from :func:`divided_differences`,
    on separated, close (1e-9) and equal eigenvalues, where G_ii = c e_i; and in single precision
    it is as close to the double-precision value as the quotient form is."""
    from blochflow.physics.bloch import divided_differences, divided_differences_folded

    gen = torch.Generator().manual_seed(3)
    lam = 0.01 * torch.randn(20, 12, generator=gen, dtype=torch.float64)
    lam[:, 1] = lam[:, 0] + 1e-9
    lam[:, 3] = lam[:, 2]
    kappa = 3000 * torch.rand(20, 1, generator=gen, dtype=torch.float64)
    x = torch.randn(20, 12, 12, generator=gen, dtype=torch.complex128)
    ref = x @ divided_differences(lam.to(torch.complex128), 1j * kappa.to(torch.complex128)).mT
    got = divided_differences_folded(x, lam, kappa)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-12
    single = divided_differences_folded(x.to(torch.complex64), lam.float(), kappa.float())
    quotient = x.to(torch.complex64) @ divided_differences(lam.to(torch.complex64), (1j * kappa).to(torch.complex64)).mT
    err = [float((y.to(torch.complex128) - ref).abs().max() / ref.abs().max()) for y in (single, quotient)]
    assert err[0] < 1e-5 and err[0] < 2 * err[1]
