#!/usr/bin/env python3
"""Tokens/s against context depth, microllm vs llama.cpp, as a hand-written SVG (stdlib only).

usage: bench/plot_depth.py --microllm A.json [B.json ...] --llama C.json [D.json ...]
       [-o docs/performance-depth.svg] [--title TEXT] [--table]

Each JSON file is one run of `microllm bench --json` or `llama-bench -o json` (same field
names: n_prompt, n_gen, n_depth, avg_ts). Several files per tool (rounds of bench/depth.sh)
are reduced to the median per (test, depth). Draws one panel for generation (tgN) and one
for prompt processing (ppN) if present, and with --table prints the medians and ratios as
Markdown.
"""
import argparse, json, statistics, sys
from html import escape

COLORS = {"microllm": "#1f77b4", "llama.cpp": "#d62728"}


def load(paths):
    """{(kind, n, depth): [avg_ts, ...]} over all files."""
    out = {}
    for p in paths:
        try:
            with open(p) as f:
                rows = json.load(f)
        except (OSError, ValueError) as e:
            print(f"skipping {p}: {e}", file=sys.stderr)  # e.g. a run still in progress
            continue
        for r in rows:
            kind, n = ("pp", r["n_prompt"]) if r["n_prompt"] else ("tg", r["n_gen"])
            out.setdefault((kind, n, r.get("n_depth", 0)), []).append(r["avg_ts"])
    return {k: statistics.median(v) for k, v in out.items()}


def nice_max(v):
    """A round axis maximum >= v."""
    if v <= 0:
        return 1
    mag = 10 ** (len(str(int(v))) - 1)
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * mag >= v:
            return m * mag
    return 10 * mag


def panel(x0, y0, w, h, title, series, depths):
    """SVG elements of one panel: series = {tool: {depth: value}}."""
    el = []
    left, right, top, bottom = 58, 12, 28, 42
    pw, ph = w - left - right, h - top - bottom
    ox, oy = x0 + left, y0 + top
    ymax = nice_max(max((v for s in series.values() for v in s.values()), default=1) * 1.05)
    dmax = max(depths) or 1

    def px(d):
        return ox + pw * d / dmax

    def py(v):
        return oy + ph * (1 - v / ymax)

    el.append(f'<text x="{x0 + w / 2}" y="{y0 + 18}" text-anchor="middle" font-weight="bold">{escape(title)}</text>')
    for i in range(6):
        v = ymax * i / 5
        y = py(v)
        el.append(f'<line x1="{ox}" y1="{y:.1f}" x2="{ox + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        el.append(f'<text x="{ox - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{v:g}</text>')
    if len(depths) == 1:
        # One depth: bars side by side, labelled with their values.
        bw = pw / (2 * len(series) + 1)
        for i, (tool, s) in enumerate(series.items()):
            v = s.get(depths[0])
            if v is None:
                continue
            x = ox + bw * (2 * i + 1)
            c = COLORS.get(tool, "#555")
            el.append(f'<rect x="{x:.1f}" y="{py(v):.1f}" width="{bw:.1f}" height="{oy + ph - py(v):.1f}" fill="{c}"/>')
            el.append(f'<text x="{x + bw / 2:.1f}" y="{py(v) - 5:.1f}" text-anchor="middle" font-size="12">{v:.1f}</text>')
        el.append(f'<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
        el.append(f'<text x="{ox + pw / 2}" y="{oy + ph + 20}" text-anchor="middle" font-size="12">at depth {depths[0]}</text>')
        el.append(f'<text x="{x0 + 14}" y="{oy + ph / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 {x0 + 14} {oy + ph / 2})">tokens/s</text>')
        return el
    for d in depths:
        x = px(d)
        el.append(f'<line x1="{x:.1f}" y1="{oy + ph}" x2="{x:.1f}" y2="{oy + ph + 4}" stroke="#333"/>')
        el.append(f'<text x="{x:.1f}" y="{oy + ph + 17}" text-anchor="middle" font-size="11">{d}</text>')
    el.append(f'<rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    el.append(f'<text x="{ox + pw / 2}" y="{oy + ph + 34}" text-anchor="middle" font-size="12">context depth (tokens already in the KV cache)</text>')
    el.append(f'<text x="{x0 + 14}" y="{oy + ph / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 {x0 + 14} {oy + ph / 2})">tokens/s</text>')
    for tool, s in series.items():
        pts = sorted(s.items())
        if not pts:
            continue
        c = COLORS.get(tool, "#555")
        path = " ".join(f"{px(d):.1f},{py(v):.1f}" for d, v in pts)
        el.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for d, v in pts:
            el.append(f'<circle cx="{px(d):.1f}" cy="{py(v):.1f}" r="3" fill="{c}"><title>{tool} {v:.1f} t/s at depth {d}</title></circle>')
    return el


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--microllm", nargs="+", required=True)
    ap.add_argument("--llama", nargs="+", required=True)
    ap.add_argument("-o", "--out", default="docs/performance-depth.svg")
    ap.add_argument("--title", default="")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    data = {"microllm": load(a.microllm), "llama.cpp": load(a.llama)}
    tests = sorted({(k, n) for d in data.values() for (k, n, _) in d}, key=lambda t: t[0] != "tg")
    if not tests:
        sys.exit("no rows in the JSON files")
    pw, ph = 460, 320
    width, height = pw * len(tests), ph + (30 if a.title else 0) + 26
    top = 30 if a.title else 0
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
          f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
          f'<rect width="{width}" height="{height}" fill="white"/>']
    if a.title:
        el.append(f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15">{escape(a.title)}</text>')
    for i, (kind, n) in enumerate(tests):
        series = {tool: {dep: v for (k, nn, dep), v in d.items() if (k, nn) == (kind, n)}
                  for tool, d in data.items()}
        depths = sorted({dep for s in series.values() for dep in s})
        name = "generation" if kind == "tg" else "prompt processing"
        el += panel(i * pw, top, pw, ph, f"{name} ({kind}{n})", series, depths)
    # Legend.
    lx = 70
    for tool, c in COLORS.items():
        el.append(f'<line x1="{lx}" y1="{height - 10}" x2="{lx + 24}" y2="{height - 10}" stroke="{c}" stroke-width="3"/>')
        el.append(f'<text x="{lx + 30}" y="{height - 6}">{tool}</text>')
        lx += 130
    el.append("</svg>")
    with open(a.out, "w") as f:
        f.write("\n".join(el) + "\n")
    if a.table:
        print("| test | depth | llama.cpp t/s | microllm t/s | ratio |")
        print("|---|---:|---:|---:|---:|")
        for kind, n in tests:
            depths = sorted({dep for d in data.values() for (k, nn, dep) in d if (k, nn) == (kind, n)})
            for dep in depths:
                m = data["microllm"].get((kind, n, dep))
                l = data["llama.cpp"].get((kind, n, dep))
                ratio = f"{m / l:.2f}x" if m and l else "-"
                fm = f"{m:.1f}" if m else "-"
                fl = f"{l:.1f}" if l else "-"
                print(f"| {kind}{n} | {dep} | {fl} | {fm} | {ratio} |")


if __name__ == "__main__":
    main()
