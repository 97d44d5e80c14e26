"""Small self-contained SVG plots (hand-written SVG, no plotting library)."""

from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from ..io.writers import atomic_write_text

W, H = 640, 480
ML, MR, MT, MB = 72, 20, 40, 56  # margins: left, right, top, bottom


def _ticks(lo: float, hi: float, n: int = 8) -> list[float]:
    """'Nice' tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    span = hi - lo
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(t: float) -> str:
    return f"{t:.6g}" if abs(t) > 1e-12 else "0"


class _Frame:
    """Maps data coordinates to pixels and draws the axes box, ticks, labels and title."""

    def __init__(self, xlim, ylim):
        self.x0, self.x1 = xlim if xlim[1] > xlim[0] else (xlim[0] - 0.5, xlim[0] + 0.5)
        self.y0, self.y1 = ylim if ylim[1] > ylim[0] else (ylim[0] - 0.5, ylim[0] + 0.5)

    def px(self, x):
        return ML + (np.asarray(x, float) - self.x0) / (self.x1 - self.x0) * (W - ML - MR)

    def py(self, y):
        return H - MB - (np.asarray(y, float) - self.y0) / (self.y1 - self.y0) * (H - MT - MB)

    def axes(self, title: str, xlabel: str, ylabel: str) -> list[str]:
        out = [f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" '
               'fill="none" stroke="black"/>']
        for t in _ticks(self.x0, self.x1):
            x = self.px(t)
            out.append(f'<line x1="{x:.1f}" y1="{H - MB}" x2="{x:.1f}" y2="{H - MB + 5}" stroke="black"/>'
                       f'<text x="{x:.1f}" y="{H - MB + 18}" text-anchor="middle">{_fmt(t)}</text>')
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            out.append(f'<line x1="{ML - 5}" y1="{y:.1f}" x2="{ML}" y2="{y:.1f}" stroke="black"/>'
                       f'<text x="{ML - 8}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        out += [f'<text x="{(ML + W - MR) / 2}" y="{H - 14}" text-anchor="middle">{escape(xlabel)}</text>',
                f'<text transform="translate(18,{(MT + H - MB) / 2}) rotate(-90)" '
                f'text-anchor="middle">{escape(ylabel)}</text>',
                f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>']
        return out


def _document(body: list[str]) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            'font-family="sans-serif" font-size="12">\n'
            f'<rect width="{W}" height="{H}" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def _limits(*arrays, pad: float = 0.04) -> tuple[float, float]:
    v = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0)
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    d = (hi - lo) * pad or 0.5
    return lo - d, hi + d


def _ssqrt(x):
    x = np.asarray(x, float)
    return np.sign(x) * np.sqrt(np.abs(x))


def fo_fc_svg(path: str | Path, io, ic, sigma, title: str, included=None) -> None:
    """Observed vs calculated on signed-sqrt(I) axes (|F|-like), y = x line; Io > 3 sigma filled; rows not
    ``included`` in the fit ((R,) bool: the free set) drawn in orange and counted apart."""
    io, ic, sigma = (np.asarray(a, float).ravel() for a in (io, ic, sigma))
    ok = np.isfinite(io) & np.isfinite(ic) & np.isfinite(sigma)
    incl = (np.ones(len(io), bool) if included is None else np.asarray(included, bool).ravel())[ok]
    fo, fc, obs = _ssqrt(io[ok]), _ssqrt(ic[ok]), (io > 3 * sigma)[ok]
    lo, hi = _limits(fo, fc)
    lo = min(lo, 0.0)
    f = _Frame((lo, hi), (lo, hi))
    body = f.axes(title, "sqrt(I calc)", "sqrt(I obs)")
    body.append(f'<line class="identity" x1="{f.px(lo):.1f}" y1="{f.py(lo):.1f}" x2="{f.px(hi):.1f}" '
                f'y2="{f.py(hi):.1f}" stroke="grey" stroke-dasharray="4 3"/>')
    xs, ys = f.px(fc), f.py(fo)
    for cls, sel, fill, colour in (("unobs", ~obs & incl, "none", "steelblue"), ("obs", obs & incl, "steelblue", "steelblue"),
                                   ("free-unobs", ~obs & ~incl, "none", "darkorange"),
                                   ("free-obs", obs & ~incl, "darkorange", "darkorange")):
        body.append(f'<g class="{cls}" fill="{fill}" stroke="{colour}" stroke-width="0.8">')
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2"/>' for x, y in zip(xs[sel], ys[sel])]
        body.append("</g>")
    body.append(f'<text x="{ML + 10}" y="{MT + 18}">filled: Io &gt; 3&#963; ({int((obs & incl).sum())}); '
                f'hollow: others ({int((~obs & incl).sum())})'
                + (f'; orange: free set ({int((~incl).sum())})' if (~incl).any() else '') + '</text>')
    atomic_write_text(path, _document(body))


def thickness_svg(path: str | Path, angle_deg, mean, lower, upper, title: str, truth=None, su=None) -> None:
    """Mean thickness (A) against frame angle (deg) with a shaded [lower, upper] band; truth dashed;
    ``su``: an error bar of +- s.u. at each mean (cut at the plot's edges, which it does not widen)."""
    a, m, lo, up = (np.asarray(x, float).ravel() for x in (angle_deg, mean, lower, upper))
    tr = None if truth is None else np.broadcast_to(np.asarray(truth, float), a.shape)
    bars = None if su is None else np.broadcast_to(np.asarray(su, float), a.shape)
    ok = np.isfinite(a) & np.isfinite(m) & np.isfinite(lo) & np.isfinite(up)
    order = np.argsort(a[ok], kind="stable")
    a, m, lo, up = (x[ok][order] for x in (a, m, lo, up))
    if tr is not None:
        tr = tr[ok][order]
    if bars is not None:
        bars = bars[ok][order]
    f = _Frame(_limits(a, pad=0.0), _limits(m, lo, up, *(() if tr is None else (tr,))))
    body = f.axes(title, "frame angle (deg)", "thickness (\u00c5)")

    def pts(x, y):
        return " ".join(f"{u:.1f},{v:.1f}" for u, v in zip(f.px(x), f.py(y)) if np.isfinite(v))

    if a.size:
        body.append(f'<polygon class="band" points="{pts(np.r_[a, a[::-1]], np.r_[up, lo[::-1]])}" '
                    'fill="steelblue" fill-opacity="0.25" stroke="none"/>')
        body.append(f'<polyline class="mean" points="{pts(a, m)}" fill="none" stroke="steelblue" '
                    'stroke-width="1.5"/>')
        if bars is not None and np.isfinite(bars).any():
            has = np.isfinite(bars)
            x = f.px(a[has])
            y_lo, y_hi = (f.py(np.clip(m[has] + sign * bars[has], f.y0, f.y1)) for sign in (-1, 1))
            d = " ".join(f"M{u:.1f} {v0:.1f}V{v1:.1f}" for u, v0, v1 in zip(x, y_lo, y_hi))
            body.append(f'<path class="su" d="{d}" stroke="steelblue" stroke-width="1"/>')
        if tr is not None:
            body.append(f'<polyline class="truth" points="{pts(a, tr)}" fill="none" stroke="firebrick" '
                        'stroke-width="1.2" stroke-dasharray="6 4"/>')
    else:
        body.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text>')
    atomic_write_text(path, _document(body))
