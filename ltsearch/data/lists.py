"""Datasets given as split files: the long-tail benchmarks' own (``ImageNet_LT_train.txt``,
Places-LT, iNaturalist 2018 as LIFT, BBN, RIDE and SADE read them: one ``relative/path label``
a line, the label a class index; a path with spaces needs the CSV form) or CSV with a header
(``path,label``; the label a class name or an index). Paths are relative to ``data.root``. Class names come from an optional classes file
(one a line, in index order), else from the CSV's names (sorted), else the indices.

Every line is checked before anything is decoded — a missing file, a label out of range or not a
class, a path given twice, a wrong column count — and a bad one is one message naming
``file:line``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from ltsearch.data.sources import DataError, FileSet, Pools


def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty line; a CSV's header checked and skipped."""
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    text = path.read_text(encoding="utf-8-sig").splitlines()
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(text))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        if header[:2] != ["path", "label"]:
            raise DataError(f"{path}:1: a CSV split starts with the header path,label (got "
                            f"{','.join(rows[0]) if rows else 'an empty file'})")
        return [(n, [f.strip() for f in row]) for n, row in enumerate(rows[1:], start=2)
                if any(f.strip() for f in row)]
    return [(n, line.split()) for n, line in enumerate(text, start=1) if line.strip()]


def read_classes(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"classes file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    seen = set()
    for n, name in enumerate(names, start=1):
        if name in seen:
            raise DataError(f"{path}:{n}: class {name!r} is named twice")
        seen.add(name)
    return names


def read_split(path: Path, root: Path, classes: Optional[list[str]],
               size: Optional[int]) -> FileSet:
    """A split file's images and labels, every line checked (files by their existence only)."""
    index = {name: i for i, name in enumerate(classes)} if classes is not None else None
    paths, labels, seen = [], [], {}
    for n, fields in _rows(path):
        where = f"{path}:{n}"
        if len(fields) != 2:
            raise DataError(f"{where}: expected 2 columns (path and label), got {len(fields)}")
        rel, label = fields
        if label.lstrip("-").isdigit():
            c = int(label)
            if c < 0 or (classes is not None and c >= len(classes)):
                bound = f"0–{len(classes) - 1}" if classes is not None else ">= 0"
                raise DataError(f"{where}: label {c} is out of range ({bound})")
        elif index is not None and label in index:
            c = index[label]
        else:
            raise DataError(f"{where}: label {label!r} is not a class"
                            + ("" if index is not None else " (no classes file names it)"))
        if rel in seen:
            raise DataError(f"{where}: {rel} is listed twice (first at line {seen[rel]})")
        seen[rel] = n
        file = root / rel
        if not file.is_file():
            raise DataError(f"{where}: no such image: {file}")
        paths.append(file)
        labels.append(c)
    if not paths:
        raise DataError(f"{path}: no images listed")
    return FileSet(paths, np.asarray(labels, dtype=np.int64), size)


def _csv_names(files: list[Path]) -> Optional[list[str]]:
    """The class names a CSV split uses (sorted), or None where its labels are indices."""
    names = set()
    for path in files:
        if path.suffix.lower() != ".csv":
            continue
        for _, fields in _rows(path):
            if len(fields) == 2 and not fields[1].lstrip("-").isdigit():
                names.add(fields[1])
    return sorted(names) or None


def load_list_pools(root: Path, train: Optional[str], test: Optional[str], val: Optional[str],
                    classes: Optional[str], size: Optional[int]) -> Pools:
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if train is None or test is None:
        raise DataError("data.source=list needs data.train and data.test (split files)")
    files = {k: (root / v if not Path(v).expanduser().is_absolute() else Path(v).expanduser())
             for k, v in (("train", train), ("test", test), ("val", val)) if v is not None}
    names = (read_classes(root / classes if not Path(classes).is_absolute() else Path(classes))
             if classes is not None else _csv_names(list(files.values())))
    sets = {k: read_split(p, root, names, size) for k, p in files.items()}
    if names is None:  # indices alone: classes 0 … max
        names = [str(c) for c in range(int(max(s.y.max() for s in sets.values())) + 1)]
    return Pools(names, sets["train"], sets["test"], sets.get("val"))  # (decoded by build_data)


def listed_paths(path: Path, root: Path) -> list[tuple[Path, Optional[str]]]:
    """The images a split file lists, each with its label where the line has one (prediction
    needs none); a file that is missing is left to whoever reads it."""
    out = []
    for n, fields in _rows(path):
        if not 1 <= len(fields) <= 2:
            raise DataError(f"{path}:{n}: expected a path and an optional label, got {len(fields)} columns")
        out.append((root / fields[0], fields[1] if len(fields) == 2 else None))
    return out
