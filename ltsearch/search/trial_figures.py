"""Each trial's two pictures for its tracking run, written as SVG text.

The driver draws them while the other trials train. With matplotlib each trial cost 0.3–0.5 s
of the driver's CPU (laying out tick labels, mostly), taken from the training workers, which
Ray runs at a lower priority: about 8 s of a 16-trial quickstart search on 2 cores. Written
directly, an SVG costs about a millisecond, stays sharp at any zoom, and MLflow's artifact
viewer shows it as an image.
"""
from __future__ import annotations

import math
from xml.sax.saxutils import escape, quoteattr

BAR, COUNT = "#1f77b4", "#d62728"
# matplotlib's "Blues", light to dark: the colour of a confusion cell
BLUES = ["#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"]
FONT = 'font-family="DejaVu Sans,Helvetica,Arial,sans-serif"'


def _svg(width: float, height: float, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" {FONT} font-size="11">'
            f'<rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>\n")


def _text(x: float, y: float, s, anchor: str = "middle", **attrs) -> str:
    extra = "".join(f' {k.replace("_", "-")}={quoteattr(str(v))}' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{escape(str(s))}</text>'


def _vertical(x: float, y: float, s, anchor: str = "end", **attrs) -> str:
    """Text read bottom to top, its ``anchor`` end at (x, y)."""
    return _text(0, 0, s, anchor, transform=f"translate({x:.1f},{y:.1f}) rotate(-90)",
                 dominant_baseline="middle", **attrs)


def _labelled(n: int, most: int) -> range:
    """Which of ``n`` class labels to print: every one, or every k-th beyond ``most``."""
    return range(0, n, max(1, math.ceil(n / most)))


def per_class_svg(classes: list[str], accuracy: list, counts: list[int], split: str) -> str:
    """Bars: each class's accuracy (0–1, left axis). Red line: its training images (log scale,
    right axis, ticks at the fewest, the geometric middle and the most)."""
    n = len(classes)
    step = 28 if n <= 40 else 14
    left, right, top, plot_h, label_h = 56, 70, 34, 220, 96
    width, bottom = left + n * step + right, top + plot_h
    body = [_text(left + n * step / 2, 20, f"per-class {split} accuracy vs training count", font_size=13)]
    for v in (0, 0.25, 0.5, 0.75, 1):
        y = bottom - v * plot_h
        body.append(f'<line x1="{left}" x2="{left + n * step}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        body.append(_text(left - 6, y + 4, f"{v:g}", "end"))
    body.append(_vertical(14, top + plot_h / 2, f"{split} accuracy", "middle"))
    for i, v in enumerate(accuracy):
        v = 0.0 if v is None or v != v else float(v)
        body.append(f'<rect class="bar" x="{left + i * step + step * 0.15:.1f}" y="{bottom - v * plot_h:.2f}" '
                    f'width="{step * 0.7:.1f}" height="{v * plot_h:.2f}" fill="{BAR}"><title>'
                    f'{escape(str(classes[i]))}: {v:.3f}</title></rect>')
    for i in _labelled(n, 60):
        body.append(_vertical(left + (i + 0.5) * step, bottom + 6, classes[i], font_size=10))
    lo, hi = max(min(counts), 1), max(max(counts), 1)
    lo_log, hi_log = math.log(lo / 1.5), math.log(hi * 1.5)

    def y_of(c: float) -> float:
        return bottom - (math.log(max(c, 1)) - lo_log) / (hi_log - lo_log) * plot_h

    points = [(left + (i + 0.5) * step, y_of(c)) for i, c in enumerate(counts)]
    body.append(f'<polyline class="counts" fill="none" stroke="{COUNT}" stroke-width="1.5" points="'
                + " ".join(f"{x:.1f},{y:.2f}" for x, y in points) + '"/>')
    body += [f'<circle cx="{x:.1f}" cy="{y:.2f}" r="2.5" fill="{COUNT}"/>' for x, y in points]
    axis_x = left + n * step
    for c in sorted({lo, int(round(math.sqrt(lo * hi))), hi}):
        body.append(_text(axis_x + 6, y_of(c) + 4, c, "start", fill=COUNT))
    body.append(_vertical(width - 12, top + plot_h / 2, "training images", "middle", fill=COUNT))
    body.append(f'<rect x="{left}" y="{top}" width="{n * step}" height="{plot_h}" fill="none" stroke="#333"/>')
    return _svg(width, bottom + label_h, body)


def _blue(t: float) -> str:
    """The colour at ``t`` in [0, 1] along BLUES, linearly between its stops."""
    x = min(max(t, 0.0), 1.0) * (len(BLUES) - 1)
    i = min(int(x), len(BLUES) - 2)
    a, b = (tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in BLUES[i:i + 2])
    return "#" + "".join(f"{round(p + (q - p) * (x - i)):02x}" for p, q in zip(a, b))


def confusion_svg(classes: list[str], confusion: list[list[int]], split: str) -> str:
    """Rows: the true class; columns: the predicted one; the colour: the count (colour bar at
    the right). Counts and class names are written in when there are at most 20 classes."""
    n = len(classes)
    cell = max(4.0, min(32.0, 480 / n))
    named = n <= 20
    left, top = (90 if named else 40), 34
    size = n * cell
    width, height = left + size + 90, top + size + (90 if named else 40)
    peak = max((max(row) for row in confusion), default=0) or 1
    body = [_text(left + size / 2, 20, f"{split} confusion matrix", font_size=13)]
    for r, row in enumerate(confusion):
        for c, v in enumerate(row):
            x, y = left + c * cell, top + r * cell
            body.append(f'<rect class="cell" x="{x:.1f}" y="{y:.1f}" width="{cell:.1f}" height="{cell:.1f}" '
                        f'fill="{_blue(v / peak)}"><title>true {escape(str(classes[r]))}, predicted '
                        f'{escape(str(classes[c]))}: {v}</title></rect>')
            if named:
                body.append(_text(x + cell / 2, y + cell / 2 + 4, v, font_size=9,
                                  fill="white" if v / peak > 0.5 else "#222"))
    if named:
        for i, name in enumerate(classes):
            body.append(_text(left - 6, top + (i + 0.5) * cell + 4, name, "end", font_size=10))
            body.append(_vertical(left + (i + 0.5) * cell, top + size + 6, name, font_size=10))
    body.append(_vertical(14, top + size / 2, "true", "middle"))
    body.append(_text(left + size / 2, height - 8, "predicted"))
    bar_x = left + size + 20
    stops = "".join(f'<stop offset="{k / (len(BLUES) - 1):.3f}" stop-color="{c}"/>' for k, c in enumerate(BLUES))
    body.append(f'<defs><linearGradient id="blues" x1="0" y1="1" x2="0" y2="0">{stops}</linearGradient></defs>')
    body.append(f'<rect x="{bar_x}" y="{top}" width="14" height="{size:.1f}" fill="url(#blues)" stroke="#333"/>')
    body.append(_text(bar_x + 20, top + 8, peak, "start"))
    body.append(_text(bar_x + 20, top + size, 0, "start"))
    return _svg(width, height, body)
