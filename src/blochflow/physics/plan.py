"""Which beams couple at each tilt and which reflections are scored: the integer bookkeeping of a
simulation (beam sets, index tables, tilt samples, scored reflections), computed once from the dataset
and the beam settings into a :class:`DiffractionPlan`, and the plans derived from one (a subset of
frames, each tilt sample split in two). Values (potential, excitation errors, thickness) are not here:
:mod:`blochflow.physics.diffraction` computes them on every call."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ..crystal.cell import reciprocal_basis
from ..io.errors import InputError
from ..crystal.structure import lattice_allowed
from .device import device_memory
from .geometry import (SampleSet, excitation_error, excitation_error_range, frame_orientations, frame_samples,
                       orientation_ub, rocking_axis_lab, sample_orientations)

COUPLINGS = ("sample", "segments")


@dataclass(frozen=True)
class BeamSettings:
    """How beams and scored reflections are chosen and how frames are integrated."""

    g_max: float | None = None  # 1/A; None: 0.4 beyond the data (dstarmax or the largest reflection)
    s_max: float = 0.02  # 1/A, excitation-error limit for coupled beams at each sample
    n_samples: int = 32  # tilts per frame (continuous) or azimuths (precession)
    sample_rule: Literal["midpoint", "gauss", "linspace"] = "midpoint"
    rsg: float = 0.66  # Klar et al. 2023: keep |s_g| / dS_g < rsg
    dsg: float = 0.0015  # and dS_g - |s_g| > dsg (1/A)
    chunk_elements: int = 1_000_000  # samples x N^2 per batched solve (smaller: less padding, more calls)
    nonparallel: bool = True  # (1 + g.n/K_n)^-1/2 factors
    ub_convention: Literal["pets", "diffbloch"] = "pets"  # g = U B h, or U^-T B h (diffBloch)
    rocking_axis: Literal["goniometer", "fixed"] = "goniometer"  # tilts turn about alpha's axis, or lab x
    tilt_window: int = 1  # > 1: tilt weights of a sum of moving averages this wide (tapered ends)
    # "sample": each tilt couples the beams within s_max of it plus every scored reflection of its
    # frame. "segments": a frame's tilts are cut into n_segments runs; a run couples the beams within
    # s_max at its first or last tilt, and a scored reflection outside that set counts zero there
    # (the rocking tails are cut, as in the simulator of diffBloch); one never coupled is not scored.
    coupling: Literal["sample", "segments"] = "sample"
    n_segments: int = 12
    # > s_max: beams with s_max <= |s_g| < s_bethe at a sample are not solved but folded into the
    # solved beams by second-order perturbation (Bethe potentials, see _bethe_correction); 0: off
    s_bethe: float = 0.0
    # The crystal's lattice-centring translations (fractional; set from its space group by the forward
    # model). A beam h with h.t not an integer for one of them is extinct with every beam whose
    # difference from it is allowed (U_{g-h} = 0), so it never couples to 000: such beams are left out,
    # which is exact and makes an F-centred crystal's matrices 4x smaller, and such reflections are
    # not scored (their intensity is zero whatever the structure).
    centring: tuple[tuple[float, float, float], ...] = ()


@dataclass(frozen=True)
class ScoredReflections:
    """The observed reflections that are simulated and compared, in one flat order."""

    row: np.ndarray  # (R,) row in the dataset's reflection table
    frame: np.ndarray  # (R,) frame index (0-based position in the frame table)
    hkl: np.ndarray  # (R, 3)
    excitation_error: np.ndarray  # (R,) s_g at the frame centre (1/A)
    excitation_range: np.ndarray  # (R,) dS_g (1/A)


@dataclass(frozen=True)
class BeamChunk:
    """A batch of samples solved together, beams padded to a common count N."""

    sample: torch.Tensor  # (B,) global sample index
    frame: torch.Tensor  # (B,) frame index
    hkl: torch.Tensor  # (B, N, 3) float, zeros at padding
    mask: torch.Tensor  # (B, N) bool, True for real beams
    out_sample: torch.Tensor  # (P,) local sample of each (sample, scored reflection) pair
    out_beam: torch.Tensor  # (P,) beam position of that reflection in the sample
    out_refl: torch.Tensor  # (P,) index into ScoredReflections
    pair_index: torch.Tensor | None = None  # (B, N, N) int32 potential row of each beam pair, if cached
    weak_hkl: torch.Tensor | None = None  # (B, W, 3) float: beams folded in by Bethe perturbation
    weak_mask: torch.Tensor | None = None  # (B, W) bool
    weak_index: torch.Tensor | None = None  # (B, N, W) int32 potential row of g_i - g_w, if cached
    pair_set: torch.Tensor | None = None  # (B,) long: samples with one value share their pair_index (a segment's
    # beam set), with pair_index


# Beam-pair index tables (potential row of g_i - g_j for every pair of every sample) are fixed
# geometry: cached in the plan when all of them fit in this many bytes (int32), else rebuilt per call.
PAIR_INDEX_BUDGET = 256 * 2 ** 20


@dataclass
class DiffractionPlan:
    settings: BeamSettings
    geometry: str
    wavelength: float
    g_max: float
    ub: torch.Tensor  # (3, 3), or (F, 3, 3) one per frame (several datasets merged)
    axis_azimuth: float  # radians
    samples: SampleSet
    scored: ScoredReflections
    chunks: list[BeamChunk]
    potential_hkl: np.ndarray  # (M, 3) hkl differences needed, row 0 is 000
    lut: torch.Tensor  # dense index box -> potential row (M = zero padding entry)
    lut_offset: torch.Tensor  # (3,)
    lut_shape: tuple
    n_beams: np.ndarray = field(default=None)  # (S,) real beams per sample
    n_weak: np.ndarray = field(default=None)  # (S,) beams folded in by Bethe perturbation per sample
    device: torch.device = field(default=torch.device("cpu"))  # where the solves run

    @property
    def n_frames(self) -> int:
        return int(self.samples.frame.max()) + 1

    def to(self, device) -> "DiffractionPlan":
        """This plan with its index tables on ``device`` (e.g. "cuda"): the Bloch solves then run
        there, while callers keep their tensors where they are (inputs are moved in and the
        intensities moved back)."""
        device = torch.device(device)
        if device == self.device:
            return self

        def move(x):
            return x.to(device) if isinstance(x, torch.Tensor) else x

        chunks = [BeamChunk(**{f.name: move(getattr(ch, f.name)) for f in dataclasses.fields(ch)})
                  for ch in self.chunks]
        return dataclasses.replace(self, chunks=chunks, ub=self.ub.to(device), lut=self.lut.to(device),
                                   lut_offset=self.lut_offset.to(device), device=device)


# A plan whose arrays would need more than this share of the machine's memory is refused before they are
# allocated, naming the sizes (the kernel's out-of-memory kill says nothing)
PLAN_MEMORY_SHARE = 0.5


def _refuse_too_large(path, need_bytes: float, what: str) -> None:
    """InputError when ``need_bytes`` exceed PLAN_MEMORY_SHARE of the machine's memory (the plan is
    built in host memory whatever the solver's device)."""
    have = PLAN_MEMORY_SHARE * device_memory(torch.device("cpu"))
    if need_bytes > have:
        raise InputError(path, "problem size", f"{what} need about {need_bytes / 1e9:.3g} GB, more than "
                         f"{PLAN_MEMORY_SHARE:.0%} of this machine's memory ({have / PLAN_MEMORY_SHARE / 1e9:.3g} GB); "
                         "lower g_max or s_max, refine fewer frames (--frames), or check the thickness and "
                         "tilt-sample settings")


def _candidate_box(g_matrix: np.ndarray, g_max: float) -> np.ndarray:
    """Half-widths of the hkl box holding every |g| <= g_max (see :func:`_candidate_beams`)."""
    return np.ceil(g_max * np.linalg.norm(np.linalg.inv(g_matrix), axis=1)).astype(int)  # |h_i| <= |row_i(G^-1)| |g|


def _candidate_beams(g_matrix: np.ndarray, g_max: float) -> np.ndarray:
    """Every hkl != 000 with |g| <= g_max, g = g_matrix h the lab-frame vector the simulation uses
    (the cell's metric only when the orientation matrix is orthonormal)."""
    hmax = _candidate_box(g_matrix, g_max)
    grids = np.meshgrid(*[np.arange(-m, m + 1) for m in hmax], indexing="ij")
    hkl = np.stack([g.ravel() for g in grids], 1)
    g = hkl @ g_matrix.T
    keep = (np.linalg.norm(g, axis=1) <= g_max) & np.any(hkl != 0, axis=1)
    return hkl[keep]


def _abs_excitation(orient: np.ndarray, incident: np.ndarray, hkl_t: torch.Tensor, k: float) -> np.ndarray:
    """|s_g| (S, C) of beams hkl_t (3, C) at orientations (S, 3, 3) (hkl -> lab) and incident
    directions (S, 3): :func:`excitation_error`, summed over rows of (S, 3, C) for speed."""
    g = torch.as_tensor(orient) @ hkl_t
    inc = torch.as_tensor(incident)[:, :, None]
    s_g = -(inc[:, 0] * g[:, 0] + inc[:, 1] * g[:, 1] + inc[:, 2] * g[:, 2]) - (
        g[:, 0] ** 2 + g[:, 1] ** 2 + g[:, 2] ** 2) / (2 * k)
    return np.abs(s_g.numpy())


def _near_candidates(orient: np.ndarray, incident: np.ndarray, cand: np.ndarray, cand_t: torch.Tensor, k: float,
                     limit: float) -> np.ndarray:
    """Indices of the candidate beams that can have |s_g| < ``limit`` at one of a frame's samples
    (orientations (S, 3, 3), incident directions (S, 3)), from one of them: every sample's
    orientation is a rotation of it and every incident direction a unit vector, so |g| is the same and
    |s_g - s_g'| <= |inc - inc'| |g| + ||R - R'||_F |hkl|. The others need not be computed."""
    d_inc = np.linalg.norm(incident - incident[:1], axis=1).max()
    d_rot = np.linalg.norm(orient - orient[:1], axis=(1, 2)).max()
    reach = limit + d_inc * np.linalg.norm(cand @ orient[0].T, axis=1) + d_rot * np.linalg.norm(cand, axis=1) + 1e-9
    return np.flatnonzero(_abs_excitation(orient[:1], incident[:1], cand_t, k)[0] < reach)


def _members(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.isin(a, b)``; small sets (a segment's beams against its frame's scored reflections, tens
    to hundreds each) by one comparison table: the 2376 calls of a README-example plan take 0.03 s
    instead of isin's 0.16 s."""
    if len(a) * len(b) > 200_000:
        return np.isin(a, b)
    return (a[:, None] == b[None, :]).any(1) if len(b) else np.zeros(len(a), bool)


def mark_differences(used: np.ndarray, a_sets: list, b_sets: list, centre: int) -> None:
    """Set ``used`` at every position a - b + centre, a in a_sets[k] and b in b_sets[k], over the sets k
    (int arrays of box positions relative to the centre, which lies at ``centre``) in their order. Only
    the pairs with a member new since the set before are formed: after set k every pair of it is marked
    (those of two old members with set k - 1), and successive tilt samples share most beams, so a pass
    costs the new beams times N, not N^2 per sample (paracetamol, 1100 beams: 24 s before)."""
    in_a, in_b = np.zeros(len(used), bool), np.zeros(len(used), bool)  # members of the set before
    prev_a = prev_b = np.zeros(0, np.int64)
    for a, b in zip(a_sets, b_sets):
        new_a, new_b = a[~in_a[a + centre]], b[~in_b[b + centre]]
        if len(new_a) and len(b):
            used[(new_a[:, None] - b[None, :] + centre).ravel()] = True
        if len(new_b) and len(a):
            used[(a[:, None] - new_b[None, :] + centre).ravel()] = True
        in_a[prev_a + centre], in_b[prev_b + centre] = False, False
        in_a[a + centre], in_b[b + centre] = True, True
        prev_a, prev_b = a, b


def distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, which) of ``np.unique(rows, axis=0, return_index=True, return_inverse=True)``: the first
    row of each distinct row in their sorted order, and each row's distinct index. Rows are hashed
    (np.unique sorts wide rows as structured items: 40 s for paracetamol's 1100 beams) and only the
    distinct ones sorted."""
    rows = np.ascontiguousarray(rows)
    seen: dict[bytes, int] = {}
    which = np.fromiter((seen.setdefault(r.tobytes(), len(seen)) for r in rows), np.int64, len(rows))
    first = np.unique(which, return_index=True)[1]  # ids count up in the order of first appearance
    order = np.lexsort(rows[first].T[::-1]) if len(first) else first  # column 0 the primary key
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[which]


def build_plan(dataset, settings: BeamSettings = BeamSettings(), frame_mask: np.ndarray | None = None,
               samples_per_frame: np.ndarray | None = None, scored_rows: np.ndarray | None = None) -> DiffractionPlan:
    """Choose beams per sample and scored reflections per frame for a PETS dataset record.

    Samples per frame: ``samples_per_frame`` (one count per frame, e.g. from
    :func:`~blochflow.physics.geometry.fringe_sample_counts`) if given, else ``settings.n_samples``.
    ``scored_rows`` fixes the scored reflections (rows of the reflection table) instead of choosing
    them, so that a plan rebuilt with other samples keeps its observations.
    """
    frames, refl = dataset.frames, dataset.reflections
    geometry = dataset.details.geometry
    k = 1.0 / dataset.wavelength
    b_matrix = reciprocal_basis(dataset.cell)
    # several datasets merged: each frame its dataset's UB (the candidate beams of every one of them)
    if frames.ub is None:
        ubs, of_frame = np.asarray(dataset.ub, float)[None], None
    else:
        if settings.rocking_axis != "goniometer":
            raise ValueError(f"rocking_axis: '{settings.rocking_axis}' needs one dataset (merged datasets carry "
                             "their rotation axes in omega, which only the goniometer axis allows)")
        ubs, of_frame = np.unique(np.asarray(frames.ub, float), axis=0, return_inverse=True)
    g_ubs = np.stack([orientation_ub(u, b_matrix, settings.ub_convention) for u in ubs])
    ub = torch.as_tensor(g_ubs[0] if of_frame is None else g_ubs[np.ravel(of_frame)], dtype=torch.float64)
    g_max = settings.g_max
    if g_max is None:  # a header's dstarmax can fall short of its own reflections (paper paracetamol: 1.4, 1.9)
        reach = max(np.linalg.norm(np.asarray(refl.hkl, float) @ g.T, axis=1).max(initial=0.0) for g in g_ubs)
        g_max = max(dataset.details.dstarmax, reach) + 0.4
    phi = math.radians(dataset.details.rotation_axis_deg)
    alpha = torch.as_tensor(np.radians(frames.alpha_deg))
    beta = torch.as_tensor(np.radians(frames.beta_deg))
    omega = torch.as_tensor(np.radians(frames.omega_deg))
    orient = frame_orientations(ub, alpha, beta, omega, phi).numpy()
    axis = rocking_axis_lab(omega, phi, settings.rocking_axis).numpy()

    # Scored reflections: Klar et al. (2023) criteria at the frame centre.
    id_to_index = {int(f): i for i, f in enumerate(frames.ids)}
    fidx = np.array([id_to_index[int(f)] for f in refl.frame_id], dtype=np.int64)
    g_obs = np.einsum("rij,rj->ri", orient[fidx], refl.hkl)
    centre_inc = np.array([0.0, 0.0, -1.0])
    s_obs = excitation_error(torch.as_tensor(g_obs), torch.as_tensor(centre_inc), k).numpy()
    ds_obs = excitation_error_range(g_obs, axis[fidx], centre_inc, np.radians(frames.half_angle_deg[fidx]), geometry)
    keep = (np.abs(s_obs) < settings.rsg * ds_obs) & (ds_obs - np.abs(s_obs) > settings.dsg)
    keep &= np.any(refl.hkl != 0, axis=1)
    keep &= lattice_allowed(refl.hkl, settings.centring)  # extinct by the centring: zero in any theory
    if frame_mask is not None:
        keep &= frame_mask[fidx]
    rows = np.flatnonzero(keep) if scored_rows is None else np.asarray(scored_rows)
    scored = ScoredReflections(row=rows, frame=fidx[rows], hkl=refl.hkl[rows], excitation_error=s_obs[rows],
                               excitation_range=ds_obs[rows])

    path = getattr(dataset, "path", "data")
    per_frame = np.broadcast_to(np.asarray(settings.n_samples if samples_per_frame is None else samples_per_frame,
                                           float), (len(frames.ids),))
    # the samples' geometry (~300 bytes each) and the candidate beams' box (~100 bytes a point)
    box = max(float(np.prod(2.0 * _candidate_box(g, g_max) + 1)) for g in g_ubs)
    _refuse_too_large(path, 300 * float(per_frame.sum()), f"{int(per_frame.sum())} tilt samples over {len(per_frame)} frames")
    _refuse_too_large(path, 100 * box, f"the beams within g_max {g_max:.3g} 1/A (a box of {box:.3g} hkl)")
    samples = frame_samples(frames.half_angle_deg, geometry,
                            settings.n_samples if samples_per_frame is None else samples_per_frame,
                            settings.sample_rule, settings.tilt_window)

    cand = (_candidate_beams(g_ubs[0], g_max) if len(g_ubs) == 1 else
            np.unique(np.concatenate([_candidate_beams(g, g_max) for g in g_ubs]), axis=0))
    cand = cand[lattice_allowed(cand, settings.centring)]
    per_frame_scored = [np.flatnonzero(scored.frame == f) for f in range(len(frames))]
    sf = samples.frame
    sample_orient = sample_orientations(ub if ub.dim() == 2 else ub[sf], alpha[sf], beta[sf], omega[sf], phi,
                                        torch.as_tensor(samples.alpha_offset), settings.rocking_axis).numpy()

    def key(h):
        return (h[:, 0] * 1_000_003 + h[:, 1]) * 1_000_003 + h[:, 2]

    cand_t = torch.as_tensor(cand.T, dtype=torch.float64)

    limit = max(settings.s_max, settings.s_bethe)

    # a frame's excitation table (its samples x the candidates, 8 bytes each)
    _refuse_too_large(path, 8.0 * float(per_frame.max(initial=0)) * len(cand),
                      f"the excitation errors of {int(per_frame.max(initial=0))} tilt samples of a frame for "
                      f"{len(cand)} beams within g_max {g_max:.3g} 1/A")

    def frame_excitation(idx, frame_idx):  # |s_g| of every candidate at these samples of a frame (S, C):
        out = np.full((len(idx), len(cand)), np.inf)  # those that stay beyond s_max (s_bethe) are not computed
        columns = _near_candidates(sample_orient[frame_idx], samples.incident[frame_idx], cand, cand_t, k, limit)
        out[:, columns] = _abs_excitation(sample_orient[idx], samples.incident[idx], cand_t[:, columns], k)
        return out

    bethe = settings.s_bethe > 0
    if bethe and settings.coupling != "sample":
        raise ValueError("s_bethe: Bethe perturbation needs coupling 'sample'")
    if bethe and settings.s_bethe <= settings.s_max:
        raise ValueError(f"s_bethe: {settings.s_bethe} must exceed s_max ({settings.s_max})")
    sample_weak: list[np.ndarray] = [np.zeros((0, 3), int)] * len(sf)

    cand_key = key(cand)
    # Per sample: its beams (000 first) and the (beam position, scored reflection) pairs it outputs.
    sample_beams: list[np.ndarray] = [np.zeros((1, 3), int)] * len(sf)
    sample_out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, int), np.zeros(0, int))] * len(sf)
    for f in range(len(frames)):
        sc = per_frame_scored[f]
        if len(sc) == 0:  # nothing to compare: no solve needed
            continue
        idx = np.flatnonzero(sf == f)
        if settings.coupling == "sample":
            exc_frame = frame_excitation(idx, idx)
            not_scored = ~np.isin(cand_key, key(scored.hkl[sc]))  # scored reflections are added once below
            for s, exc in zip(idx, exc_frame):
                sample_beams[s] = np.concatenate([np.zeros((1, 3), int), scored.hkl[sc],
                                                  cand[(exc < settings.s_max) & not_scored]])
                sample_out[s] = (1 + np.arange(len(sc)), sc)
                if bethe:
                    sample_weak[s] = cand[(exc >= settings.s_max) & (exc < settings.s_bethe) & not_scored]
        elif settings.coupling == "segments":
            sc_key = key(scored.hkl[sc])
            segments = np.array_split(np.arange(len(idx)), min(settings.n_segments, len(idx)))
            ends = np.array([[seg[0], seg[-1]] for seg in segments])  # only a run's end tilts choose its beams
            excited = frame_excitation(idx[ends.ravel()], idx).reshape(len(segments), 2, -1) < settings.s_max
            for seg, exc in zip(segments, excited):
                sel = cand[exc[0] | exc[1]]
                sel_key = key(sel)
                pos = np.flatnonzero(_members(sc_key, sel_key))
                beams = np.concatenate([np.zeros((1, 3), int), scored.hkl[sc[pos]],
                                        sel[~_members(sel_key, sc_key)]])
                for s in idx[seg]:
                    sample_beams[s], sample_out[s] = beams, (1 + np.arange(len(pos)), sc[pos])
        else:
            raise ValueError(f"unknown coupling '{settings.coupling}' (choose {', '.join(COUPLINGS)})")
    if settings.coupling == "segments" and scored_rows is None:  # one coupled at no tilt of its frame is not scored
        used_refl = np.zeros(len(scored.row), bool)
        for _, r in sample_out:
            used_refl[r] = True
        new_index = np.cumsum(used_refl) - 1
        scored = ScoredReflections(row=scored.row[used_refl], frame=scored.frame[used_refl],
                                   hkl=scored.hkl[used_refl], excitation_error=scored.excitation_error[used_refl],
                                   excitation_range=scored.excitation_range[used_refl])
        sample_out = [(b, new_index[r]) for b, r in sample_out]
        per_frame_scored = [np.flatnonzero(scored.frame == f) for f in range(len(frames))]
    n_beams = np.array([len(b) for b in sample_beams])
    # one sample's structure matrix and the solver's work on it (~64 bytes per element: A, V, pair tables)
    _refuse_too_large(path, 64.0 * float(n_beams.max(initial=1)) ** 2,
                      f"structure matrices of {int(n_beams.max(initial=1))} beams (one sample's)")

    # Chunks of samples with similar beam counts (little padding) and a bounded B x N^2.
    chunks_idx: list[list[int]] = []
    cur: list[int] = []
    cur_n = 0
    for s in np.argsort(n_beams, kind="stable"):
        if len(per_frame_scored[sf[s]]) == 0:
            continue
        n = max(cur_n, n_beams[s])
        if cur and (len(cur) + 1) * n * n > settings.chunk_elements:
            chunks_idx.append(cur)
            cur, n = [], n_beams[s]
        cur.append(s)
        cur_n = n
    if cur:
        chunks_idx.append(cur)

    # Beams of each chunk, padded to its largest count; weak (Bethe) beams likewise.
    n_weak = np.array([len(w) for w in sample_weak])
    flat_beams = np.concatenate(sample_beams)  # every sample's beams, one after another
    first_beam = np.cumsum(n_beams) - n_beams
    padded = []
    for idx in chunks_idx:
        n = int(n_beams[idx].max())
        mask = np.arange(n)[None, :] < n_beams[idx][:, None]
        hkl = np.zeros((len(idx), n, 3), np.int64)
        hkl[mask] = flat_beams[(first_beam[idx][:, None] + np.arange(n)[None, :])[mask]]
        whkl = wmask = None
        if bethe:
            nw = max(1, max(n_weak[s] for s in idx))
            whkl = np.zeros((len(idx), nw, 3), np.int64)
            wmask = np.zeros((len(idx), nw), bool)
            for j, s in enumerate(idx):
                whkl[j, :n_weak[s]] = sample_weak[s]
                wmask[j, :n_weak[s]] = True
        padded.append((hkl, mask, whkl, wmask))

    # Potential table: every hkl difference that occurs, via a dense lookup box. A box position is
    # linear in hkl (strides), so the difference of two beams' positions is that of their difference.
    hmax = np.max(np.abs(np.concatenate(sample_beams + sample_weak)), axis=0) * 2
    shape = tuple(int(2 * m + 1) for m in hmax)
    strides = np.array([shape[1] * shape[2], shape[2], 1], np.int64)
    centre = int(hmax @ strides)

    def differences(hkl, mask, other, other_mask):  # box positions (B, N, W) of g_i - g_w and the valid ones
        a, b = (hkl @ strides).astype(np.int32), (other @ strides).astype(np.int32)
        return a[:, :, None] - b[:, None, :] + np.int32(centre), mask[:, :, None] & other_mask[:, None, :]

    cache_pairs = sum(len(c) * int(n_beams[c].max()) * int(n_beams[c].max() + n_weak[c].max())
                      for c in chunks_idx) * 4 <= PAIR_INDEX_BUDGET
    used = np.zeros(int(np.prod(shape)), bool)
    used[centre] = True
    solved = sorted(s for c in chunks_idx for s in c)  # in the order of the rotation: neighbours share beams
    strong = [sample_beams[s] @ strides for s in solved]
    mark_differences(used, strong, strong, centre)
    if bethe:
        mark_differences(used, strong, [sample_weak[s] @ strides for s in solved], centre)
    # each chunk's (positions, valid) of its beam pairs (and weak pairs) per distinct beam set (the
    # samples of a segment share theirs), and each sample's set, when cached
    pair_positions = []
    for hkl, mask, whkl, wmask in padded:
        if not cache_pairs:
            pair_positions.append(None)
            continue
        parts = [hkl.reshape(len(hkl), -1), mask]
        if whkl is not None:
            parts += [whkl.reshape(len(whkl), -1), wmask]
        first, which = distinct_rows(np.concatenate([x.astype(np.int64) for x in parts], 1))
        pairs = [differences(hkl[first], mask[first], hkl[first], mask[first])]
        if whkl is not None:
            pairs.append(differences(hkl[first], mask[first], whkl[first], wmask[first]))
        pair_positions.append((pairs, which))
    pot_hkl = np.argwhere(used.reshape(shape)) - hmax
    # 000 first
    zero = np.flatnonzero(np.all(pot_hkl == 0, axis=1))[0]
    order = np.concatenate([[zero], np.delete(np.arange(len(pot_hkl)), zero)])
    pot_hkl = pot_hkl[order]
    lut = np.full(shape, len(pot_hkl), dtype=np.int64)
    lut[pot_hkl[:, 0] + hmax[0], pot_hkl[:, 1] + hmax[1], pot_hkl[:, 2] + hmax[2]] = np.arange(len(pot_hkl))
    lut_flat = lut.reshape(-1)

    pad = np.int32(len(pot_hkl))
    lut_flat32 = lut_flat.astype(np.int32)  # padding beams (hkl 000) give positions inside the box

    chunks = []
    for idx, (hkl, mask, whkl, wmask), pairs in zip(chunks_idx, padded, pair_positions):
        n = hkl.shape[1]
        osamp, obeam, orefl = [], [], []
        for j, s in enumerate(idx):
            beam_pos, refl_idx = sample_out[s]
            osamp.append(np.full(len(refl_idx), j))
            obeam.append(beam_pos)
            orefl.append(refl_idx)
        pair_index = pair_set = None
        if pairs is not None:
            (pos, ok), which = pairs[0][0], pairs[1]
            pair_index = torch.as_tensor(np.where(ok & ~np.eye(n, dtype=bool), lut_flat32[pos], pad)[which])
            pair_set = torch.as_tensor(which).long()
        weak = {}
        if bethe:
            weak = dict(weak_hkl=torch.as_tensor(whkl.astype(float)), weak_mask=torch.as_tensor(wmask))
            if pairs is not None:
                pos, ok = pairs[0][1]
                weak["weak_index"] = torch.as_tensor(np.where(ok, lut_flat32[pos], pad)[which])
        chunks.append(BeamChunk(
            sample=torch.as_tensor(np.array(idx)), frame=torch.as_tensor(samples.frame[idx]),
            hkl=torch.as_tensor(hkl.astype(float)), mask=torch.as_tensor(mask),
            out_sample=torch.as_tensor(np.concatenate(osamp)).long(),
            out_beam=torch.as_tensor(np.concatenate(obeam)).long(),
            out_refl=torch.as_tensor(np.concatenate(orefl)).long(), pair_index=pair_index, pair_set=pair_set,
            **weak))
    return DiffractionPlan(settings=settings, geometry=geometry, wavelength=dataset.wavelength, g_max=g_max,
                           ub=ub, axis_azimuth=phi, samples=samples, scored=scored, chunks=chunks,
                           potential_hkl=pot_hkl, lut=torch.as_tensor(lut), lut_offset=torch.as_tensor(hmax),
                           lut_shape=shape, n_beams=n_beams, n_weak=n_weak)


def frame_subplan(plan: DiffractionPlan, frames: torch.Tensor) -> tuple[DiffractionPlan, list]:
    """The plan cut to the samples of the frames in the (F,) bool mask (chunks left empty are
    dropped), and for each of its chunks (index of the chunk in ``plan``, positions of its samples
    there). Output rows of the other frames are not computed (zero): a line search re-solves only
    the frames whose step it shortens."""
    chunks, source = [], []
    for ci, ch in enumerate(plan.chunks):
        keep = frames.to(ch.frame.device)[ch.frame]
        pos = torch.nonzero(keep)[:, 0]
        if len(pos) == 0:
            continue
        local = torch.full((len(keep),), -1, dtype=torch.long, device=pos.device)
        local[pos] = torch.arange(len(pos), device=pos.device)
        pair = keep[ch.out_sample]

        def cut(x):
            return None if x is None else x[pos]

        chunks.append(BeamChunk(sample=ch.sample[pos], frame=ch.frame[pos], hkl=ch.hkl[pos], mask=ch.mask[pos],
                                out_sample=local[ch.out_sample[pair]], out_beam=ch.out_beam[pair],
                                out_refl=ch.out_refl[pair], pair_index=cut(ch.pair_index), weak_hkl=cut(ch.weak_hkl),
                                weak_mask=cut(ch.weak_mask), weak_index=cut(ch.weak_index), pair_set=cut(ch.pair_set)))
        source.append((ci, pos))
    return dataclasses.replace(plan, chunks=chunks), source


def split_samples(plan: DiffractionPlan, half_angle_deg: np.ndarray) -> DiffractionPlan | None:
    """The plan with every sample split in two: the midpoint rule with twice the samples, whose nodes
    lie a quarter spacing either side of each node of the rule with n (tilts of a rocking wedge,
    azimuths of a precession cone), at half the weight. Each half keeps its sample's beams, pair
    tables and scored outputs, so that no plan is rebuilt and the two rules differ in their
    integration alone. None for rules whose nodes do not nest so (Gauss, linspace, tapered weights)."""
    settings, smp = plan.settings, plan.samples
    if settings.sample_rule != "midpoint" or (plan.geometry == "continuous" and settings.tilt_window > 1):
        return None
    counts = np.bincount(smp.frame, minlength=len(half_angle_deg))[smp.frame]
    half = np.radians(np.asarray(half_angle_deg, float))[smp.frame]
    frame = np.repeat(smp.frame, 2)
    weight = np.repeat(smp.weight / 2, 2)
    if plan.geometry == "continuous":
        quarter = half / (2 * counts)  # nodes 2 half / n apart
        offset = np.stack([smp.alpha_offset - quarter, smp.alpha_offset + quarter], 1).reshape(-1)
        incident = np.repeat(smp.incident, 2, axis=0)
    else:  # precession: azimuths 2 pi (i + 1/2) / n
        az = np.arctan2(smp.incident[:, 1], smp.incident[:, 0])
        az = np.stack([az - np.pi / (2 * counts), az + np.pi / (2 * counts)], 1).reshape(-1)
        ph = np.repeat(half, 2)
        incident = np.stack([np.sin(ph) * np.cos(az), np.sin(ph) * np.sin(az), -np.cos(ph)], -1)
        offset = np.repeat(smp.alpha_offset, 2)
    samples = dataclasses.replace(smp, frame=frame, alpha_offset=offset, incident=incident, weight=weight)

    def twice(x):
        return None if x is None else x.repeat_interleave(2, 0)

    chunks = []
    for ch in plan.chunks:  # output pairs sorted by sample, as the plan has them
        out_sample = torch.cat([2 * ch.out_sample, 2 * ch.out_sample + 1])
        order = torch.sort(out_sample, stable=True).indices
        chunks.append(BeamChunk(sample=torch.stack([2 * ch.sample, 2 * ch.sample + 1], 1).reshape(-1),
                                frame=twice(ch.frame), hkl=twice(ch.hkl), mask=twice(ch.mask),
                                out_sample=out_sample[order], out_beam=ch.out_beam.repeat(2)[order],
                                out_refl=ch.out_refl.repeat(2)[order],
                                pair_index=twice(ch.pair_index), weak_hkl=twice(ch.weak_hkl),
                                weak_mask=twice(ch.weak_mask), weak_index=twice(ch.weak_index),
                                pair_set=twice(ch.pair_set)))
    return dataclasses.replace(plan, samples=samples, chunks=chunks,
                               n_beams=None if plan.n_beams is None else np.repeat(plan.n_beams, 2),
                               n_weak=None if plan.n_weak is None else np.repeat(plan.n_weak, 2))
