"""Small members of modern image-model families, as `package.module:factory` sources
(`modern_models:convnext_mini`): a ConvNeXt (GELU, LayerNorm), a ViT (GELU, attention), a
MobileNetV3 (Hardswish, ReLU, Hardsigmoid gates) and an EfficientNet-style SiLU network,
each small enough to train on the bundled digits in seconds."""

from __future__ import annotations

from functools import partial

import timm
import torchvision
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt


def convnext_mini(num_classes: int = 10) -> nn.Module:
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)],
                    num_classes=num_classes)


def vit_mini(num_classes: int = 10) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, embed_dim=48, num_heads=2,
                             num_classes=num_classes)


def mobilenet_v3_mini(num_classes: int = 10) -> nn.Module:
    return torchvision.models.mobilenet_v3_small(weights=None, num_classes=num_classes,
                                                 width_mult=0.25)


def efficientnet_mini(num_classes: int = 10) -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return EfficientNet(setting, dropout=0.2, last_channel=last, num_classes=num_classes)


class Untraceable(nn.Module):
    """A ReLU reused at two call sites behind data-dependent control flow (fx cannot trace
    it), so nothing can separate the two uses."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = partial(nn.functional.adaptive_avg_pool2d, output_size=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        h = self.act(self.conv(x))
        if h.mean() > -1:  # data-dependent: fx cannot trace
            h = self.act(h - 0.1)
        return self.fc(self.pool(h).flatten(1))


def untraceable(num_classes: int = 10) -> nn.Module:
    return Untraceable(num_classes)


def linear_only(num_classes: int = 10) -> nn.Module:
    """No rectifier at all: Deconvolution and Guided Backprop are Saliency here."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.Sigmoid(),
                         nn.Linear(16, num_classes))


def gelu_cnn(num_classes: int = 10) -> nn.Module:
    """A plain GELU CNN (torch.export exports it with a dynamic batch)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.GELU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
