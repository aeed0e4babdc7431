"""The paper's truncated networks (section 3): a torchvision ResNet's first 8 child modules
(conv1 … layer4) or AlexNet's first 6 feature modules, then a new fully connected layer on
the flattened features. They are `package.module:factory` model sources, so
`axguard serve --model axguard.paper.models:truncated_resnet34` rebuilds them (the factory
gets num_classes and the input size)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..engine.model import load_state_dict

# arch → (torchvision name, how many leading modules are kept, where they are)
ARCHES = {"resnet34": ("resnet34", 8, "children"), "resnet18": ("resnet18", 8, "children"),
          "alexnet": ("alexnet", 6, "features")}


def truncated(arch: str, num_classes: int, input_size: tuple[int, int] = (256, 256),
              weights: Path | None = None) -> nn.Module:
    """Return the truncated `arch` with a new (num_classes) linear layer; the kept modules
    take their weights from `weights` (a state dict of the full torchvision network, from a
    local file: nothing is downloaded) when given."""
    name, keep, where = ARCHES[arch]
    base = torchvision.models.get_model(name, weights=None)
    if weights is not None:
        base.load_state_dict(load_state_dict(weights))
    modules = list(base.children() if where == "children" else base.features.children())
    body = nn.Sequential(*modules[:keep])
    with torch.no_grad():
        features = body.eval()(torch.zeros(1, 3, *input_size)).numel()
    return nn.Sequential(OrderedDict(body=body, flatten=nn.Flatten(),
                                     fc=nn.Linear(features, num_classes)))


def truncated_resnet34(num_classes: int, input_size: tuple[int, int] = (256, 256)) -> nn.Module:
    """The paper's Resnet34_x: ResNet-34's first 8 child modules + a new linear layer."""
    return truncated("resnet34", num_classes, tuple(input_size))


def truncated_resnet18(num_classes: int, input_size: tuple[int, int] = (256, 256)) -> nn.Module:
    """The same recipe on ResNet-18 (smaller, for quick runs)."""
    return truncated("resnet18", num_classes, tuple(input_size))


def truncated_alexnet(num_classes: int, input_size: tuple[int, int] = (256, 256)) -> nn.Module:
    """The paper's Alexnet_x: AlexNet's first 6 feature modules + a new linear layer."""
    return truncated("alexnet", num_classes, tuple(input_size))


FACTORIES = {"resnet34": "axguard.paper.models:truncated_resnet34",
             "resnet18": "axguard.paper.models:truncated_resnet18",
             "alexnet": "axguard.paper.models:truncated_alexnet"}
