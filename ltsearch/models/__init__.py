"""Backbones exposing their last feature map (for CAMs) and the classifier separately.

``model.arch`` is a CIFAR ResNet (``resnet8`` … ``resnet110``, LDAM-DRW's and BBN's), a
torchvision ResNet (``resnet18/34/50``), both trained from scratch, or any timm model by name
(``timm:<name>`` where the name is also one of those), built by timm with weights from
``model.weights`` (:mod:`ltsearch.models.timm_body`). A CIFAR or torchvision body is
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
from ltsearch.models.timm_body import Preprocess, TimmBody

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
    """The timm model ``arch`` names, or None for a network of our own."""
    if arch in SCRATCH:
        return None
    return arch.removeprefix("timm:")


def build_body(model: ModelConfig | str, in_channels: int) -> tuple[nn.Module, int]:
    """The body and its feature width (``model``: the model section, or an arch's name)."""
    model = ModelConfig(arch=model) if isinstance(model, str) else model
    name = timm_name(model.arch)
    if name is None:
        if model.arch in CIFAR_RESNETS:
            return cifar_resnet_body(CIFAR_RESNETS[model.arch], in_channels)
        return torchvision_body(model.arch, in_channels)
    from ltsearch.models.timm_body import build_net
    from ltsearch.models.weights import resolve_weights

    weights = resolve_weights(model.weights) if model.weights else None
    body = TimmBody(build_net(name, model.options, weights))
    return body, body.num_features


def preprocess(model: ModelConfig) -> Preprocess:
    """The input the backbone expects (a network from scratch: the data's own)."""
    name = timm_name(model.arch)
    if name is None:
        return Preprocess()
    from ltsearch.models.timm_body import build_net, preprocess_of

    with torch.device("meta"):  # the config alone, no weights in memory
        return preprocess_of(build_net(name, model.options, None), model.options)


def describe(model: ModelConfig) -> dict:
    """What a backbone offers the parts that need more than pooled features: ``conv_map``
    (its features are a map for CAMs), ``blocks`` (a ViT's transformer blocks, or 0),
    ``groups`` (its layer groups, stem included), ``sequential`` (BBN's split of the last
    residual block). Built on the meta device: no weights, no memory."""
    return dict(_described(model.arch, json.dumps(model.options, sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _described(arch: str, options: str) -> tuple:
    name = timm_name(arch)
    if name is None:  # (on the CPU: our inits on the meta device import torch._dynamo)
        body, _ = build_body(arch, 3)
        return (("conv_map", True), ("blocks", 0), ("groups", len(layer_groups(body))),
                ("sequential", True))
    with torch.device("meta"):
        from ltsearch.models.timm_body import build_net, preprocess_of

        opts = json.loads(options)
        body = TimmBody(build_net(name, opts, None))
        features = body(torch.empty(1, 3, *preprocess_of(body.net, opts).size))
    blocks = body.blocks
    return (("conv_map", features.ndim == 4), ("blocks", len(blocks) if blocks is not None else 0),
            ("groups", len(body.layer_groups())), ("sequential", False))


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
    """The architecture exists and the weights file is there; with ``load``, that the file is
    the architecture's, read as a trial will (once, before anything trains)."""
    name = timm_name(model.arch)
    if name is None:
        if model.weights:
            raise ConfigError(f"{key}.weights", f"{model.arch} is trained from scratch here; "
                              f"pretrained weights need a timm model (e.g. timm:{model.arch})")
        if model.options:
            raise ConfigError(f"{key}.options", f"options are timm's create_model arguments; "
                                                f"{model.arch} takes none")
        return
    from ltsearch.models.timm_body import build_net, check_name, classifier_keys
    from ltsearch.models.weights import check_fit, resolve_weights

    check_name(name, f"{key}.arch")
    try:
        with torch.device("meta"):
            net = build_net(name, model.options, None)
    except TypeError as e:  # an option the model does not take
        raise ConfigError(f"{key}.options", f"{name}: {e}") from None
    if not model.weights:
        return
    path = resolve_weights(model.weights, f"{key}.weights")
    if not load:
        return
    heads = classifier_keys(net)
    check_fit(path, name, {k: tuple(v.shape) for k, v in net.state_dict().items() if k not in heads},
              heads, f"{key}.weights")
    try:  # the real load, on the CPU: what else does not fit (a shape) fails here, not in a trial
        build_net(name, model.options, path)
    except Exception as e:
        lines = [line.strip() for line in str(e).strip().splitlines()] or [type(e).__name__]
        said = next((line for line in lines if "mismatch" in line), lines[0])
        raise ConfigError(f"{key}.weights", f"{path} does not fit {name}: {said}") from None


def layer_groups(body: nn.Module) -> list[list[nn.Parameter]]:
    """The body's parameters by depth, stem first: timm's group matcher for a timm model; for
    ours, every residual block (a stage's element) a group after the stem's."""
    if isinstance(body, TimmBody):
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


CLASSIFIERS = {"linear": nn.Linear, "normed": NormedLinear}


class ImageClassifier(nn.Module):
    """body → pool (global average, or the body's own: a ViT's class token) → classifier
    (linear, or LDAM's normed one)."""

    def __init__(self, body: nn.Module, feat_dim: int, num_classes: int,
                 classifier: str = "linear"):
        super().__init__()
        self.body = body
        self.classifier = CLASSIFIERS[classifier](feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The body's last map (N, C_f, H, W), the input of a class activation map (a ViT's:
        its tokens)."""
        return self.body(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.body.pool(f) if isinstance(self.body, TimmBody) else f.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
