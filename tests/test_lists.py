"""Datasets as split files (the long-tail benchmarks' `relative/path label` lines, and CSV):
generated PNG and JPEG images of mixed sizes in a temporary folder; labels and order as written;
every bad line refused by file:line before anything is decoded."""
import numpy as np
import pytest
from PIL import Image

from conftest import DIGITS
from ltsearch.cli import main
from ltsearch.data import DataError, build_data
from ltsearch.runconfig import config_from_dict

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/images/<class>/<n>.{png,jpg} of sizes 20–40 px, each a flat colour by class."""
    root = tmp_path_factory.mktemp("lists")
    rng = np.random.default_rng(0)
    files = []
    for c, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        for n in range(12 - 3 * c):  # 12, 9, 6: a long tail of its own
            side = int(rng.integers(20, 41))
            ext = "png" if n % 2 else "jpg"
            colour = tuple(int(v) for v in (40 + 80 * c, 200 - 60 * c, 30 * n % 255))
            Image.new("RGB", (side, side + n % 3), colour).save(root / "images" / name / f"{n}.{ext}")
            files.append((f"images/{name}/{n}.{ext}", c))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    order = rng.permutation(len(files))
    test = [files[i] for i in order[:9]]
    train = [files[i] for i in order[9:]]
    (root / "train.txt").write_text("".join(f"{p} {c}\n" for p, c in train))
    (root / "test.txt").write_text("".join(f"{p} {c}\n" for p, c in test))
    (root / "train.csv").write_text("path,label\n" + "".join(f"{p},{CLASSES[c]}\n" for p, c in train))
    (root / "test.csv").write_text("path,label\n" + "".join(f"{p},{CLASSES[c]}\n" for p, c in test))
    return root, train, test


def _data(root, **keys):
    return {"source": "list", "root": str(root), "profile": "none", "val_per_class": 0,
            "image_size": 16, **keys}


@pytest.mark.parametrize("kind", ["txt", "csv"])
def test_split_files_give_their_labels_in_their_order(tree, kind):
    root, train, test = tree
    keys = dict(train=f"train.{kind}", test=f"test.{kind}")
    if kind == "txt":
        keys["classes"] = "classes.txt"
    cfg = config_from_dict({**DIGITS, "data": _data(root, **keys)})
    from ltsearch.data.sources import load_pools

    pools = load_pools("list", str(root), image_size=16,
                       splits=dict(train=keys["train"], test=keys["test"], val=None,
                                   classes=keys.get("classes")))
    assert pools.classes == CLASSES  # the classes file's order; the CSV's names, sorted
    assert [str(p.relative_to(root)) for p in pools.train.paths] == [p for p, _ in train]
    assert pools.train.y.tolist() == [c for _, c in train]
    decoded = pools.test.load()  # (files until read)
    assert decoded.y.tolist() == [c for _, c in test] and decoded.x.shape[1:] == (3, 16, 16)
    data = build_data(cfg.data)  # profile none: the split's own long tail
    assert data.counts == np.bincount([c for _, c in train], minlength=3).tolist()
    # a decoded image is its file, resized: the flat colour of its class
    first = Image.open(root / test[0][0]).convert("RGB").resize((16, 16), Image.BILINEAR)
    assert np.array_equal(decoded.x[0], np.asarray(first).transpose(2, 0, 1))


@pytest.mark.parametrize("line,said", [
    ("images/cat/0.jpg 7", "label 7 is out of range (0–2)"),
    ("images/cat/0.jpg bird", "label 'bird' is not a class"),
    ("images/cat/missing.jpg 0", "no such image: "),
    ("images/cat/0.jpg 0 extra", "expected 2 columns (path and label), got 3"),
    ("FIRST", "is listed twice (first at line 1)"),
])
def test_every_bad_line_is_one_message_naming_file_and_line(tree, tmp_path, capsys, line, said):
    root, train, test = tree
    bad = tmp_path / "bad.txt"
    first = f"{train[0][0]} {train[0][1]}"
    bad.write_text(f"{first}\n{line.replace('FIRST', first)}\n")
    lineno = 2
    with pytest.raises(DataError, match=f"{bad}:{lineno}: .*" + said.replace("(", r"\(").replace(")", r"\)")):
        build_data(config_from_dict({**DIGITS, "data": _data(root, train=str(bad), test="test.txt",
                                                            classes="classes.txt")}).data)
    # through the command line: one line, exit 2, before Ray or any decoding
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**DIGITS, "data": _data(root, train=str(bad), test="test.txt",
                                                             classes="classes.txt")}))
    assert main(["train", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:{lineno}:" in err[0]


def test_a_csv_needs_its_header_and_split_keys_their_source(tree, tmp_path):
    root, train, _ = tree
    bad = tmp_path / "noheader.csv"
    bad.write_text(f"{train[0][0]},cat\n")
    with pytest.raises(DataError, match=f"{bad}:1: a CSV split starts with the header path,label"):
        build_data(config_from_dict({**DIGITS, "data": _data(root, train=str(bad), test="test.csv")}).data)
    with pytest.raises(Exception, match="data.test: required with source: list"):
        config_from_dict({**DIGITS, "data": _data(root, train="train.txt")})
    with pytest.raises(Exception, match="data.train: split files are read with source: list"):
        config_from_dict({**DIGITS, "data": {"source": "digits", "train": "train.txt"}})
