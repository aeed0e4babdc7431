"""Activations and the backward rules of the modified-gradient methods at each of them.

Deconvolution and Guided Backprop were defined for ReLU networks (Zeiler & Fergus;
Springenberg et al.), and Captum applies them at `nn.ReLU` modules only: on a GELU, SiLU
or Hardswish network they silently become Saliency. axguard applies them at every
*rectifying* activation y = f(x), elementwise, with R the gradient arriving from above:

    plain (Saliency, InputXGradient)   R · f'(x)                  the ordinary backward
    deconvolution                      max(R, 0)                  the signal rectified;
                                                                  the forward ignored
    guided                             max(R, 0) · max(f'(x), 0)  the ordinary backward of
                                                                  the rectified signal, where
                                                                  f passes it positively

For ReLU (f' = [x > 0]) these are exactly Captum's rules. Gates and normalisers (Sigmoid,
Hardsigmoid, Tanh, Softmax: squeeze-excitation, attention) pass plain gradients under every
rule, as they do in Captum. DeepLift is Captum's: it has rules for ReLU, ELU, LeakyReLU,
Softplus (and the gates); at any other rectifier it passes the plain gradient, which the
method report (attribution.method_report) states.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

log = logging.getLogger(__name__)

# Elementwise activations whose role is rectification: the modified rules apply there.
RECTIFIERS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus,
)

# Functional forms fx can turn into modules: function (or Tensor method name) → module.
FUNCTIONAL: dict[object, type[nn.Module]] = {
    torch.relu: nn.ReLU, F.relu: nn.ReLU, "relu": nn.ReLU, F.relu6: nn.ReLU6,
    F.leaky_relu: nn.LeakyReLU, F.elu: nn.ELU, F.celu: nn.CELU, F.selu: nn.SELU,
    F.gelu: nn.GELU, F.silu: nn.SiLU, F.mish: nn.Mish, F.hardswish: nn.Hardswish,
    F.softplus: nn.Softplus,
}


def is_rectifier(module: nn.Module) -> bool:
    return isinstance(module, RECTIFIERS)


def rectifier_census(network: nn.Module) -> Counter[str]:
    """Rectifying activation modules of a network, counted by class name."""
    return Counter(type(m).__name__ for m in network.modules() if is_rectifier(m))


@dataclass
class TraceReport:
    """What making activations unique did: the modules added, or why fx could not trace."""

    added: int = 0
    error: str | None = None
    """fx's error when the network could not be traced (reused or functional activations
    are then left as they are)."""
    reused: list[str] = field(default_factory=list)
    """Activation modules called more than once per forward (after the pass)."""


def _module_for(node: torch.fx.Node, kind: type[nn.Module]) -> nn.Module:
    """A module equal to a functional activation call, its keyword arguments kept."""
    if node.op == "call_method" or kind is nn.ReLU:
        return kind()
    function = node.target
    bound = inspect.signature(function).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
    options = {k: v for k, v in bound.arguments.items() if k not in ("input", "inplace")}
    accepted = inspect.signature(kind).parameters
    return kind(**{k: v for k, v in options.items() if k in accepted})


def make_activations_unique(network: nn.Module) -> tuple[nn.Module, TraceReport]:
    """Return `network` with every rectifying activation a separate, non-inplace module at
    each call site, and a report.

    DeepLift hooks activation modules and the shared pass swaps them: a module reused at two
    call sites (torchvision's ResNet reuses its ReLU) or a functional call is otherwise
    double-counted or missed (DESIGN 1.9). In-place activations are made out-of-place; the
    forward is traced with torch.fx and every reused module and functional call gets its
    own module. If fx cannot trace the network, it is kept as it is and the report says why.
    """
    for module in network.modules():
        if is_rectifier(module) and getattr(module, "inplace", False):
            module.inplace = False
    report = TraceReport()
    try:
        traced = torch.fx.symbolic_trace(network)
    except Exception as err:  # noqa: BLE001  (fx raises many types on dynamic control flow)
        report.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("activation_trace_failed", extra={"error": report.error})
        return network, report
    seen: set[str] = set()
    for node in list(traced.graph.nodes):
        if node.op == "call_module":
            module = traced.get_submodule(node.target)
            if not is_rectifier(module):
                continue
            if node.target not in seen:
                seen.add(node.target)
                continue
            replacement: nn.Module = _clone(module)
        elif node.op in ("call_function", "call_method") and node.target in FUNCTIONAL:
            replacement = _module_for(node, FUNCTIONAL[node.target])
        else:
            continue
        report.added += 1
        name = f"axguard_act_{report.added}"
        traced.add_submodule(name, replacement)
        with traced.graph.inserting_after(node):
            new = traced.graph.call_module(name, args=(node.args[0],))
        node.replace_all_uses_with(new)
        traced.graph.erase_node(node)
    if not report.added:
        return network, report
    traced.graph.lint()
    traced.recompile()
    return traced, report


def _clone(module: nn.Module) -> nn.Module:
    """A second call site of a reused activation: parameter-free ones are copied, a PReLU
    shares its weight (one learned slope, two sites)."""
    if any(True for _ in module.parameters(recurse=False)):
        clone = copy.copy(module)
        clone._forward_hooks = type(module._forward_hooks)()
        return clone
    return copy.deepcopy(module)


def reused_activations(network: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of rectifying modules called more than once in one forward of `example`."""
    calls: Counter[str] = Counter()
    handles = [m.register_forward_hook(lambda *_, n=name: calls.update([n]))
               for name, m in network.named_modules() if is_rectifier(m)]
    try:
        with torch.no_grad():
            network(example)
    finally:
        for h in handles:
            h.remove()
    return sorted(n for n, c in calls.items() if c > 1)


class RuleState:
    """The backward rule every switchable activation of one network applies right now."""

    def __init__(self) -> None:
        self.name = "plain"


class _RuleFn(torch.autograd.Function):
    """y = f(x) forward; backward by the current rule (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module, rule: RuleState  # noqa: ANN001
                ) -> torch.Tensor:
        ctx.module, ctx.rule = module, rule
        ctx.save_for_backward(x)
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        name = ctx.rule.name
        if name == "deconvolution":
            return torch.relu(grad), None, None
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            y = ctx.module(leaf)
            if name == "plain":
                (passed,) = torch.autograd.grad(y, leaf, grad)
                return passed, None, None
            (slope,) = torch.autograd.grad(y, leaf, torch.ones_like(y))  # f'(x), elementwise
        return torch.relu(grad) * torch.relu(slope), None, None


class _ReluRuleFn(torch.autograd.Function):
    """The same rules for ReLU, without recomputing: f'(x) = [y > 0]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rule: RuleState) -> torch.Tensor:  # noqa: ANN001
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


class SwitchableActivation(nn.Module):
    """A rectifying activation whose backward rule is chosen when gradients are taken."""

    def __init__(self, activation: nn.Module, rule: RuleState) -> None:
        super().__init__()
        self.activation = activation
        self.rule = rule
        self._relu = type(activation) is nn.ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._relu:
            return _ReluRuleFn.apply(x, self.rule)
        return _RuleFn.apply(x, self.activation, self.rule)


def switch_activations(network: nn.Module, rule: RuleState) -> int:
    """Replace every rectifying activation of `network` (in place) with a
    SwitchableActivation reading `rule`; return how many were replaced."""
    replaced = 0
    for name, module in list(network.named_modules(remove_duplicate=False)):
        if not is_rectifier(module) or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        if isinstance(parent, SwitchableActivation):
            continue
        setattr(parent, child, SwitchableActivation(module, rule))
        replaced += 1
    return replaced
