"""An OpenCLIP image tower as a body (``model.arch: open_clip:<name>``), weights from a local file.

OpenCLIP builds and loads the whole CLIP (``create_model_and_transforms(name, pretrained=PATH)``,
strictly: a file of another model fails by its missing keys). The body is the image tower's
output *before* its projection to the joint space, as LIFT reads it (Shi et al., ICML 2024,
``shijxcs/LIFT`` ``models/peft_vit.py``: the ViT's pooled, normalised class token); a head
initialised from text reads the class names' text features mapped back through that projection
(``text @ projᵀ``, normalised, as LIFT's ``init_head_text_feat``). The text tower is kept only
until then. ``options.model_config`` registers a model-config JSON (its file name is the model's
name) for a network OpenCLIP does not list; other options go to ``create_model_and_transforms``.
"""
from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltsearch.config import ConfigError
from ltsearch.models.interface import Preprocess, ViTView

PREFIX = "open_clip:"
TEMPLATE = "a photo of a {}."  # LIFT's default prompt


def _registered(name: str, options: dict) -> dict:
    import open_clip

    options = dict(options)
    config = options.pop("model_config", None)
    if config is not None:
        open_clip.add_model_config(Path(config).expanduser())
    return options


def check_name(name: str, options: dict, key: str = "model.arch") -> None:
    import open_clip

    config = options.get("model_config")
    if config is not None and not Path(config).expanduser().is_file():
        raise ConfigError(f"{key.rsplit('.', 1)[0]}.options.model_config", f"no such file: {config}")
    _registered(name, options)
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=4, cutoff=0.6)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(key, f"OpenCLIP knows no model {name!r}{hint}")


def build_clip(name: str, options: dict, weights: Optional[Path]) -> nn.Module:
    import open_clip

    kwargs = _registered(name, options)
    root = logging.getLogger()
    quiet = _Unsaid("No pretrained weights loaded")  # (said at every weightless build: the checks')
    root.addFilter(quiet)
    try:
        model, _, _ = open_clip.create_model_and_transforms(  # (on the meta device where asked)
            name, pretrained=str(weights) if weights is not None else None,
            device=torch.get_default_device(), **kwargs)
    finally:
        root.removeFilter(quiet)
    return model


class _Unsaid(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


class OpenCLIPBody(nn.Module):
    """``forward``: the image tower's pooled features before its projection (N, D); ``pool``:
    nothing more to do."""

    def __init__(self, clip: nn.Module, name: str):
        super().__init__()
        self.visual = clip.visual
        self.__dict__["_name"] = name
        self.__dict__["_clip"] = clip  # for the text features, not a submodule (not trained, not moved)
        self.__dict__["_proj"] = self.visual.proj
        self.visual.proj = None
        self.num_features = self.visual.ln_post.normalized_shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features

    @torch.no_grad()
    def text_features(self, classes: list[str], template: str = TEMPLATE) -> torch.Tensor:
        """Each class name's text feature, ``template``-prompted, through the image projection
        back to the body's width, normalised (LIFT's head initialisation). Frees the text tower."""
        import open_clip

        clip = self.__dict__.get("_clip")
        if clip is None:
            raise RuntimeError("the text tower was freed after the head was initialised")
        tokenizer = open_clip.get_tokenizer(self.__dict__["_name"])
        tokens = tokenizer([template.format(c.replace("_", " ")) for c in classes])
        clip.eval()
        text = F.normalize(clip.encode_text(tokens).float(), dim=-1)
        out = F.normalize(text @ self.__dict__["_proj"].detach().float().T, dim=-1)
        self.release_text()
        return out

    def release_text(self) -> None:
        """Drop the text tower (kept only for a text-initialised head)."""
        self.__dict__.pop("_clip", None)

    def preprocess(self, options: dict) -> Preprocess:
        return preprocess_of(self.visual)

    def vit(self) -> Optional[ViTView]:
        v = self.visual
        blocks = getattr(getattr(v, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(v, "conv1"):
            return None
        fused = all(isinstance(b.attn, nn.MultiheadAttention) and b.attn.in_proj_weight is not None
                    for b in blocks)  # one (3d, d) in-projection for q, k and v
        return ViTView(list(blocks), v.ln_post.normalized_shape[0], math.prod(v.conv1.kernel_size),
                       v.ln_post, norm2=lambda b: b.ln_2, mlp=lambda b: b.mlp,
                       qkv=(lambda b: (b.attn, "in_proj_weight")) if fused else None,
                       seq_dim=1 if v.transformer.batch_first else 0)

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Stem (patch and position embeddings, the first norm), each block, the last norm."""
        v = self.visual
        blocks = list(v.transformer.resblocks)
        inside = {id(p) for b in blocks for p in b.parameters()} | {id(p) for p in v.ln_post.parameters()}
        stem = [p for p in v.parameters() if id(p) not in inside]
        groups = [stem] + [list(b.parameters()) for b in blocks]
        groups[-1] += list(v.ln_post.parameters())
        return [g for g in groups if g]


def preprocess_of(visual: nn.Module) -> Preprocess:
    cfg = visual.preprocess_cfg
    size = cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return Preprocess(size=size, interpolation=cfg.get("interpolation", "bicubic"),
                      mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), channels=3)
