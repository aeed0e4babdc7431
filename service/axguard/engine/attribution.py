"""Attribution methods: one registry from name to everything about a method — how to build
its heatmap function (inputs, targets) → heatmaps, whether it runs on TorchScript, and the
backward rule that gives it from the shared pass (sharedpass.py). Names are the only key:
the converters map them to the proto enum by name (ATTRIBUTION_METHOD_<NAME>), as the
client does. Validation happens at the edges through `require`.

Every method is Captum's, computed for the given target class (the predicted class in
axguard), in pixel space: inputs (N, C, H, W) float32 in [0, 1] → heatmaps of the same shape.

Deconvolution and GuidedBackprop apply their rules at every rectifying activation, not only
at ReLU (activations.py: Captum's own classes where the network's rectifiers are all ReLU,
where the two agree, else axguard's rules); `method_report` says what each method is on a
given model: exact, reduced to another, or unavailable, and why.

Warning: hook-based methods (Deconvolution, GuidedBackprop, DeepLift) register hooks on the
model's activation modules while they run, which changes every concurrent pass through the
same model. The engine therefore runs all passes of one model under one lock.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import captum.attr._core.deep_lift as captum_deep_lift
import torch
from captum.attr import (
    Deconvolution,
    DeepLift,
    GuidedBackprop,
    InputXGradient,
    LayerAttribution,
    LayerGradCam,
    Saliency,
)
from torch import nn

from ..errors import ConfigError, UnknownMethod
from .activations import RuleState, is_rectifier, rectifier_census, switch_activations
from .model import ModelBundle, shared_copy

HeatmapFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """One attribution method and what it needs."""

    name: str
    """Short name, also the key of returned heatmaps ("saliency")."""
    build: Callable[[ModelBundle], HeatmapFn]
    """Returns the heatmap function for a bundle."""
    uses_hooks: bool
    """True when it hooks (and so temporarily changes) the model's modules."""
    works_on_torchscript: bool
    """True for pure gradient methods, which need no hooks."""
    backward_rule: str | None = None
    """How a ReLU passes gradients back for this method in the shared pass ("plain",
    "deconvolution", "guided"); None: only Captum computes it."""
    times_input: bool = False
    """The heatmap is the rule's gradient times the input (InputXGradient)."""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; refuses duplicate names."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_methods() -> list[MethodSpec]:
    """Return every registered method, in registration order."""
    return list(_REGISTRY.values())


def get_method(name: str) -> MethodSpec:
    """Return the method called `name`; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(m.name for m in list_methods())
        raise UnknownMethod(f"unknown method {name!r}; valid: {valid}",
                            field="methods") from None


def available_methods(bundle: ModelBundle) -> list[MethodSpec]:
    """Return the methods this bundle supports (gradient methods only for TorchScript and
    ExportedPrograms)."""
    return [m for m in list_methods() if m.works_on_torchscript or bundle.hookable]


def shared_methods() -> tuple[str, ...]:
    """Names of the methods the shared pass computes (those with a backward rule)."""
    return tuple(m.name for m in list_methods() if m.backward_rule is not None)


def require(name: str, bundle: ModelBundle | None = None) -> MethodSpec:
    """Return the method called `name`, checked to run on `bundle` when given: the one
    validation of a method name (settings, requests, the CLI). UnknownMethod lists the
    valid names."""
    spec = get_method(name)
    if bundle is not None:
        check_available(spec, bundle)
    return spec


def check_available(spec: MethodSpec, bundle: ModelBundle) -> None:
    """Raise UnknownMethod when `spec` cannot run on this bundle."""
    if not bundle.hookable and not spec.works_on_torchscript:
        names = ", ".join(m.name for m in available_methods(bundle))
        raise UnknownMethod(
            f"{spec.name} needs module hooks, which {_FORMAT_NAMES[bundle.model_format]} "
            f"lacks; available: {names}",
            field="methods",
        )


_FORMAT_NAMES = {"torchscript": "a TorchScript model",
                 "exported_program": "an ExportedProgram (.pt2)", "module": "a module"}


def _captum(method_cls: type, **attribute_kwargs: object) -> Callable[[ModelBundle], HeatmapFn]:
    """Return a builder for a Captum method constructed on the whole network."""

    def build(bundle: ModelBundle) -> HeatmapFn:
        method = method_cls(bundle.network)

        def heatmaps(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            with warnings.catch_warnings():
                # Captum warns on every hook-based call; the engine's lock is the answer.
                warnings.filterwarnings("ignore", message="Setting (forward, )?backward hooks")
                leaf = inputs.detach().clone().requires_grad_(True)
                out = method.attribute(leaf, target=targets, **attribute_kwargs)
            return out.detach()

        return heatmaps

    return build


def _only_relu_rectifies(network: nn.Module) -> bool:
    return all(type(m) is nn.ReLU for m in network.modules() if is_rectifier(m))


def _rule_based(method_cls: type, rule: str) -> Callable[[ModelBundle], HeatmapFn]:
    """Return a builder for Deconvolution or GuidedBackprop: Captum's class where every
    rectifier is a ReLU (Captum's rules are then axguard's), else the gradient through a
    copy of the network whose rectifiers apply `rule` (activations.py)."""
    captum_build = _captum(method_cls)

    def build(bundle: ModelBundle) -> HeatmapFn:
        if _only_relu_rectifies(bundle.network):
            return captum_build(bundle)
        state = RuleState()
        network = shared_copy(bundle.network)
        switch_activations(network, state)

        def heatmaps(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            leaf = inputs.detach().clone().requires_grad_(True)
            state.name = rule
            try:
                with torch.enable_grad():
                    picked = network(leaf).gather(1, targets.reshape(-1, 1)).sum()
                    (grad,) = torch.autograd.grad(picked, leaf)
            finally:
                state.name = "plain"
            return grad.detach()

        return heatmaps

    return build


@dataclass(frozen=True)
class MethodStatus:
    """What a method is on one model."""

    method: str
    state: str
    """"exact" (the method as defined, at every activation it acts on), "reduced" (some of
    its rules cannot act here: it equals `reduced_to` when that is set) or "unavailable"."""
    reason: str
    reduced_to: str = ""


# Modules Captum's DeepLift has a rule for (captum.attr._core.deep_lift).
DEEP_LIFT_MODULES: tuple[type[nn.Module], ...] = tuple(captum_deep_lift.SUPPORTED_NON_LINEAR)


def _counted(census: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(census.items(), key=lambda kv: -kv[1]))


def method_report(bundle: ModelBundle) -> list[MethodStatus]:
    """Return, per registered method, whether it is exact, reduced or unavailable on this
    model, and why (GetModelInfo, the OIP metadata, serve's start-up log, calibrate)."""
    census = dict(rectifier_census(bundle.network)) if bundle.hookable else {}
    trace = bundle.trace
    untraced = (f"; fx could not trace the network ({trace.error}): functional activations, "
                "if any, are not reached") if trace.error else ""
    report = []
    for spec in list_methods():
        if not (bundle.hookable or spec.works_on_torchscript):
            report.append(MethodStatus(spec.name, "unavailable",
                                       f"needs module hooks, which "
                                       f"{_FORMAT_NAMES[bundle.model_format]} lacks"))
        elif spec.name in ("saliency", "input_x_gradient"):
            report.append(MethodStatus(spec.name, "exact", "plain gradients"))
        elif spec.backward_rule in ("deconvolution", "guided"):
            if not census:
                report.append(MethodStatus(
                    spec.name, "reduced", "the network has no rectifying activation "
                    f"module: the {spec.backward_rule} rule changes nothing{untraced}",
                    reduced_to="saliency"))
                continue
            beyond = "" if set(census) == {"ReLU"} else (
                " (beyond ReLU: axguard's generalisation, activations.py)")
            report.append(MethodStatus(spec.name, "exact", f"the {spec.backward_rule} rule "
                                       f"at {_counted(census)}{beyond}{untraced}"))
        elif spec.name == "deep_lift":
            report.append(_deep_lift_status(bundle, census, untraced))
        else:
            report.append(MethodStatus(spec.name, "exact",
                                       f"layer {bundle.grad_cam_layer or 'first Conv2d'}"))
    return report


def _deep_lift_status(bundle: ModelBundle, census: dict[str, int], untraced: str
                      ) -> MethodStatus:
    trace = bundle.trace
    if trace.reused:
        return MethodStatus("deep_lift", "unavailable",
                            f"activation modules called more than once per forward "
                            f"({', '.join(trace.reused[:5])}) cannot be hooked correctly, and "
                            f"fx could not trace the network to separate them ({trace.error})")
    ruled = {n for n in census if any(c.__name__ == n for c in DEEP_LIFT_MODULES)}
    without = {n: k for n, k in census.items() if n not in ruled}
    any_rule = any(isinstance(m, DEEP_LIFT_MODULES) for m in bundle.network.modules())
    if not without:
        return MethodStatus("deep_lift", "exact", "Captum's rules at every nonlinearity it "
                            f"meets{untraced}")
    if not any_rule:
        return MethodStatus("deep_lift", "reduced", "Captum's DeepLift has no rule for "
                            f"{_counted(without)} and the network has no other nonlinearity "
                            "it rules: with a zero baseline it is InputXGradient",
                            reduced_to="input_x_gradient")
    return MethodStatus("deep_lift", "reduced", f"Captum's DeepLift has no rule for "
                        f"{_counted(without)}: plain gradients there, its rules elsewhere"
                        f"{untraced}")


def duplicate_methods(report: list[MethodStatus], methods: tuple[str, ...] | list[str]
                      ) -> list[tuple[str, str, str]]:
    """(method, the method it equals here, why) for each of `methods` that is another of
    them in effect, by a model's method report."""
    offered = set(methods)
    return [(s.method, s.reduced_to, s.reason) for s in report
            if s.method in offered and s.reduced_to in offered]


def first_conv_layer(network: nn.Module) -> str:
    """Return the qualified name of the first Conv2d in `network` (the paper's Grad-CAM layer)."""
    for name, module in network.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise ConfigError("the model has no Conv2d layer for Grad-CAM",
                      field="attribution.grad_cam_layer")


def _build_grad_cam(bundle: ModelBundle) -> HeatmapFn:
    layer_name = bundle.grad_cam_layer or first_conv_layer(bundle.network)
    # The user names layers of their own network; the bundle wraps it as network[1], so
    # that name comes first ("0" is the user's first layer, not the wrapper's Normalize).
    candidates = [f"1.{layer_name}", layer_name]
    layer = None
    for candidate in candidates:
        try:
            layer = bundle.network.get_submodule(candidate)
            break
        except AttributeError:
            continue
    if layer is None:
        raise ConfigError(f"no layer {layer_name!r} in the model",
                          field="attribution.grad_cam_layer")
    method = LayerGradCam(bundle.network, layer)
    height, width = bundle.spec.height, bundle.spec.width
    channels = bundle.spec.channels

    def heatmaps(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cam = method.attribute(inputs.detach().clone().requires_grad_(True), target=targets)
        up = LayerAttribution.interpolate(cam, (height, width), interpolate_mode="bilinear")
        return up.detach().expand(-1, channels, -1, -1).contiguous()

    return heatmaps


# In the order of axguard.v1.AttributionMethod (ATTRIBUTION_METHOD_<NAME>).
SALIENCY = register_method(MethodSpec("saliency", _captum(Saliency, abs=False), False, True,
                                      backward_rule="plain"))
DECONVOLUTION = register_method(MethodSpec("deconvolution",
                                           _rule_based(Deconvolution, "deconvolution"), True,
                                           False, backward_rule="deconvolution"))
INPUT_X_GRADIENT = register_method(MethodSpec("input_x_gradient", _captum(InputXGradient),
                                              False, True, backward_rule="plain",
                                              times_input=True))
GUIDED_BACKPROP = register_method(MethodSpec("guided_backprop",
                                             _rule_based(GuidedBackprop, "guided"), True,
                                             False, backward_rule="guided"))
DEEP_LIFT = register_method(MethodSpec("deep_lift", _captum(DeepLift), True, False))
LAYER_GRAD_CAM = register_method(MethodSpec("layer_grad_cam", _build_grad_cam, False, False))

DEFAULT_METHODS = ("saliency", "deconvolution")
