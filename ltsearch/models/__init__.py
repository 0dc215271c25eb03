"""Backbones exposing their last feature map (for CAMs) and the classifier separately.

``model.arch`` is a CIFAR ResNet (``resnet8`` … ``resnet110``, LDAM-DRW's and BBN's), a
torchvision ResNet (``resnet18/34/50``), both trained from scratch, or any timm model by name
(``timm:<name>`` where the name is also one of those), built by timm with weights from
``model.weights`` (:mod:`ltsearch.models.timm_body`), or an OpenCLIP image tower
(``open_clip:<name>``, :mod:`ltsearch.models.open_clip_body`). A CIFAR or torchvision body is
``nn.Sequential(stem…, last_stage)`` whose last element is itself a Sequential of residual blocks,
so BBN can share everything but the last block (:func:`split_last_block`).
"""
from __future__ import annotations

import functools
import json

import torch
import torch.nn as nn

from ltsearch.config import ConfigError, ModelConfig
from ltsearch.models.resnet_cifar import DEPTHS, cifar_resnet_body
from ltsearch.models.interface import Preprocess
from ltsearch.models.timm_body import TimmBody

CLIP_PREFIX = "open_clip:"
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")  # ImageNet's, from scratch
CIFAR_RESNETS = {f"resnet{d}": d for d in DEPTHS}
SCRATCH = (*CIFAR_RESNETS, *TORCHVISION_RESNETS)


def torchvision_body(arch: str, in_channels: int) -> tuple[nn.Sequential, int]:
    """A torchvision ResNet without pretrained weights (none can be downloaded here)."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                         net.layer1, net.layer2, net.layer3, net.layer4)
    return body, net.fc.in_features


def timm_name(arch: str) -> str | None:
    """The timm model ``arch`` names, or None for a network of our own or OpenCLIP's."""
    if arch in SCRATCH or arch.startswith(CLIP_PREFIX):
        return None
    return arch.removeprefix("timm:")


def clip_name(arch: str) -> str | None:
    """The OpenCLIP model ``arch`` names (``open_clip:<name>``), or None."""
    return arch[len(CLIP_PREFIX):] if arch.startswith(CLIP_PREFIX) else None


def pretrained(arch: str) -> bool:
    return arch not in SCRATCH


def build_body(model: ModelConfig | str, in_channels: int) -> tuple[nn.Module, int]:
    """The body and its feature width (``model``: the model section, or an arch's name)."""
    model = ModelConfig(arch=model) if isinstance(model, str) else model
    if model.arch in CIFAR_RESNETS:
        return cifar_resnet_body(CIFAR_RESNETS[model.arch], in_channels)
    if model.arch in TORCHVISION_RESNETS:
        return torchvision_body(model.arch, in_channels)
    from ltsearch.models.weights import resolve_weights

    weights = resolve_weights(model.weights) if model.weights else None
    body = _pretrained_body(model, weights)
    return body, body.num_features


def _pretrained_body(model: ModelConfig, weights) -> nn.Module:
    name = clip_name(model.arch)
    if name is not None:
        from ltsearch.models.open_clip_body import OpenCLIPBody, build_clip

        return OpenCLIPBody(build_clip(name, model.options, weights), name)
    from ltsearch.models.timm_body import build_net

    return TimmBody(build_net(timm_name(model.arch), model.options, weights))


def preprocess(model: ModelConfig) -> Preprocess:
    """The input the backbone expects (a network from scratch: the data's own)."""
    if not pretrained(model.arch):
        return Preprocess()
    return _preprocessed(model.arch, json.dumps(model.options, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _preprocessed(arch: str, options: str) -> Preprocess:
    model = ModelConfig(arch=arch, options=json.loads(options))
    with torch.device("meta"):  # the config alone, no weights in memory
        return _preprocess_of(_pretrained_body(model, None), model)


def _preprocess_of(body: nn.Module, model: ModelConfig) -> Preprocess:
    return body.preprocess(model.options)


def describe(model: ModelConfig) -> dict:
    """What a backbone offers the parts that need more than pooled features: ``conv_map``
    (its features are a map for CAMs), ``blocks`` (a ViT's transformer blocks, or 0), ``qkv``
    (they have one q, k, v projection), ``groups`` (its layer groups, stem included),
    ``sequential`` (BBN's split of the last residual block), ``text`` (a text tower for a head
    initialised from class names). Built on the meta device: no weights, no memory."""
    return dict(_described(model.arch, json.dumps(model.options, sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _described(arch: str, options: str) -> tuple:
    if not pretrained(arch):  # (on the CPU: our inits on the meta device import torch._dynamo)
        body, _ = build_body(arch, 3)
        return (("conv_map", True), ("blocks", 0), ("qkv", False),
                ("groups", len(layer_groups(body))), ("sequential", True), ("text", False))
    model = ModelConfig(arch=arch, options=json.loads(options))
    with torch.device("meta"):
        body = _pretrained_body(model, None)
        features = body(torch.empty(1, 3, *_preprocess_of(body, model).size))
    vit = body.vit()
    return (("conv_map", features.ndim == 4), ("blocks", len(vit.blocks) if vit else 0),
            ("qkv", bool(vit and vit.qkv)), ("groups", len(body.layer_groups())),
            ("sequential", False), ("text", hasattr(body, "text_features")))


def identity(model: ModelConfig) -> dict:
    """What a run records of its backbone: the architecture, and the weights file with its
    sha256 (the same name can hold other weights tomorrow)."""
    out = {"arch": model.arch, "weights": None, "weights_sha256": None}
    if model.weights:
        from ltsearch.models.weights import resolve_weights, sha256

        path = resolve_weights(model.weights)
        out.update(weights=str(path), weights_sha256=sha256(path))
    return out


def check_model(model: ModelConfig, key: str = "model", load: bool = True) -> None:
    """The architecture exists and takes its options; with ``load``, that the weights file is
    there and the architecture's, read as a trial will (once, before anything trains)."""
    if not pretrained(model.arch):
        if model.weights:
            raise ConfigError(f"{key}.weights", f"{model.arch} is trained from scratch here; "
                              f"pretrained weights need a timm model (e.g. timm:{model.arch})")
        if model.options:
            raise ConfigError(f"{key}.options", f"options are timm's or OpenCLIP's create_model "
                                                f"arguments; {model.arch} takes none")
        return
    from ltsearch.models.weights import resolve_weights

    name = clip_name(model.arch) or timm_name(model.arch)
    if clip_name(model.arch) is not None:
        from ltsearch.models.open_clip_body import check_name
        check_name(name, model.options, f"{key}.arch")
    else:
        from ltsearch.models.timm_body import check_name
        check_name(name, f"{key}.arch")
    try:
        with torch.device("meta"):
            body = _pretrained_body(model, None)
    except TypeError as e:  # an option the model does not take
        raise ConfigError(f"{key}.options", f"{name}: {e}") from None
    if not model.weights or not load:  # (the file is checked before Ray starts, not as a
        return                           # search file is read: a template names none yet)
    path = resolve_weights(model.weights, f"{key}.weights")
    if isinstance(body, TimmBody):  # (OpenCLIP loads strictly: its own load below says what lacks)
        from ltsearch.models.timm_body import classifier_keys
        from ltsearch.models.weights import check_fit

        heads = classifier_keys(body.net)
        check_fit(path, name, {k: tuple(v.shape) for k, v in body.net.state_dict().items()
                               if k not in heads}, heads, f"{key}.weights")
    try:  # the real load, on the CPU: what else does not fit (a shape) fails here, not in a trial
        _pretrained_body(model, path)
    except Exception as e:
        raise ConfigError(f"{key}.weights", f"{path} does not fit {name}: {_load_error(e)}") from None


def _load_error(e: Exception) -> str:
    """torch's load_state_dict error in a line: what is missing or extra (counted, the first few
    named) or the first size mismatch."""
    import re

    from ltsearch.models.weights import few

    lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
    said = []
    for line in lines:
        for kind, verb in (("Missing", "lacks"), ("Unexpected", "holds extra")):
            if line.startswith(f"{kind} key(s)"):
                names = re.findall(r'"([^"]+)"', line)
                said.append(f"it {verb} {len(names)} tensors ({few(names)})")
    mismatch = next((line for line in lines if "size mismatch" in line), None)
    if mismatch:
        said.append(mismatch)
    return "; ".join(said) or lines[0][:300]


def layer_groups(body: nn.Module) -> list[list[nn.Parameter]]:
    """The body's parameters by depth, stem first: a pretrained body's own (timm's group
    matcher; an OpenCLIP tower's blocks); for ours, every residual block (a stage's element) a
    group after the stem's."""
    if hasattr(body, "layer_groups"):  # a pretrained body knows its own (timm's, OpenCLIP's)
        return body.layer_groups()
    groups: list[list[nn.Parameter]] = [[]]
    for child in body.children():
        blocks = list(child.children()) if isinstance(child, nn.Sequential) else []
        if blocks and all(list(b.children()) for b in blocks):  # a stage of residual blocks
            groups += [list(b.parameters()) for b in blocks]
        else:
            groups[0] += list(child.parameters())
    return [g for g in groups if g]


def split_last_block(body: nn.Sequential) -> tuple[nn.Sequential, nn.Module]:
    """(trunk, last residual block): the trunk holds the body's modules themselves, not copies."""
    last_stage = body[-1]
    trunk = nn.Sequential(*body[:-1], *last_stage[:-1])
    return trunk, last_stage[-1]


class NormedLinear(nn.Module):
    """Cosine classifier of LDAM-DRW's code: z_c = ⟨x/‖x‖, w_c/‖w_c‖⟩, no bias. The official
    ``NormedLinear`` stores W as (in, out) and normalises columns; here rows of (out, in), the same
    map, so class activation maps and per-class norms read ``weight[c]`` as for ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(−1, 1), each class vector then scaled to norm 1 (the official
        ``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)``)."""
        with torch.no_grad():
            nn.init.uniform_(self.weight, -1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.weight, dim=1).T


class CosineLinear(NormedLinear):
    """A scaled cosine classifier, z_c = s·cos(x, w_c) (LIFT's ``CosineClassifier``; its weights
    start as the normed classifier's: uniform, each row scaled to norm 1)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 25.0):
        super().__init__(in_features, out_features)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


CLASSIFIERS = {"linear": nn.Linear, "normed": NormedLinear, "cosine": CosineLinear}


class ImageClassifier(nn.Module):
    """body → pool (global average, or the body's own: a ViT's class token) → classifier
    (linear, or LDAM's normed one)."""

    def __init__(self, body: nn.Module, feat_dim: int, num_classes: int,
                 classifier: str = "linear", scale: float = 25.0):
        super().__init__()
        self.body = body
        extra = {"scale": scale} if classifier == "cosine" else {}
        self.classifier = CLASSIFIERS[classifier](feat_dim, num_classes, **extra)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The body's last map (N, C_f, H, W), the input of a class activation map (a ViT's:
        its tokens)."""
        return self.body(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.body.pool(f) if hasattr(self.body, "pool") else f.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
