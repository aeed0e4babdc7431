"""Shared passes: one recorded forward of x serves Saliency, Deconvolution, GuidedBackprop
and InputXGradient.

These methods differ only in how a ReLU passes gradients back (Captum hooks nn.ReLU
modules and nothing else):
    Saliency / InputXGradient   grad · [x > 0]            (the ordinary ReLU backward)
    Deconvolution               max(grad, 0)              (Zeiler & Fergus)
    GuidedBackprop              max(grad, 0) · [x > 0]    (Springenberg et al.)
so a copy of the network whose ReLUs read the rule at backward time gives all of them from
one forward pass, one backward pass each (graph retained between them). The copy shares
the parameters of the served network and is only used under the engine's lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .model import shared_copy

SHARED_METHODS = ("saliency", "deconvolution", "guided_backprop", "input_x_gradient")
_RULE = {"saliency": "plain", "input_x_gradient": "plain", "deconvolution": "deconvolution",
         "guided_backprop": "guided"}


@dataclass
class _Rule:
    """The backward rule every switchable ReLU of one network applies right now."""

    name: str = "plain"


class _SwitchableReluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: _Rule) -> torch.Tensor:  # noqa: ANN001
        ctx.rule = rule
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (out,) = ctx.saved_tensors
        name = ctx.rule.name
        if name == "deconvolution":
            return torch.relu(grad), None
        # aten's own ReLU backward kernel: pass grad where the output is positive.
        passed = torch.ops.aten.threshold_backward(grad, out, 0)
        return (torch.relu(passed) if name == "guided" else passed), None


class SwitchableReLU(nn.Module):
    """A ReLU whose backward rule is chosen when gradients are taken."""

    def __init__(self, rule: _Rule) -> None:
        super().__init__()
        self.rule = rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwitchableReluFn.apply(x, self.rule)


class SharedPass:
    """Heatmaps of several gradient methods from one forward pass."""

    def __init__(self, network: nn.Module) -> None:
        self.rule = _Rule()
        shared = shared_copy(network)
        self.relus = 0
        for name, module in list(shared.named_modules()):
            if isinstance(module, nn.ReLU):
                parent_name, _, child = name.rpartition(".")
                parent = shared.get_submodule(parent_name) if parent_name else shared
                setattr(parent, child, SwitchableReLU(self.rule))
                self.relus += 1
        self.network = shared.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (leaf input with grad, logits with their graph) for (N, C, H, W) pixels."""
        leaf = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            return leaf, self.network(leaf)

    def heatmaps(self, leaf: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                 methods: list[str]) -> dict[str, torch.Tensor]:
        """Return raw heatmaps per method from one recorded forward (graph freed at the end)."""
        selected = logits.gather(1, targets[:, None]).sum()
        out = {}
        for i, method in enumerate(methods):
            self.rule.name = _RULE[method]
            (grad,) = torch.autograd.grad(selected, leaf, retain_graph=i < len(methods) - 1)
            out[method] = (grad * leaf).detach() if method == "input_x_gradient" else grad
        self.rule.name = "plain"
        return out
