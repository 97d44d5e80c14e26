"""The composed forward model: crystal -> potential -> frame intensities, with the observed data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from ..crystal.structure import Crystal
from ..io.errors import InputError
from ..io.pets import PetsDataset
from ..physics.diffraction import (AbsorptionMethod, FrameState, frame_state_from_dataset, pass_seconds,
                                   simulate_frames, solve_cost_probe)
from ..physics.plan import BeamSettings, build_plan, frame_subplan
from ..physics.device import default_device, resolve_device, work_scale
from ..physics.geometry import fringe_sample_counts
from ..physics.structure_factors import AbsorptionModel, crystal_potential, crystal_potential_jvp, potential_plan
from .objective import Figures, figures_of_merit, frame_scales, klar_weights


@dataclass(frozen=True)
class ModelSettings:
    beams: BeamSettings = field(default_factory=BeamSettings)
    absorption: AbsorptionModel = "none"
    kappa: float = 0.05  # proportional absorption U' = kappa U
    absorption_method: AbsorptionMethod = "exact"
    instability: float = 0.01  # u in w = 1/(sigma^2 + (u Io)^2)
    device: str | None = None  # where the Bloch solves run (cpu, cuda, auto); None: the process default


class ForwardModel:
    """Holds the cached geometry for one dataset and evaluates intensities for given values."""

    def __init__(self, crystal: Crystal, dataset: PetsDataset, settings: ModelSettings = ModelSettings(),
                 frame_mask: np.ndarray | None = None):
        self.crystal = crystal
        self.dataset = dataset
        self.settings = settings
        self.frame_mask = frame_mask
        self.device = default_device() if settings.device is None else resolve_device(settings.device)
        self.plan = build_plan(dataset, self._plan_settings(), frame_mask=frame_mask).to(self.device)
        if len(self.plan.scored.row) == 0:
            b = settings.beams
            g = np.linalg.norm(np.asarray(dataset.reflections.hkl, float) @ np.asarray(dataset.ub, float).T, axis=1)
            if len(g) and not (g <= self.plan.g_max).any():
                raise InputError(dataset.path, "reflection loop", f"no reflection is scored: none lies within g_max "
                                 f"{self.plan.g_max:g} 1/A (the nearest at |g| = {g.min():.3g} 1/A); raise g_max")
            raise InputError(dataset.path, "reflection loop", f"no reflection is scored: none lies within RSg {b.rsg:g} "
                             f"(and DSg {b.dsg:g} 1/A) of its Bragg condition in its frame; check the UB matrix, the "
                             f"frame angles and the wedge half-angles, or raise --rsg")
        self.potential_plan = potential_plan(self.plan.potential_hkl, crystal, dataset.wavelength)
        rows = self.plan.scored.row
        self.io = torch.as_tensor(dataset.reflections.intensity[rows])
        self.sigma = torch.as_tensor(dataset.reflections.sigma[rows])
        self.frame = torch.as_tensor(self.plan.scored.frame).long()
        self.n_frames = len(dataset.frames)
        self._per_n3: float | None = None  # solve_cost_probe, measured once

    def resample(self, samples_per_frame: np.ndarray) -> None:
        """Rebuild the plan with these tilt (or azimuth) counts per frame; the scored reflections,
        hence the observations, stay the same (with segment coupling, which ones are coupled at all
        depends on the tilts, so they are passed on rather than chosen again)."""
        self.plan = build_plan(self.dataset, self._plan_settings(), frame_mask=self.frame_mask,
                               samples_per_frame=np.asarray(samples_per_frame, int),
                               scored_rows=self.plan.scored.row).to(self.device)
        self.potential_plan = potential_plan(self.plan.potential_hkl, self.crystal, self.dataset.wavelength)

    def _plan_settings(self) -> BeamSettings:
        """The beam settings with chunks sized for the device (larger batches on a GPU)."""
        b = self.settings.beams
        centring = tuple(tuple(float(x) for x in t) for t in self.crystal.symmetry.centring_translations())
        return dataclasses.replace(b, chunk_elements=int(b.chunk_elements * work_scale(self.device)), centring=centring)

    def fit_samples_to_fringes(self, thickness, samples_per_fringe: float) -> bool:
        """Give each frame at least ``samples_per_fringe`` tilt samples per Pendelloesung fringe of its
        fastest scored reflection at ``thickness`` (A, one value or one per frame: the largest it
        sees), and at least the settings' n_samples: below one per fringe the rocking integral is
        wrong by percents to tens of percents (docs/physics.md). Returns whether the plan changed."""
        if samples_per_fringe <= 0:
            return False
        counts = self.fringe_counts(thickness, samples_per_fringe)
        if np.array_equal(counts, self.samples_per_frame()):
            return False
        self.resample(counts)
        return True

    def fringe_counts(self, thickness, samples_per_fringe: float) -> np.ndarray:
        """(F,) the tilt samples :meth:`fit_samples_to_fringes` gives each frame at ``thickness``."""
        sc = self.plan.scored
        return fringe_sample_counts(sc.excitation_range, sc.frame, self.n_frames,
                                    np.asarray(thickness, float) * samples_per_fringe, self.plan.geometry,
                                    self.settings.beams.n_samples)

    def samples_per_frame(self) -> np.ndarray:
        return np.bincount(self.plan.samples.frame, minlength=self.n_frames)

    def potential(self, xyz=None, occupancy=None, u_frac=None, kappa=None):
        asu = self.crystal.asu
        return crystal_potential(self.potential_plan, asu.xyz if xyz is None else xyz,
                                 asu.occupancy if occupancy is None else occupancy,
                                 asu.u_frac if u_frac is None else u_frac,
                                 absorption=self.settings.absorption,
                                 kappa=self.settings.kappa if kappa is None else kappa)

    def potential_jvp(self, xyz, occupancy, u_frac, kappa, d_xyz, d_occupancy, d_u_frac, d_kappa=None):
        """(U, U_abs, dU (T, M), dU_abs) along T tangents of the atomic parameters (and of kappa)."""
        return crystal_potential_jvp(self.potential_plan, xyz, occupancy, u_frac, d_xyz, d_occupancy, d_u_frac,
                                     absorption=self.settings.absorption,
                                     kappa=self.settings.kappa if kappa is None else kappa, d_kappa=d_kappa)

    def frame_state(self, thickness) -> FrameState:
        return frame_state_from_dataset(self.dataset, thickness)

    def intensities(self, state: FrameState, potential=None, per_thickness: bool = False,
                    decompositions=None, plan=None) -> torch.Tensor:
        """Intensities over the model's plan (or ``plan``, e.g. a :func:`frame_subplan` of it)."""
        u, u_abs = self.potential() if potential is None else potential
        return simulate_frames(self.plan if plan is None else plan, u, u_abs, state,
                               absorption_method=self.settings.absorption_method,
                               per_thickness=per_thickness, decompositions=decompositions)

    def figures(self, ic: torch.Tensor, n_params: int = 0) -> Figures:
        return figures_of_merit(self.io, self.sigma, ic, self.frame, self.n_frames, n_params,
                                self.settings.instability)

    def best_thickness(self, grid: np.ndarray | None = None) -> tuple[float, dict]:
        """Best single (global) thickness by wR2, from one set of eigendecompositions.

        A coarse grid (50 A steps, 100-3000 A) then a 5 A grid around the minimum; each pass solves
        every sample once for all thicknesses.
        """
        with torch.no_grad():
            pot = self.potential()
            norm = float(torch.sum(klar_weights(self.io, self.sigma, self.settings.instability) * self.io ** 2))

            def scan(ts):  # global wR2 per grid thickness
                return np.sqrt(np.nansum(self.thickness_scan(ts, potential=pot), 0) / norm).tolist()

            coarse = np.arange(100.0, 3001.0, 50.0) if grid is None else np.asarray(grid, float)
            w1 = scan(coarse)
            t1 = coarse[int(np.nanargmin(w1))]
            fine = np.arange(max(t1 - 50, 10.0), t1 + 50.1, 5.0)
            w2 = scan(fine)
            best = float(fine[int(np.nanargmin(w2))])
        return best, {"coarse_thickness": coarse.tolist(), "coarse_wR2": w1}

    def pass_seconds_estimate(self) -> float:
        """Seconds a pass without gradient in single precision (a thickness scan, an LM trial point)
        takes on this machine over the current plan (probed once per model, see solve_cost_probe)."""
        if self._per_n3 is None:
            u, u_abs = self.potential()
            pot = tuple(None if x is None else x.to(torch.complex64) for x in (u, u_abs))
            self._per_n3 = solve_cost_probe(self.plan, *pot, self.frame_state(600.0).to(torch.float32),
                                            self.settings.absorption_method)
        return pass_seconds(self.plan, self._per_n3)

    def n_beams_mean(self) -> float:
        solved = self.plan.n_beams > 1  # frames without scored reflections are not solved
        return float(np.mean(self.plan.n_beams[solved])) if solved.any() else 0.0

    def thickness_scan(self, grid, potential=None, state: FrameState | None = None,
                       use: torch.Tensor | None = None, max_elements: float = 4e7, decompositions=None,
                       frames: torch.Tensor | None = None) -> np.ndarray:
        """Per-frame weighted residual sum w (Io - k Ic)^2 (F, Q) for each grid thickness (A).

        Every grid point reuses the same eigendecompositions: the grid is split into blocks only
        when a chunk's amplitudes (samples x beams x grid points) would exceed ``max_elements``.
        ``use`` masks the reflections that count (e.g. the work set). Frames without reflections get NaN.
        ``decompositions``: those of a pass at the same structure and orientations (any thickness), in
        place of the solver. The scan solves in single precision: it only ranks grid thicknesses, and
        its costs agree with double precision to ~1e-5 relative (tests). ``frames``: an (F,) bool
        mask; only those frames are solved (the others' rows are NaN; not with ``decompositions``).
        """
        grid = torch.as_tensor(np.asarray(grid, float))
        plan = self.plan if frames is None else frame_subplan(self.plan, frames)[0]
        widest = max((ch.hkl.shape[0] * ch.hkl.shape[1] for ch in plan.chunks), default=1)
        block = max(1, int(max_elements // widest))
        out = []
        with torch.no_grad():
            pot = self.potential() if potential is None else potential
            pot = tuple(None if x is None else x.to(torch.complex64) for x in pot)
            for q0 in range(0, len(grid), block):
                st = self.grid_state(grid[q0:q0 + block], state).to(torch.float32)
                ic = self.intensities(st, pot, per_thickness=True, decompositions=decompositions, plan=plan)
                out.append(self.scan_costs(ic.to(torch.float64), use))
        table = np.concatenate(out, 1)
        if frames is not None:
            table[~np.asarray(frames.cpu(), bool)] = np.nan
        return table

    def grid_state(self, grid, state: FrameState | None = None) -> FrameState:
        """``state`` (default: the data's) with every frame at the thicknesses ``grid`` (A), equal weights."""
        base = self.frame_state(1.0) if state is None else state
        ts = torch.as_tensor(np.asarray(grid, float))
        return FrameState(base.alpha, base.beta, base.omega, ts[None, :].expand(self.n_frames, -1),
                          torch.full((self.n_frames, len(ts)), 1.0 / len(ts), dtype=torch.float64),
                          base.surface_normal, base.orientation_correction)

    def scan_costs(self, ic: torch.Tensor, use: torch.Tensor | None = None) -> np.ndarray:
        """Per-frame w (Io - k Ic)^2 (F, Q) of each column of per-thickness intensities ic (R, Q), each
        with its own WLS frame scales; frames without (``use``d) reflections get NaN."""
        use = torch.ones(len(self.io), dtype=torch.bool) if use is None else use
        w = klar_weights(self.io, self.sigma, self.settings.instability) * use
        out = []
        for j in range(ic.shape[1]):
            k = frame_scales(self.io, ic[:, j], w, self.frame, self.n_frames)
            res = w * (self.io - k[self.frame] * ic[:, j]) ** 2
            out.append(torch.zeros(self.n_frames, dtype=torch.float64).index_add(0, self.frame, res))
        table = torch.stack(out, 1).numpy()
        counts = np.bincount(self.frame.numpy()[use.numpy()], minlength=self.n_frames)
        table[counts == 0] = np.nan
        return table
