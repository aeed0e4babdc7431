"""Attribution methods: one registry from name to everything about a method — how to build
its heatmap function (inputs, targets) → heatmaps, whether it runs on TorchScript, and the
backward rule that gives it from the shared pass (sharedpass.py). Names are the only key:
the converters map them to the proto enum by name (ATTRIBUTION_METHOD_<NAME>), as the
client does. Validation happens at the edges through `require`.

Every method is Captum's, computed for the given target class (the predicted class in
axguard), in pixel space: inputs (N, C, H, W) float32 in [0, 1] → heatmaps of the same shape.

Warning: hook-based methods (Deconvolution, GuidedBackprop, DeepLift) register hooks on the
model's ReLU modules while they run, which changes every concurrent pass through the same
model. The engine therefore runs all passes of one model under one lock.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

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

from .errors import ConfigError, UnknownMethod
from .model import ModelBundle

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
    """Return the methods this bundle supports (gradient methods only for TorchScript)."""
    return [m for m in list_methods() if m.works_on_torchscript or not bundle.torchscript]


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
    if bundle.torchscript and not spec.works_on_torchscript:
        names = ", ".join(m.name for m in available_methods(bundle))
        raise UnknownMethod(
            f"{spec.name} needs module hooks, which a TorchScript model lacks; "
            f"available: {names}",
            field="methods",
        )


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
DECONVOLUTION = register_method(MethodSpec("deconvolution", _captum(Deconvolution), True, False,
                                           backward_rule="deconvolution"))
INPUT_X_GRADIENT = register_method(MethodSpec("input_x_gradient", _captum(InputXGradient),
                                              False, True, backward_rule="plain",
                                              times_input=True))
GUIDED_BACKPROP = register_method(MethodSpec("guided_backprop", _captum(GuidedBackprop), True,
                                             False, backward_rule="guided"))
DEEP_LIFT = register_method(MethodSpec("deep_lift", _captum(DeepLift), True, False))
LAYER_GRAD_CAM = register_method(MethodSpec("layer_grad_cam", _build_grad_cam, False, False))

DEFAULT_METHODS = ("saliency", "deconvolution")
