"""Shared passes: one recorded forward of x serves Saliency, Deconvolution, GuidedBackprop
and InputXGradient.

These methods differ only in how a rectifying activation passes gradients back
(activations.py states the rules; at ReLU they are Captum's):
    Saliency / InputXGradient   R · f'(x)                  (the ordinary backward)
    Deconvolution               max(R, 0)                  (Zeiler & Fergus)
    GuidedBackprop              max(R, 0) · max(f'(x), 0)  (Springenberg et al.)
so a copy of the network whose activations read the rule at backward time gives all of
them from one forward pass, one backward pass each (graph retained between them). The copy
shares the parameters of the served network and is only used under the engine's lock.
Which rule gives which method is the method registry's (attribution.MethodSpec.backward_rule).
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import RuleState, switch_activations
from .attribution import get_method, shared_methods
from .model import shared_copy

SHARED_METHODS = shared_methods()


class SharedPass:
    """Heatmaps and input gradients of several backward rules from one forward pass.

    With `switchable=False` (TorchScript, an ExportedProgram: no modules to swap) the
    network is used as it is and only the plain rule (ordinary gradients) is available.
    """

    def __init__(self, network: nn.Module, *, switchable: bool = True) -> None:
        self.rule = RuleState()
        self.activations = 0
        """Rectifying activations whose backward rule this pass switches."""
        self.switchable = switchable
        if not switchable:
            self.network = network
            return
        shared = shared_copy(network)
        self.activations = switch_activations(shared, self.rule)
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
                    raise ValueError(f"rule {rule!r} needs switchable activations")
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
