"""Comparison of calculated and observed intensities: frame scales, weights, R factors.

Definitions (also in docs/figures_of_merit.md):
  frame scale   k_f = sum_f w Io Ic / sum_f w Ic^2          (weighted least squares, closed form)
  weights       w = 1 / (sigma^2 + (u Io)^2), u the instability factor (default 0.01)
  R_obs         sum_obs | sqrt(Io) - sqrt(k Ic) | / sum_obs sqrt(Io),  obs: Io > 3 sigma
  wR2           sqrt( sum w (Io - k Ic)^2 / sum w Io^2 )        over all scored reflections
  GoF           sqrt( sum w (Io - k Ic)^2 / (n - p) )
  amplitudes    F = sqrt(max(I, 0)), sigma_F = sigma / (2 sqrt(max(Io, sigma))), w_F = 1 / (sigma_F^2 + (u Fo)^2)
                (the first-order phase's objective: sum w_F (Fo - k_F Fc)^2 is smooth far from the minimum)
  R_all         R_obs over all scored reflections
  wR2_diffbloch sqrt( sum v (Io - k' Ic)^2 / sum v Io^2 ), v = 1 / (sigma_sqrtI^2 + u^2 Io), sigma_sqrtI =
                sigma / (2 sqrt(Io)) (5 sqrt(sigma) where Io < 0.01 sigma), k' the scale minimising it per
                frame (or the given scales): the weighted R2 diffBloch reports, for comparison with it
Each is reported globally and as the unweighted mean of per-frame values (diffBloch's figure).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


def klar_weights(io: torch.Tensor, sigma: torch.Tensor, instability: float = 0.01) -> torch.Tensor:
    """w = 1 / (sigma^2 + (u Io)^2)."""
    return 1.0 / (sigma ** 2 + (instability * io) ** 2)


def amplitude_weights(io: torch.Tensor, sigma: torch.Tensor, instability: float = 0.01) -> torch.Tensor:
    """w_F = 1 / (sigma_F^2 + (u Fo)^2) with sigma_F = sigma / (2 sqrt(max(Io, sigma)))."""
    sigma_f = sigma / (2 * torch.sqrt(torch.maximum(io, sigma)))
    return 1.0 / (sigma_f ** 2 + instability ** 2 * io.clamp_min(0))


def amplitude(i: torch.Tensor) -> torch.Tensor:
    """sqrt(max(I, 0)) with a finite derivative at zero (intensities are never exactly zero in use)."""
    return torch.sqrt(i.clamp_min(0) + 1e-30)


def diffbloch_weights(io: torch.Tensor, sigma: torch.Tensor, instability: float = 0.01) -> torch.Tensor:
    """v = 1 / (sigma_sqrtI^2 + u^2 Io): amplitude-type weights on intensity differences, the weighted
    R2 diffBloch reports (after Klar et al. 2023); sigma_sqrtI = sigma / (2 sqrt(Io)), and 5 sqrt(sigma)
    for weak reflections (Io < 0.01 sigma, negative ones included)."""
    root = torch.sqrt(io.clamp_min(1e-12))
    sigma_root = torch.where(io < 0.01 * sigma, 5 * torch.sqrt(sigma), 0.5 * sigma / root)
    return 1.0 / (sigma_root ** 2 + instability ** 2 * root ** 2)


def frame_scales(io, ic, weight, frame, n_frames: int) -> torch.Tensor:
    """Closed-form weighted least-squares scale per frame (differentiable in ic), held at 0 where the
    frame's Io anticorrelate with ic (a negative scale is no physical frame: its data are then left
    unexplained rather than fitted upside down; the refinement names such frames)."""
    num = torch.zeros(n_frames, dtype=ic.dtype).index_add(0, frame, weight * io * ic)
    den = torch.zeros(n_frames, dtype=ic.dtype).index_add(0, frame, weight * ic * ic)
    return num.clamp_min(0) / den.clamp_min(torch.finfo(ic.dtype).tiny)


@dataclass(frozen=True)
class Figures:
    R_obs: float
    wR2: float
    GoF: float
    R_obs_frame_mean: float
    wR2_frame_mean: float
    R_all: float
    wR2_diffbloch: float
    wR2_diffbloch_frame_mean: float
    n_obs: int
    n_all: int
    n_frames: int

    def as_dict(self) -> dict:
        return asdict(self)


def data_chi2(figures: Figures, n_params: int) -> float:
    """sum w (Io - k Ic)^2 of the reflections ``figures`` describe, from their GoF (whose degrees of freedom
    are max(n - n_params, 1)): the data's part of the objective, without restraints or priors."""
    return figures.GoF ** 2 * max(figures.n_all - n_params, 1)


def r_obs(io, kic, obs):
    """R_obs over the reflections ``obs`` (the definition above); NaN when there are none."""
    num = torch.abs(io.clamp_min(0).sqrt() - kic.clamp_min(0).sqrt())[obs].sum()
    den = io[obs].clamp_min(0).sqrt().sum()
    return (num / den).item() if obs.any() else float("nan")


def figures_of_merit(io, sigma, ic, frame, n_frames: int, n_params: int = 0, instability: float = 0.01,
                     scale: torch.Tensor | None = None) -> Figures:
    """All reported figures for scored reflections; ``scale`` (F,) defaults to the WLS frame scales."""
    io, sigma, ic = io.detach(), sigma.detach(), ic.detach()
    w = klar_weights(io, sigma, instability)
    k = frame_scales(io, ic, w, frame, n_frames) if scale is None else scale.detach()
    kic = k[frame] * ic
    resid2 = w * (io - kic) ** 2
    obs = io > 3 * sigma
    n_all = len(io)
    v = diffbloch_weights(io, sigma, instability)
    kv = frame_scales(io, ic, v, frame, n_frames) if scale is None else k  # its own optimal scales, or the given
    vres2 = v * (io - kv[frame] * ic) ** 2
    present = torch.unique(frame)
    r_f, wr_f, wd_f = [], [], []
    for f in present.tolist():
        m = frame == f
        if (m & obs).any():
            r_f.append(r_obs(io[m], kic[m], obs[m]))
        den = (w[m] * io[m] ** 2).sum()
        if den > 0:  # a frame whose Io are all 0 has no wR2 (0/0); it is left out of the mean
            wr_f.append(torch.sqrt(resid2[m].sum() / den).item())
            wd_f.append(torch.sqrt(vres2[m].sum() / (v[m] * io[m] ** 2).sum()).item())
    return Figures(
        R_obs=r_obs(io, kic, obs),
        wR2=torch.sqrt(resid2.sum() / (w * io ** 2).sum()).item(),
        GoF=torch.sqrt(resid2.sum() / max(n_all - n_params, 1)).item(),
        R_obs_frame_mean=float(sum(r_f) / len(r_f)) if r_f else float("nan"),
        wR2_frame_mean=float(sum(wr_f) / len(wr_f)) if wr_f else float("nan"),
        R_all=r_obs(io, kic, torch.ones_like(obs)),
        wR2_diffbloch=torch.sqrt(vres2.sum() / (v * io ** 2).sum()).item(),
        wR2_diffbloch_frame_mean=float(sum(wd_f) / len(wd_f)) if wd_f else float("nan"),
        n_obs=int(obs.sum()), n_all=n_all, n_frames=len(present))


def weighted_residual(io, sigma, ic, frame, n_frames: int, instability: float = 0.01) -> torch.Tensor:
    """Least-squares objective sum w (Io - k Ic)^2 with frame scales profiled out (differentiable)."""
    w = klar_weights(io, sigma, instability)
    k = frame_scales(io, ic, w, frame, n_frames)
    return torch.sum(w * (io - k[frame] * ic) ** 2)
