"""Pretrained weights from a local file or folder, never a download.

``model.weights`` names a file (safetensors, ``.pth``/``.pt``, ``.bin``) or a folder: a model
folder holding one of the usual file names, or a Hugging Face cache entry
(``models--org--name/`` with ``snapshots/<revision>/``; ``refs/main`` chooses the revision).
The file is identified by its sha256, recorded with every run.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ltsearch.config import ConfigError

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# What a model folder holds, in order of preference (timm's and OpenCLIP's hub file names).
FOLDER_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                "open_clip_pytorch_model.bin")


def resolve_weights(given: str, key: str = "model.weights") -> Path:
    """The weights file ``given`` names, checked to exist and to be of a known kind."""
    path = Path(given).expanduser()
    if not path.exists():
        raise ConfigError(key, f"no such file or folder: {path}")
    if path.is_dir():
        return _in_folder(path, key)
    if path.suffix not in SUFFIXES:
        raise ConfigError(key, f"{path} is not a weights file ({', '.join(SUFFIXES)})")
    return path


def _in_folder(folder: Path, key: str) -> Path:
    snapshots = folder / "snapshots"
    if snapshots.is_dir():  # a Hugging Face cache entry
        ref = folder / "refs" / "main"
        revisions = sorted(p for p in snapshots.iterdir() if p.is_dir())
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            folder = snapshots / ref.read_text().strip()
        elif len(revisions) == 1:
            folder = revisions[0]
        else:
            raise ConfigError(key, f"{folder} holds {len(revisions)} snapshots and no refs/main: "
                                   "name the snapshot folder")
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(key, f"{folder} holds none of {', '.join(FOLDER_FILES)}")


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_keys(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a weights file (safetensors: read from its header alone)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch

    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    for wrapper in ("state_dict", "model"):  # a training checkpoint around the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): tuple(v.shape) for k, v in state.items()
            if hasattr(v, "shape")}


def check_fit(path: Path, arch: str, expected: dict[str, tuple[int, ...]], ignored: set[str],
              key: str = "model.weights") -> None:
    """Refuse a file that is not the architecture's (timm drops the classifier and then loads
    without strictness, so a wrong file would leave the backbone random without a word): every
    weight of the body must be in the file and every tensor of the file a weight of the model,
    the classifier's aside. Shapes may differ where the model resamples them on loading (a
    ViT's position embedding at another input size); anything else fails the load itself."""
    given = {k for k in state_dict_keys(path) if k not in ignored}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in sorted(given) if k not in expected]
    if missing or unexpected:
        said = []
        if missing:
            said.append(f"lacks {len(missing)} of {arch}'s {len(expected)} tensors ({few(missing)})")
        if unexpected:
            said.append(f"holds {len(unexpected)} that {arch} has not ({few(unexpected)})")
        raise ConfigError(key, f"{path} does not fit {arch}: it " + "; it ".join(said))


def few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", … {len(names) - n} more" if len(names) > n else "")
