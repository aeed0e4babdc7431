"""Attribution methods: a registry from name to a function (inputs, targets) → heatmaps.

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
    proto_value: int
    """The value of axguard.v1.AttributionMethod."""
    build: Callable[[ModelBundle], HeatmapFn]
    """Returns the heatmap function for a bundle."""
    uses_hooks: bool
    """True when it hooks (and so temporarily changes) the model's modules."""
    works_on_torchscript: bool
    """True for pure gradient methods, which need no hooks."""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; refuses duplicate names or proto values."""
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    if any(m.proto_value == spec.proto_value for m in _REGISTRY.values()):
        raise ValueError(f"proto value {spec.proto_value} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_methods() -> list[MethodSpec]:
    """Return every registered method, ordered by proto value."""
    return sorted(_REGISTRY.values(), key=lambda m: m.proto_value)


def get_method(name: str) -> MethodSpec:
    """Return the method called `name`; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(m.name for m in list_methods())
        raise UnknownMethod(f"unknown method {name!r}; valid: {valid}",
                            field="methods") from None


def method_by_proto_value(value: int) -> MethodSpec:
    """Return the method with this axguard.v1.AttributionMethod value."""
    for spec in _REGISTRY.values():
        if spec.proto_value == value:
            return spec
    raise UnknownMethod(f"unknown attribution method value {value}", field="methods")


def available_methods(bundle: ModelBundle) -> list[MethodSpec]:
    """Return the methods this bundle supports (gradient methods only for TorchScript)."""
    return [m for m in list_methods() if m.works_on_torchscript or not bundle.torchscript]


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
    # The user names layers of their own network; the bundle wraps it as network[1].
    candidates = [layer_name, f"1.{layer_name}"]
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


# proto values follow axguard.v1.AttributionMethod.
SALIENCY = register_method(MethodSpec("saliency", 1, _captum(Saliency, abs=False), False, True))
DECONVOLUTION = register_method(MethodSpec("deconvolution", 2, _captum(Deconvolution), True, False))
INPUT_X_GRADIENT = register_method(
    MethodSpec("input_x_gradient", 3, _captum(InputXGradient), False, True)
)
GUIDED_BACKPROP = register_method(
    MethodSpec("guided_backprop", 4, _captum(GuidedBackprop), True, False)
)
DEEP_LIFT = register_method(MethodSpec("deep_lift", 5, _captum(DeepLift), True, False))
LAYER_GRAD_CAM = register_method(MethodSpec("layer_grad_cam", 6, _build_grad_cam, False, False))

DEFAULT_METHODS = ("saliency", "deconvolution")
