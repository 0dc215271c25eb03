"""Each trial's pictures (SVG): what they draw, read back from the SVG."""
import math
import xml.etree.ElementTree as ET

from ltsearch.search.trial_figures import BLUES, _blue, confusion_svg, per_class_svg

NS = {"s": "http://www.w3.org/2000/svg"}


def _texts(root):
    return ["".join(t.itertext()) for t in root.iter(f"{{{NS['s']}}}text")]


def test_per_class_bars_are_the_accuracies_and_the_line_the_counts_on_a_log_scale():
    classes = ["cat", "a&b<c>", "dog", "eel"]
    accuracy = [0.9, 0.5, None, 0.0]
    counts = [400, 100, 25, 5]
    root = ET.fromstring(per_class_svg(classes, accuracy, counts, "test"))
    bars = root.findall(".//s:rect[@class='bar']", NS)
    assert len(bars) == 4
    heights = [float(b.get("height")) for b in bars]
    full = heights[0] / 0.9
    assert [round(h / full, 6) for h in heights] == [0.9, 0.5, 0.0, 0.0]  # no value: no bar
    assert [b.find("s:title", NS).text for b in bars][:2] == ["cat: 0.900", "a&b<c>: 0.500"]
    ys = [float(p.split(",")[1]) for p in root.find(".//s:polyline[@class='counts']", NS).get("points").split()]
    # equal count ratios (×4, ×4, ×5) → rises in proportion to their logarithms
    assert math.isclose((ys[1] - ys[0]) / (ys[2] - ys[1]), 1.0, rel_tol=1e-3)
    assert math.isclose((ys[3] - ys[2]) / (ys[2] - ys[1]), math.log(5) / math.log(4), rel_tol=1e-3)
    texts = _texts(root)
    assert "per-class test accuracy vs training count" in texts
    assert {"a&b<c>", "5", "45", "400"} <= set(texts)  # class names escaped; the count axis' ticks


def test_many_classes_print_every_kth_label():
    classes = [f"c{i}" for i in range(100)]
    root = ET.fromstring(per_class_svg(classes, [0.5] * 100, list(range(100, 0, -1)), "val"))
    assert len(root.findall(".//s:rect[@class='bar']", NS)) == 100
    names = [t for t in _texts(root) if t.startswith("c")]
    assert names == [f"c{i}" for i in range(0, 100, 2)]


def test_confusion_cells_are_coloured_by_count_and_labelled_up_to_20_classes():
    confusion = [[8, 0, 2], [1, 4, 0], [0, 3, 5]]  # rows true, columns predicted
    root = ET.fromstring(confusion_svg(["x", "y", "z"], confusion, "val"))
    cells = root.findall(".//s:rect[@class='cell']", NS)
    assert len(cells) == 9
    fills = [c.get("fill") for c in cells]
    assert fills[0] == BLUES[-1] and fills[1] == BLUES[0]  # the largest count darkest, zero lightest
    assert fills[4] == _blue(0.5)
    assert cells[5].find("s:title", NS).text == "true y, predicted z: 0"
    texts = _texts(root)
    assert "val confusion matrix" in texts and {"8", "4", "5", "x", "z"} <= set(texts)
    many = ET.fromstring(confusion_svg([str(i) for i in range(30)], [[1] * 30] * 30, "test"))
    assert len(many.findall(".//s:rect[@class='cell']", NS)) == 900
    assert set(_texts(many)) == {"test confusion matrix", "true", "predicted", "1", "0"}  # no names


def test_the_colour_ramp_runs_through_the_blues_stops():
    assert _blue(0.0) == BLUES[0] and _blue(1.0) == BLUES[-1]
    assert _blue(0.5) == BLUES[4]  # 9 stops: the middle one
    assert _blue(1 / 32) == "#f1f7fd"  # a quarter of the way from the first stop to the second
