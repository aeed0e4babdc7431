"""The demo network: a small CNN for 3 x 32 x 32 digit images."""

from __future__ import annotations

from torch import nn


def build_demo_net(num_classes: int = 10) -> nn.Module:
    """Return the untrained demo CNN: (N, 3, 32, 32) normalised input → (N, classes) logits.

    Every ReLU is its own non-inplace module, so every Captum method works on it.
    """
    return nn.Sequential(
        nn.Conv2d(3, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )
