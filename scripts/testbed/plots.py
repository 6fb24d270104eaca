"""The testbed's plots, as SVG drawn here and PNG rendered by headless Chromium.

matplotlib is not in the project's venv (nor Pillow, nor gnuplot on the host), and Chromium is
(the hls.js tests need it), so each plot is a small hand-made SVG that Chromium screenshots to a
PNG of the same size. Plots: bytes by source over time (stacked, per policy), startup time CDF
(all policies), stalls over time (per policy, with the faults marked).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.support.browser import find_chromium

W, H = 760, 420
L, R, T, B = 70, 170, 40, 50
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf"]


def _frame(title: str, xlabel: str, ylabel: str, xmax: float, ymax: float) -> list[str]:
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
        f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
        f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
        f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>',
        f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" '
        f'text-anchor="middle">{ylabel}</text>',
    ]
    for k in range(6):
        x = L + (W - R - L) * k / 5
        y = H - B - (H - B - T) * k / 5
        out.append(f'<text x="{x}" y="{H - B + 16}" text-anchor="middle">{xmax * k / 5:.3g}</text>')
        out.append(f'<text x="{L - 6}" y="{y + 4}" text-anchor="end">{ymax * k / 5:.3g}</text>')
        out.append(f'<line x1="{L}" y1="{y}" x2="{W - R}" y2="{y}" stroke="#eee"/>')
    return out


def _xy(x: float, y: float, xmax: float, ymax: float) -> tuple[float, float]:
    return (
        L + (W - R - L) * x / max(xmax, 1e-9),
        H - B - (H - B - T) * y / max(ymax, 1e-9),
    )


def _legend(out: list[str], names: list[str]) -> None:
    for i, name in enumerate(names):
        y = T + 10 + 18 * i
        c = COLORS[i % len(COLORS)]
        out.append(f'<rect x="{W - R + 10}" y="{y - 9}" width="12" height="12" fill="{c}"/>')
        out.append(f'<text x="{W - R + 28}" y="{y + 1}">{name}</text>')


def _render(svg: list[str], path: Path) -> None:
    svg_path = path.with_suffix(".svg")
    svg_path.write_text("\n".join([*svg, "</svg>"]))
    subprocess.run(  # noqa: S603
        [
            find_chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={W},{H}",
            f"--screenshot={path}",
            svg_path.as_uri(),
        ],  # fmt: skip
        capture_output=True,
        timeout=60,
        check=True,
    )


def bytes_over_time(series: list[dict[str, Any]], policy: str, path: Path) -> None:
    """Stacked rate (Mbit/s) of bytes viewers received, by source, over time."""
    sources = sorted({k for s in series for k in s["viewer_bytes"]})
    rows: list[tuple[float, list[float]]] = []
    for prev, cur in zip(series, series[1:], strict=False):
        dt = max(cur["t"] - prev["t"], 1e-3)
        rates = [
            (cur["viewer_bytes"].get(k, 0) - prev["viewer_bytes"].get(k, 0)) * 8 / dt / 1e6
            for k in sources
        ]
        rows.append((cur["t"], rates))
    xmax = max((t for t, _ in rows), default=1.0)
    ymax = max((sum(r) for _, r in rows), default=1.0) * 1.1 or 1.0
    out = _frame(f"Bytes to viewers by source ({policy})", "time (s)", "Mbit/s", xmax, ymax)
    for i in range(len(sources) - 1, -1, -1):
        pts = [_xy(0, 0, xmax, ymax)]
        pts += [_xy(t, sum(r[: i + 1]), xmax, ymax) for t, r in rows]
        pts.append(_xy(xmax, 0, xmax, ymax))
        poly = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        out.append(f'<polygon points="{poly}" fill="{COLORS[i % len(COLORS)]}" opacity="0.85"/>')
    _legend(out, sources)
    _render(out, path)


def startup_cdf(startups: dict[str, list[float]], path: Path) -> None:
    """CDF of startup times, one line per policy."""
    xmax = max((max(v) for v in startups.values() if v), default=1.0) * 1.05
    out = _frame("Startup time CDF", "startup (s)", "fraction of viewers", xmax, 1.0)
    for i, xs in enumerate(startups.values()):
        ordered = sorted(xs)
        pts = [_xy(x, (k + 1) / len(ordered), xmax, 1.0) for k, x in enumerate(ordered)]
        poly = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        out.append(
            f'<polyline points="{poly}" fill="none" stroke="{COLORS[i % len(COLORS)]}" '
            'stroke-width="2"/>'
        )
    _legend(out, list(startups))
    _render(out, path)


def stalls(
    per_policy: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]], path: Path
) -> None:
    """Cumulative stalls over time per policy; faults as vertical lines."""
    xmax = max((s["t"] for ser, _ in per_policy.values() for s in ser), default=1.0)
    ymax = max((s["stalls"] for ser, _ in per_policy.values() for s in ser), default=0) * 1.1 or 1.0
    out = _frame("Stalls (cumulative)", "time (s)", "stalls", xmax, ymax)
    for i, (ser, faults) in enumerate(per_policy.values()):
        c = COLORS[i % len(COLORS)]
        pts = " ".join("{:.1f},{:.1f}".format(*_xy(s["t"], s["stalls"], xmax, ymax)) for s in ser)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        for f in faults:
            x, _ = _xy(f["t"], 0, xmax, ymax)
            out.append(
                f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}" stroke="{c}" '
                'stroke-dasharray="4 3"/>'
            )
            out.append(f'<text x="{x + 2:.1f}" y="{T + 12}" font-size="10">{f["fault"]}</text>')
    _legend(out, list(per_policy))
    _render(out, path)


def write_all(out: Path, policies: list[str]) -> None:
    """Every plot from ``out/<policy>.json``."""
    startups: dict[str, list[float]] = {}
    stall_series: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for policy in policies:
        f = out / f"{policy}.json"
        if not f.exists():
            continue
        data = json.loads(f.read_text())
        bytes_over_time(data["series"], policy, out / f"bytes_{policy}.png")
        startups[policy] = [v["startup_s"] for v in data["viewers"] if v["startup_s"] is not None]
        stall_series[policy] = (data["series"], data["summary"]["faults"])
    startup_cdf(startups, out / "startup_cdf.png")
    stalls(stall_series, out / "stalls.png")
