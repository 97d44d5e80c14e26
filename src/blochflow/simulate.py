"""Synthetic datasets on a real geometry: known structure, known thickness, chosen noise."""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .crystal.structure import Crystal
from .io.errors import InputError
from .io.pets import PetsDataset, ReflectionTable
from .physics.diffraction import FrameState, frame_state_from_dataset
from .refine.model import ForwardModel, ModelSettings

Noise = Literal["none", "poisson", "gaussian"]

_ALLOWED_FUNCS = {"cos": np.cos, "sin": np.sin, "tan": np.tan, "abs": np.abs, "sqrt": np.sqrt,
                  "exp": np.exp, "radians": np.radians, "minimum": np.minimum, "maximum": np.maximum}


def evaluate_profile(expr: str, frames, source: str = "--thickness-expr") -> np.ndarray:
    """Evaluate a per-frame expression in alpha, beta, omega (degrees) and frame (id).

    Only arithmetic, numbers, those names and a few numpy functions (cos, sin, radians, ...) are
    allowed, e.g. ``800 / cos(radians(alpha))``.
    """
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise InputError(source, expr, "not a valid expression") from None
    names = {"alpha": frames.alpha_deg, "beta": frames.beta_deg, "omega": frames.omega_deg,
             "frame": frames.ids.astype(float), "pi": math.pi}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in names and node.id not in _ALLOWED_FUNCS:
            raise InputError(source, expr, f"unknown name '{node.id}'")
        if not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Constant,
                                 ast.Load, ast.operator, ast.unaryop)):
            raise InputError(source, expr, f"'{type(node).__name__}' is not allowed")
    value = eval(compile(tree, "<profile>", "eval"), {"__builtins__": {}}, {**names, **_ALLOWED_FUNCS})
    value = np.broadcast_to(np.asarray(value, float), (len(frames),)).copy()
    if not np.all(np.isfinite(value)) or np.any(value <= 0):
        raise InputError(source, expr, "gives a non-positive or non-finite thickness for some frame")
    return value


@dataclass(frozen=True)
class ThicknessSpec:
    """Per-frame thickness: mean (F,) in A and, optionally, a Gaussian spread (F,) in A, or an
    explicit distribution: points (F, Q) in A with weights (F, Q) summing to 1 per frame."""

    mean: np.ndarray
    spread: np.ndarray | None = None
    n_points: int = 16
    points: np.ndarray | None = None
    weights: np.ndarray | None = None

    @classmethod
    def from_points(cls, points: np.ndarray, weights: np.ndarray) -> "ThicknessSpec":
        w = np.asarray(weights, float) / np.sum(weights, 1, keepdims=True)
        return cls(mean=np.sum(points * w, 1), points=np.asarray(points, float), weights=w)

    @property
    def is_constant(self) -> bool:
        """The same thickness (no spread, no distribution) for every frame: summaries give one number."""
        return self.points is None and self.spread is None and np.ptp(self.mean) == 0

    def frame_state(self, dataset: PetsDataset) -> FrameState:
        state = frame_state_from_dataset(dataset, torch.as_tensor(self.mean))
        if self.points is not None:
            return dataclasses.replace(state, thickness=torch.as_tensor(self.points),
                                       thickness_weight=torch.as_tensor(self.weights))
        if self.spread is None or np.all(self.spread == 0):
            return state
        x, w = np.polynomial.hermite_e.hermegauss(self.n_points)
        w = w / w.sum()
        t = np.clip(self.mean[:, None] + self.spread[:, None] * x[None, :], 1.0, None)
        return dataclasses.replace(state, thickness=torch.as_tensor(t),
                                   thickness_weight=torch.as_tensor(np.broadcast_to(w, t.shape).copy()))


@dataclass(frozen=True)
class FrameModelSpec:
    """Thickness and orientation from a refined frame model (``refine``'s frame_model.json)."""

    state: FrameState

    spread = None  # a refined distribution is not a Gaussian spread: see frames.csv of the run

    @property
    def mean(self) -> np.ndarray:
        return torch.sum(self.state.thickness * self.state.thickness_weight, -1).detach().numpy()

    @property
    def is_constant(self) -> bool:
        """The same mean thickness for every frame: summaries give one number."""
        return np.ptp(self.mean) == 0

    def frame_state(self, dataset: PetsDataset) -> FrameState:
        return self.state


def synthesize(crystal: Crystal, dataset: PetsDataset, thickness: ThicknessSpec | FrameModelSpec,
               settings: ModelSettings,
               noise: Noise = "poisson", max_counts: float = 1e5, seed: int = 0, samples_per_fringe: float = 0.0):
    """Simulated intensities, with noise, for the reflection rows of ``dataset`` that ``settings`` score.

    Returns (rows, I, sigma) with rows indexing the input reflection table. The calculated
    intensities are scaled so that the strongest one has ``max_counts``. Only scored rows are
    written because the scored reflections are part of each sample's beam set: simulating the file
    again with the same settings reproduces the same beams and intensities exactly.
    ``samples_per_fringe`` > 0 sizes each frame's samples for its thickness (see :meth:`ForwardModel.fit_samples_to_fringes`).
    """
    model = ForwardModel(crystal, dataset, settings)
    state = thickness.frame_state(dataset)
    model.fit_samples_to_fringes(state.thickness.detach().amax(-1).numpy(), samples_per_fringe)
    with torch.no_grad():
        ic = model.intensities(state).numpy()
    rows = model.plan.scored.row
    expected = ic * (max_counts / ic.max())
    rng = np.random.default_rng(seed)
    if noise == "poisson":
        i_obs = rng.poisson(expected).astype(float)
        sigma = np.sqrt(np.maximum(i_obs, 1.0))
    elif noise == "gaussian":
        sigma = np.sqrt(expected + 1.0)
        i_obs = expected + sigma * rng.standard_normal(len(expected))
    elif noise == "none":
        i_obs = expected
        sigma = np.sqrt(expected + 1.0)
    else:
        raise ValueError(f"unknown noise model '{noise}'")
    return rows, i_obs, sigma


def synthetic_dataset(dataset: PetsDataset, rows, i_obs, sigma) -> PetsDataset:
    refl = dataset.reflections
    new = ReflectionTable(hkl=refl.hkl[rows], intensity=np.asarray(i_obs, float), sigma=np.asarray(sigma, float),
                          frame_id=refl.frame_id[rows])
    return dataclasses.replace(dataset, reflections=new)
