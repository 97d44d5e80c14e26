"""The composed forward model: crystal -> potential -> frame intensities, with the observed data."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..crystal.structure import Crystal
from ..io.pets import PetsDataset
from ..physics.diffraction import (AbsorptionMethod, BeamSettings, FrameState, build_plan,
                                   frame_state_from_dataset, simulate_frames)
from ..physics.structure_factors import AbsorptionModel, crystal_potential, potential_plan
from .objective import Figures, figures_of_merit


@dataclass(frozen=True)
class ModelSettings:
    beams: BeamSettings = field(default_factory=BeamSettings)
    absorption: AbsorptionModel = "none"
    kappa: float = 0.05  # proportional absorption U' = kappa U
    absorption_method: AbsorptionMethod = "exact"
    instability: float = 0.01  # u in w = 1/(sigma^2 + (u Io)^2)


class ForwardModel:
    """Holds the cached geometry for one dataset and evaluates intensities for given values."""

    def __init__(self, crystal: Crystal, dataset: PetsDataset, settings: ModelSettings = ModelSettings(),
                 frame_mask: np.ndarray | None = None):
        self.crystal = crystal
        self.dataset = dataset
        self.settings = settings
        self.plan = build_plan(dataset, settings.beams, frame_mask=frame_mask)
        self.potential_plan = potential_plan(self.plan.potential_hkl, crystal, dataset.wavelength)
        rows = self.plan.scored.row
        self.io = torch.as_tensor(dataset.reflections.intensity[rows])
        self.sigma = torch.as_tensor(dataset.reflections.sigma[rows])
        self.frame = torch.as_tensor(self.plan.scored.frame).long()
        self.n_frames = len(dataset.frames)

    def potential(self, xyz=None, occupancy=None, u_frac=None, kappa=None):
        asu = self.crystal.asu
        return crystal_potential(self.potential_plan, asu.xyz if xyz is None else xyz,
                                 asu.occupancy if occupancy is None else occupancy,
                                 asu.u_frac if u_frac is None else u_frac,
                                 absorption=self.settings.absorption,
                                 kappa=self.settings.kappa if kappa is None else kappa)

    def frame_state(self, thickness) -> FrameState:
        return frame_state_from_dataset(self.dataset, thickness)

    def intensities(self, state: FrameState, potential=None, per_thickness: bool = False) -> torch.Tensor:
        u, u_abs = self.potential() if potential is None else potential
        return simulate_frames(self.plan, u, u_abs, state, absorption_method=self.settings.absorption_method,
                               per_thickness=per_thickness)

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

            def scan(ts):
                state = self.frame_state(torch.as_tensor(ts, dtype=torch.float64))
                ic = self.intensities(state, pot, per_thickness=True)
                return [self.figures(ic[:, q]).wR2 for q in range(len(ts))]

            coarse = np.arange(100.0, 3001.0, 50.0) if grid is None else np.asarray(grid, float)
            w1 = scan(coarse)
            t1 = coarse[int(np.nanargmin(w1))]
            fine = np.arange(max(t1 - 50, 10.0), t1 + 50.1, 5.0)
            w2 = scan(fine)
            best = float(fine[int(np.nanargmin(w2))])
        return best, {"coarse_thickness": coarse.tolist(), "coarse_wR2": w1}

    def n_beams_mean(self) -> float:
        return float(np.mean(self.plan.n_beams))
