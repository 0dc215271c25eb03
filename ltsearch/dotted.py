"""Nested dicts and their dotted-key form: ``{"train": {"lr": 0.1}}`` ⇄ ``{"train.lr": 0.1}``
(MLflow params, CSV columns, search-space keys, a saved model's state)."""
from __future__ import annotations


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def nested(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *path, leaf = dotted.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
