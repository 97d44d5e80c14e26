"""Frame geometry in the PETS2 convention: orientations, rocking/precession samples, excitation errors.

Lab frame: beam travels along -z, goniometer axis along x after the azimuth correction.
A frame's orientation maps Miller indices to lab reciprocal vectors (1/A):
    g_lab = R_z(-phi_axis) R_z(omega) R_x(alpha) R_y(beta) UB h,
with UB from the file (U = UB B^-1 not re-orthonormalised). A continuous-rotation frame integrates
over alpha +- half-angle; a precession frame over a cone of incident directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def rotation_matrix(axis: str, angle: torch.Tensor) -> torch.Tensor:
    """Active rotation matrices (..., 3, 3) about a lab axis by ``angle`` (radians)."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    if axis == "x":
        rows = [[o, z, z], [z, c, -s], [z, s, c]]
    elif axis == "y":
        rows = [[c, z, s], [z, o, z], [-s, z, c]]
    elif axis == "z":
        rows = [[c, -s, z], [s, c, z], [z, z, o]]
    else:
        raise ValueError(axis)
    return torch.stack([torch.stack(r, -1) for r in rows], -2)


def frame_orientations(ub: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, omega: torch.Tensor,
                       axis_azimuth: float) -> torch.Tensor:
    """Orientation matrices O (F, 3, 3), g_lab = O h; angles in radians, differentiable."""
    phi = torch.full_like(alpha, -axis_azimuth)
    return (rotation_matrix("z", phi) @ rotation_matrix("z", omega) @ rotation_matrix("x", alpha)
            @ rotation_matrix("y", beta) @ ub)


ROCKING_AXES = ("goniometer", "fixed")


def sample_orientations(ub: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, omega: torch.Tensor,
                        axis_azimuth: float, offset: torch.Tensor, rocking_axis: str = "goniometer") -> torch.Tensor:
    """Orientations (S, 3, 3) of tilt samples ``offset`` (radians) inside their frames.

    ``goniometer``: the tilt adds to alpha, i.e. turns about the goniometer axis R_z(omega - phi) x.
    ``fixed``: the tilt turns about the frame-independent axis R_z(-phi) x after the whole goniometer
    rotation (how diffBloch rocks, about its lab x); the two axes differ by omega.
    """
    if rocking_axis == "goniometer":
        return frame_orientations(ub, alpha + offset, beta, omega, axis_azimuth)
    if rocking_axis == "fixed":
        phi = torch.full_like(alpha, -axis_azimuth)
        return (rotation_matrix("z", phi) @ rotation_matrix("x", offset) @ rotation_matrix("z", omega)
                @ rotation_matrix("x", alpha) @ rotation_matrix("y", beta) @ ub)
    raise ValueError(f"unknown rocking axis '{rocking_axis}' (choose {', '.join(ROCKING_AXES)})")


def rocking_axis_lab(omega: torch.Tensor, axis_azimuth: float, rocking_axis: str = "goniometer") -> torch.Tensor:
    """Unit vectors (F, 3) of the axis the tilt samples turn about (see :func:`sample_orientations`)."""
    return rotation_axis_lab(omega if rocking_axis == "goniometer" else torch.zeros_like(omega), axis_azimuth)


UB_CONVENTIONS = ("pets", "diffbloch")


def orientation_ub(ub: np.ndarray, b_matrix: np.ndarray, convention: str = "pets") -> np.ndarray:
    """The matrix that maps h to the crystal's Cartesian g before the goniometer rotations.

    ``pets``: UB as written (g = U B h, U = UB B^-1 not re-orthonormalised). ``diffbloch``:
    g = U^-T B h, the convention of diffBloch, with which the paper's synthetic data were simulated.
    The two agree when U is orthonormal; they differ by U's small strain.
    """
    if convention == "pets":
        return ub
    if convention == "diffbloch":
        u = ub @ np.linalg.inv(b_matrix)
        return np.linalg.inv(u).T @ b_matrix
    raise ValueError(f"unknown UB convention '{convention}' (choose {', '.join(UB_CONVENTIONS)})")


def rotation_axis_lab(omega: torch.Tensor, axis_azimuth: float) -> torch.Tensor:
    """Unit vector (F, 3) of the goniometer (alpha) axis in the lab frame."""
    ang = omega - axis_azimuth
    return torch.stack([torch.cos(ang), torch.sin(ang), torch.zeros_like(ang)], -1)


def excitation_error(g_lab: torch.Tensor, incident: torch.Tensor, k: float | torch.Tensor) -> torch.Tensor:
    """Exact s_g = (K^2 - |K + g|^2) / (2K) (1/A); g_lab (..., 3), incident unit vectors (..., 3)."""
    return -torch.sum(incident * g_lab, -1) - torch.sum(g_lab * g_lab, -1) / (2 * k)


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes in [-1, 1] and weights summing to 1."""
    x, w = np.polynomial.legendre.leggauss(n)
    return x, w / w.sum()


def linspace(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Evenly spaced nodes in [-1, 1] with both ends, equal weights (the tilt set diffBloch uses)."""
    x = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    return x, np.full(n, 1.0 / n)


def midpoint(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Midpoint-rule nodes in [-1, 1] and equal weights summing to 1."""
    x = (np.arange(n) + 0.5) / n * 2 - 1
    return x, np.full(n, 1.0 / n)


@dataclass(frozen=True)
class SampleSet:
    """The incident directions that integrate each frame (tilts or precession azimuths).

    For continuous rotation each sample is an alpha offset with the beam along -z; for precession
    each sample is an azimuth on the cone with the crystal at the frame's orientation.
    """

    frame: np.ndarray  # (S,) frame index
    alpha_offset: np.ndarray  # (S,) radians
    incident: np.ndarray  # (S, 3) unit incident direction
    weight: np.ndarray  # (S,) sums to 1 within each frame


def window_weights(n: int, window: int) -> np.ndarray:
    """Weights (n,) summing to 1 of a sum of ``window``-wide moving averages over n tilts.

    Tilt i lies in min(i + 1, n - i, window, n - window + 1) windows, so the ends taper linearly
    (window 5: 0.2, 0.4, 0.6, 0.8, 1, ..., 1, 0.8, ..., 0.2 before normalising); the mosaic
    smoothing with which diffBloch sums its tilts. window 1 gives equal weights.
    """
    w = min(max(int(window), 1), n)
    i = np.arange(n)
    c = np.minimum.reduce([i + 1, n - i, np.full(n, w), np.full(n, n - w + 1)]).astype(float)
    return c / c.sum()


def frame_samples(half_angle_deg: np.ndarray, geometry: str, n_samples: int | np.ndarray,
                  rule: str = "midpoint", window: int = 1) -> SampleSet:
    """Sample each frame's integration range: rocking wedge (continuous) or precession cone.

    ``n_samples`` is one count for every frame or one per frame. ``window`` > 1 tapers the tilt
    weights of a continuous frame (:func:`window_weights`) in place of the rule's own weights.
    """
    n_frames = len(half_angle_deg)
    counts = np.broadcast_to(np.asarray(n_samples, dtype=int), (n_frames,))
    frame = np.repeat(np.arange(n_frames), counts)
    if geometry == "continuous":
        table = {"gauss": gauss_legendre, "midpoint": midpoint, "linspace": linspace}[rule]
        nodes = {int(n): table(int(n)) for n in np.unique(counts)}
        if window > 1:
            nodes = {n: (x, window_weights(n, window)) for n, (x, _) in nodes.items()}
        x = np.concatenate([nodes[int(n)][0] for n in counts])
        weights = np.concatenate([nodes[int(n)][1] for n in counts])
        offs = np.radians(np.asarray(half_angle_deg, float))[frame] * x
        inc = np.tile([0.0, 0.0, -1.0], (len(frame), 1))
    elif geometry == "precession":
        az = np.concatenate([2 * np.pi * (np.arange(n) + 0.5) / n for n in counts])
        ph = np.radians(np.asarray(half_angle_deg, float))[frame]
        inc = np.stack([np.sin(ph) * np.cos(az), np.sin(ph) * np.sin(az), -np.cos(ph)], -1)
        offs = np.zeros(len(frame))
        weights = 1.0 / counts[frame]
    else:
        raise ValueError(f"unknown geometry '{geometry}'")
    return SampleSet(frame=frame, alpha_offset=offs, incident=inc, weight=weights)


def fringe_sample_counts(excitation_range: np.ndarray, frame: np.ndarray, n_frames: int, thickness,
                         geometry: str, minimum: int) -> np.ndarray:
    """Samples per frame so that no scored reflection's excitation error moves by more than one
    Pendelloesung fringe (1/t) between samples: n_f = max(minimum, ceil(t_f * sweep_f)).

    The frame integral of a rocking curve is band-limited in s with period 1/t, so the midpoint sum
    converges fast once the spacing is below it (measured on quartz: 0.3 % at 0.85 samples per
    fringe, 0.02 % at 1.4; 17 % at 0.3). sweep_f is the fastest scored reflection's excitation
    error travel at its steepest rate, spread evenly over the frame: 2 dS_g across a rocking wedge
    (s moves at a constant rate), 2 pi dS_g round a precession cone (s = dS_g cos phi moves at up to
    dS_g per radian; the distance travelled, 4 dS_g, leaves pi/2 fringes between samples where s
    moves fastest: 0.57 % against 0.03 % at 1.2 samples per fringe, quartz at 500 A).
    ``thickness`` is one value (A) or one per frame.
    """
    sweep = np.zeros(n_frames)
    np.maximum.at(sweep, frame, (2.0 if geometry == "continuous" else 2 * np.pi) * np.asarray(excitation_range, float))
    t = np.broadcast_to(np.asarray(thickness, float), (n_frames,))
    return np.maximum(int(minimum), np.ceil(t * sweep).astype(int))


def excitation_error_range(g_lab: np.ndarray, axis: np.ndarray, incident: np.ndarray, half_angle_rad,
                           geometry: str) -> np.ndarray:
    """dS_g: the excitation-error range swept by a frame for each reflection (1/A).

    Continuous rotation: |k . (axis x g)| * half-angle (the lever arm about the rotation axis).
    Precession: |g_perp| * semi-angle, g_perp the component normal to the beam.
    """
    if geometry == "continuous":
        lever = np.abs(np.sum(incident * np.cross(axis, g_lab), -1))
    else:
        lever = np.linalg.norm(g_lab - np.sum(g_lab * incident, -1, keepdims=True) * incident, axis=-1)
    return lever * half_angle_rad
