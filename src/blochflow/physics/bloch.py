"""Bloch-wave propagation: one eigendecomposition per incident direction, any number of thicknesses.

psi(t) = exp(i pi t A / K_n) e_0 = V diag(exp(i pi t lambda / K_n)) V^-1 e_0, with A the structure
matrix (1/A^2), t the thickness along the surface normal (A) and K_n (1/A). The backward pass
uses the Daleckii-Krein divided differences of exp, evaluated in a form that stays finite and
accurate when eigenvalues coincide (zone axes), instead of differentiating eigenvectors.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import numpy as np
import torch


# Eigenvalue pairs with |l_i - l_j| max_q |c_q| < _TAU are "close" (the diagonal always is): their
# divided differences take an interpolated integral form, free of cancellation; the others take the
# plain quotient, whose rounding error is then at most ~eps / _TAU relative to the scale max_q |c_q|
# of the derivative (2e-15 in double, 1e-6 in single).
_TAU = 0.1


def _interpolation_order(dtype: torch.dtype) -> int:
    """Chebyshev nodes R for exp(i b y), |b| <= 1, |y| < _TAU: error <= _TAU^R / (2^(R-1) R!).

    R = 9: 1.1e-17 (double); R = 5: 5e-9 (single).
    """
    return 9 if dtype in (torch.complex128, torch.float64) else 5


@functools.lru_cache(maxsize=None)
def _interpolation_tables(order: int):
    """Chebyshev nodes b_r (first kind), Lagrange denominators, Gauss-Legendre rule on [0, 1]."""
    nodes = [math.cos((2 * r + 1) * math.pi / (2 * order)) for r in range(order)]
    denom = [math.prod(nodes[r] - nodes[k] for k in range(order) if k != r) for r in range(order)]
    gl_x, gl_w = np.polynomial.legendre.leggauss(order // 2 + 1)  # exact for L_r (degree order - 1)
    return nodes, denom, [float(x + 1) / 2 for x in gl_x], [float(w) / 2 for w in gl_w]


def _coefficients(thickness: torch.Tensor, inv_kn: torch.Tensor, ctype: torch.dtype) -> torch.Tensor:
    """c_q = i pi t_q / K_n, (B,Q)."""
    return (1j * math.pi) * thickness.to(ctype) * inv_kn[..., None].to(ctype)


def _pair_tables(lam: torch.Tensor, c: torch.Tensor):
    """Q-independent pair data, decided once per matrix.

    Returns the scale s = max_q |c_q| (B,) (1 where every c is 0), ``close`` = |l_i - l_j| s < _TAU
    (B,N,N) and ``inv_d`` = 1 / (l_i - l_j) on separated pairs, 0 on close ones.
    """
    d = lam[..., :, None] - lam[..., None, :]
    cmax = torch.cat([c.abs(), c.real.new_zeros(c.shape[:-1] + (1,))], -1).amax(-1)  # also for Q = 0
    scale = torch.where(cmax > 0, cmax, torch.ones_like(cmax))
    close = (d.real ** 2 + d.imag ** 2) * (scale ** 2)[..., None, None] < _TAU ** 2  # |d| s < tau, no hypot
    inv_d = torch.where(close, torch.zeros_like(d), 1 / torch.where(close, torch.ones_like(d), d))
    return scale, close, inv_d


def _close_factors(lam: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, order: int):
    """Separable form of the divided differences on close pairs.

    G_qij = (e_qi - e_qj) / (l_i - l_j) = c_q e_qi int_0^1 exp(-c_q u (l_i - l_j)) du. With
    c_q = i s g_q (|g_q| <= 1) and y_i = s (l_i - mu), exp(-c_q u d_ij) = exp(i b (y_i - y_j)) at
    b = -g_q u in [-1, 1]. Interpolating exp(i b y) in b at Chebyshev nodes b_r (accurate for
    |y_i - y_j| < _TAU, i.e. on close pairs) gives
        G_qij = c_q e_qi sum_r alpha_r(g_q) exp(i b_r y_i) exp(-i b_r y_j),
    alpha_r(g) = int_0^1 L_r(-g u) du (L_r the Lagrange basis; Gauss-Legendre, exact): a sum over
    R terms, each a product of a function of i and one of j, so sums over q and j become matrix
    products. Returns ``weights`` c_q alpha_r(g_q) (B,Q,R), ``left`` exp(i b_r y_i) and ``right``
    exp(-i b_r y_j) (B,N,R). mu = i mean(Im l) keeps both factors of order one under absorption.
    """
    nodes, denom, gl_x, gl_w = _interpolation_tables(order)
    rtype = lam.real.dtype
    b = torch.tensor(nodes, dtype=rtype, device=lam.device)
    g = c / (1j * scale[..., None]).to(c.dtype)  # (B,Q)
    x = -g[..., None] * torch.tensor(gl_x, dtype=rtype, device=lam.device)  # (B,Q,P), points in [-1, 1]
    diff = x[..., None] - b  # (B,Q,P,R)
    basis = torch.stack([diff[..., [k for k in range(order) if k != r]].prod(-1) / denom[r]
                         for r in range(order)], -1)  # L_r(x) (B,Q,P,R)
    alpha = torch.sum(basis * torch.tensor(gl_w, dtype=rtype, device=lam.device)[:, None], dim=-2)  # (B,Q,R)
    weights = c[..., None] * alpha
    y = (lam - 1j * lam.imag.mean(-1, keepdim=True)) * scale[..., None].to(lam.dtype)  # (B,N)
    phase = (1j * y[..., :, None]) * b.to(lam.dtype)  # (B,N,R)
    return weights, torch.exp(phase), torch.exp(-phase)


def divided_differences_folded(x: torch.Tensor, lam: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """x G^T (B,N,N) with G the :func:`divided_differences` of real eigenvalues (a Hermitian structure
    matrix) at c = i kappa (kappa (B,1) real). With e_i - e_j = 2 h_i h_j sinh(c (l_i - l_j) / 2),
    h = exp(c l / 2): G_ij = c h_i h_j S_ij, S_ij = sinc(kappa (l_i - l_j) / 2) real and symmetric,
    exact at every separation (no close-pair branch, no quotient), so x G^T = c h^T * ((x h) S). The
    real S multiplies the real and imaginary parts of x h in one real product of width 2N, as
    (x h S)^T = S (x h)^T on the interleaved parts; the result is returned as a transposed view."""
    b, n = lam.shape
    h = torch.exp((0.5j * kappa) * lam)  # (B,N)
    a = (0.5 * kappa) * lam
    u = a[..., :, None] - a[..., None, :]
    s = torch.sin(u).div_(u).nan_to_num_(nan=1.0)  # sin u / u, 1 at u = 0 (torch.sinc is 4x slower on CPU)
    xh_t = torch.empty((b, n, n), dtype=x.dtype, device=x.device)
    torch.mul(x.mT, h[..., :, None], out=xh_t)  # (x h)^T, contiguous
    y_t = torch.view_as_complex((s @ torch.view_as_real(xh_t).reshape(b, n, 2 * n)).view(b, n, n, 2))
    return y_t.mT * ((1j * kappa) * h)[..., None, :]


def divided_differences(lam: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """G_ij = (e_i - e_j) / (l_i - l_j), e = exp(c l), G_ii = c e_i, for one thickness (c (B,1)): (B,N,N).

    Separated pairs take the quotient, close ones the interpolated integral form of
    :func:`_close_factors`, as in the rules that sum over many thickness points.
    """
    scale, close, inv_d = _pair_tables(lam, c)
    weights, left, right = _close_factors(lam, c, scale, _interpolation_order(lam.dtype))
    e = torch.exp(c * lam)  # (B,N)
    g_close = ((e[..., :, None] * left) * weights[..., 0, None, :]) @ right.mT
    return torch.where(close, g_close, (e[..., :, None] - e[..., None, :]) * inv_d)


# Eigensolver for batches of Hermitian matrices on CUDA: torch's default solves a batch of matrices
# larger than 32 one at a time (cuSOLVER syevd in a loop); MAGMA's batched solver does not.
# BLOCHFLOW_CUDA_EIGH = auto | jax | cupy | magma | torch: jax.numpy.linalg.eigh and cupy.linalg.eigh
# (when installed) call cuSOLVER's batched solvers on the same memory (DLPack, no copies). Measured
# on an H200 for 369 quartz matrices of 90 beams (benchmarks/device.py), against 16 CPU threads:
# complex128 jax 65x, cupy 9x, magma 0.9x, torch 0.8x; complex64 cupy 120x, jax 87x. ``auto``: jax,
# else cupy, else magma. jax reaches cuSOLVER's batched syevd (any size); cupy's batched eigh is
# Jacobi (syevj), whose cost grows faster with the beam count: its 120x was measured at 90 beams
# only, and single-precision passes on paracetamol (200-300 beams) ran far slower than expected.
CUDA_EIGH_BACKENDS = ("auto", "jax", "cupy", "magma", "torch")


@functools.lru_cache(maxsize=None)
def cuda_backend_usable(module: str) -> bool:
    """Whether ``module`` (jax or cupy) is installed and sees a CUDA device (a CPU-only jax is
    installed but cannot take CUDA arrays)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return False
    try:
        if module == "jax":
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the memory to torch
            import jax

            jax.config.update("jax_enable_x64", True)  # complex128 stays complex128
            return len(jax.devices("gpu")) > 0
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CUDA backend in that build, or no device: not usable
        return False


def fast_cuda_eigh_available() -> bool:
    """Whether a batched CUDA eigensolver (jax or cupy with CUDA) is usable; without one, MAGMA
    solves the matrices about as fast as 16 CPU threads, and a GPU gains little."""
    return cuda_backend_usable("jax") or cuda_backend_usable("cupy")


def cuda_eigh_backend() -> str:
    """The backend for Hermitian batches on CUDA (see CUDA_EIGH_BACKENDS). A named jax or cupy that
    cannot be used is a ValueError saying why."""
    name = os.environ.get("BLOCHFLOW_CUDA_EIGH", "auto").strip().lower()
    if name not in CUDA_EIGH_BACKENDS:
        raise ValueError(f"BLOCHFLOW_CUDA_EIGH={name!r}: choose one of {', '.join(CUDA_EIGH_BACKENDS)}")
    if name == "auto":
        return next((m for m in ("jax", "cupy") if cuda_backend_usable(m)), "magma")
    if name in ("jax", "cupy") and not cuda_backend_usable(name):
        raise ValueError(f"BLOCHFLOW_CUDA_EIGH={name}: {name} is not installed with CUDA support or sees no "
                         f"CUDA device")
    return name


@contextlib.contextmanager
def _linalg_library(name: str):
    previous = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(previous)


# a complex matrix batch whose imaginary parts are below this many machine epsilons of its largest
# off-diagonal element is solved as real symmetric (rounding of a centrosymmetric structure's U_g is
# ~1 eps of them; the diagonal, 2 K s_g and 1e4 on padded beams, sets no scale for the potential)
REAL_TOLERANCE_EPS = 64


def _within_rounding(imaginary, real_scale, dtype: torch.dtype) -> bool:
    """Whether the largest |imaginary part| is rounding (REAL_TOLERANCE_EPS eps of ``dtype``) of the
    real scale."""
    return bool(imaginary <= REAL_TOLERANCE_EPS * torch.finfo(dtype).eps * real_scale)


def _effectively_real(a_mat: torch.Tensor) -> bool:
    """True when every element of the complex batch ``a_mat`` (..., N, N) is real to rounding of its
    off-diagonal part: the structure matrices of a centrosymmetric crystal with its origin on an
    inversion centre and no absorption (U_g = U_-g real, so A is real symmetric)."""
    dtype = a_mat.real.dtype
    # a non-centrosymmetric batch fails on its first matrix (imaginary parts of the size of U_g),
    # before the pass over the whole batch; in numpy (a tenth of torch's call overhead)
    first = a_mat.detach().reshape(-1, *a_mat.shape[-2:])[0].cpu().numpy()
    off = np.abs(first.real)
    np.fill_diagonal(off, 0.0)
    if not _within_rounding(np.abs(first.imag).max(), off.max(), dtype):
        return False
    off = a_mat.real.clone()  # the largest |Re| off the diagonal
    off.diagonal(dim1=-2, dim2=-1).zero_()
    low, high = torch.aminmax(off)
    return _within_rounding(torch.linalg.vector_norm(a_mat.imag, ord=math.inf), torch.maximum(-low, high), dtype)


def _real_tangents(dpot: torch.Tensor) -> bool:
    """True when the potential tangents (T, M) are real to rounding (centrosymmetric crystals)."""
    if not dpot.numel():
        return False
    low, high = torch.aminmax(dpot.real)
    return _within_rounding(dpot.imag.abs().max(), torch.maximum(-low, high), dpot.real.dtype)


def hermitian_eigh(a_mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of Hermitian matrices (..., N, N), as
    ``torch.linalg.eigh``; on CUDA, batches of matrices above 32 go to the backend of
    :func:`cuda_eigh_backend` (plain torch inside torch.func transforms). A complex batch that is
    real to rounding (:func:`_effectively_real`) is solved as real symmetric, 1.5-2.7x faster at
    40-700 beams; its eigenvectors come back complex (real orthogonal, an eigenbasis of A)."""
    plain = torch._C._functorch.peek_interpreter_stack() is None and not (torch.is_grad_enabled() and a_mat.requires_grad)
    if plain and a_mat.is_complex() and a_mat.numel() and _effectively_real(a_mat):
        lam, vec = hermitian_eigh(a_mat.real)
        return lam, vec.to(a_mat.dtype)
    if not a_mat.is_cuda or a_mat.shape[-1] <= 32 or a_mat.dim() < 3 or a_mat.shape[0] < 2:
        return torch.linalg.eigh(a_mat)
    backend = cuda_eigh_backend()
    if backend == "magma":
        with _linalg_library("magma"):
            return torch.linalg.eigh(a_mat)
    if backend == "cupy" and plain:
        import cupy

        with cupy.cuda.Device(a_mat.device.index or 0):
            lam, vec = cupy.linalg.eigh(cupy.from_dlpack(a_mat.detach().contiguous()))
        return torch.from_dlpack(lam), torch.from_dlpack(vec)
    if backend == "jax" and plain:
        import jax

        torch.cuda.current_stream(a_mat.device).synchronize()
        lam, vec = jax.numpy.linalg.eigh(jax.dlpack.from_dlpack(a_mat.detach().contiguous()))
        vec.block_until_ready()
        return torch.from_dlpack(lam), torch.from_dlpack(vec)
    return torch.linalg.eigh(a_mat)


def _cat_broadcast(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along the last dimension after broadcasting the leading ones."""
    lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(lead + p.shape[-1:]) for p in parts], -1)


class _Propagate(torch.autograd.Function):
    """psi = V exp(c lam) V^-1 e_0 with reverse (vjp) and forward (jvp) rules from divided differences.

    Written in the functorch form (setup_context, generated vmap rule) so that ``torch.func.jacfwd``
    pushes many tangents through one eigendecomposition: the Jacobian for Gauss-Newton costs a few
    matrix products per parameter direction, not a decomposition.

    Both rules need sums over thickness points q of the divided differences
    G_qij = (e_qi - e_qj) / (l_i - l_j), e_qi = exp(c_q l_i). They are never formed: for separated
    eigenvalue pairs the sum over q factorises into vectors and one (N x Q)(Q x N) matrix product;
    close pairs (including i = j) use a separable, cancellation-free form of G with R = 9 terms
    (:func:`_close_factors`), so their sums over q and j are (N x Q)(Q x R) and (N x R)(R x N)
    products. The Q-dependent work is a few GEMMs; the elementwise N x N work does not grow with Q,
    and in forward mode no N x N table is contracted per tangent other than by matrix products.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a_mat, thickness, inv_kn, hermitian):
        # a_mat (B,N,N) complex; thickness (B,Q) real (A); inv_kn (B,) real (A)
        if hermitian:
            lam, vec = hermitian_eigh(a_mat)
            lam = lam.to(a_mat.dtype)
            vinv = vec.mH
        else:
            lam, vec = torch.linalg.eig(a_mat)
            vinv = torch.linalg.inv(vec)
        w = vinv[..., :, 0]  # V^-1 e_0, (B,N)
        c = _coefficients(thickness, inv_kn, a_mat.dtype)  # (B,Q)
        expo = torch.exp(c[..., :, None] * lam[..., None, :])  # (B,Q,N)
        psi = torch.einsum("bij,bqj->bqi", vec, expo * w[..., None, :])
        return psi, lam, vec, vinv, expo

    @staticmethod
    def setup_context(ctx, inputs, output):
        a_mat, thickness, inv_kn, hermitian = inputs
        psi, lam, vec, vinv, expo = output
        ctx.mark_non_differentiable(lam, vec, vinv, expo)
        ctx.hermitian = hermitian
        ctx.save_for_backward(lam, vec, vinv, expo, thickness, inv_kn)
        ctx.save_for_forward(lam, vec, vinv, expo, thickness, inv_kn)

    @staticmethod
    def backward(ctx, gpsi, *_):
        lam, vec, vinv, expo, thickness, inv_kn = ctx.saved_tensors
        w = vinv[..., :, 0]
        c = _coefficients(thickness, inv_kn, vec.dtype)
        grad_a = grad_t = grad_kn = None
        # be_iq = conj(b_qi) e_qi with b = V^H g (B,Q,N); bct = conj(b)^T (B,N,Q)
        bct = vec.mT @ gpsi.mH
        be = bct * expo.mT
        if ctx.needs_input_grad[0]:
            # Y_ij = sum_q conj(b_qi) G_qij
            scale, close, inv_d = _pair_tables(lam, c)
            # separated: (s_i - M_ij) / d_ij, s_i = sum_q conj(b_qi) e_qi, M = conj(b)^T E
            y_sep = (be.sum(-1)[..., :, None] - bct @ expo) * inv_d
            # close: sum_r P_ir exp(i b_r y_i) exp(-i b_r y_j), P_ir = sum_q conj(b_qi) e_qi c_q alpha_r(g_q)
            weights, left, right = _close_factors(lam, c, scale, _interpolation_order(vec.dtype))
            y_close = ((be @ weights) * left) @ right.mT
            y = torch.where(close, y_close, y_sep) * w[..., None, :]
            # dL = Re tr(Y^T V^-1 dA V)  ->  grad_A = (V Y^T V^-1)^H
            if ctx.hermitian and not vec.imag.any():  # real orthogonal eigenvectors (real A): four real products
                # of (V Y^T V^T) in place of two complex ones, half the arithmetic
                vr = vec.real.contiguous()
                yt = y.mT
                grad_a = torch.complex(vr @ yt.real @ vr.mT, -(vr @ yt.imag @ vr.mT)).mT
            else:
                grad_a = (vec @ y.mT @ vinv).mH
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # psi_q depends on c_q = i pi t_q / K_n; d psi_q / d c_q = V (lam * expo * w), so
            # gc_q = <g_q, d psi_q / d c_q> = sum_j conj(b_qj) e_qj lam_j w_j
            gc = torch.sum(be * (lam * w)[..., :, None], dim=-2)  # (B,Q)
            if ctx.needs_input_grad[1]:
                grad_t = torch.real(gc * (1j * math.pi) * inv_kn[..., None].to(c.dtype))
            if ctx.needs_input_grad[2]:
                grad_kn = torch.real(torch.sum(gc * (1j * math.pi) * thickness.to(c.dtype), dim=-1))
        return grad_a, grad_t, grad_kn, None

    @staticmethod
    def jvp(ctx, da, dt, dkn, *_):
        dpsi = propagate_tangents(*ctx.saved_tensors, da, dt, dkn)
        return dpsi, None, None, None, None  # one tangent per output


def propagate_tangents(lam, vec, vinv, expo, thickness, inv_kn, da, dt, dkn, beams=None, basis_tangent=None):
    """Tangent of psi (the forward rule of :class:`_Propagate`) from its decomposition, for tangents
    da (..., B, N, N), dt (..., B, Q), dkn (..., B) of the matrix, thickness and 1/K_n (None: fixed);
    leading dimensions batch tangents. ``beams`` (B, S) keeps only those beams of each matrix (the
    last dimension of the result is then S). ``basis_tangent`` (..., B, N, N), given in place of da,
    is the matrix tangent already in the eigenbasis, (V^-1 dA V)_ij w_j with w = V^-1 e_0. Plain
    tensor algebra, so it also runs on worker threads."""
    w = vinv[..., :, 0]
    out_vec = vec if beams is None else torch.gather(vec, -2, beams[..., None].expand(beams.shape + vec.shape[-1:]))
    ctype = vec.dtype
    c = _coefficients(thickness, inv_kn, ctype)
    dc = None  # tangent of c_q = i pi t_q / K_n; d psi_q / d c_q = V (lam * expo * w)
    if dt is not None:
        dc = (1j * math.pi) * dt.to(ctype) * inv_kn[..., None].to(ctype)
    if dkn is not None:
        extra = (1j * math.pi) * thickness.to(ctype) * dkn[..., None].to(ctype)
        dc = extra if dc is None else dc + extra
    lw = (lam * w)[..., :, None]  # (B,N,1)
    moves = da is not None or basis_tangent is not None
    if expo.shape[-2] == 0 or (not moves and dc is None):
        return torch.zeros(expo.shape[:-1] + out_vec.shape[-2:-1], dtype=expo.dtype, device=expo.device)
    if not moves:  # d psi_q = dc_q V (lam * expo_q * w): one vector per thickness, shared by every tangent
        return dc[..., None] * ((expo * lw.mT) @ out_vec.mT)
    if expo.shape[-2] == 1:
        # one thickness: form G once per matrix and fold it with V and w into
        # H_li = sum_j V_lj w_j G_ij, so that each tangent costs one product dA H:
        # dpsi'_i = sum_j G_ij (V^-1 dA V)_ij w_j = sum_k (V^-1)_ik (dA H)_ki
        if basis_tangent is not None:
            core = torch.sum(divided_differences(lam, c) * basis_tangent, -1)
        else:
            h = (vec * w[..., None, :]) @ divided_differences(lam, c).mT
            core = torch.sum(vinv * (da @ h).mT, -1)  # (...,B,N)
        if dc is not None:
            core = core + lw[..., 0] * expo[..., 0, :] * dc
        core_t = core[..., None]
    else:
        # d psi = V core with core^T (...,B,N,Q) in the eigenbasis, from the divided differences
        scale, close, inv_d = _pair_tables(lam, c)
        weights, left, right = _close_factors(lam, c, scale, _interpolation_order(ctype))
        # m_ij = (V^-1 dA V)_ij w_j; dpsi'_qi = sum_j G_qij m_ij   (da may carry leading dims)
        m = vinv @ da @ (vec * w[..., None, :]) if basis_tangent is None else basis_tangent
        # separated pairs: sum_j (e_qi - e_qj) r_ij = e_qi (r 1)_i - (r E^T)_iq with r = m / d
        sep = (m * inv_d) @ torch.cat([torch.ones_like(expo[..., :1, :]), -expo], -2).mT  # (...,B,N,1+Q)
        # close pairs: e_qi sum_r c_q alpha_r(g_q) exp(i b_r y_i) sum_{j close} exp(-i b_r y_j) m_ij
        near = ((m * close.to(m.dtype)) @ right) * left  # (...,B,N,R)
        # h_iq = (r 1)_i + sum_r near_ir weights_qr (+ lam_i w_i dc_q); core^T = e^T h - (r E^T)
        cols, rows = [sep[..., :1], near], [torch.ones_like(weights[..., :1]), weights]
        if dc is not None:
            cols.append(lw)
            rows.append(dc[..., None])
        h = _cat_broadcast(cols) @ _cat_broadcast(rows).mT
        core_t = torch.addcmul(sep[..., 1:], expo.mT, h)
    return core_t.mT @ out_vec.mT


def propagate(a_mat: torch.Tensor, thickness: torch.Tensor, inv_kn: torch.Tensor, *,
              hermitian: bool = True) -> torch.Tensor:
    """Wave amplitudes psi (B, Q, N) for structure matrices (B, N, N) at thicknesses (B, Q) in A.

    ``hermitian`` selects ``eigh`` (elastic, or perturbative absorption handled outside); set it
    False for an exact treatment of absorption by a general eigendecomposition. The gradient rules
    sum over thickness points by matrix products, so many points per eigendecomposition cost little
    more than one.
    """
    if thickness.dim() == 1:
        thickness = thickness[:, None]
    return _Propagate.apply(a_mat, thickness, inv_kn, hermitian)[0]


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
    lam, vec = hermitian_eigh(a_mat)
    mu = torch.einsum("bij,bik,bkj->bj", vec.conj(), a_abs, vec)
    lam_c = lam.to(a_mat.dtype) + 1j * mu
    c = (1j * math.pi) * thickness.to(a_mat.dtype) * inv_kn[:, None].to(a_mat.dtype)
    w = vec.conj()[:, 0, :]
    return torch.einsum("bij,bqj->bqi", vec, torch.exp(c[:, :, None] * lam_c[:, None, :]) * w[:, None, :])


def two_beam_intensity(u_g: float, k: float, s_g: float, thickness):
    """Analytic two-beam Pendelloesung |psi_g|^2 (U_g in 1/A^2, K in 1/A, s_g in 1/A, t in A)."""
    xi = math.sqrt(u_g ** 2 + (k * s_g) ** 2)
    return (u_g ** 2 / xi ** 2) * torch.sin(math.pi * torch.as_tensor(thickness) * xi / k) ** 2
