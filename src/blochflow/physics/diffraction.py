"""Frame intensities: structure matrices, Bloch solves, integration over samples, and their forward-mode
derivatives.

Geometry (which beams couple, index tables, scored reflections) is integer bookkeeping computed once
into a :class:`~blochflow.physics.plan.DiffractionPlan`; values (potential, excitation errors,
thickness) are recomputed here on every call and carry gradients.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .bloch import (_coefficients, _Propagate, _real_tangents, divided_differences, divided_differences_folded, hermitian_eigh, propagate,
                    propagate_perturbative, propagate_tangents)
from .device import device_memory, work_scale
from .geometry import excitation_error, rocking_axis_lab, rotation_matrix, sample_orientations
from .plan import BeamChunk, DiffractionPlan
from .workers import add_rows, parallel_map, pipeline, solver_workers, split_evenly, transforms_active

AbsorptionMethod = Literal["exact", "perturbative"]


def _weak_index(hkl, mask, weak_hkl, weak_mask, lut, offset, pad: int) -> torch.Tensor:
    """Potential rows (B, N, W) of g_i - g_w between solved and weak beams; ``pad`` where either is padding."""
    d = (hkl[:, :, None, :] - weak_hkl[:, None, :, :]).long() + offset
    idx = lut[d[..., 0], d[..., 1], d[..., 2]]
    return torch.where(mask[:, :, None] & weak_mask[:, None, :], idx, torch.full_like(idx, pad))


def _bethe_correction(pot: torch.Tensor, weak_idx: torch.Tensor, diag_weak: torch.Tensor):
    """Second-order (Bethe) coupling through weak beams: C = P_sw D_w^-1 P_ws, and X = D_w^-1 P_ws.

    Eliminating a weak beam w from (A - lambda) c = 0 with lambda << A_ww = 2 K s_w (|s_w| >= s_max)
    and weak-weak coupling neglected gives the solved block A_eff = M (P - C + D) M: the illumination
    factors of the weak beams cancel. pot (M+1,) with a trailing zero; weak_idx (B, N, W);
    diag_weak (B, W) = 2 K s_w (large on padding).
    """
    p_sw = pot[weak_idx]  # (B, N, W)
    x = p_sw.conj().mT / diag_weak.to(pot.dtype)[:, :, None]  # (B, W, N)
    return p_sw @ x, x


@dataclass
class FrameState:
    """Per-frame values that enter the simulation (tensors, may require grad).

    alpha/beta/omega in radians (F,), thickness (F, Q) in A with weights (F, Q) summing to 1.
    surface_normal (F, 3) unit lab vectors along propagation, or None for 'along the beam'.
    orientation_correction (F, 2): small rotations (radians) about lab x and y applied after the
    goniometer, g_lab = R_x R_y O h, or None. (A rotation about the beam leaves every excitation
    error unchanged, so it cannot be refined from intensities.)
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    omega: torch.Tensor
    thickness: torch.Tensor
    thickness_weight: torch.Tensor
    surface_normal: torch.Tensor | None = None
    orientation_correction: torch.Tensor | None = None

    def tensors(self) -> tuple:
        return (self.alpha, self.beta, self.omega, self.thickness, self.thickness_weight,
                self.surface_normal, self.orientation_correction)

    def to(self, target) -> "FrameState":
        """The same state with every tensor moved to ``target`` (a dtype or a device; differentiable)."""
        return FrameState(*[None if x is None else x.to(target) for x in self.tensors()])


def frame_state_from_dataset(dataset, thickness: float | torch.Tensor, dtype=torch.float64) -> FrameState:
    f = dataset.frames
    n = len(f)
    t = torch.as_tensor(thickness, dtype=dtype)
    if t.dim() == 0:
        t = t.expand(n)[:, None].clone()
    elif t.dim() == 1:
        t = t[:, None] if len(t) == n else t[None, :].expand(n, -1).clone()
    return FrameState(alpha=torch.as_tensor(np.radians(f.alpha_deg), dtype=dtype),
                      beta=torch.as_tensor(np.radians(f.beta_deg), dtype=dtype),
                      omega=torch.as_tensor(np.radians(f.omega_deg), dtype=dtype),
                      thickness=t, thickness_weight=torch.full_like(t, 1.0 / t.shape[1]))


def correction_rotation(angles: torch.Tensor) -> torch.Tensor:
    """R_x(a) R_y(b) (..., 3, 3) from small angles (..., 2) in radians."""
    return rotation_matrix("x", angles[..., 0]) @ rotation_matrix("y", angles[..., 1])


def _rotate_about(v: torch.Tensor, axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues rotation of vectors v (B, 3) about unit axes (B, 3) by angles (B,)."""
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    return v * c + torch.linalg.cross(axis, v) * s + axis * torch.sum(axis * v, -1, keepdim=True) * (1 - c)


@dataclass
class _ChunkTerms:
    """What a chunk's structure matrices are made of: A = M (pot[idx] + diag(diag)) M, M = diag(m)."""

    pot: torch.Tensor  # (M+1,) potential with a trailing 0 for uncoupled pairs
    pot_abs: torch.Tensor | None
    idx: torch.Tensor  # (B,N,N) index into pot
    diag: torch.Tensor  # (B,N) 2 K s_g, large on padding
    m: torch.Tensor | None  # (B,N) non-parallel illumination factors, None when off
    kn: torch.Tensor  # (B,) K_n
    thickness: torch.Tensor  # (B,Q)
    weight: torch.Tensor  # (B,) rocking-integration weight of each sample
    mask: torch.Tensor  # (B,N)
    out_sample: torch.Tensor
    out_beam: torch.Tensor
    out_refl: torch.Tensor
    weak_idx: torch.Tensor | None = None  # (B,N,W) index into pot, for the Bethe correction
    diag_weak: torch.Tensor | None = None  # (B,W) 2 K s_w of the weak beams, large on padding
    pair_set: torch.Tensor | None = None  # (B,) samples with one value share idx (BeamChunk.pair_set)


def _padded(potential: torch.Tensor) -> torch.Tensor:
    """(M+1,) potential rows with the trailing 0 that uncoupled and padded beam pairs index."""
    return torch.cat([potential, potential.new_zeros(1)])


def _pair_rows(plan: DiffractionPlan, ch_hkl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N, N) potential row of g_i - g_j for every beam pair of these samples; the trailing zero row
    (M) on the diagonal and for padding beams."""
    n = ch_hkl.shape[1]
    d = (ch_hkl[:, :, None, :] - ch_hkl[:, None, :, :]).long() + plan.lut_offset
    idx = plan.lut[d[..., 0], d[..., 1], d[..., 2]]
    pair = mask[:, :, None] & mask[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=mask.device)
    return torch.where(pair, idx, torch.full_like(idx, len(plan.potential_hkl)))


def friedel_rows(plan: DiffractionPlan) -> torch.Tensor:
    """(M+1,) for each potential row the smaller of its own index and that of its Friedel mate -h
    (its own where the plan has no -h; the zero row M stays M). Where every tangent of the potential
    is real (a centrosymmetric crystal without absorption) dU_h = dU_-h, so pairs g_k - g_l and
    g_l - g_k can share one coefficient in the potential contraction (half the table to contract)."""
    m = len(plan.potential_hkl)
    own = torch.arange(m, device=plan.lut.device)
    if m == 0:
        return own.new_zeros(1)
    minus = plan.lut_offset - torch.as_tensor(plan.potential_hkl, device=plan.lut.device).long()
    mate = plan.lut[minus[:, 0], minus[:, 1], minus[:, 2]].long()
    mate = torch.where(mate == m, own, mate)
    return torch.cat([torch.minimum(own, mate), own.new_full((1,), m)])


def _sample_geometry(plan: DiffractionPlan, s_idx: torch.Tensor, fr: torch.Tensor, u0: torch.Tensor,
                     state: FrameState, rtype: torch.dtype) -> tuple:
    """Per-sample geometry (orientation O (B, 3, 3), incident direction (B, 3), surface normal (B, 3),
    wave number K (), K_n = K n.k (B,)) of samples ``s_idx`` in frames ``fr``; ``u0`` is U_0, which
    sets K in the crystal. Everything a beam's terms depend on besides its h k l."""
    k = torch.sqrt(1.0 / plan.wavelength ** 2 + u0.real)  # wave number in the crystal (1/A)
    samples = plan.samples
    dev = s_idx.device
    inc = torch.as_tensor(samples.incident, dtype=rtype, device=dev)[s_idx]
    offs = torch.as_tensor(samples.alpha_offset, dtype=rtype, device=dev)[s_idx]
    orient = sample_orientations((plan.ub if plan.ub.dim() == 2 else plan.ub[fr]).to(rtype), state.alpha[fr],
                                 state.beta[fr], state.omega[fr],
                                 plan.axis_azimuth, offs, plan.settings.rocking_axis)  # (B,3,3)
    turn = None if state.orientation_correction is None else correction_rotation(state.orientation_correction[fr])
    if turn is not None:
        orient = turn @ orient
    if state.surface_normal is None:
        normal = inc
    else:  # the normal turns with the crystal: by the tilt inside the frame, then the correction
        normal = _rotate_about(state.surface_normal[fr].to(rtype),
                               rocking_axis_lab(state.omega[fr], plan.axis_azimuth,
                                                plan.settings.rocking_axis).to(rtype), offs)
        if turn is not None:
            normal = torch.einsum("bij,bj->bi", turn, normal)
    return orient, inc, normal, k, k * torch.sum(inc * normal, -1)


def _beam_terms(hkl: torch.Tensor, mask: torch.Tensor, geometry: tuple, nonparallel: bool, pad_value):
    """(2 K s_g (B, N) with ``pad_value`` at padding, illumination factors (1 + g.n / K_n)^-1/2 (B, N) or
    None) of beams hkl (B, N, 3) at the samples' geometry (:func:`_sample_geometry`)."""
    orient, inc, normal, k, kn = geometry
    g_lab = torch.einsum("bij,bnj->bni", orient, hkl)
    diag = torch.where(mask, 2 * k * excitation_error(g_lab, inc[:, None, :], k), pad_value)
    if not nonparallel:
        return diag, None
    m = torch.where(mask, (1 + torch.sum(g_lab * normal[:, None, :], -1) / kn[:, None]) ** -0.5,
                    torch.ones_like(diag))
    return diag, m


def _beam_terms_tangent(hkl: torch.Tensor, mask: torch.Tensor, geometry: tuple, d_geometry: tuple,
                        nonparallel: bool):
    """Tangents (T, B, N) of :func:`_beam_terms` for tangents (T, ...) of the geometry, in closed form:
    d(2 K s) = 2 dK s + 2 K ds, ds = -(k_in + g / K).dg + |g|^2 dK / (2 K^2); dm = -m^3 du / 2 with
    u = g.n / K_n. Forward AD of the same algebra cost ~0.1 ms per operation per chunk on one
    thread (the tangents of operations with a constant go through Python reference kernels)."""
    orient, inc, normal, k, kn = geometry
    d_orient, d_normal, dk, dkn = d_geometry
    g_lab = torch.einsum("bij,bnj->bni", orient, hkl)
    dg = torch.einsum("tbij,bnj->tbni", d_orient, hkl)
    g2 = torch.sum(g_lab * g_lab, -1)
    s = excitation_error(g_lab, inc[:, None, :], k)
    dk_ = dk[:, None, None]
    ds = -torch.sum((inc[:, None, :] + g_lab / k) * dg, -1) + g2 * dk_ / (2 * k ** 2)
    d_diag = torch.where(mask, 2 * (dk_ * s + k * ds), 0.0)
    if not nonparallel:
        return d_diag, None
    u = torch.sum(g_lab * normal[:, None, :], -1) / kn[:, None]
    du = ((torch.sum(dg * normal[:, None, :], -1) + torch.einsum("bni,tbi->tbn", g_lab, d_normal))
          / kn[:, None] - u * (dkn / kn)[..., None])
    return d_diag, torch.where(mask, -0.5 * (1 + u) ** -1.5 * du, 0.0)


def _chunk_terms(plan: DiffractionPlan, ch: BeamChunk, potential, potential_abs, state: FrameState,
                 sample_slice: slice | None = None, pairs: bool = True, geometry: tuple | None = None) -> _ChunkTerms:
    """Structure-matrix ingredients of a chunk (optionally of some of its samples). ``pairs`` False
    leaves ``idx`` None where the plan does not cache it (:func:`_pair_rows` builds it later).
    ``geometry``: :func:`_sample_geometry` of the samples these terms are for (those of
    ``sample_slice`` when given), when already at hand."""
    rtype = potential.real.dtype
    pot = _padded(potential)
    pot_abs = None if potential_abs is None else _padded(potential_abs)
    ch_hkl, mask, fr, s_idx, pair_index, pair_set = ch.hkl, ch.mask, ch.frame, ch.sample, ch.pair_index, ch.pair_set
    out_sample, out_beam, out_refl = ch.out_sample, ch.out_beam, ch.out_refl
    weak_hkl, weak_mask, weak_index = ch.weak_hkl, ch.weak_mask, ch.weak_index
    if sample_slice is not None:
        keep = (out_sample >= sample_slice.start) & (out_sample < sample_slice.stop)
        out_sample = out_sample[keep] - sample_slice.start
        out_beam, out_refl = out_beam[keep], out_refl[keep]
        ch_hkl, mask, fr, s_idx = (ch_hkl[sample_slice], mask[sample_slice], fr[sample_slice],
                                   s_idx[sample_slice])
        if pair_index is not None:
            pair_index = pair_index[sample_slice]
            pair_set = None if pair_set is None else pair_set[sample_slice]
        if weak_hkl is not None:
            weak_hkl, weak_mask = weak_hkl[sample_slice], weak_mask[sample_slice]
            weak_index = None if weak_index is None else weak_index[sample_slice]
    dev = s_idx.device
    if geometry is None:
        geometry = _sample_geometry(plan, s_idx, fr, potential[0], state, rtype)
    weight = torch.as_tensor(plan.samples.weight, dtype=rtype, device=dev)[s_idx]
    n = ch_hkl.shape[1]
    if pair_index is not None:
        idx = pair_index
    else:
        pair_set = None
        idx = _pair_rows(plan, ch_hkl, mask) if pairs else None
    big = 1e4 * (1 + torch.arange(n, dtype=rtype, device=dev) * 1e-3)
    diag, m = _beam_terms(ch_hkl.to(rtype), mask, geometry, plan.settings.nonparallel, big)
    weak_idx = diag_weak = None
    if weak_hkl is not None:
        weak_idx = weak_index.long() if weak_index is not None else _weak_index(
            ch_hkl, mask, weak_hkl, weak_mask, plan.lut, plan.lut_offset, len(potential))
        diag_weak, _ = _beam_terms(weak_hkl.to(rtype), weak_mask, geometry, False, 1e4)
    return _ChunkTerms(pot, pot_abs, idx, diag, m, geometry[4], state.thickness[fr], weight, mask,
                       out_sample, out_beam, out_refl, weak_idx, diag_weak, pair_set)


def _slice_terms(tm: _ChunkTerms, sl: slice) -> _ChunkTerms:
    """The terms of some of a chunk's samples (as ``_chunk_terms(..., sample_slice=sl)`` builds them)."""
    keep = (tm.out_sample >= sl.start) & (tm.out_sample < sl.stop)

    def cut(x):
        return None if x is None else x[sl]

    return _ChunkTerms(tm.pot, tm.pot_abs, cut(tm.idx), tm.diag[sl], cut(tm.m), tm.kn[sl], tm.thickness[sl],
                       tm.weight[sl], tm.mask[sl], tm.out_sample[keep] - sl.start, tm.out_beam[keep],
                       tm.out_refl[keep], cut(tm.weak_idx), cut(tm.diag_weak), cut(tm.pair_set))


def _absorptive_diagonal(tm: _ChunkTerms) -> torch.Tensor:
    """(B, N) U'_0 on the diagonal of every solved beam (padding beams get none): the mean absorption."""
    return tm.mask.to(tm.pot_abs.dtype) * tm.pot_abs[0]


def _beam_sets(pair_set: torch.Tensor):
    """Samples grouped by shared beam set: (set of each sample (B,), samples per set (S,), the samples
    ordered by set (B,), where each set starts in that order (S,))."""
    _, set_of, size = torch.unique(pair_set, return_inverse=True, return_counts=True)
    order = torch.sort(set_of, stable=True).indices
    return set_of, size, order, torch.cumsum(size, 0) - size


def _pair_matrix(table: torch.Tensor, tm: _ChunkTerms, diag: torch.Tensor) -> torch.Tensor:
    """(B, N, N) table[idx] with ``diag`` on the diagonal: gathered once per shared beam set
    (``pair_set``) and copied to its samples as whole matrices, 3x faster than an element gather per
    sample; the diagonal goes in by diagonal_scatter (no (B, N, N) diag_embed)."""
    if tm.pair_set is None:
        m = table[tm.idx]
    else:
        set_of, _, order, start = _beam_sets(tm.pair_set)
        m = table[tm.idx[order[start]]].index_select(0, set_of)
    return torch.diagonal_scatter(m, m.diagonal(dim1=-2, dim2=-1) + diag.to(table.dtype), dim1=-2, dim2=-1)


def _unscaled_matrix(tm: _ChunkTerms, pot, diag, corr) -> torch.Tensor:
    """a0 = P + D (- C, the Bethe correction, when given) of A = M a0 M."""
    a0 = _pair_matrix(pot, tm, diag)
    return a0 if corr is None else a0 - corr


def _chunk_matrices(tm: _ChunkTerms, absorption_method: AbsorptionMethod):
    """(A (B,N,N), A' or None) of a chunk: the matrix to solve and, for perturbative absorption only,
    the absorptive part kept apart (exact absorption solves A + i A' as one general matrix)."""
    ctype = tm.pot.dtype
    corr = None if tm.weak_idx is None else _bethe_correction(tm.pot, tm.weak_idx, tm.diag_weak)[0]
    a_mat = _unscaled_matrix(tm, tm.pot, tm.diag, corr)
    mm = None if tm.m is None else (tm.m[:, :, None] * tm.m[:, None, :]).to(ctype)
    if mm is not None:
        a_mat = a_mat * mm
    if tm.pot_abs is None:
        return a_mat, None
    a_abs = _pair_matrix(tm.pot_abs, tm, _absorptive_diagonal(tm))
    if mm is not None:
        a_abs = a_abs * mm
    if absorption_method == "exact":
        return a_mat + 1j * a_abs, None
    return a_mat, a_abs


def _rocking_values(tm: _ChunkTerms, inten: torch.Tensor, beam: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Q, N) intensities -> (P, Q) rocking-weighted values of the chunk's pairs; (T, B, Q, N)
    tangents -> (T, P, Q). ``beam`` (P,): each pair's column of the last axis (default: its beam)."""
    wt = tm.weight[tm.out_sample][:, None]
    beam = tm.out_beam if beam is None else beam
    if inten.dim() == 3:
        return inten[tm.out_sample, :, beam] * wt
    return inten[:, tm.out_sample, :, beam].transpose(0, 1) * wt  # split advanced indices lead


def _chunk_intensities(plan: DiffractionPlan, ch: BeamChunk, potential, potential_abs, state: FrameState,
                       absorption_method: AbsorptionMethod, sample_slice: slice | None = None,
                       keep: list | None = None, decomposition: tuple | None = None):
    """Rocking-weighted intensities (P, Q) of the chunk's (sample, reflection) pairs, and their rows.

    ``sample_slice`` restricts the chunk to some of its samples (smaller batches for Jacobians).
    ``keep`` (without gradient, exact or no absorption): [dtype], to which the decomposition (lam, V,
    V^-1) is appended in that dtype. ``decomposition`` (lam, V, V^-1 or None) of these samples' matrices,
    from an earlier pass, replaces the eigensolver (without gradient; values in its precision).
    """
    tm = _chunk_terms(plan, ch, potential, potential_abs, state, sample_slice)
    if decomposition is not None:  # no matrices to build
        return _scored_values(tm, None, keep, decomposition), tm.out_refl
    a_mat, a_abs = _chunk_matrices(tm, absorption_method)
    recording = torch.is_grad_enabled() and a_mat.requires_grad
    if a_abs is not None:
        psi = propagate_perturbative(a_mat, a_abs, tm.thickness, 1.0 / tm.kn)
    elif not recording and (keep is not None or tm.thickness.shape[1] > 1):
        return _scored_values(tm, a_mat, keep, decomposition), tm.out_refl
    else:
        psi = propagate(a_mat, tm.thickness, 1.0 / tm.kn, hermitian=tm.pot_abs is None)
    if tm.m is not None:
        psi = psi * tm.m[:, None, :].to(psi.dtype)
    return _rocking_values(tm, psi.real ** 2 + psi.imag ** 2), tm.out_refl


def solve_cost_probe(plan: DiffractionPlan, potential: torch.Tensor, potential_abs: torch.Tensor | None,
                     state: FrameState, absorption_method: AbsorptionMethod = "exact") -> float:
    """Seconds per unit of N^3 (N: a chunk's padded beam count) that a pass without gradient costs per
    sample on one thread here: a solve of the plan's median-sized chunk (as a pass batches it), timed
    after a warm-up of one sample. With :func:`pass_seconds` it tells a user what a pass will cost before a
    long one starts. Against whole passes in single precision on 2 threads (2-core machine): 0.93-1.18
    of a forward pass, 0.8-0.9 of a thickness scan (quartz at 36 and 70 beams, paracetamol at 580 and
    1100, an F-centred cell at 920)."""
    chunks = [ch for ch in plan.chunks if ch.hkl.shape[0]]
    if not chunks:
        return 0.0
    ch = sorted(chunks, key=lambda c: c.hkl.shape[1])[len(chunks) // 2]
    k = ch.hkl.shape[0]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # a sample of thousands of beams takes minutes: then the rate of a smaller eigendecomposition, scaled
        per_n3 = untimed_rate(ch.hkl.shape[1], potential.dtype, plan.device)
        if per_n3 is not None:
            return per_n3
        with torch.no_grad():
            _chunk_intensities(plan, ch, potential, potential_abs, state, absorption_method, slice(0, 1))
            t0 = time.perf_counter()
            _chunk_intensities(plan, ch, potential, potential_abs, state, absorption_method, slice(0, k))
            if plan.device.type == "cuda":
                torch.cuda.synchronize(plan.device)
            seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)
    return seconds / (k * float(ch.hkl.shape[1]) ** 3)


# above this (seconds of one sample, extrapolated: ~1900 beams on a 2-core CPU) solve_cost_probe times no
# sample of the plan (its figure was checked to 1100 beams, README)
PROBE_SAMPLE_S = 5.0
PROBE_BEAMS = 256  # the size of the eigendecomposition that rate is taken from


def seconds_per_n3(dtype: torch.dtype, device: torch.device, n: int = PROBE_BEAMS, op: str = "eigh") -> float:
    """Seconds per N^3 of one ``op`` on an n x n Hermitian matrix of ``dtype`` (complex) here, on one
    thread as a pass's solver workers run, for problems too large to time a sample of: "eigh" (with
    eigenvectors), the rate a pass's solves scale with (81 % of a forward pass on the quartz example),
    or "product" (a matrix product: a Jacobian's work per tangent)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, dtype=torch.float64, generator=g) + 1j * torch.randn(n, n, dtype=torch.float64, generator=g)
    a = ((a + a.mH) / 2).to(dtype if dtype.is_complex else torch.complex64).to(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers solve; two threads gain nothing at this size and lose 80x on a busy core
    try:
        run = {"eigh": lambda: torch.linalg.eigh(a), "product": lambda: a @ a}[op]
        run()  # allocations and library start-up
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / float(n) ** 3
    finally:
        torch.set_num_threads(previous)


def untimed_rate(n_beams: float, dtype: torch.dtype, device: torch.device) -> float | None:
    """For a problem whose solves reach ``n_beams``: the rate of :func:`seconds_per_n3` when one such solve
    would take over PROBE_SAMPLE_S, too long to time a sample of; else None, and at most PROBE_BEAMS
    beams the rate is not even measured (a sample costs less than its measurement)."""
    if n_beams <= PROBE_BEAMS:
        return None
    rate = seconds_per_n3(dtype, device)
    return rate if rate * float(n_beams) ** 3 > PROBE_SAMPLE_S else None


def pass_seconds(plan: DiffractionPlan, per_n3: float, workers: int | None = None) -> float:
    """Seconds a pass over the plan without gradient takes, from :func:`solve_cost_probe`'s figure:
    every sample costs per_n3 N^3 at its chunk's N, shared among the solver threads."""
    work = sum(ch.hkl.shape[0] * float(ch.hkl.shape[1]) ** 3 for ch in plan.chunks)
    return per_n3 * work / (_workers(plan) if workers is None else workers)


GRID_BLOCK_MIN = 16  # thicknesses per sample from which a uniform grid's phase factors are built in blocks


def _grid_phases(thickness: torch.Tensor, kn: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """exp(i pi t_q lam_j / K_n) (B, Q, N) for thicknesses (B, Q), K_n (B,) and real eigenvalues (B, N).
    A thickness scan's grid is uniform, t_q = t_0 + q dt: then with q = a K + b the factor is the product
    of those at t_0 + a K dt and at b dt, each from its own phase (two roundings, none accumulated), so
    cos and sin run on (Q / K + K) N phases instead of Q N (the scan's largest cost after the eigensolver;
    a scan of half the README example's frames 0.93x, benchmarks/thickness_scan.py)."""
    b_n, q_n = thickness.shape
    if q_n >= GRID_BLOCK_MIN:
        t = thickness.to(lam.dtype)
        step = t[:, 1:2] - t[:, :1]
        if bool(torch.all(torch.abs(t[:, 1:] - t[:, :-1] - step) <= 1e-6 * torch.abs(t).amax())):
            k = math.ceil(math.sqrt(q_n))
            rate = (math.pi / kn[:, None]).to(lam.dtype) * lam  # (B, N) phase per A
            big = t[:, ::k, None] * rate[:, None, :]  # (B, Q / K, N)
            small = (step * torch.arange(k, dtype=lam.dtype, device=lam.device))[:, :, None] * rate[:, None, :]
            z_big = torch.complex(torch.cos(big), torch.sin(big))
            z_small = torch.complex(torch.cos(small), torch.sin(small))
            return (z_big[:, :, None, :] * z_small[:, None, :, :]).reshape(b_n, -1, lam.shape[-1])[:, :q_n]
    phase = (math.pi * thickness / kn[:, None]).to(lam.dtype)[:, :, None] * lam[:, None, :]
    return torch.complex(torch.cos(phase), torch.sin(phase))


def _scored_values(tm: _ChunkTerms, a_mat: torch.Tensor | None, keep: list | None,
                   decomposition: tuple | None = None) -> torch.Tensor:
    """Rocking-weighted intensities (P, Q) without gradient, the waves formed only at the beams
    scored at each sample: S N Q per sample where all beams cost N^2 Q (a thickness scan's many Q).
    ``keep`` = [dtype]: the decomposition (lam, V, V^-1 or None) is appended in that dtype.
    ``decomposition``: the solver's result from an earlier pass, used as it is."""
    hermitian = tm.pot_abs is None
    if decomposition is not None:
        lam, vec, vinv = decomposition
        w = vec[..., 0, :].conj() if vinv is None else vinv[..., :, 0]
    elif hermitian:
        lam, vec = hermitian_eigh(a_mat)
        lam, vinv = lam.to(a_mat.dtype), None
        w = vec[..., 0, :].conj()
    else:
        lam, vec = torch.linalg.eig(a_mat)
        vinv = torch.linalg.inv(vec)
        w = vinv[..., :, 0]
    if keep is not None:
        for slot, x in zip(keep[1], (lam, vec, vinv)):  # into the pass's tensors, on this thread
            if slot is not None:
                slot.copy_(x)
        keep.append(True)
    beams, place = _scored_beams(tm)
    rows = torch.gather(vec, 1, beams[:, :, None].expand(-1, -1, vec.shape[-1]))  # (B,S,N)
    if vinv is None:  # real eigenvalues: exp(i pi t lam / K_n) from its phase (a complex exp costs 8x,
        # torch.polar 2x)
        expo = _grid_phases(tm.thickness, tm.kn, lam.real)
    else:
        c = _coefficients(tm.thickness, 1.0 / tm.kn, vec.dtype)  # (B,Q)
        expo = torch.exp(c[:, :, None] * lam[:, None, :])
    psi = (rows * w[:, None, :]) @ expo.mT  # (B,S,Q); w on the S scored rows, not the Q thicknesses
    if tm.m is not None:
        psi = psi * torch.gather(tm.m, 1, beams)[:, :, None].to(psi.dtype)
    inten = (psi.real ** 2 + psi.imag ** 2).to(tm.weight.dtype)
    return inten[tm.out_sample, place] * tm.weight[tm.out_sample][:, None]


def _solve_jvp(tm: _ChunkTerms, primal, tangent, hermitian: bool):
    """Values (P, Q) and tangents (T, P, Q) of a chunk piece from its matrix, thickness, 1/K_n and
    illumination factors and their T tangents (the generic forward rule of the solver, as plain
    tensor algebra: safe on worker threads)."""
    a_mat, thick, inv_kn, m = primal
    da, dthick, dinv_kn, dm = tangent
    psi, lam, vec, vinv, expo = _Propagate.forward(a_mat, thick, inv_kn, hermitian)
    # tangents that move the matrix cost two N^3 products each; the others (thickness, 1/K_n) N^2
    moves = torch.view_as_real(da).flatten(1).ne(0).any(1)
    dpsi = propagate_tangents(lam, vec, vinv, expo, thick, inv_kn, None, dthick, dinv_kn)  # (T,B,Q,N)
    if bool(moves.any()):
        live = torch.nonzero(moves)[:, 0]
        dpsi[live] = propagate_tangents(lam, vec, vinv, expo, thick, inv_kn, da[live], dthick[live], dinv_kn[live])
    mc = m.to(psi.dtype)[:, None, :]
    dpsi = dpsi * mc + psi * dm.to(psi.dtype)[:, :, None, :]
    psi = psi * mc
    inten = psi.real ** 2 + psi.imag ** 2
    d_inten = 2 * (psi.real * dpsi.real + psi.imag * dpsi.imag)
    return _rocking_values(tm, inten), _rocking_values(tm, d_inten)


def _work_items(plan: DiffractionPlan, workers: int) -> list[tuple]:
    """(chunk, sample slice) pieces: each chunk cut into ``workers`` equal runs of samples, so the
    pieces balance across threads (one piece per chunk, no slice, for one worker)."""
    if workers <= 1:
        return [(ch, None) for ch in plan.chunks]
    return [(ch, sl) for ch in plan.chunks for sl in split_evenly(ch.hkl.shape[0], workers)]


def _piece_intensities(plan, piece, inputs, absorption_method, keep=None, decomposition=None):
    ch, sl = piece
    return _chunk_intensities(plan, ch, inputs[0], inputs[1], FrameState(*inputs[2:]), absorption_method, sl, keep,
                              decomposition)


class Decompositions:
    """Eigendecompositions of every sample's structure matrix at one set of inputs, kept by a
    forward pass without gradient so that a Jacobian at the same inputs need not redo them: per
    chunk, lam (B, N), V (B, N, N) and, for general (absorbing) matrices, V^-1, in ``dtype``."""

    def __init__(self, dtype: torch.dtype = torch.complex64):
        self.dtype = dtype
        self.chunks: list[tuple] = []

    def slots(self, plan: DiffractionPlan, pieces: list, general: bool) -> list[list]:
        """For each of a pass's pieces, [dtype, (lam, V, V^-1 or None) slices of this set's tensors]:
        the piece writes its decompositions there (on its worker thread; the tensors are allocated
        here, chunk by chunk), then appends True. ``general``: V^-1 too (non-Hermitian matrices)."""
        self.chunks = [(torch.empty(ch.hkl.shape[:2], dtype=self.dtype, device=ch.hkl.device),
                        torch.empty((*ch.hkl.shape[:2], ch.hkl.shape[1]), dtype=self.dtype, device=ch.hkl.device),
                        torch.empty((*ch.hkl.shape[:2], ch.hkl.shape[1]), dtype=self.dtype, device=ch.hkl.device)
                        if general else None) for ch in plan.chunks]
        where = {id(ch): i for i, ch in enumerate(plan.chunks)}
        return [[self.dtype, tuple(None if x is None else x[slice(None) if sl is None else sl]
                                   for x in self.chunks[where[id(ch)]])] for ch, sl in pieces]

    def take(self, kept: list[list]) -> None:
        """Keep the set once every piece wrote its part (see :meth:`slots`), else none."""
        if not all(len(k) > 2 for k in kept):
            self.chunks = []

    def piece(self, chunk_index: int, sl: slice) -> tuple:
        return tuple(None if x is None else x[sl] for x in self.chunks[chunk_index])

    def take_frames(self, plan: DiffractionPlan, other: "Decompositions", frames: torch.Tensor,
                    source: list | None = None) -> None:
        """Replace, in place, the samples of the ``frames`` (F,) bool mask by those of ``other``: of
        the same plan, or (``source`` from :func:`frame_subplan`) of a plan cut from it."""
        if source is None:
            source = [(i, None) for i in range(len(plan.chunks))]
        for (ci, pos), theirs in zip(source, other.chunks):
            fr = plan.chunks[ci].frame if pos is None else plan.chunks[ci].frame[pos]
            sel = frames.to(fr.device)[fr]
            at = sel if pos is None else pos[sel]
            for x, y in zip(self.chunks[ci], theirs):
                if x is not None:
                    x[at] = y[sel]


# A pass with gradient whose pieces' graphs would take more than this share of the device's memory
# keeps none: each piece is solved again in the backward pass, one graph per worker alive at a time.
# The graphs take ~70 bytes per structure-matrix element (samples x N^2 x thickness points) in single
# or double precision: simulated corundum (97 beams, 6138 samples, 5.8e7 elements) 4.5 GB in double,
# paracetamol on 5 frames at 42 tilts (2.6e8) 17 GB in single. Solving again costs a forward pass:
# paracetamol 102 s and 17 GB per gradient with the graphs, 143 s and 3.2 GB without.
GRAPH_MEMORY_SHARE = 0.25
GRAPH_BYTES_PER_ELEMENT = 70


def _graph_elements(plan: DiffractionPlan, q: int) -> float:
    return float(sum(ch.hkl.shape[0] * ch.hkl.shape[1] ** 2 for ch in plan.chunks)) * q


def _graphs_too_large(plan: DiffractionPlan, q: int) -> bool:
    """Whether a pass's graphs would exceed GRAPH_MEMORY_SHARE of its device's memory."""
    return _graph_elements(plan, q) * GRAPH_BYTES_PER_ELEMENT > GRAPH_MEMORY_SHARE * device_memory(plan.device)


class _ParallelFrames(torch.autograd.Function):
    """Frame intensities (R, Q) with the pieces solved on several threads, forward and backward.

    Each piece records its own graph from its own detached copies of the inputs; the backward pass
    pulls the output gradient through every piece's graph on the worker threads and sums. Only
    first derivatives pass through it (forward-mode and higher derivatives use the one-thread path).
    A large pass (:data:`GRAPH_MEMORY_SHARE`) keeps no graph: the forward pass solves without
    one, and the backward pass solves each piece again with its graph and pulls through it at once
    (one forward pass more, the memory of a few pieces instead of all).
    """

    @staticmethod
    def forward(ctx, plan, absorption_method, workers, *inputs):
        pieces = _work_items(plan, workers)
        ref = inputs[0]
        out = torch.zeros((len(plan.scored.row), inputs[5].shape[1]), dtype=ref.real.dtype, device=ref.device)
        ctx.recompute = _graphs_too_large(plan, inputs[5].shape[1])
        if ctx.recompute:
            done = parallel_map(lambda piece: _piece_intensities(plan, piece, inputs, absorption_method),
                                pieces, workers, grad=False)
            add_rows(out, ((rows, vals) for vals, rows in done))
            ctx.plan, ctx.absorption_method, ctx.pieces, ctx.workers = plan, absorption_method, pieces, workers
            ctx.inputs = [None if x is None else x.detach() for x in inputs]
            return out

        def run(piece):
            leaves = [None if x is None else x.detach().requires_grad_(x.requires_grad) for x in inputs]
            vals, rows = _piece_intensities(plan, piece, leaves, absorption_method)
            return leaves, vals, rows

        done = parallel_map(run, pieces, workers, grad=True)
        add_rows(out, ((rows, vals.detach()) for _, vals, rows in done))
        ctx.done, ctx.workers = done, workers
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        if ctx.recompute:
            def again(piece):  # this piece's graph, pulled through and dropped
                leaves = [None if x is None else x.detach().requires_grad_(i in wanted) for i, x in enumerate(ctx.inputs)]
                vals, rows = _piece_intensities(ctx.plan, piece, leaves, ctx.absorption_method)
                return torch.autograd.grad(vals, [leaves[i] for i in wanted], grad_out[rows], allow_unused=True)

            parts_of = parallel_map(again, ctx.pieces, ctx.workers, grad=True)
        else:
            def pull(item):
                leaves, vals, rows = item
                targets = [leaves[i] for i in wanted]
                # retained: the caller may pull again through the same graph (gradcheck does); the pieces
                # are freed with the output
                return torch.autograd.grad(vals, targets, grad_out[rows], retain_graph=True, allow_unused=True)

            parts_of = parallel_map(pull, ctx.done, ctx.workers, grad=False)

        grads = [None] * (len(ctx.needs_input_grad) - 3)
        for parts in parts_of:
            for i, g in zip(wanted, parts):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
        return (None, None, None, *grads)


def simulate_frames(plan: DiffractionPlan, potential: torch.Tensor, potential_abs: torch.Tensor | None,
                    state: FrameState, *, absorption_method: AbsorptionMethod = "exact",
                    per_thickness: bool = False, keep: Decompositions | None = None,
                    decompositions: Decompositions | None = None) -> torch.Tensor:
    """Calculated intensities of the scored reflections, integrated over each frame's samples.

    potential (M,) complex U over ``plan.potential_hkl`` (1/A^2); potential_abs (M,) or None.
    Returns (R,) or, with ``per_thickness``, (R, Q) without the thickness average. The solves run
    on :func:`solver_workers` threads. ``keep`` collects the eigendecompositions (a pass without
    gradient, no or exact absorption) for :func:`simulate_frames_jvp` at the same inputs;
    ``decompositions``, kept so by an earlier pass whose matrices these are (e.g. at other thicknesses:
    the structure matrix does not depend on them), replace the solver in a pass without gradient.
    """
    rtype = potential.real.dtype
    home = potential.device
    potential, potential_abs, state = _to_device(plan.device, potential, potential_abs, state)
    inputs = (potential, potential_abs, *state.tensors())
    workers = _workers(plan)
    recording = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    if recording and (workers > 1 or (not transforms_active() and _graphs_too_large(plan, state.thickness.shape[1]))):
        out = _ParallelFrames.apply(plan, absorption_method, workers, *inputs)
    else:
        out = torch.zeros((len(plan.scored.row), state.thickness.shape[1]), dtype=rtype, device=plan.device)
        pieces = _work_items(plan, workers)
        keeping = keep is not None and not recording and (potential_abs is None or absorption_method == "exact")
        kept = keep.slots(plan, pieces, potential_abs is not None) if keeping else [None] * len(pieces)
        given = [None] * len(pieces)
        if decompositions is not None and not recording:
            where = {id(ch): i for i, ch in enumerate(plan.chunks)}
            given = [decompositions.piece(where[id(ch)], slice(None) if sl is None else sl) for ch, sl in pieces]
        done = parallel_map(lambda item: _piece_intensities(plan, item[0], inputs, absorption_method, item[1], item[2]),
                            list(zip(pieces, kept, given)), workers)
        add_rows(out, ((rows, vals.to(out.dtype)) for vals, rows in done))
        if keeping:
            keep.take(kept)
    if per_thickness:
        return out.to(home)
    return torch.sum(out * state.thickness_weight[_scored_frames(plan)], -1).to(home)


def _to_device(device: torch.device, potential, potential_abs, state: FrameState):
    """The inputs of a simulation on the plan's device (differentiable moves; no copy when there)."""
    def move(x):
        return None if x is None else x.to(device)

    return move(potential), move(potential_abs), state.to(device)


def _workers(plan: DiffractionPlan) -> int:
    """Solver threads: several on a CPU; one on an accelerator, where one batched call per chunk
    already fills the device."""
    return 1 if transforms_active() or plan.device.type != "cpu" else solver_workers()


def _scored_frames(plan: DiffractionPlan) -> torch.Tensor:
    """(R,) frame index of each scored reflection, on the plan's device."""
    return torch.as_tensor(plan.scored.frame, device=plan.device)


# Real potential tangents (a centrosymmetric crystal's) at or above this count go through
# _potential_contraction (one scatter of N^3 products) instead of one matrix product each (T' N^3);
# complex ones from half of it, as their products cost twice as much. Break-even on a 2-core CPU with
# the cache-sized contraction blocks (session 31): paracetamol, 2 frames of 42 tilts, real tangents,
# products 4.5 s against 6.4 s contracted at 44 tangents, 10.1 s against 6.9 s at 80; quartz, complex,
# 0.78 s against 1.45 s at 14 tangents.
CONTRACTION_MIN_TANGENTS = 56
FRIEDEL_BINS = True  # real tangents: h and -h share a coefficient in the contraction (friedel_rows)


def contraction_threshold(real_tangents: bool) -> int:
    """How many potential tangents make the Jacobian contract the potential (see CONTRACTION_MIN_TANGENTS)."""
    return CONTRACTION_MIN_TANGENTS if real_tangents else CONTRACTION_MIN_TANGENTS // 2


def _potential_rows(dpot: torch.Tensor, live: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, N, N T') potential tangents laid out g[b, r, (c, t)] = dpot[live[t], idx[b, r, c]] for the
    tangents ``live`` of dpot (T, K) at pair indices idx (B, N, N) (a chunk's, or their transpose):
    contiguous row copies of a (K, T') table, the layout of one matrix product of width N T' per
    sample (a 4-d gather of dP (B, T', N, N) costs as much as the products themselves)."""
    b, n = idx.shape[0], idx.shape[-1]
    return dpot[live].T.contiguous().index_select(0, idx.reshape(-1)).view(b, n, n * len(live))


def _potential_contraction(left: torch.Tensor, right: torch.Tensor, idx: torch.Tensor,
                           max_elements: float = 5e5) -> tuple[torch.Tensor, torch.Tensor]:
    """G (B, N, M') and the potential indices (B, M') it refers to, such that for any tangent dpot
    of the potential  sum_kl left[i,k] dpot[idx[k,l]] right[l,i] = sum_m G[i,m] dpot[uniq[m]].

    A sample's N^2 pairs share only M' << N^2 distinct potential entries (differences of beams near
    one zone), so many tangents then cost N M' each after one scatter of the N^3 products, instead
    of one N^3 matrix product each. Padding entries of ``uniq`` repeat the largest index."""
    b, n, _ = idx.shape
    flat = idx.reshape(b, n * n).long()
    # each entry's rank among its sample's distinct entries, from a table of the entries present (the
    # indices are bounded by the potential's rows): 6x faster than sorting the N^2 entries; the tables
    # for at most 4e6 entries at a time (samples x potential rows)
    size = int(flat.max()) + 1
    local, distinct = torch.empty_like(flat), flat.new_empty(b)
    step = max(1, int(4e6 // size))
    for s0 in range(0, b, step):
        s1 = min(b, s0 + step)
        present = torch.zeros((s1 - s0, size), dtype=torch.bool, device=flat.device).scatter_(1, flat[s0:s1], True)
        rank = present.cumsum(1) - 1
        local[s0:s1] = torch.gather(rank, 1, flat[s0:s1])
        distinct[s0:s1] = rank[:, -1] + 1
    m_loc = int(distinct.max())
    uniq = flat.amax(1, keepdim=True).expand(b, m_loc).clone().scatter_(1, local, flat)
    g_table = torch.zeros((b, n, m_loc), dtype=left.dtype, device=left.device)
    right_t = right.mT
    # products and scatter in blocks of at most max_elements (samples x rows i x N^2): a block that stays
    # in cache scatters 1.6-2.9x faster than 4e6 did (N = 200-554, one thread)
    if n ** 3 <= max_elements:
        sample_step, row_step = max(1, int(max_elements // n ** 3)), n
    else:
        sample_step, row_step = 1, max(1, int(max_elements // (n * n)))
    for s0 in range(0, b, sample_step):
        s1 = min(b, s0 + sample_step)
        for i0 in range(0, n, row_step):
            i1 = min(n, i0 + row_step)
            prod = left[s0:s1, i0:i1, :, None] * right_t[s0:s1, i0:i1, None, :]  # (B', i, k, l)
            g_table[s0:s1, i0:i1].scatter_add_(2, local[s0:s1].view(s1 - s0, 1, n * n).expand(s1 - s0, i1 - i0, n * n),
                                               prod.reshape(s1 - s0, i1 - i0, n * n))
    return g_table, uniq


def _fused_decomposition(tm: _ChunkTerms, pot, diag, m, diag_w, hermitian: bool, decomposition=None):
    """(a0 or None, C or None, X or None, M, lam, V, V^-1) of A = M a0 M, a0 = P + D (- C with Bethe
    beams, C = P_sw X, X = D_w^-1 P_ws). ``decomposition`` (lam, V, V^-1 or None), kept by a forward
    pass at the same inputs, replaces the eigensolver; a0 is then not formed (None: see
    :func:`_unscaled_matrix`)."""
    ctype = pot.dtype
    corr = x = None
    if tm.weak_idx is not None:  # A = M (P - C + D) M (see _bethe_correction)
        corr, x = _bethe_correction(pot, tm.weak_idx, diag_w)
    mc = m.to(ctype)
    if decomposition is not None:
        lam, vec, vinv = (None if y is None else y.to(ctype) for y in decomposition)
        return None, corr, x, mc, lam, vec, vec.mH if vinv is None else vinv
    a0 = _unscaled_matrix(tm, pot, diag, corr)
    a_mat = a0 * (mc[:, :, None] * mc[:, None, :])
    if hermitian:
        lam, vec = hermitian_eigh(a_mat)
        return a0, corr, x, mc, lam.to(ctype), vec, vec.mH
    lam, vec = torch.linalg.eig(a_mat)
    return a0, corr, x, mc, lam, vec, torch.linalg.inv(vec)


def _scored_beams(tm: _ChunkTerms):
    """(B, S) the beams scored at each sample (padded with beam 0) and each pair's place among them:
    the pairs come sorted by sample."""
    b = tm.diag.shape[0]
    counts = torch.bincount(tm.out_sample, minlength=b)
    start = torch.cumsum(counts, 0) - counts
    place = torch.arange(len(tm.out_sample), device=counts.device) - start[tm.out_sample]
    beams = torch.zeros((b, max(1, int(counts.max()) if b else 1)), dtype=torch.long, device=counts.device)
    beams[tm.out_sample, place] = tm.out_beam
    return beams, place


def _fused_points_jvp(tm: _ChunkTerms, primal, tangent, hermitian: bool = True, decomposition=None):
    """Intensities (P, Q) and tangents (T, P, Q) at several thicknesses per sample from the values and
    tangents of the cheap inputs (as :func:`_fused_jvp`). The tangents of A are formed here in plain
    algebra, only for the tangents that move it (N^2 each, where forward AD through the matrix build
    formed all of them on one thread), then the solver's generic forward rule: two N^3 products per
    moving tangent and a few (N x N)(N x Q) products; thickness-only tangents cost S Q each. Waves
    are mapped back only to the S beams scored at each sample."""
    (pot, diag, m, kn, thick, diag_w), (dpot, ddiag, dm, dkn, dthick, ddiag_w) = primal, tangent
    ctype = pot.dtype
    with torch.no_grad():
        a0, corr, x, mc, lam, vec, vinv = _fused_decomposition(tm, pot, diag, m, diag_w, hermitian, decomposition)
        beams, place = _scored_beams(tm)
        inv_kn = 1.0 / kn
        expo = torch.exp(_coefficients(thick, inv_kn, ctype)[..., :, None] * lam[..., None, :])  # (B,Q,N)
        rows = torch.gather(vec, 1, beams[..., None].expand(beams.shape + vec.shape[-1:]))  # (B,S,N)
        psi_in = (expo * vinv[:, None, :, 0]) @ rows.mT  # (B,Q,S) before the illumination factors
        dinv_kn = -dkn * inv_kn ** 2
        dpsi = propagate_tangents(lam, vec, vinv, expo, thick, inv_kn, None, dthick, dinv_kn, beams)  # (T,B,Q,S)
        flat = [(d != 0).flatten(1).any(1) for d in (dpot, ddiag, dm) + (() if x is None else (ddiag_w,))]
        moving = torch.stack(flat)
        if x is None and len(moving) and bool(moving[0].any()):
            # tangents that move only the potential: (V^-1 dA V) w = (V^-1 M) dP (M V w) as two products of
            # width N T' per sample on dP gathered as rows of a (K, T') table, no 4-d gather or dA formed
            only_pot = moving[0] & ~moving[1:].any(0)
            pot_live = torch.nonzero(only_pot)[:, 0]
            if len(pot_live):
                b, n, n_t = vec.shape[0], vec.shape[-1], len(pot_live)
                vinv_m = vinv * mc[:, None, :]
                vw_m = mc[:, :, None] * (vec * vinv[:, None, :, 0])
                z = (vinv_m @ _potential_rows(dpot, pot_live, tm.idx)).view(b, n, n, n_t).transpose(-1, -2).reshape(b, n * n_t, n)  # [b, (i, t), k]
                basis = (z @ vw_m).view(b, n, n_t, n).permute(2, 0, 1, 3)  # (T', B, N, N)
                dpsi[pot_live] = propagate_tangents(lam, vec, vinv, expo, thick, inv_kn, None, dthick[pot_live],
                                                    dinv_kn[pot_live], beams, basis_tangent=basis)
                moving = moving.clone()
                moving[:, pot_live] = False
        live = torch.nonzero(moving.any(0))[:, 0]
        if len(live):
            d_a0 = dpot[live][:, tm.idx]  # (L,B,N,N), a new tensor
            d_diag = ddiag[live]
            if bool((d_diag != 0).any()):
                d_a0.diagonal(dim1=-2, dim2=-1).add_(d_diag.to(ctype))
            if x is not None:  # -dC = -(dP_sw X + (dP_sw X)^H) + X^H dD_w X
                z = dpot[live][:, tm.weak_idx] @ x
                d_a0 = d_a0 - z - z.mH + x.mH @ (ddiag_w[live].to(ctype)[..., None] * x)
            da = d_a0 * (mc[:, :, None] * mc[:, None, :])  # dA = M da0 M + dM a0 M + M a0 dM
            dml = dm[live]
            if bool((dml != 0).any()):
                dml = dml.to(ctype)
                if a0 is None:
                    a0 = _unscaled_matrix(tm, pot, diag, corr)
                da = da + dml[..., :, None] * (a0 * mc[:, None, :]) + (mc[:, :, None] * a0) * dml[..., None, :]
            dpsi[live] = propagate_tangents(lam, vec, vinv, expo, thick, inv_kn, da, dthick[live], dinv_kn[live],
                                            beams)
        m_s, dm_s = torch.gather(mc, 1, beams), torch.gather(dm.to(ctype), 2, beams.expand(dm.shape[:1] + beams.shape))
        dpsi = dpsi * m_s[:, None, :] + psi_in * dm_s[:, :, None, :]
        psi = psi_in * m_s[:, None, :]
        inten = psi.real ** 2 + psi.imag ** 2
        d_inten = 2 * (psi.real * dpsi.real + psi.imag * dpsi.imag)
    return _rocking_values(tm, inten, place), _rocking_values(tm, d_inten, place)


def _times_rows(lhs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """lhs @ rows for complex lhs; real rows (a centrosymmetric crystal's potential tangents) take two
    real products, half the arithmetic of one complex product."""
    if rows.is_complex():
        return lhs @ rows
    return torch.complex(lhs.real @ rows, lhs.imag @ rows)


def _potential_core(dpot, live, idx, pair_set, hm, vinv_m) -> torch.Tensor:
    """(T', B, N) sum_kl (V^-1 M)_ik dP_t[idx_kl] (M H)_li for the potential tangents ``live``: one product
    of width N T' per sample on rows d[l, (k, t)] = dP_t[idx_kl]. Samples that share their pair indices
    (``pair_set``: a segment's beam set) share these rows, gathered once per set; their H' stack into
    one product per set, (G N, N) by (N, N T'), by sets of equal size G (the gather of a row per sample
    had cost half as much as the products)."""
    b, n = idx.shape[:2]
    if pair_set is None:
        y = _times_rows(hm.mT, _potential_rows(dpot, live, idx.mT)).view(b, n, n, len(live))
        return torch.einsum("bik,bikt->tbi", vinv_m, y)
    _, size, order, start = _beam_sets(pair_set)
    core = vinv_m.new_empty((len(live), b, n))
    for g in torch.unique(size).tolist():
        sets = torch.nonzero(size == g)[:, 0]
        members = order[start[sets, None] + torch.arange(g, device=idx.device)]  # (S_g, g) samples
        rows = _potential_rows(dpot, live, idx[members[:, 0]].mT)  # (S_g, N, N T')
        lhs = hm[members.reshape(-1)].mT.reshape(len(sets), g * n, n)
        y = _times_rows(lhs, rows).view(len(sets) * g, n, n, len(live))
        core[:, members.reshape(-1)] = torch.einsum("bik,bikt->tbi", vinv_m[members.reshape(-1)], y)
    return core


def _fused_jvp(tm: _ChunkTerms, primal, tangent, hermitian: bool, decomposition, live: torch.Tensor,
               moving: torch.Tensor, real_tangents: bool = False, pair_rows: torch.Tensor | None = None):
    """Intensities (P, 1) and tangents (T, P, 1) of a chunk piece at one thickness per sample from the
    values and tangents of its cheap inputs (pot, diag, m, kn, thickness, weak diag). Exact
    absorption (``hermitian`` False) comes in as pot = U + i U' and a complex diag (+ i U'_0): the
    same algebra holds for any diagonalisable matrix, with eig and V^-1 in place of eigh and V^H.

    The tangents of the structure matrix are never formed: with A = M (P + D) M and the divided
    differences G of exp folded into H_li = sum_j V_lj w_j G_ij, a tangent contributes to the
    eigenbasis amplitudes dpsi'_i = sum_kl (V^-1)_ik dA_kl H_li, which splits into one matrix product
    for the potential part (dP, one per tangent, or the potential contraction), and matrix-vector
    products with tables shared by every tangent for the diagonal (D: excitation errors) and the
    illumination factors (M). Plain tensor algebra, safe on worker threads. ``live`` and ``moving``
    (index tensors, found once per Jacobian) name the tangents that move the potential and those
    that move the diagonal, illumination or weak-beam inputs: the others' terms are zero and skipped.
    ``real_tangents``: the potential tangents are real (a centrosymmetric crystal), so their products
    with the complex H take two real products each (:func:`_times_rows`). ``pair_rows`` (real tangents
    only; :func:`friedel_rows`) maps each potential row to the one the contraction bins it with.
    """
    if primal[4].shape[1] > 1:
        return _fused_points_jvp(tm, primal, tangent, hermitian, decomposition)
    (pot, diag, m, kn, thick, diag_w), (dpot, ddiag, dm, dkn, dthick, ddiag_w) = primal, tangent
    ctype = pot.dtype
    with torch.no_grad():
        _, _, x, mc, lam, vec, vinv = _fused_decomposition(tm, pot, diag, m, diag_w, hermitian, decomposition)
        bethe = x is not None
        w = vinv[:, :, 0]
        inv_kn = (1.0 / kn).to(ctype)
        c = (1j * math.pi) * thick.to(ctype) * inv_kn[:, None]  # (B,1)
        e = torch.exp(c * lam)  # (B,N)
        psi_in = torch.einsum("bgi,bi->bg", vec, e * w)  # before the illumination factors
        psi = psi_in * mc
        if hermitian:  # H (B,N,N)
            h = divided_differences_folded(vec * w[:, None, :], lam.real, c.imag)
        else:
            h = (vec * w[:, None, :]) @ divided_differences(lam, c).mT
        hm = mc[:, :, None] * h  # M H
        vinv_m = vinv * mc[:, None, :]  # V^-1 M
        (b, n), n_t = diag.shape, dpot.shape[0]
        core = torch.zeros((n_t, b, n), dtype=ctype, device=diag.device)
        if len(live) and not bethe and len(live) >= contraction_threshold(real_tangents):
            g_table, uniq = _potential_contraction(vinv_m, hm, tm.idx if pair_rows is None else pair_rows[tm.idx])
            core[live] = torch.einsum("bim,tbm->tbi", g_table, dpot[live][:, uniq])
        elif len(live):
            if bethe:  # dC = dP_sw X + (dP_sw X)^H for a potential tangent (P hermitian)
                d_p = dpot[live[None, :, None, None], tm.idx[:, None]]  # dP (B,T',N,N)
                n_w = x.shape[1]
                d_sw = dpot[live[None, :, None, None], tm.weak_idx[:, None]]  # (B,T',N,W)
                z = (d_sw.reshape(b, len(live) * n, n_w) @ x).view(b, len(live), n, n)
                d_p = d_p - z - z.mH
                y = (d_p.reshape(b, len(live) * n, n) @ hm).view(b, len(live), n, n)  # width T'N per sample
                core[live] = torch.sum(vinv_m[:, None] * y.mT, -1).transpose(0, 1)
            else:  # one product of width N T' per sample on d[b, l, (k, t)] = dP_t[b, k, l] (the transposed
                # pair indices), y[b, i, k, t] = sum_l H'_li dP_t[b, k, l]; 8-10 % faster than the other order
                table = dpot.real if real_tangents else dpot
                core[live] = _potential_core(table, live, tm.idx, tm.pair_set, hm, vinv_m)
        if len(moving):
            core[moving] += torch.einsum("bik,tbk->tbi", vinv_m * hm.mT, ddiag[moving].to(ctype))
        if bethe and len(moving):  # -dC = X^H dD_w X for a weak beam's excitation error
            k_w = (vinv_m @ x.mH) * (x @ hm).mT  # (B,N,W)
            core[moving] += torch.einsum("biw,tbw->tbi", k_w, ddiag_w[moving].to(ctype))
        # illumination factors: dA = dM a0 M + M a0 dM. With A = M a0 M = V Lam V^-1, V^-1 M a0 =
        # Lam V^-1 M^-1, and (divided differences: l_i G_ij - G_ij l_j = e_i - e_j) a0 M H =
        # M^-1 (H Lam - e_0 e^T + psi_in 1^T): both tables without an N^3 product
        moving_m = moving[(dm[moving] != 0).flatten(1).any(1)] if len(moving) else moving
        if len(moving_m):  # (illumination factors are constant 1 without the non-parallel correction)
            a0_hm = h * lam[:, None, :] + psi_in[:, :, None]
            a0_hm[:, 0, :] -= e
            a0_hm = a0_hm / mc[:, :, None]
            k_m = vinv * a0_hm.mT + (lam[:, :, None] * vinv / mc[:, None, :]) * h.mT
            core[moving_m] += torch.einsum("bik,tbk->tbi", k_m, dm[moving_m].to(ctype))
        dc = (1j * math.pi) * (dthick[..., 0].to(ctype) * inv_kn - thick[:, 0].to(ctype) * dkn.to(ctype) * inv_kn ** 2)
        core = core + (lam * w * e) * dc[..., None]
        dpsi = torch.einsum("bgi,tbi->tbg", vec, core) * mc + psi_in * dm.to(ctype)
        inten = psi.real ** 2 + psi.imag ** 2
        d_inten = 2 * (psi.real * dpsi.real + psi.imag * dpsi.imag)
        wt = tm.weight[tm.out_sample]
        vals = inten[tm.out_sample, tm.out_beam] * wt
        dvals = d_inten[:, tm.out_sample, tm.out_beam] * wt
    return vals[:, None], dvals[..., None]


def simulate_frames_jvp(plan: DiffractionPlan, potential: torch.Tensor, potential_abs: torch.Tensor | None,
                        state: FrameState, tangents: list[tuple], *, absorption_method: AbsorptionMethod = "exact",
                        batch_elements: float | None = None, fused_rule: bool = True,
                        decompositions: Decompositions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Intensities (R,) and their directional derivatives (R, T) along T tangents, forward mode.

    Each tangent is ``(d_potential, d_potential_abs, d_state_tensors)`` matching
    ``(potential, potential_abs, state.tensors())`` (None where a part is fixed). One
    eigendecomposition per sample serves every tangent; samples are batched so that
    samples x N^2 x T stays below ``batch_elements`` (default 2e6, times the device's
    :func:`~blochflow.physics.device.work_scale`). Elastic or with exact absorption (without
    Bethe beams), the fused rules of :func:`_fused_jvp` are used (``fused_rule``): forward AD only
    through the cheap inputs of the structure matrices, the rest in plain algebra on the workers;
    else forward AD through the matrices and the solver's generic forward rule. The fused rules take
    the eigendecompositions from ``decompositions`` when a forward pass at the same inputs kept them.
    """
    home = potential.device
    potential, potential_abs, state = _to_device(plan.device, potential, potential_abs, state)
    tangents = [(None if a is None else a.to(plan.device), None if b is None else b.to(plan.device),
                 tuple(None if x is None else x.to(plan.device) for x in c)) for a, b, c in tangents]
    # Tangents that move nothing but the frames' thickness points (and their weights), like a learned
    # distribution's logits, go through the solver as one: with dt = 1 at every point it gives dI/dt_q
    # per reflection and point, and each such tangent is dt[f, q] times that. Exact, because a point's
    # intensities depend on the thickness only through its own t_q, the same for every tilt of a frame.
    pointwise = [i for i, t in enumerate(tangents) if _moves_only_thickness(t)]
    through = sorted(set(range(len(tangents))) - set(pointwise))
    solved = [tangents[i] for i in through]
    if pointwise:
        solved.append((None, None, tuple(torch.ones_like(x) if k == 3 else None
                                         for k, x in enumerate(state.tensors()))))
    out, d_solved = _frames_jvp_per_point(plan, potential, potential_abs, state, solved,
                                          absorption_method=absorption_method, batch_elements=batch_elements,
                                          fused_rule=fused_rule, decompositions=decompositions)
    frame = _scored_frames(plan)
    d_out = torch.zeros(out.shape + (len(tangents),), dtype=out.dtype, device=out.device)
    if through:
        d_out[..., through] = d_solved[..., :len(through)]
    for i in pointwise:
        dt = tangents[i][2][3]
        if dt is not None:
            d_out[..., i] = dt.to(out.dtype)[frame] * d_solved[..., -1]
    w = state.thickness_weight[frame]  # (R,Q)
    ic = torch.sum(out * w, -1)
    d_ic = torch.einsum("rqt,rq->rt", d_out, w)
    for i, t in enumerate(tangents):
        if t[2][4] is not None:
            d_ic[:, i] += torch.sum(t[2][4].to(out.dtype)[frame] * out, -1)
    return ic.to(home), d_ic.to(home)


def _moves_only_thickness(tangent) -> bool:
    """Whether a tangent (d_potential, d_potential_abs, d_state) moves nothing but thickness points and
    their weights (state entries 3 and 4)."""
    d_pot, d_abs, d_state = tangent
    if any(x is not None and bool((x != 0).any()) for x in (d_pot, d_abs)):
        return False
    return not any(x is not None and bool((x != 0).any()) for k, x in enumerate(d_state) if k not in (3, 4))


def _frames_jvp_per_point(plan: DiffractionPlan, potential, potential_abs, state: FrameState, tangents: list[tuple],
                          *, absorption_method: AbsorptionMethod, batch_elements, fused_rule: bool,
                          decompositions) -> tuple[torch.Tensor, torch.Tensor]:
    """Intensities (R, Q) and tangents (R, Q, T) at each thickness point, before the points' weights
    (inputs already on the plan's device): the body of :func:`simulate_frames_jvp`."""
    from torch.func import jvp, vmap

    n_t = len(tangents)
    primals = (potential, potential_abs, tuple(None if x is None else x.contiguous() for x in state.tensors()))

    def stack(parts, primal):  # (T, ...) tangents of one input; zeros where a tangent is None
        if primal is None:
            return None
        return torch.stack([torch.zeros_like(primal) if p is None else p for p in parts])

    t_pot = stack([t[0] for t in tangents], potential)
    t_pot_abs = stack([t[1] for t in tangents], potential_abs)
    t_state = tuple(stack([t[2][i] for t in tangents], x) for i, x in enumerate(primals[2]))

    rtype = potential.real.dtype
    n_refl, q = len(plan.scored.row), state.thickness.shape[1]
    out = torch.zeros((n_refl, q), dtype=rtype, device=plan.device)
    d_out = torch.zeros((n_refl, q, n_t), dtype=rtype, device=plan.device)
    state_idx = [i for i, x in enumerate(primals[2]) if x is not None]
    has_abs = potential_abs is not None
    prim_args = (potential,) + ((potential_abs,) if has_abs else ()) + tuple(primals[2][i] for i in state_idx)
    tan_args = (t_pot,) + ((t_pot_abs,) if has_abs else ()) + tuple(t_state[i] for i in state_idx)
    # the fused rules: elastic or exact absorption, no Bethe beams with absorption
    fast = fused_rule and (not has_abs or (
        absorption_method == "exact" and all(ch.weak_hkl is None for ch in plan.chunks)))
    workers = _workers(plan)
    if batch_elements is None:
        batch_elements = 2e6 * work_scale(plan.device)
    pieces = []
    for ch in plan.chunks:
        b_total, n = ch.hkl.shape[0], ch.hkl.shape[1]
        n_w = 0 if ch.weak_hkl is None else ch.weak_hkl.shape[1]
        step = max(1, int(batch_elements // (n * (n + n_w) * n_t)))
        step = min(step, -(-b_total // workers))  # at least one piece per worker
        pieces += [(ch, slice(b0, min(b0 + step, b_total))) for b0 in range(0, b_total, step)]

    def unpack(args):  # flat primal or tangent args -> (potential, potential_abs, FrameState)
        full = list(primals[2])
        for i, v in zip(state_idx, args[1 + has_abs:]):
            full[i] = v
        return args[0], (args[1] if has_abs else None), FrameState(*full)

    def forward_ad(fn, only=None):  # values and T tangents of fn(*prim_args), forward AD (one thread only);
        # ``only`` (T,) bool: the tangents that can move fn's value, the rest are zero and not pushed through
        if only is None or bool(only.all()):
            return vmap(lambda *t: jvp(fn, prim_args, t), out_dims=(None, 0))(*tan_args)
        if not bool(only.any()):
            value = fn(*prim_args)
            return value, tuple(x.new_zeros((n_t, *x.shape)) for x in value)
        value, part = vmap(lambda *t: jvp(fn, prim_args, t), out_dims=(None, 0))(*(x[only] for x in tan_args))
        full = []
        for x in part:
            z = x.new_zeros((n_t, *x.shape[1:]))
            z[only] = x
            full.append(z)
        return value, tuple(full)

    if fast:  # forward AD on this thread, once per chunk; eigendecompositions and products on the workers
        reuse = decompositions if decompositions is not None and decompositions.chunks else None

        def padded_potential(*args):  # (M+1,), as _chunk_terms pads it
            pot, pot_abs, _ = unpack(args)
            if pot_abs is None:
                return _padded(pot)
            return _padded(pot) + 1j * _padded(pot_abs)  # A = M (U + i U' + D + i U'_0) M, one general matrix

        # the same for every chunk: one (T, M+1) tangent table shared by all pieces (per chunk it
        # was a copy each, 12 GB for paracetamol's 50 frames)
        pot_primal, pot_tangent = forward_ad(padded_potential)
        # the chunk terms (excitation errors, illumination, wave number, thickness) see the potential
        # only through its entry 0, U_0 + i U'_0 (the wave number, the mean absorption): atomic
        # positions and ADPs leave it alone, and most tangents of a structure refinement are those
        moves_terms = pot_tangent[:, 0] != 0
        for x in tan_args[1 + has_abs:]:  # the frame state's
            moves_terms = moves_terms | (x != 0).flatten(1).any(1)
        # forward AD only of the per-sample geometry, once for every sample; the beams' terms take their
        # tangents in closed form per chunk (:func:`_beam_terms_tangent`)
        chunk_samples = torch.cat([ch.sample for ch in plan.chunks])
        chunk_frames = torch.cat([ch.frame for ch in plan.chunks])
        rtype = potential.real.dtype

        def geometry_of(*args):
            pot, _, st = unpack(args)
            return _sample_geometry(plan, chunk_samples, chunk_frames, pot[0], st, rtype)

        geo, d_geo = forward_ad(geometry_of, moves_terms)
        geo_live = torch.nonzero(moves_terms)[:, 0]
        thick_t = t_state[3]
        live = torch.nonzero((pot_tangent != 0).any(-1))[:, 0]  # once here, not per piece
        moving = torch.nonzero(moves_terms)[:, 0]
        real_tangents = not has_abs and _real_tangents(pot_tangent[live])  # centrosymmetric
        pair_rows = friedel_rows(plan) if real_tangents and FRIEDEL_BINS else None
        start = 0
        inputs = []
        for ci, ch in enumerate(plan.chunks):
            fr, rng = ch.frame, slice(start, start + len(ch.sample))
            start = rng.stop
            ch_geo = tuple(x if x.dim() == 0 else x[rng] for x in geo)
            tm = _chunk_terms(plan, ch, potential, potential_abs, state, pairs=False, geometry=ch_geo)
            d_ch = tuple((x[geo_live] if x.dim() == 1 else x[geo_live][:, rng]).to(tm.diag.dtype) for x in
                         (d_geo[0], d_geo[2], d_geo[3], d_geo[4]))  # d orientation, normal, K, K_n
            b, n = tm.diag.shape
            zeros = tm.diag.new_zeros
            d_diag, d_m = zeros((n_t, b, n)), zeros((n_t, b, n))
            d_diag[geo_live], dm_live = _beam_terms_tangent(ch.hkl.to(rtype), ch.mask, ch_geo, d_ch,
                                                            plan.settings.nonparallel)
            if dm_live is not None:
                d_m[geo_live] = dm_live
            d_kn = zeros((n_t, b))
            d_kn[geo_live] = d_ch[3]
            diag = tm.diag
            if tm.pot_abs is not None:
                diag = diag + 1j * _absorptive_diagonal(tm)
                d_diag = d_diag + 1j * tm.mask.to(t_pot_abs.dtype) * t_pot_abs[:, 0, None, None]
            if tm.diag_weak is None:
                diag_w, d_diag_w = tm.kn[:, None], d_kn[:, :, None]
            else:
                diag_w, d_diag_w = tm.diag_weak, zeros((n_t,) + tm.diag_weak.shape)
                d_diag_w[geo_live], _ = _beam_terms_tangent(ch.weak_hkl.to(rtype), ch.weak_mask, ch_geo, d_ch,
                                                            False)
            primal = (diag, torch.ones_like(tm.diag) if tm.m is None else tm.m, tm.kn, tm.thickness, diag_w)
            tangent = (d_diag, d_m, d_kn, thick_t[:, fr], d_diag_w)
            inputs += [(_slice_terms(tm, sl), (pot_primal, *(x[sl] for x in primal)),
                        (pot_tangent, *(x[:, sl] for x in tangent)), None if reuse is None else reuse.piece(ci, sl),
                        (ch, sl)) for c, sl in pieces if c is ch]
        # all made first, then solved: handing each chunk's pieces to the workers as they were made put
        # three threads on two cores and cost 5-8 % of a quartz Jacobian (sessions 25 and 31)
        # pair tables the plan does not cache are built by the worker, piece by piece: held for every
        # piece at once they took B N^2 x 8 bytes (4.5 GB for 672 samples of 920 beams)
        def solve(args):
            tm, (ch, sl) = args[0], args[4]
            if tm.idx is None:
                tm = dataclasses.replace(tm, idx=_pair_rows(plan, ch.hkl[sl], ch.mask[sl]))
            return _fused_jvp(tm, *args[1:3], hermitian=not has_abs, decomposition=args[3], live=live,
                              moving=moving, real_tangents=real_tangents, pair_rows=pair_rows)

        results = parallel_map(solve, inputs, workers)
        done = [(vals, dvals, args[0].out_refl) for (vals, dvals), args in zip(results, inputs)]
    elif has_abs and absorption_method == "perturbative":  # forward AD through the solver: one thread
        done = []
        for ch, sl in pieces:
            box = []

            def f(*args, ch=ch, sl=sl, box=box):
                vals, rows = _chunk_intensities(plan, ch, *unpack(args), absorption_method, sl)
                box.append(rows)
                return vals

            vals, dvals = forward_ad(f)
            done.append((vals, dvals, box[0]))
    else:  # the reference (or exact absorption with Bethe beams): matrices and their tangents by forward AD here,
        # the decompositions and the solver's forward rule on the workers, overlapped
        def make(item):
            box = []

            def matrices(*args):
                pot, pot_abs, st = unpack(args)
                tm = _chunk_terms(plan, item[0], pot, pot_abs, st, item[1])
                box.append(tm)  # index tables and output rows: plain tensors, no tangent
                a_mat, _ = _chunk_matrices(tm, absorption_method)
                return a_mat, tm.thickness, 1.0 / tm.kn, torch.ones_like(tm.diag) if tm.m is None else tm.m

            primal, tangent = forward_ad(matrices)
            return box[0], primal, tangent

        def solve(made):
            vals, dvals = _solve_jvp(*made, hermitian=not has_abs)
            return vals, dvals, made[0].out_refl

        done = pipeline(make, solve, pieces, workers)
    add_rows(out, ((rows, vals) for vals, _, rows in done))
    add_rows(d_out, ((rows, dvals.permute(1, 2, 0)) for _, dvals, rows in done))
    return out, d_out
