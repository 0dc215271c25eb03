"""The trained model as a folder a user keeps: ``model.safetensors`` (the network's weights and
the recipe's learnt inference state, such as LWS's scales; no pickle), ``config.yaml`` (what
built them), ``model.json`` (class names and counts, the preprocessing, what the recipe does at
inference — post-hoc τ and priors, τ-norm's τ, LWS's scales, BBN's α —, test-time views and the
test metrics).

Loaded back (:class:`TrainedModel`), the network is rebuilt from its config without its
pretrained weights file or a text tower (the saved weights replace them) and predicts through
the recipe's own code, the same as the trainer's evaluation (:func:`mean_logits`): the same
logits, to the bit, on the same device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from ltsearch.config import ConfigError
from ltsearch.data.device import DeviceImages, tta_views
from ltsearch.data.sources import DataError, ImageSet, conform, decode_image, stored_mode
from ltsearch.dotted import flatten, nested

FORMAT = 1
WEIGHTS, CONFIG, META = "model.safetensors", "config.yaml", "model.json"
MODEL_PREFIX, RECIPE_PREFIX = "model.", "recipe."


def resolve_device(name: str) -> torch.device:
    """The device ``train.device`` names, checked on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("train.device", f"not a device: {name!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device", f"{name!r}, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("train.device", f"{name!r}, but this machine has "
                                              f"{torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ConfigError("train.device", f"{name!r} is not supported (auto, cpu, cuda or cuda:N)")
    return device


def eval_batch_size(train, cuda: bool) -> int:
    return train.eval_batch_size or (1024 if cuda else 128)


def autocast(train, cuda: bool):
    return (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and train.amp
            else contextlib.nullcontext())


def mean_logits(steps: Iterable, view_logits: Callable, views: int) -> torch.Tensor:
    """(N, K) float logits, the mean over ``views`` test-time views of each batch ``steps``
    yields (``(idx, raw)``), ``view_logits(idx, raw, v)`` giving one view's."""
    out = []
    for idx, raw in steps:
        z = 0.0
        for v in range(views):
            z = z + view_logits(idx, raw, v)
        out.append(z / views)
    return torch.cat(out)


def _tensors(state: dict, prefix: str) -> tuple[dict, dict]:
    """(tensors by dotted key, the rest) of a nested state dict."""
    flat = flatten(state, prefix)
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in flat.items() if k not in tensors}


def save_model(trainer, folder: str | Path, metrics: dict | None = None,
               status: str = "finished") -> Path:
    """Write ``trainer``'s model to ``folder`` (made if missing; its files replaced);
    ``metrics``: its run's last report (the test metrics are kept), ``status``: how it ended."""
    from safetensors.torch import save_file

    from ltsearch import __version__
    from ltsearch.models import identity
    from ltsearch.runconfig import dump_config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, _ = _tensors(trainer.model.state_dict(), MODEL_PREFIX)
    own, plain = _tensors(trainer.method.state_dict(), RECIPE_PREFIX)
    jsonable = {k: v for k, v in plain.items() if _jsonable(v)}  # (training-only bookkeeping: dropped)
    # one storage per tensor, contiguous, on the CPU (safetensors refuses shared storage)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in {**tensors, **own}.items()}
    test = trainer.test_set
    meta = {
        "format": FORMAT, "ltsearch": __version__,
        "classes": list(trainer.data.classes), "counts": list(trainer.data.counts),
        "in_channels": trainer.data.in_channels,
        "preprocess": {
            "stored": list(trainer.data.test.image_shape),  # what a file is decoded to (C, H, W)
            "input_size": list(test.size) if test.size else list(trainer.data.test.image_shape[1:]),
            "channels": test.channels or trainer.data.in_channels,
            "mean": test.mean.flatten().tolist(), "std": test.std.flatten().tolist(),
            "interpolation": test.interpolation, "eval_crop_pct": test.eval_crop_pct},
        "inference": {**trainer.method.inference(), "tta": trainer.cfg.train.tta},
        "recipe_state": jsonable, "backbone": identity(trainer.cfg.model),
        "method": trainer.cfg.method.label(), "status": status, "epochs": trainer.epoch,
        "metrics": {k: v for k, v in (metrics or {}).items()
                    if k.startswith("test/") and _jsonable(v)},
    }
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": str(FORMAT)})
    (folder / CONFIG).write_text(dump_config(trainer.cfg))
    (folder / META).write_text(json.dumps(meta, indent=1))
    return folder


def _jsonable(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


def check_folder(folder: str | Path) -> Path:
    """``folder``, if it holds a saved model's files; else one message saying what is missing."""
    folder = Path(folder).expanduser()
    missing = [n for n in (WEIGHTS, CONFIG, META) if not (folder / n).is_file()]
    if not folder.is_dir() or missing:
        raise DataError(f"{folder} is not a saved model (no {', '.join(missing)}; "
                        f"`ltsearch train` writes one to OUT/model)")
    return folder


class TrainedModel:
    """A saved model, ready to predict: :meth:`logits` of stored-size uint8 images,
    :meth:`read` for image files, :meth:`probabilities` of either."""

    def __init__(self, folder: str | Path, device: str | torch.device = "auto"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from ltsearch.models import build_body
        from ltsearch.recipes import MethodContext, Recipe
        from ltsearch.runconfig import load_config

        folder = check_folder(folder)
        try:
            meta = json.loads((folder / META).read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, this ltsearch reads {FORMAT}")
            cfg = load_config(folder / CONFIG)
            state = load_file(str(folder / WEIGHTS))
        except (ValueError, KeyError, OSError, SafetensorError, ConfigError) as e:
            raise DataError(f"{folder} is not a model this ltsearch can read: {e}") from None
        self.folder, self.meta, self.cfg = folder, meta, cfg
        self.classes: list[str] = meta["classes"]
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.cuda = self.device.type == "cuda"
        ctx = MethodContext(meta["counts"], None, None, self.device, classes=self.classes,
                            initialise=False)
        self.method = Recipe(cfg.method, ctx, cfg.train)
        body = dataclasses.replace(cfg.model, weights=None)  # (the saved weights replace them)
        self.model = self.method.build_model(lambda: build_body(body, meta["in_channels"])).to(
            self.device, memory_format=torch.channels_last)
        own = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
        try:
            self.model.load_state_dict(own, strict=True)
        except RuntimeError as e:
            raise DataError(f"{folder / WEIGHTS} does not fit {CONFIG}: {str(e).splitlines()[0]}") from None
        recipe = {k[len(RECIPE_PREFIX):]: v.to(self.device) for k, v in state.items()
                  if k.startswith(RECIPE_PREFIX)}
        recipe.update({k[len(RECIPE_PREFIX):]: v for k, v in meta.get("recipe_state", {}).items()})
        self.method.load_state_dict(nested(recipe))
        self.model.eval()
        p = meta["preprocess"]
        self.stored = tuple(p["stored"])
        self._shape = dict(mean=torch.tensor(p["mean"]), std=torch.tensor(p["std"]),
                           size=tuple(p["input_size"]), interpolation=p["interpolation"],
                           channels=p["channels"], eval_crop_pct=p["eval_crop_pct"])
        self.views = tta_views(cfg.train.tta, cfg.train.tta_expand)
        self.batch_size = eval_batch_size(cfg.train, self.cuda)

    def images(self, x: np.ndarray) -> DeviceImages:
        """Stored-size uint8 images (N, C, H, W) on the device, evaluated as the trainer's are."""
        x = np.asarray(x, dtype=np.uint8)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.stored:
            raise DataError(f"images of shape {tuple(x.shape)}: this model reads (N, "
                            f"{', '.join(map(str, self.stored))}) uint8 (see read())")
        return DeviceImages(ImageSet(x, np.zeros(len(x), dtype=np.int64)), self.device,
                            self._shape["mean"], self._shape["std"],
                            **{k: v for k, v in self._shape.items() if k not in ("mean", "std")})

    @torch.no_grad()
    def logits(self, x: np.ndarray | DeviceImages) -> torch.Tensor:
        images = x if isinstance(x, DeviceImages) else self.images(x)
        order = torch.arange(len(images), device=self.device)

        def view_logits(idx, raw, v):
            with autocast(self.cfg.train, self.cuda):
                batch, _ = images.batch(idx, augment=False, view=self.views[v], raw=raw)
                return self.method.logits(self.model, batch).float()

        return mean_logits(images.steps(order, self.batch_size), view_logits, len(self.views))

    def probabilities(self, x: np.ndarray | DeviceImages) -> np.ndarray:
        return torch.softmax(self.logits(x), dim=1).cpu().numpy()

    def read(self, path: str | Path) -> np.ndarray:
        """One image file as the model's stored images are (DataError if it cannot be read)."""
        return decode_image(Path(path), self.stored)

    def from_array(self, image: np.ndarray) -> np.ndarray:
        """An image array (H, W), (H, W, C) or (C, H, W), any size, uint8 0–255, as the model's
        stored images are (resized as files are)."""
        from PIL import Image

        a = np.asarray(image)
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
            a = a.transpose(1, 2, 0)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
            raise DataError(f"an image array of shape {a.shape}: expected (H, W), (H, W, 3) or (3, H, W)")
        return conform(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), tuple(self.stored[1:]),
                       stored_mode(self.stored))
