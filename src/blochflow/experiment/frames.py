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
from ..physics.geometry import frame_orientations, rotation_matrix

THICKNESS_REF = 1000.0  # A; raw thickness parameters are log(t / THICKNESS_REF)


@dataclass(frozen=True)
class Block:
    """A named slice of raw parameters: global (shape (n,)) or per frame (shape (F, k))."""

    name: str
    shape: tuple
    per_frame: bool
    group: str  # learning-rate / reporting group
    derived: bool = False  # global weights that act only through per-frame features (a network)


@dataclass(frozen=True)
class FrameContext:
    """What frame models may look at: goniometer angles (radians) and the rotation-axis azimuth."""

    alpha: torch.Tensor  # (F,)
    beta: torch.Tensor  # (F,)
    omega: torch.Tensor  # (F,)
    axis_azimuth: float = 0.0

    @classmethod
    def from_dataset(cls, dataset, dtype=torch.float64) -> "FrameContext":
        st = frame_state_from_dataset(dataset, 1.0, dtype)
        return cls(st.alpha, st.beta, st.omega, math.radians(dataset.details.rotation_axis_deg))

    def goniometer(self) -> torch.Tensor:
        """(F, 3, 3) rotation of the crystal by the goniometer (the orientation without U B)."""
        eye = torch.eye(3, dtype=self.alpha.dtype)
        return frame_orientations(eye, self.alpha, self.beta, self.omega, self.axis_azimuth)

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

    def surface_normal(self, raw: dict[str, torch.Tensor], ctx: FrameContext) -> torch.Tensor | None:
        """(F, 3) lab surface normals along propagation, or None: thickness is measured along the beam."""
        return None

    def prior_residuals(self, raw: dict[str, torch.Tensor], ctx: FrameContext) -> torch.Tensor:
        """Extra least-squares rows (priors such as smoothness across frames); empty by default."""
        return torch.zeros(0, dtype=torch.float64)

    def config(self) -> dict:
        """JSON-able constructor arguments (with :meth:`initial` shapes) to rebuild the model."""
        raise NotImplementedError

    def path_length(self, raw: dict[str, torch.Tensor], ctx: FrameContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Thickness points along the beam (F, Q) and their weights, for reports."""
        t, w = self.evaluate(raw, ctx)
        n = self.surface_normal(raw, ctx)
        if n is not None:
            t = t / n[:, 2:3].abs().clamp_min(1e-3)  # beam along -z
        return t, w

    def describe(self, raw: dict[str, torch.Tensor], ctx: FrameContext) -> dict[str, np.ndarray]:
        """Per-frame mean, spread and quantiles (A) for reports."""
        t, w = (x.detach() for x in self.path_length(raw, ctx))
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

    def config(self):
        return {"kind": self.kind, "thickness": self.start}


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

    def config(self):
        return {"kind": self.kind, "thickness": self.start.tolist()}


BEAM = (0.0, 0.0, -1.0)  # lab propagation direction


class SlabThickness(GlobalThickness):
    """A parallel-sided slab: thickness t0 along its normal, the normal fixed to the crystal.

    Raw: log(t0 / 1000) and two angles (rad) tilting the normal away from the beam direction at
    zero goniometer angles, n0 = R_x(a) R_y(b) (0, 0, -1); frame f sees n = G_f n0 (G the
    goniometer rotation). The path length is t0 / |cos(beam, n)| for each frame and, through the
    solver's surface-normal geometry, for each tilt inside a frame.
    """

    kind = "slab"

    def __init__(self, thickness: float, normal=(0.0, 0.0)):
        super().__init__(thickness)
        self.normal = tuple(float(x) for x in normal)

    def blocks(self):
        return super().blocks() + [Block("surface_normal", (2,), False, "surface")]

    def initial(self):
        return {**super().initial(), "surface_normal": torch.tensor(self.normal, dtype=torch.float64)}

    def surface_normal(self, raw, ctx):
        a = raw["surface_normal"]
        n0 = rotation_matrix("x", a[0]) @ rotation_matrix("y", a[1]) @ torch.tensor(BEAM, dtype=a.dtype)
        return torch.einsum("fij,j->fi", ctx.goniometer().to(a.dtype), n0)

    def config(self):
        return {"kind": self.kind, "thickness": self.start, "normal": list(self.normal)}


class LearnedThickness(ThicknessModel):
    """A small network maps a frame's goniometer angle to its thickness distribution.

    Network: a radial-basis-function layer (H Gaussian bumps of the scaled alpha, evenly spaced,
    width = spacing, plus a constant) and a learned linear layer to the logits. The fixed smooth
    first layer makes the logits linear in the weights, which keeps Gauss-Newton steps well
    conditioned and the prediction for unseen angles smooth; a deep MLP with hundreds of weights
    per few hundred reflections was neither (it over-fitted and stalled LM on our synthetic cases).
    The distribution (``distribution``): by default Q = ``points`` weighted thickness points, 2Q + 1
    logits per frame (Q + 1 split the range [t_lo, t_hi] into ordered positions as the quantile
    knots below, Q give the weights by softmax), evaluated at those points exactly; a weight moves continuously
    where the quantile form can move mass only in steps of 1/K (a peak's weight changes by moving
    a knot across the gap between peaks). Or (``"quantile"``) a monotone quantile function: the
    network gives K + 2 logits per frame, their softmax splits the allowed range [t_lo, t_hi] into a gap below, K increments between
    K + 1 knots at quantile levels 0, 1/K, ..., 1, and a gap above. Knots are therefore ordered and
    bounded by construction, and a steep increment makes the distribution two-peaked, equal
    increments make it uniform-like. The intensity of a frame is the average over Q thickness
    points at the mid-levels (q + 1/2) / Q of that quantile function: fixed quadrature, so the
    objective is smooth and deterministic. A smoothness prior ties the knots of neighbouring
    frames (by angle) together.
    """

    kind = "learned"
    DISTRIBUTIONS = ("quantile", "mixture")

    def __init__(self, mean, spread=None, bounds=(20.0, 5000.0), knots: int = 8, points: int = 16,
                 basis: int = 6, smoothness: float = 1.0, weights=None, inputs=None,
                 distribution: str = "mixture"):
        self.mean = np.asarray(mean, float)
        self.spread = 0.05 * self.mean if spread is None else np.broadcast_to(np.asarray(spread, float),
                                                                             self.mean.shape).copy()
        self.bounds = (float(bounds[0]), float(bounds[1]))
        if not 0 < self.bounds[0] < self.bounds[1]:
            raise ValueError(f"thickness bounds {bounds} must satisfy 0 < low < high")
        if distribution not in self.DISTRIBUTIONS:
            raise ValueError(f"thickness distribution '{distribution}': choose {' or '.join(self.DISTRIBUTIONS)}")
        self.distribution = distribution
        self.knots, self.points, self.basis = int(knots), int(points), int(basis)
        self.smoothness = float(smoothness)
        self.n_outputs = self.knots + 2 if distribution == "quantile" else 2 * self.points + 1
        self.n_weights = self.n_outputs * (self.basis + 1)
        self._weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.inputs = inputs  # (centre, half range) of alpha (rad), fixed at construction for reuse

    # -- network ---------------------------------------------------------------------------------

    def hidden(self, ctx: FrameContext) -> torch.Tensor:
        """(F, H + 1) radial-basis features of the scaled angle x in [-1, 1], and a constant."""
        if self.inputs is None:
            a = ctx.alpha.detach().numpy()
            self.inputs = (float((a.max() + a.min()) / 2), float(max(np.ptp(a) / 2, 1e-3)))
        c, s = self.inputs
        x = ((ctx.alpha - c) / s)[:, None]
        if self.basis == 1:
            centres, width = torch.zeros(1, dtype=x.dtype), 1.0
        else:
            centres = torch.linspace(-1.0, 1.0, self.basis, dtype=x.dtype)
            width = 2.0 / (self.basis - 1)
        phi = torch.exp(-0.5 * ((x - centres[None, :]) / width) ** 2)
        return torch.cat([phi, torch.ones_like(x)], 1)

    def features(self, raw, ctx) -> torch.Tensor:
        """Per-frame logits (F, K + 2), or (F, 2Q + 1) for a mixture of Q points: the only way the
        weights reach the intensities."""
        w = raw["thickness_net"].reshape(self.n_outputs, self.basis + 1)
        return self.hidden(ctx).to(w.dtype) @ w.T

    def knot_values(self, features: torch.Tensor) -> torch.Tensor:
        """(F, K + 1) thickness at quantile levels 0, 1/K, ..., 1 (A), inside the bounds; for a
        mixture (F, Q), its ordered positions."""
        lo, hi = self.bounds
        p = torch.softmax(features[:, :self.knots + 2] if self.distribution == "quantile"
                          else features[:, :self.points + 1], -1)
        return lo + (hi - lo) * torch.cumsum(p, -1)[:, :-1]

    def quadrature(self, knots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = (torch.arange(self.points, dtype=knots.dtype) + 0.5) / self.points * self.knots
        i = torch.clamp(u.floor().long(), max=self.knots - 1)
        f = u - i
        t = knots[:, i] * (1 - f) + knots[:, i + 1] * f
        return t, torch.full_like(t, 1.0 / self.points)

    def evaluate_features(self, features, ctx):
        if self.distribution == "mixture":
            return self.knot_values(features), torch.softmax(features[:, self.points + 1:], -1)
        return self.quadrature(self.knot_values(features))

    # -- ThicknessModel --------------------------------------------------------------------------

    def blocks(self):
        return [Block("thickness_net", (self.n_weights,), False, "network", derived=True)]

    def initial(self):
        if self._weights is None:
            raise RuntimeError("LearnedThickness.initial needs warm_start(ctx) first")
        return {"thickness_net": self._weights.clone()}

    def evaluate(self, raw, ctx):
        return self.evaluate_features(self.features(raw, ctx), ctx)

    def prior_residuals(self, raw, ctx):
        if self.smoothness <= 0 or ctx.n_frames < 2:
            return torch.zeros(0, dtype=torch.float64)
        features = self.features(raw, ctx)
        knots = self.knot_values(features)
        order = torch.argsort(ctx.alpha)
        d = (knots[order[1:]] - knots[order[:-1]]).reshape(-1) / SMOOTHNESS_UNIT  # (F-1)(K+1), mixture (F-1)Q
        if self.distribution == "mixture":  # a weight change of WEIGHT_SMOOTHNESS_UNIT costs as much as a 100 A jump
            wt = torch.softmax(features[:, self.points + 1:], -1)
            d = torch.cat([d, (wt[order[1:]] - wt[order[:-1]]).reshape(-1) / WEIGHT_SMOOTHNESS_UNIT])
        return math.sqrt(self.smoothness) * d

    def target_knots(self) -> np.ndarray:
        """Warm-start knots: Gaussian quantiles of (mean, spread) per frame, levels clipped to 2..98 %
        (a mixture: its Q points at the mid-levels (q + 1/2) / Q, equal weights)."""
        from statistics import NormalDist
        if self.distribution == "mixture":
            lv = (np.arange(self.points) + 0.5) / self.points
        else:
            lv = np.clip(np.arange(self.knots + 1) / self.knots, 0.02, 0.98)
        z = np.array([NormalDist().inv_cdf(float(u)) for u in lv])
        lo, hi = self.bounds
        return np.clip(self.mean[:, None] + self.spread[:, None] * z[None, :], lo + 1.0, hi - 1.0)

    def warm_start(self, ctx: FrameContext, ridge: float = 1e-6, frames=None) -> "LearnedThickness":
        """Weights whose logits reproduce :meth:`target_knots` (ridge least squares; no physics),
        over the ``frames`` given (a boolean mask; default all): the others get the network's
        prediction from their angle."""
        target = self.target_knots()
        lo, hi = self.bounds
        gaps = np.diff(np.concatenate([np.full((len(self.mean), 1), lo), target,
                                       np.full((len(self.mean), 1), hi)], 1), axis=1)
        logits = np.log(np.clip(gaps, 1e-9, None))
        logits -= logits.mean(1, keepdims=True)  # softmax is shift-invariant: centre each frame
        if self.distribution == "mixture":  # equal weights: zero weight logits
            logits = np.concatenate([logits, np.zeros((len(logits), self.points))], 1)
        phi = self.hidden(ctx).numpy()
        if frames is not None:
            phi, logits = phi[np.asarray(frames, bool)], logits[np.asarray(frames, bool)]
        a = phi.T @ phi + ridge * np.eye(phi.shape[1])
        w = np.linalg.solve(a, phi.T @ logits).T  # (outputs, H+1)
        self._weights = torch.as_tensor(w.reshape(-1))
        return self

    def config(self):
        return {"kind": self.kind, "mean": self.mean.tolist(), "spread": self.spread.tolist(),
                "bounds": list(self.bounds), "knots": self.knots, "points": self.points, "basis": self.basis,
                "smoothness": self.smoothness, "distribution": self.distribution,
                "inputs": None if self.inputs is None else list(self.inputs)}


SMOOTHNESS_UNIT = 100.0  # A: a knot jump of this size between neighbouring frames costs `smoothness`
WEIGHT_SMOOTHNESS_UNIT = 0.1  # a mixture weight's change between neighbouring frames that costs the same

THICKNESS_MODELS = {"global": GlobalThickness, "per-frame": PerFrameThickness, "slab": SlabThickness,
                    "learned": LearnedThickness}


def thickness_model_from_config(cfg: dict) -> ThicknessModel:
    """Rebuild a thickness model from :meth:`ThicknessModel.config` output."""
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    if kind not in THICKNESS_MODELS:
        raise ValueError(f"unknown thickness model '{kind}'")
    if kind == "learned":  # saved before the mixture form existed (and became the default): quantile
        cfg.setdefault("distribution", "quantile")
    return THICKNESS_MODELS[kind](**cfg)


class FrameModel:
    """Thickness model plus optional per-frame orientation corrections (mrad about lab x and y).

    A rotation about the beam does not change any excitation error, so two angles per frame are
    all that intensities can determine.
    """

    def __init__(self, ctx: FrameContext, thickness: ThicknessModel, refine_orientation: bool = False,
                 orientation_sigma: float = 0.0):
        self.ctx = ctx
        self.thickness = thickness
        self.refine_orientation = refine_orientation
        # > 0 (mrad): a Gaussian prior of this width on every correction angle (PETS's frame
        # orientations are right to about this); 0: none
        self.orientation_sigma = orientation_sigma

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

    def state(self, raw: dict[str, torch.Tensor], feature_shift: torch.Tensor | None = None) -> FrameState:
        """The physics state; ``feature_shift`` (F, k) is added to a network's per-frame features
        (the refinement's Jacobian differentiates through it)."""
        if feature_shift is not None:
            f = self.thickness.features(raw, self.ctx) + feature_shift
            t, w = self.thickness.evaluate_features(f, self.ctx)
        else:
            t, w = self.thickness.evaluate(raw, self.ctx)
        corr = raw["orientation"] * 1e-3 if "orientation" in raw else None
        return FrameState(alpha=self.ctx.alpha, beta=self.ctx.beta, omega=self.ctx.omega, thickness=t,
                          thickness_weight=w, surface_normal=self.thickness.surface_normal(raw, self.ctx),
                          orientation_correction=corr)

    def prior_residuals(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = self.thickness.prior_residuals(raw, self.ctx)
        if self.orientation_sigma > 0 and "orientation" in raw:
            rows = torch.cat([rows, raw["orientation"].reshape(-1) / self.orientation_sigma])
        return rows

    def frame_prior_costs(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        """(F,) the squared prior rows that depend on one frame's own parameters only (the
        orientation prior), summed per frame: a frame's share of :meth:`prior_residuals`."""
        if self.orientation_sigma > 0 and "orientation" in raw:
            return ((raw["orientation"] / self.orientation_sigma) ** 2).sum(1)
        return torch.zeros(self.ctx.n_frames, dtype=torch.float64)


def frame_model_from_record(record: dict, ctx: FrameContext, frame_ids) -> tuple[FrameModel, dict[str, torch.Tensor]]:
    """A saved frame model applied to (possibly other) frames: global, slab and learned models
    predict any frame from its angles; per-frame values and orientation corrections need the same
    frame ids. Raises ValueError naming what does not fit."""
    thick = thickness_model_from_config(record["thickness_model"])
    same = [int(f) for f in frame_ids] == [int(f) for f in record["frame_ids"]]
    raw = {}
    for b in thick.blocks():
        if b.per_frame and not same:
            held = [int(f) for f in record["frame_ids"]]
            names = ", ".join(map(str, held[:8])) + (" ..." if len(held) > 8 else "")
            raise ValueError(f"the '{thick.kind}' thickness model holds values for {len(held)} frames ({names}), not "
                             f"for the {len(frame_ids)} given; select the same frames (--frames)")
        raw[b.name] = torch.as_tensor(record["raw"][b.name], dtype=torch.float64).reshape(
            (ctx.n_frames, *b.shape[1:]) if b.per_frame else b.shape)
    orientation = record.get("refine_orientation", False) and same and "orientation" in record["raw"]
    if orientation:
        raw["orientation"] = torch.as_tensor(record["raw"]["orientation"], dtype=torch.float64).reshape(-1, 2)
    return FrameModel(ctx, thick, refine_orientation=orientation), raw
