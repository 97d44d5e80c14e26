"""Bloch-wave propagation: one eigendecomposition per incident direction, any number of thicknesses.

psi(t) = exp(i pi t A / K_n) e_0 = V diag(exp(i pi t lambda / K_n)) V^-1 e_0, with A the structure
matrix (1/A^2), t the thickness along the surface normal (A) and K_n (1/A). The backward pass
uses the Daleckii-Krein divided differences of exp, evaluated in a form that stays finite and
accurate when eigenvalues coincide (zone axes), instead of differentiating eigenvectors.
"""

from __future__ import annotations

import math

import torch


def _divided_exp(lam: torch.Tensor, c: torch.Tensor, expo: torch.Tensor) -> torch.Tensor:
    """G_ij = (exp(c l_i) - exp(c l_j)) / (l_i - l_j), G_ii = c exp(c l_i); lam (B,N), c (B,Q) -> (B,Q,N,N).

    ``expo`` = exp(c lam) (B,Q,N) from the forward pass. Separated pairs use the plain quotient;
    close pairs (|c d| < 1e-4) a series in x = c d about l_i, exact to O(x^3) and free of
    cancellation, so the result is finite and accurate at exact degeneracy without new exponentials.
    """
    d = lam[:, None, :, None] - lam[:, None, None, :]  # (B,1,N,N)
    cc = c[:, :, None, None]
    x = cc * d
    ei = expo[:, :, :, None]
    ej = expo[:, :, None, :]
    close = x.abs() < 1e-4
    safe_d = torch.where(close, torch.ones_like(d), d)
    quotient = (ei - ej) / safe_d
    # exp(c l_j) = exp(c l_i) exp(-x): G = c exp(c l_i) (1 - exp(-x)) / x = c e_i (1 - x/2 + x^2/6)
    series = cc * ei * (1 - x / 2 + x * x / 6)
    return torch.where(close, series, quotient)


class _Propagate(torch.autograd.Function):
    """psi = V exp(c lam) V^-1 e_0 with reverse (vjp) and forward (jvp) rules from divided differences.

    Written in the functorch form (setup_context, generated vmap rule) so that ``torch.func.jacfwd``
    pushes many tangents through one eigendecomposition: the Jacobian for Gauss-Newton costs a few
    matrix products per parameter direction, not a decomposition.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a_mat, thickness, inv_kn, hermitian, q_block):
        # a_mat (B,N,N) complex; thickness (B,Q) real (A); inv_kn (B,) real (A)
        if hermitian:
            lam, vec = torch.linalg.eigh(a_mat)
            lam = lam.to(a_mat.dtype)
            vinv = vec.mH
        else:
            lam, vec = torch.linalg.eig(a_mat)
            vinv = torch.linalg.inv(vec)
        w = vinv[..., :, 0]  # V^-1 e_0, (B,N)
        c = (1j * math.pi) * thickness.to(a_mat.dtype) * inv_kn[..., None].to(a_mat.dtype)  # (B,Q)
        expo = torch.exp(c[..., :, None] * lam[..., None, :])  # (B,Q,N)
        psi = torch.einsum("bij,bqj->bqi", vec, expo * w[..., None, :])
        return psi, lam, vec, vinv, expo

    @staticmethod
    def setup_context(ctx, inputs, output):
        a_mat, thickness, inv_kn, hermitian, q_block = inputs
        psi, lam, vec, vinv, expo = output
        ctx.mark_non_differentiable(lam, vec, vinv, expo)
        ctx.save_for_backward(lam, vec, vinv, expo, thickness, inv_kn)
        ctx.save_for_forward(lam, vec, vinv, expo, thickness, inv_kn)
        ctx.q_block = q_block

    @staticmethod
    def backward(ctx, gpsi, *_):
        lam, vec, vinv, expo, thickness, inv_kn = ctx.saved_tensors
        w = vinv[:, :, 0]
        c = (1j * math.pi) * thickness.to(vec.dtype) * inv_kn[:, None].to(vec.dtype)
        grad_a = grad_t = grad_kn = None
        b = torch.einsum("bij,bqi->bqj", vec.conj(), gpsi)  # (V^H g)_j  (B,Q,N)
        if ctx.needs_input_grad[0]:
            y = torch.zeros_like(vec)
            for q0 in range(0, c.shape[1], ctx.q_block):
                sl = slice(q0, q0 + ctx.q_block)
                g = _divided_exp(lam, c[:, sl], expo[:, sl])  # (B,q,N,N)
                y = y + torch.einsum("bqi,bqij->bij", b[:, sl].conj(), g)
            y = y * w[:, None, :]
            # dL = Re tr(Y^T V^-1 dA V)  ->  grad_A = (V Y^T V^-1)^H
            grad_a = (vec @ y.transpose(-1, -2) @ vinv).mH
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # psi_q depends on c_q = i pi t_q / K_n; d psi_q / d c_q = V (lam * expo * w)
            dpsi_dc = torch.einsum("bij,bqj->bqi", vec, lam[:, None, :] * expo * w[:, None, :])
            gc = torch.sum(gpsi.conj() * dpsi_dc, dim=-1)  # (B,Q)
            if ctx.needs_input_grad[1]:
                grad_t = torch.real(gc * (1j * math.pi) * inv_kn[:, None].to(c.dtype))
            if ctx.needs_input_grad[2]:
                grad_kn = torch.real(torch.sum(gc * (1j * math.pi) * thickness.to(c.dtype), dim=-1))
        return grad_a, grad_t, grad_kn, None, None

    @staticmethod
    def jvp(ctx, da, dt, dkn, *_):
        lam, vec, vinv, expo, thickness, inv_kn = ctx.saved_tensors
        w = vinv[..., :, 0]
        ctype = vec.dtype
        c = (1j * math.pi) * thickness.to(ctype) * inv_kn[..., None].to(ctype)
        dpsi = None
        if da is not None:
            m = vinv @ da @ vec  # tangent in the eigenbasis (B,N,N)
            parts = []
            for q0 in range(0, c.shape[-1], ctx.q_block):
                sl = slice(q0, q0 + ctx.q_block)
                g = _divided_exp(lam, c[..., sl], expo[..., sl, :])  # (B,q,N,N)
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


def propagate(a_mat: torch.Tensor, thickness: torch.Tensor, inv_kn: torch.Tensor, *,
              hermitian: bool = True, q_block: int = 4) -> torch.Tensor:
    """Wave amplitudes psi (B, Q, N) for structure matrices (B, N, N) at thicknesses (B, Q) in A.

    ``hermitian`` selects ``eigh`` (elastic, or perturbative absorption handled outside); set it
    False for an exact treatment of absorption by a general eigendecomposition.
    """
    if thickness.dim() == 1:
        thickness = thickness[:, None]
    return _Propagate.apply(a_mat, thickness, inv_kn, hermitian, q_block)[0]


def propagate_expm(a_mat: torch.Tensor, thickness: torch.Tensor, inv_kn: torch.Tensor) -> torch.Tensor:
    """Reference path: psi = expm(i pi t A / K_n) e_0 by matrix exponential (slow, autograd)."""
    if thickness.dim() == 1:
        thickness = thickness[:, None]
    c = (1j * math.pi) * thickness.to(a_mat.dtype) * inv_kn[:, None].to(a_mat.dtype)  # (B,Q)
    mats = torch.linalg.matrix_exp(c[:, :, None, None] * a_mat[:, None])
    return mats[..., 0]


def propagate_perturbative(a_mat: torch.Tensor, a_abs: torch.Tensor, thickness: torch.Tensor,
                           inv_kn: torch.Tensor) -> torch.Tensor:
    """First-order absorption: eigenvalues lambda_j + i (V^H A' V)_jj with the elastic eigenvectors.

    Cheap but approximate; its error against :func:`propagate` with ``hermitian=False`` is measured
    in the tests. Gradients go through eigenvectors (autograd of eigh), so avoid exact degeneracy.
    """
    if thickness.dim() == 1:
        thickness = thickness[:, None]
    lam, vec = torch.linalg.eigh(a_mat)
    mu = torch.einsum("bij,bik,bkj->bj", vec.conj(), a_abs, vec)
    lam_c = lam.to(a_mat.dtype) + 1j * mu
    c = (1j * math.pi) * thickness.to(a_mat.dtype) * inv_kn[:, None].to(a_mat.dtype)
    w = vec.conj()[:, 0, :]
    return torch.einsum("bij,bqj->bqi", vec, torch.exp(c[:, :, None] * lam_c[:, None, :]) * w[:, None, :])


def two_beam_intensity(u_g: float, k: float, s_g: float, thickness):
    """Analytic two-beam Pendelloesung |psi_g|^2 (U_g in 1/A^2, K in 1/A, s_g in 1/A, t in A)."""
    xi = math.sqrt(u_g ** 2 + (k * s_g) ** 2)
    return (u_g ** 2 / xi ** 2) * torch.sin(math.pi * torch.as_tensor(thickness) * xi / k) ** 2
