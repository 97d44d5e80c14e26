"""Models of the experiment per frame: thickness seen by the beam and orientation corrections.

Every model maps raw parameters (tensors) to the :class:`FrameState` the physics layer simulates.
Raw parameters come in blocks that are either global (one vector) or per frame (shape (F, k));
per-frame blocks let the refinement build Jacobians for all frames at once, because a frame's
intensities depend only on its own row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..physics.diffraction import FrameState, frame_state_from_dataset

THICKNESS_REF = 1000.0  # A; raw thickness parameters are log(t / THICKNESS_REF)


@dataclass(frozen=True)
class Block:
    """A named slice of raw parameters: global (shape (n,)) or per frame (shape (F, k))."""

    name: str
    shape: tuple
    per_frame: bool
    group: str  # learning-rate / reporting group


@dataclass(frozen=True)
class FrameContext:
    """What frame models may look at: goniometer angles (radians)."""

    alpha: torch.Tensor  # (F,)
    beta: torch.Tensor  # (F,)
    omega: torch.Tensor  # (F,)

    @classmethod
    def from_dataset(cls, dataset, dtype=torch.float64) -> "FrameContext":
        st = frame_state_from_dataset(dataset, 1.0, dtype)
        return cls(st.alpha, st.beta, st.omega)

    @property
    def n_frames(self) -> int:
        return len(self.alpha)


class ThicknessModel:
    """Base: raw blocks -> thickness (F, Q) in A along the beam and weights (F, Q) summing to 1."""

    kind = "base"

    def blocks(self) -> list[Block]:
        raise NotImplementedError

    def initial(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, raw: dict[str, torch.Tensor], ctx: FrameContext) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def describe(self, raw: dict[str, torch.Tensor], ctx: FrameContext) -> dict[str, np.ndarray]:
        """Per-frame mean, spread and quantiles (A) for reports."""
        t, w = (x.detach() for x in self.evaluate(raw, ctx))
        mean = (t * w).sum(-1)
        spread = ((t - mean[:, None]) ** 2 * w).sum(-1).clamp_min(0).sqrt()
        out = {"thickness_mean": mean.numpy(), "thickness_spread": spread.numpy()}
        order = torch.argsort(t, -1)
        ts, cw = torch.gather(t, -1, order), torch.cumsum(torch.gather(w, -1, order), -1)
        for q in (0.1, 0.5, 0.9):
            i = torch.searchsorted(cw.contiguous(), torch.full((len(t), 1), q, dtype=cw.dtype)).clamp_max(t.shape[1] - 1)
            out[f"thickness_q{int(q * 100):02d}"] = torch.gather(ts, -1, i)[:, 0].numpy()
        return out


class GlobalThickness(ThicknessModel):
    """One thickness for every frame."""

    kind = "global"

    def __init__(self, thickness: float):
        self.start = float(thickness)

    def blocks(self):
        return [Block("thickness", (1,), False, "thickness")]

    def initial(self):
        return {"thickness": torch.tensor([math.log(self.start / THICKNESS_REF)], dtype=torch.float64)}

    def evaluate(self, raw, ctx):
        t = THICKNESS_REF * torch.exp(raw["thickness"])  # (1,)
        t = t.expand(ctx.n_frames)[:, None]
        return t, torch.ones_like(t)


class PerFrameThickness(ThicknessModel):
    """One free thickness per frame."""

    kind = "per-frame"

    def __init__(self, thickness):
        self.start = np.asarray(thickness, dtype=float)

    def blocks(self):
        return [Block("thickness", (len(self.start), 1), True, "thickness")]

    def initial(self):
        return {"thickness": torch.as_tensor(np.log(self.start / THICKNESS_REF), dtype=torch.float64)[:, None]}

    def evaluate(self, raw, ctx):
        t = THICKNESS_REF * torch.exp(raw["thickness"])  # (F,1)
        return t, torch.ones_like(t)


class FrameModel:
    """Thickness model plus optional per-frame orientation corrections (mrad about lab x and y).

    A rotation about the beam does not change any excitation error, so two angles per frame are
    all that intensities can determine.
    """

    def __init__(self, ctx: FrameContext, thickness: ThicknessModel, refine_orientation: bool = False):
        self.ctx = ctx
        self.thickness = thickness
        self.refine_orientation = refine_orientation

    def blocks(self) -> list[Block]:
        b = list(self.thickness.blocks())
        if self.refine_orientation:
            b.append(Block("orientation", (self.ctx.n_frames, 2), True, "orientation"))
        return b

    def initial(self) -> dict[str, torch.Tensor]:
        raw = dict(self.thickness.initial())
        if self.refine_orientation:
            raw["orientation"] = torch.zeros((self.ctx.n_frames, 2), dtype=torch.float64)
        return raw

    def state(self, raw: dict[str, torch.Tensor]) -> FrameState:
        t, w = self.thickness.evaluate(raw, self.ctx)
        corr = raw["orientation"] * 1e-3 if "orientation" in raw else None
        return FrameState(alpha=self.ctx.alpha, beta=self.ctx.beta, omega=self.ctx.omega, thickness=t,
                          thickness_weight=w, orientation_correction=corr)
