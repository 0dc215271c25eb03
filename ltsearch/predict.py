"""``ltsearch predict MODEL_DIR INPUTS…``: a saved model's top-k classes for image files,
folders (walked, sorted) and split files (``path [label]`` lines or a ``path,label`` CSV, paths
relative to ``--root``, by default the split file's folder). Decoded in threads, batched on the
best device; a file that cannot be read is reported by path and skipped (exit status 1 at the
end, the rest predicted)."""
from __future__ import annotations

import csv
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ltsearch.data.sources import IMAGE_EXTENSIONS, DataError

SPLIT_SUFFIXES = (".txt", ".csv")


def gather(inputs: list[str], root: str | None = None) -> list[tuple[Path, str | None]]:
    """(image path, given label or None) of every input, in the order given."""
    from ltsearch.data.lists import listed_paths

    out = []
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            out += [(p, None) for p in sorted(path.rglob("*"))
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        elif path.suffix.lower() in SPLIT_SUFFIXES and path.is_file():
            out += listed_paths(path, Path(root).expanduser() if root else path.parent)
        elif path.is_file():
            out.append((path, None))
        else:
            raise DataError(f"no such file or folder: {path}")
    if not out:
        raise DataError(f"no images in {', '.join(inputs)}")
    return out


def predict_files(model, items: list[tuple[Path, str | None]], top_k: int, on_row, on_error,
                  chunk: int | None = None) -> int:
    """Predict ``items`` a batch at a time; ``on_row(path, label, [(class, p), …])`` for each
    read, ``on_error(path, message)`` for each not; returns how many could not be read."""
    chunk = chunk or model.batch_size
    k = min(top_k, len(model.classes))
    failed = 0

    def read(item):
        try:
            return model.read(item[0]), None
        except DataError as e:
            return None, str(e)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            images, kept = [], []
            for item, (image, error) in zip(part, pool.map(read, part)):
                if error is not None:
                    failed += 1
                    on_error(item[0], error)
                else:
                    images.append(image)
                    kept.append(item)
            if not images:
                continue
            p = model.probabilities(np.stack(images))
            best = np.argsort(-p, axis=1, kind="stable")[:, :k]
            for (path, label), row, order in zip(kept, p, best):
                on_row(path, label, [(model.classes[c], float(row[c])) for c in order])
    return failed


def main_predict(args) -> int:
    from ltsearch.config import ConfigError
    from ltsearch.inference import TrainedModel

    if args.top_k < 1:
        raise ConfigError("--top-k", f"must be >= 1, got {args.top_k}")
    model = TrainedModel(args.model_dir, args.device or "auto")
    items = gather(args.inputs, args.root)
    labelled = any(label is not None for _, label in items)
    k = min(args.top_k, len(model.classes))
    writer, handle = None, None
    if args.out:
        handle = open(args.out, "w", newline="")
        writer = csv.writer(handle)
        writer.writerow(["path", *(["label"] if labelled else []),
                         *[f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "p")]])

    def on_row(path, label, top):
        if writer is not None:
            writer.writerow([str(path), *([label or ""] if labelled else []),
                             *[v for c, p in top for v in (c, f"{p:.6f}")]])
        else:
            print(f"{path}  " + "  ".join(f"{c} {p:.4f}" for c, p in top), flush=False)

    def on_error(path, message):
        print(f"skipped: {message}", file=sys.stderr, flush=True)

    try:
        failed = predict_files(model, items, args.top_k, on_row, on_error)
    finally:
        if handle is not None:
            handle.close()
    done = len(items) - failed
    print(f"predicted {done} image{'s' if done != 1 else ''} with {args.model_dir}"
          + (f", wrote {args.out}" if args.out else "")
          + (f"; {failed} could not be read" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
