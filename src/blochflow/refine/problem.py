"""The refinement problem: one flat parameter vector -> weighted residuals, gradients, Jacobians.

theta = [structure | frame blocks (thickness, orientation) | absorption]. Frame scales are profiled
out in closed form (weighted least squares per frame over the work reflections), so they are not
parameters; R_free reflections are simulated and scaled with the work scales but never fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..crystal.cell import direct_basis
from ..crystal.constraints import floating_origin_directions
from ..crystal.parameters import StructureParameters
from ..crystal.restraints import restraint_residuals
from ..experiment.frames import Block, FrameModel
from ..physics.diffraction import Decompositions, FrameState, device_memory, simulate_frames, simulate_frames_jvp
from ..physics.plan import frame_subplan
from ..physics.scattering import atomic_number
from .model import ForwardModel
from .objective import Figures, amplitude, amplitude_weights, figures_of_merit, frame_scales, klar_weights


# largest change of one network weight in one LM step (0.5 until session 19, which held a mixture's
# weight logits back: 17 synthetic frames, 6 LM, case d W1 56 -> 42 A; quartz experimental R_obs
# 4.60 % not converged in 30 iterations -> 4.06 %, converged in 28; docs/thickness_models.md)
NETWORK_MAX_STEP = 2.0
# Largest change of a frame's own parameters in one step, by group: log thickness 0.1 (10 %, well
# inside a Pendelloesung period of strong reflections at a few hundred A) and orientation 1 mrad
# (about half a rocking-curve width, 1 / (t |g|), for |g| = 1 / A at 500 A). A Gauss-Newton step
# that moves one frame further than its linearisation holds would otherwise be rejected and raise
# the damping of every parameter.
PER_FRAME_MAX_STEP = {"thickness": 0.1, "orientation": 1.0}
# A forward pass without gradient keeps its eigendecompositions (in the Jacobian's precision) for
# a Jacobian at the same point when they take at most this much memory, or this share of the solving
# device's memory if that is more (an LTA-like cell, 192 tilts of 924 beams: 1.3 GB kept, 10 % off an
# LM iteration)
KEEP_DECOMPOSITIONS_BYTES = 512e6
KEEP_DECOMPOSITIONS_SHARE = 1 / 8


@dataclass(frozen=True)
class Slot:
    """Where a block lives in theta."""

    block: Block
    start: int
    stop: int


def equivalence_keys(hkl: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """(R, 3) one representative per symmetry-equivalence group (Laue class): the lexicographically
    largest equivalent of h under the point group with inversion."""
    ops = np.concatenate([rotations, -rotations])  # h' = h R (row vector) for each operator
    images = np.einsum("rj,sji->rsi", hkl, ops)  # (R, S, 3)
    keyval = (images[..., 0] * 1_000_003 + images[..., 1]) * 1_000_003 + images[..., 2]
    return images[np.arange(len(hkl)), np.argmax(keyval, 1)]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: well-spread uint64 hashes of nearby integers (wrapping arithmetic)."""
    x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def free_set_mask(hkl: np.ndarray, rotations: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """R_free reflections: whole symmetry-equivalence groups (Laue class, all frames), round(fraction x
    the groups present), at least one.

    The groups with the smallest hashes of their key (:func:`equivalence_keys`) and the seed are
    taken, so every run and every frame agrees on which reflections are free, and the fraction holds
    however few groups the data have.
    """
    if fraction <= 0 or len(hkl) == 0:
        return np.zeros(len(hkl), bool)
    groups, member = np.unique(equivalence_keys(hkl, rotations), axis=0, return_inverse=True)
    member = member.reshape(-1)
    with np.errstate(over="ignore"):
        packed = ((groups[:, 0] + 512) * 1024 + (groups[:, 1] + 512)) * 1024 + (groups[:, 2] + 512)
        h = _mix64(_mix64(packed.astype(np.uint64)) ^ np.uint64(seed))
    n_free = max(1, int(round(fraction * len(groups))))
    chosen = np.zeros(len(groups), bool)
    chosen[np.argsort(h, kind="stable")[:n_free]] = True
    return chosen[member]


def holdout_frame_mask(n_frames: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Hold-out frames: ~``fraction`` of the frames, spread evenly over the rotation (never the ends).

    Their reflections are not fitted; a model of the frames (e.g. a learned thickness) must predict
    them from the frame angle, which shows over-fitting that R_free alone cannot.
    """
    mask = np.zeros(n_frames, bool)
    n = int(round(fraction * n_frames))
    if n <= 0 or n_frames < 3:
        return mask
    step = (n_frames - 2) / n
    offset = (seed % 997) / 997.0 * step
    idx = 1 + np.floor(offset + step * np.arange(n)).astype(int)
    mask[np.clip(idx, 1, n_frames - 2)] = True
    return mask


class RefinementProblem:
    """Composes structure parameters, the frame model and the forward model into residuals."""

    def __init__(self, model: ForwardModel, structure: StructureParameters, frames: FrameModel,
                 refine_absorption: bool = False, free_fraction: float = 0.05, free_seed: int = 0,
                 holdout_frames: float = 0.0, restraints: list | None = None):
        self.model = model
        self.structure = structure
        self.restraints = list(restraints or [])
        self.frames = frames
        self.refine_absorption = refine_absorption and model.settings.absorption == "proportional"
        slots, pos = [], 0
        blocks = [Block("structure", (len(structure),), False, "structure")] + frames.blocks()
        if self.refine_absorption:
            blocks.append(Block("kappa", (1,), False, "absorption"))
        for b in blocks:
            size = int(np.prod(b.shape))
            slots.append(Slot(b, pos, pos + size))
            pos += size
        self.slots = {s.block.name: s for s in slots}
        self.n_params = pos
        init = {"structure": structure.theta0, **frames.initial()}
        if self.refine_absorption:
            init["kappa"] = torch.tensor([model.settings.kappa], dtype=torch.float64)
        self.theta0 = torch.cat([init[s.block.name].reshape(-1) for s in slots]).to(torch.float64)
        hkl = model.plan.scored.hkl
        self.free = torch.as_tensor(free_set_mask(hkl, model.crystal.symmetry.rotations, free_fraction, free_seed))
        self.holdout_frame = torch.as_tensor(holdout_frame_mask(model.n_frames, holdout_frames, free_seed))
        self.holdout = self.holdout_frame[model.frame] & ~self.free
        self.work = ~self.free & ~self.holdout
        self.weight = klar_weights(model.io, model.sigma, model.settings.instability)
        self.amplitude_weight = amplitude_weights(model.io, model.sigma, model.settings.instability)
        self.names = self._names()
        self.n_refined = self.n_params  # the optimiser sets the number actually refined (for GoF)
        self.jacobian_dtype = torch.float64  # float32: derivatives in single precision, values in double
        self.forward_dtype = torch.float64  # float32: solves of intensities() in single precision (Adam)
        self._last_intensities = None
        self._last_decompositions = None  # (theta, plan, Decompositions) of the last pass without gradient
        self._pending_follow = None  # (before, after) of follow_frames
        self.warm_start = None  # record of the simpler model's fit this problem started from, if any
        self.origin = self._floating_origin()

    # -- the origin of polar space groups --------------------------------------------------------

    def _floating_origin(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(V, C), both (P, k), for a space group whose origin floats along k polar directions: V[:, i]
        moves every atom by one unit (A) along direction i, leaving every intensity unchanged; C[:, i]
        is the gradient of the atoms' weighted centroid along it (weights Z x occupancy x equivalent
        positions, as Flack & Schwarzenbach 1988). Refinements hold C^T theta fixed, which defines the
        origin as the centroid's start position. None where symmetry fixes the origin, or an atom that
        is not refined (fixed hydrogens) pins it."""
        crystal = self.model.crystal
        dirs = floating_origin_directions(crystal.symmetry.rotations, crystal.cell)
        st, sp = self.slots["structure"], self.structure
        if len(dirs) == 0 or len(sp) == 0:
            return None
        own = [i for i in range(len(sp.labels)) if i not in sp.riding]  # riding H follow their parents
        theta_s = self.theta0[st.start:st.stop]
        b = torch.autograd.functional.jacobian(lambda t: sp.physical(t)[0][own].reshape(-1), theta_s)  # (3A', p)
        a = direct_basis(crystal.cell)
        occ = sp.physical(theta_s)[1]
        mult = len(crystal.symmetry.rotations) * crystal.site_multiplicity_weights().numpy()
        w = np.array([atomic_number(crystal.asu.elements[i]) * float(occ[i]) * mult[i] for i in own])
        v_all, c_all = torch.zeros((self.n_params, len(dirs)), dtype=torch.float64), torch.zeros(
            (self.n_params, len(dirs)), dtype=torch.float64)
        for k, d in enumerate(dirs):
            step = d / np.linalg.norm(a @ d)  # fractional shift of one A
            target = torch.as_tensor(np.tile(step, len(own)))
            v = torch.linalg.pinv(b) @ target
            if float(torch.linalg.norm(b @ v - target)) > 1e-8 * float(torch.linalg.norm(target)):
                return None  # some atom cannot follow the shift
            u = a @ step  # Cartesian unit vector
            grad = torch.as_tensor(np.tile(a.T @ u, len(own)) * np.repeat(w / w.sum(), 3))
            v_all[st.start:st.stop, k] = v
            c_all[st.start:st.stop, k] = b.T @ grad
        return v_all, c_all

    def fix_origin(self, theta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """theta moved along the polar directions (an exact symmetry of the data) so that the centroid
        is where it is in ``reference``."""
        if self.origin is None:
            return theta
        v, c = self.origin
        gap = c.T @ (theta.detach() - reference)
        return theta - v @ torch.linalg.solve(c.T @ v, gap)

    def step_basis(self, index: torch.Tensor) -> torch.Tensor | None:
        """(p, p - k) orthonormal basis of the steps of the refined ``index`` that keep the centroid
        (C^T delta = 0), or None where the origin does not float or the positions are not refined."""
        if self.origin is None:
            return None
        v, c = self.origin
        if bool((v.abs().sum(1) > 0)[~torch.isin(torch.arange(self.n_params), index)].any()):
            return None  # a shift would move parameters that are not refined: they pin the origin
        q, _ = torch.linalg.qr(c[index], mode="complete")
        return q[:, c.shape[1]:]

    # -- layout --------------------------------------------------------------------------------

    def _names(self) -> list[str]:
        names = list(self.structure.names)
        ids = self.model.dataset.frames.ids
        for s in self.slots.values():
            b = s.block
            if b.name == "structure":
                continue
            if b.per_frame:
                names += [f"{b.name}[{int(ids[f])}].{k}" for f in range(b.shape[0]) for k in range(b.shape[1])]
            else:
                names += [f"{b.name}.{k}" for k in range(int(np.prod(b.shape)))]
        return names

    def parameter_frames(self) -> torch.Tensor:
        """(P,) frame index of each parameter of a per-frame block, -1 for global parameters."""
        frames = torch.full((self.n_params,), -1, dtype=torch.long)
        for s in self.slots.values():
            if s.block.per_frame:
                f, k = s.block.shape
                frames[s.start:s.stop] = torch.arange(f).repeat_interleave(k)
        return frames

    def split(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: theta[s.start:s.stop].reshape(s.block.shape) for n, s in self.slots.items()}

    def group_index(self, group: str) -> torch.Tensor:
        """Indices of theta in a reporting / learning-rate group ('xyz', 'adp', 'occupancy', or a block group)."""
        st = self.slots["structure"]
        if group in self.structure.groups:
            return self.structure.groups[group] + st.start
        idx = [torch.arange(s.start, s.stop) for s in self.slots.values() if s.block.group == group]
        return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)

    def derived_mask(self) -> torch.Tensor:
        """(P,) True for weights that act only through per-frame features (network weights)."""
        m = torch.zeros(self.n_params, dtype=torch.bool)
        for s in self.slots.values():
            if s.block.derived:
                m[s.start:s.stop] = True
        return m

    def bounded_step(self, theta: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """``delta`` made feasible: each atom's ADP step shortened to keep it positive definite, each
        frame's own thickness and orientation step scaled to ``PER_FRAME_MAX_STEP``, and the network
        block scaled so that no weight moves by more than ``NETWORK_MAX_STEP`` (weights of nearly
        flat directions would otherwise get huge Gauss-Newton steps far outside where the
        linearisation holds). Other components are untouched. Returns (step, whether it was cut)."""
        delta = delta.detach().clone()
        cut = False
        for s in self.slots.values():
            if s.block.per_frame:  # each frame's row on its own
                cap, shape = PER_FRAME_MAX_STEP.get(s.block.group), s.block.shape
            else:  # the network block as a whole
                cap, shape = (NETWORK_MAX_STEP if s.block.derived else None), (1, -1)
            if cap is None or s.stop == s.start:
                continue
            rows = delta[s.start:s.stop].view(shape)
            factor = torch.clamp(cap / rows.abs().amax(1, keepdim=True).clamp_min(1e-300), max=1.0)
            if bool((factor < 1).any()):
                delta[s.start:s.stop] = (rows * factor).reshape(-1)
                cut = True
        st = self.slots["structure"]
        d = delta[st.start:st.stop]
        if torch.any(d != 0):
            d, cut_adp = self.structure.bounded_step(theta[st.start:st.stop].detach(), d)
            delta[st.start:st.stop] = d
            cut = cut or cut_adp
        return delta, cut

    # -- evaluation ----------------------------------------------------------------------------

    def potential(self, raw: dict[str, torch.Tensor]):
        xyz, occ, u = self.structure.physical(raw["structure"])
        kappa = raw["kappa"][0] if "kappa" in raw else None
        return self.model.potential(xyz, occ, u, kappa)

    def state(self, raw: dict[str, torch.Tensor]) -> FrameState:
        return self.frames.state(raw)

    def intensities(self, theta: torch.Tensor) -> torch.Tensor:
        """Calculated intensities (R,) at theta, solved in ``forward_dtype``. Values computed without
        gradient are remembered for the last theta with the precision they were solved in (see
        :meth:`intensities_at`, :meth:`jacobian`)."""
        plan = self.model.plan
        keeping = not torch.is_grad_enabled() and self._keeps(plan)
        if keeping:
            self._last_decompositions = None  # one set in memory at a time
        ic, keep = self._solve(theta, plan, keeping)
        if keep is not None:
            self._last_decompositions = (theta.detach().clone(), plan, keep)
        if not ic.requires_grad:
            self._last_intensities = (theta.detach().clone(), ic, self.forward_dtype)
        return ic

    def frame_intensities(self, theta: torch.Tensor, frames: torch.Tensor) -> tuple:
        """(intensities (R,) without gradient at theta of the frames in the (F,) bool mask, zero at
        the others; that pass's decompositions or None; their places in the plan, for
        ``Decompositions.take_frames``). Nothing is remembered: the values are not those of theta."""
        plan, source = frame_subplan(self.model.plan, frames)
        with torch.no_grad():
            ic, keep = self._solve(theta, plan, self._keeps(plan))
        return ic, keep, source

    def _keeps(self, plan) -> bool:
        """Whether a pass without gradient over ``plan`` keeps its decompositions: they fit the budget,
        and the pass solves in at least the Jacobian's precision."""
        if self.forward_dtype == torch.float32 and self.jacobian_dtype == torch.float64:
            return False
        size = sum(ch.hkl.shape[0] * ch.hkl.shape[1] ** 2 for ch in plan.chunks)
        size *= 1 + (self.model.settings.absorption != "none")  # and V^-1 with absorption
        budget = max(KEEP_DECOMPOSITIONS_BYTES, KEEP_DECOMPOSITIONS_SHARE * device_memory(plan.device))
        return size * (8 if self.jacobian_dtype != torch.float64 else 16) <= budget

    def _solve(self, theta: torch.Tensor, plan, keeping: bool, decompositions=None) -> tuple:
        """Intensities (R,) over ``plan`` at theta in ``forward_dtype`` and, when ``keeping`` (see
        :meth:`_keeps`), its decompositions in the Jacobian's precision, else None. ``decompositions``
        (of these structure matrices, kept at another thickness) replace the solver."""
        raw = self.split(theta)
        u, u_abs = self.potential(raw)
        state = self.state(raw)
        single = self.forward_dtype == torch.float32
        if single:  # the solves in single precision; everything around them stays double
            u = u.to(torch.complex64)
            u_abs = None if u_abs is None else u_abs.to(torch.complex64)
            state = state.to(torch.float32)
        keep = None
        if keeping:
            keep = Decompositions(torch.complex64 if self.jacobian_dtype != torch.float64 else torch.complex128)
        ic = simulate_frames(plan, u, u_abs, state, absorption_method=self.model.settings.absorption_method,
                             keep=keep, decompositions=decompositions).to(torch.float64)
        return ic, (keep if keep is not None and keep.chunks else None)

    def remember_intensities(self, theta: torch.Tensor, ic: torch.Tensor) -> None:
        """Record intensities, solved in ``forward_dtype``, known to be those at theta (e.g. put
        together from trials that share everything each frame depends on) for :meth:`intensities_at`."""
        self._last_intensities = (theta.detach().clone(), ic.detach().to(torch.float64), self.forward_dtype)

    def decompositions_at(self, theta: torch.Tensor):
        """The eigendecompositions the last forward pass kept if it was at theta, else None."""
        return self._last_decompositions[2] if self.decompositions_kept_at(theta) else None

    def remember_decompositions(self, theta: torch.Tensor, decompositions) -> None:
        """Record eigendecompositions known to be those at theta (put together frame by frame from
        trials, as :meth:`remember_intensities`)."""
        self._last_decompositions = (theta.detach().clone(), self.model.plan, decompositions)

    def resample(self, samples_per_frame: np.ndarray) -> None:
        """Rebuild the model's plan with these tilt counts per frame (the observations stay the
        same); values and decompositions remembered for the old plan are dropped."""
        self.model.resample(samples_per_frame)
        self._last_intensities = self._last_decompositions = None

    def follow_frames(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """``after`` differs from ``before`` in the own parameters (thickness, orientation corrections) of
        some frames only: a rescan, search or restart moved them. The values and decompositions at
        ``after``, when next asked for, are then those remembered at ``before`` with only the moved frames
        solved again; frames moved in thickness alone take the kept decompositions (a structure matrix
        does not depend on thickness), with no solve. Asked for after anything else was evaluated, or
        for another plan, the pass is whole as before."""
        self._pending_follow = (before.detach().clone(), after.detach().clone())

    def _follow(self, theta: torch.Tensor) -> None:
        """Form the values (and decompositions) at theta announced by :meth:`follow_frames`, if still valid."""
        pending = self._pending_follow
        if pending is None or not torch.equal(pending[1], theta.detach()):
            return
        self._pending_follow = None
        before, after = pending
        last = self._last_intensities
        if last is None or last[2] != self.forward_dtype or not torch.equal(last[0], before):
            return
        changed = before != after
        owner = self.parameter_frames()[changed]
        if not len(owner) or bool((owner < 0).any()):
            return
        frames = torch.zeros(self.model.n_frames, dtype=torch.bool)
        frames[owner] = True
        dec = self.decompositions_at(before)
        sl = self.slots.get("thickness")
        thickness_only = sl is not None and not bool(torch.cat([changed[:sl.start], changed[sl.stop:]]).any())
        wanted = torch.complex64 if self.forward_dtype == torch.float32 else torch.complex128
        with torch.no_grad():
            if thickness_only and dec is not None and dec.dtype == wanted:
                ic, _ = self._solve(after, self.model.plan, False, decompositions=dec)
            else:
                ic_moved, dec_moved, source = self.frame_intensities(after, frames)
                ic = torch.where(frames[self.model.frame], ic_moved, last[1])
                if dec is not None and dec_moved is not None and dec.dtype == dec_moved.dtype:
                    dec.take_frames(self.model.plan, dec_moved, frames, source)
                else:
                    dec = None
        self._last_intensities = (after.clone(), ic, self.forward_dtype)
        if dec is not None:
            self.remember_decompositions(after, dec)

    def decompositions_kept_at(self, theta: torch.Tensor) -> bool:
        """Whether a Jacobian at theta would take the eigendecompositions of the last forward pass."""
        self._follow(theta)
        kept = self._last_decompositions
        return kept is not None and kept[1] is self.model.plan and torch.equal(kept[0], theta.detach())

    def values_single_at(self, theta: torch.Tensor) -> bool:
        """Whether the intensities remembered at theta were solved in single precision."""
        self._follow(theta)
        last = self._last_intensities
        return last is not None and last[2] == torch.float32 and torch.equal(last[0], theta.detach())

    def intensities_at(self, theta: torch.Tensor) -> torch.Tensor:
        """Intensities at theta without gradient, reusing the last such evaluation when theta is the
        same (an LM iteration has just computed them at its accepted trial point) and it was solved
        in ``forward_dtype`` or in double precision."""
        self._follow(theta)
        last = self._last_intensities
        if (last is not None and last[2] in (self.forward_dtype, torch.float64)
                and torch.equal(last[0], theta.detach())):
            return last[1]
        with torch.no_grad():
            return self.intensities(theta.detach())

    def scales(self, ic: torch.Tensor, kind: str = "intensity") -> torch.Tensor:
        """Per-frame least-squares scales k_f of Ic (or k_F of Fc) fitted on the work reflections."""
        yo, yc, w = self._observable(ic, kind)
        return frame_scales(yo, yc, torch.where(self.work, w, torch.zeros_like(w)), self.model.frame, self.model.n_frames)

    def residuals(self, ic: torch.Tensor, kind: str = "intensity") -> torch.Tensor:
        """Weighted residuals over work reflections with frame scales profiled (differentiable in ic):
        sqrt(w) (Io - k Ic) for ``kind`` "intensity", sqrt(w_F) (Fo - k_F Fc) for "amplitude"."""
        yo, yc, w = self._observable(ic, kind)
        k = self.scales(ic, kind)
        return (torch.sqrt(w) * (yo - k[self.model.frame] * yc))[self.work]

    def _observable(self, ic: torch.Tensor, kind: str):
        if kind == "intensity":
            return self.model.io, ic, self.weight
        if kind == "amplitude":
            return amplitude(self.model.io), amplitude(ic), self.amplitude_weight
        raise ValueError(f"unknown objective kind '{kind}'")

    def _prior_factor(self, kind: str) -> float:
        """Prior rows are written against the intensity objective; the amplitude objective sees them
        scaled by the ratio of the two objectives' norms, so their relative weight is the same."""
        if kind == "intensity":
            return 1.0
        return math.sqrt(self.objective_norm(kind) / self.objective_norm("intensity"))

    def prior_residuals(self, theta: torch.Tensor) -> torch.Tensor:
        """Least-squares rows that are not observations: structure restraints and priors of the
        frame model (smoothness)."""
        raw = self.split(theta)
        rows = [self.frames.prior_residuals(raw)]
        if self.restraints:
            xyz, _, u = self.structure.physical(raw["structure"])
            rows.append(restraint_residuals(self.restraints, self.model.crystal.cell, xyz, u))
        return torch.cat(rows)

    def objective(self, theta: torch.Tensor, kind: str = "intensity") -> torch.Tensor:
        """Sum of squared weighted residuals over the work set (see :meth:`residuals`) plus the
        squared prior rows. The amplitude objective is smoother far from the minimum (a misplaced
        atom changes strong intensities quadratically, amplitudes linearly): the first phases use it."""
        return torch.sum(self.residuals(self.intensities(theta), kind) ** 2) + self.prior_cost(theta, kind)

    def residual_vector(self, theta: torch.Tensor, kind: str = "intensity") -> torch.Tensor:
        """The rows of :meth:`jacobian`'s residuals at theta: the work observations (reusing the last
        evaluation at the same theta), then the prior rows."""
        with torch.no_grad():
            r = self.residuals(self.intensities_at(theta), kind)
            return torch.cat([r, self.prior_residuals(theta) * self._prior_factor(kind)])

    def prior_cost(self, theta: torch.Tensor, kind: str = "intensity") -> torch.Tensor:
        """The objective's prior part: the squared prior rows, scaled for ``kind``."""
        return torch.sum((self.prior_residuals(theta) * self._prior_factor(kind)) ** 2)

    def frame_costs(self, theta: torch.Tensor, kind: str = "intensity") -> torch.Tensor:
        """(F,) each frame's share of the objective's observation part at theta (no gradient; reuses
        the last evaluation at the same theta)."""
        return self.frame_costs_of(self.intensities_at(theta), kind)

    def frame_prior_costs(self, theta: torch.Tensor, kind: str = "intensity") -> torch.Tensor:
        """(F,) each frame's share of the objective's prior part that depends on its own parameters
        only (the orientation prior); the rest of the prior ties frames together or is global."""
        with torch.no_grad():
            return self.frames.frame_prior_costs(self.split(theta)) * self._prior_factor(kind) ** 2

    def frame_costs_of(self, ic: torch.Tensor, kind: str = "intensity") -> torch.Tensor:
        """(F,) each frame's share of the objective's observation part for intensities ``ic``."""
        with torch.no_grad():
            r = self.residuals(ic, kind)
        return torch.zeros(self.model.n_frames, dtype=r.dtype).index_add(0, self.model.frame[self.work], r ** 2)

    def objective_norm(self, kind: str = "intensity") -> float:
        """sum w Io^2 (or sum w_F Fo^2) over the work set: objective / norm = wR2^2 (or wR(F)^2)."""
        yo, _, w = self._observable(self.model.io, kind)
        return float(torch.sum(w[self.work] * yo[self.work] ** 2))

    def figures(self, ic: torch.Tensor, subset: str = "work") -> Figures:
        ic = ic.detach()
        k = self.scales(ic)
        m = {"work": self.work, "free": self.free, "holdout": self.holdout, "all": torch.ones_like(self.work)}[subset]
        if subset == "holdout":  # these frames have no work reflections: their scale is fitted on themselves
            k = frame_scales(self.model.io, ic, torch.where(m, self.weight, torch.zeros_like(self.weight)),
                             self.model.frame, self.model.n_frames)
        frame = self.model.frame[m]
        return figures_of_merit(self.model.io[m], self.model.sigma[m], ic[m], frame, self.model.n_frames,
                                self.n_refined if subset == "work" else 0, self.model.settings.instability,
                                scale=k)

    # -- Jacobian ------------------------------------------------------------------------------

    def jacobian(self, theta: torch.Tensor, index: torch.Tensor | None = None, kind: str = "intensity"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ic (R,), residuals (W,), J (W, p)) at theta for the columns ``index`` (default all).

        Forward mode through one decomposition per sample: global parameters are one tangent
        each; a per-frame block of width k costs k tangents for all frames together (frame f's
        intensities depend only on row f).
        """
        theta = theta.detach()
        wanted = torch.zeros(self.n_params, dtype=torch.bool)
        wanted[torch.arange(self.n_params) if index is None else index] = True
        raw = self.split(theta)
        from torch.func import jvp, vmap

        state = self.state(raw)
        layout = [x is not None for x in state.tensors()]
        derived = [s for s in self.slots.values() if s.block.derived]
        net = self.frames.thickness
        feat0 = net.features(raw, self.frames.ctx).detach() if derived else None
        has_kappa = "kappa" in raw

        def cheap(th, shift):  # atomic parameters, kappa and the frame state: cheap to push tangents through
            r = self.split(th)
            xyz, occ, uf = self.structure.physical(r["structure"])
            st = self.frames.state(r, feature_shift=shift) if derived else self.state(r)
            kappa = r["kappa"] if has_kappa else th.new_zeros(1)
            return (xyz, occ, uf, kappa, *(x for x in st.tensors() if x is not None))

        def unflatten(flat):
            it = iter(flat)
            return tuple(next(it) if present else None for present in layout)

        tangents, columns = [], []  # columns: list of (kind, data); tangents: (d_theta, d_feature_shift)
        zero_shift = None if feat0 is None else torch.zeros_like(feat0)
        for name, s in self.slots.items():
            b = s.block
            if b.derived:  # network weights: one tangent per feature column, then the chain rule
                if not wanted[s.start:s.stop].any():
                    continue
                for j in range(feat0.shape[1]):
                    e = torch.zeros_like(feat0)
                    e[:, j] = 1.0
                    tangents.append((torch.zeros_like(theta), e))
                    columns.append(("feature", (s, j)))
            elif b.per_frame:
                f, k = b.shape
                for j in range(k):
                    cols = s.start + torch.arange(f) * k + j
                    if not wanted[cols].any():
                        continue
                    d = torch.zeros_like(theta)
                    d[s.start:s.stop].view(f, k)[:, j] = 1.0
                    tangents.append((d, zero_shift))
                    columns.append(("frame", cols))
            else:
                for i in range(s.start, s.stop):
                    if not wanted[i]:
                        continue
                    d = torch.zeros_like(theta)
                    d[i] = 1.0
                    tangents.append((d, zero_shift))
                    columns.append(("global", i))
        # tangents of the potential and the frame state: all directions in one batched pass
        d_theta = torch.stack([d for d, _ in tangents])
        if zero_shift is None:
            stacked = vmap(lambda d: jvp(lambda th: cheap(th, None), (theta,), (d,))[1])(d_theta)
        else:
            stacked = vmap(lambda d, e: jvp(cheap, (theta, zero_shift), (d, e))[1])(
                d_theta, torch.stack([e for _, e in tangents]))
        # the potential's tangents from per-atom tables (one matrix product for all tangents)
        xyz, occ, uf = self.structure.physical(raw["structure"])
        u, u_abs, du, du_abs = self.model.potential_jvp(xyz, occ, uf, raw["kappa"][0] if has_kappa else None,
                                                        *stacked[:3], stacked[3][:, 0] if has_kappa else None)
        t_list = [(du[i], None if du_abs is None else du_abs[i], unflatten([x[i] for x in stacked[4:]]))
                  for i in range(len(tangents))]
        low = self.jacobian_dtype != torch.float64

        def cast(x):  # the Jacobian's working precision
            if x is None:
                return None
            x = x.detach()
            return x.to(torch.complex64 if x.is_complex() else self.jacobian_dtype) if low else x

        t_list = [(cast(a), cast(b), tuple(cast(x) for x in c)) for a, b, c in t_list]
        if low:  # values (residuals, scales, cost) in double precision; a new pass keeps its decompositions
            ic_double = self.intensities_at(theta)
        reuse = self.decompositions_at(theta)  # those of the accepted trial point, if kept
        ic, d_ic = simulate_frames_jvp(self.model.plan, cast(u), cast(u_abs),
                                       FrameState(*[cast(x) for x in state.tensors()]),
                                       t_list, absorption_method=self.model.settings.absorption_method,
                                       decompositions=reuse)
        d_ic = d_ic.to(torch.float64)
        if low:
            ic = ic_double
        j_ic = torch.zeros((len(ic), self.n_params), dtype=ic.dtype)
        frame = self.model.frame
        d_feat = {}  # slot name -> (F, k, P) d features / d weights
        for c, (column, data) in enumerate(columns):
            if column == "global":
                j_ic[:, data] = d_ic[:, c]
            elif column == "frame":
                j_ic[torch.arange(len(ic)), data[frame]] = d_ic[:, c]
            else:
                s, jf = data
                if s.block.name not in d_feat:
                    d_feat[s.block.name] = _dense_jacobian(
                        lambda w, s=s: net.features({**raw, s.block.name: w}, self.frames.ctx), raw[s.block.name],
                        feat0.numel())
                j_ic[:, s.start:s.stop] += d_ic[:, c, None] * d_feat[s.block.name][frame, jf, :]
        # residual r = sqrt(w)(yo - k_f yc), k_f = sum_f w yo yc / sum_f w yc^2 over work rows;
        # y = I, or y = F = sqrt(I) with dF = dI / 2F
        yo, yc, w = self._observable(ic, kind)
        j_y = j_ic if kind == "intensity" else j_ic / (2 * yc[:, None])
        ww = torch.where(self.work, w, torch.zeros_like(w))
        den = torch.zeros(self.model.n_frames, dtype=ic.dtype).index_add(0, frame, ww * yc * yc)
        k = self.scales(ic, kind)
        dk_coef = ww * (yo - 2 * k[frame] * yc) / den[frame].clamp_min(1e-300) * (k[frame] > 0)  # dk_f / dy_j
        dk = torch.zeros((self.model.n_frames, self.n_params), dtype=ic.dtype).index_put_(
            (frame,), dk_coef[:, None] * j_y, accumulate=True)  # index_add is ~50x slower on a CPU
        sw = torch.sqrt(w)
        jac = -sw[:, None] * (k[frame, None] * j_y + yc[:, None] * dk[frame])
        r = sw * (yo - k[frame] * yc)
        cols = torch.arange(self.n_params) if index is None else index
        factor = self._prior_factor(kind)
        prior = self.prior_residuals(theta) * factor
        if len(prior):
            j_prior = _dense_jacobian(self.prior_residuals, theta, len(prior)) * factor
            return ic, torch.cat([r[self.work], prior]), torch.cat([jac[self.work], j_prior])[:, cols]
        return ic, r[self.work], jac[self.work][:, cols]


def _dense_jacobian(fn, x: torch.Tensor, n_out: int) -> torch.Tensor:
    """d fn / d x, shape fn(x).shape + x.shape, for fn with ``n_out`` output elements: by forward mode
    when x has fewer elements (a learned mixture's 98 x 65 smoothness rows against its few hundred
    weights: one vmapped jvp per weight, not one vmapped backward pass per row), else by reverse mode."""
    from torch.func import jacfwd, jacrev

    return (jacfwd if x.numel() < n_out else jacrev)(fn)(x)
