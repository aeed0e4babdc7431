"""Shared passes: one recorded forward of x serves Saliency, Deconvolution, GuidedBackprop
and InputXGradient.

These methods differ only in how a ReLU passes gradients back (Captum hooks nn.ReLU
modules and nothing else):
    Saliency / InputXGradient   grad · [x > 0]            (the ordinary ReLU backward)
    Deconvolution               max(grad, 0)              (Zeiler & Fergus)
    GuidedBackprop              max(grad, 0) · [x > 0]    (Springenberg et al.)
so a copy of the network whose ReLUs read the rule at backward time gives all of them from
one forward pass, one backward pass each (graph retained between them). The copy shares
the parameters of the served network and is only used under the engine's lock. Which rule
gives which method is the method registry's (attribution.MethodSpec.backward_rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attribution import get_method, shared_methods
from .model import shared_copy

SHARED_METHODS = shared_methods()


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
    """Heatmaps and input gradients of several backward rules from one forward pass.

    With `switchable=False` (TorchScript: no modules to swap) the network is used as it is
    and only the plain rule (ordinary gradients) is available.
    """

    def __init__(self, network: nn.Module, *, switchable: bool = True) -> None:
        self.rule = _Rule()
        self.relus = 0
        self.switchable = switchable
        if not switchable:
            self.network = network
            return
        shared = shared_copy(network)
        for name, module in list(shared.named_modules()):
            if isinstance(module, nn.ReLU):
                parent_name, _, child = name.rpartition(".")
                parent = shared.get_submodule(parent_name) if parent_name else shared
                setattr(parent, child, SwitchableReLU(self.rule))
                self.relus += 1
        self.network = shared.eval()

    def supports(self, method: str) -> bool:
        """Return True when this pass gives `method`'s heatmaps."""
        rule = get_method(method).backward_rule
        return rule is not None and (self.switchable or rule == "plain")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (leaf input with grad, logits with their graph) for (N, C, H, W) pixels."""
        leaf = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            return leaf, self.network(leaf)

    def gradients(self, leaf: torch.Tensor, logits: torch.Tensor,
                  requests: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Return ∇ₓ Σₙ Kₙ·zₙ for each (rule, K) request, K (N, C) held fixed.

        Rows are independent (eval mode), so row n of the result is the gradient of
        Kₙ·zₙ for image n alone. The graph is freed after the last request. Rules:
        "plain" (ordinary gradients), "deconvolution", "guided".
        """
        out = []
        try:
            for i, (rule, coefficients) in enumerate(requests):
                if rule != "plain" and not self.switchable:
                    raise ValueError(f"rule {rule!r} needs switchable ReLUs")
                self.rule.name = rule
                objective = (logits * coefficients.to(logits.dtype)).sum()
                (grad,) = torch.autograd.grad(objective, leaf,
                                              retain_graph=i < len(requests) - 1)
                out.append(grad)
        finally:
            self.rule.name = "plain"
        return out

    def heatmaps(self, leaf: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                 methods: list[str]) -> dict[str, torch.Tensor]:
        """Return raw heatmaps per method for the target classes (graph freed at the end)."""
        k = torch.nn.functional.one_hot(targets, logits.shape[1])
        grads = self.gradients(leaf, logits, [(rule_of(m), k) for m in methods])
        return {m: finish_heatmap(m, leaf, g) for m, g in zip(methods, grads, strict=True)}


def rule_of(method: str) -> str:
    """Return the backward rule that gives a shared method's heatmap."""
    rule = get_method(method).backward_rule
    assert rule is not None, f"{method} has no shared-pass rule"
    return rule


def finish_heatmap(method: str, leaf: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Return the method's heatmap from its rule's gradient (× input for InputXGradient)."""
    return (gradient * leaf).detach() if get_method(method).times_input else gradient
