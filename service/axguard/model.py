"""Model bundles: the network wrapped with its normalisation, input spec and class names.

The served network is `Normalize(mean, std)` followed by the user's network, so every
tensor the engine sees is pixel space, float32 in [0, 1] (DESIGN 1.1).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import logging
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.transforms import Normalize

from .errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: channels, height, width and the normalisation inside it."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}", field="channels")
        if self.height < 1 or self.width < 1:
            raise ConfigError("input size must be positive", field="input_size")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise ConfigError(
                    f"needs {self.channels} values, got {len(values)}", field=name
                )
        if any(s <= 0 for s in self.std):
            raise ConfigError("every std must be positive", field="std")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return (self.channels, self.height, self.width)


@dataclass
class ModelBundle:
    """A ready-to-serve model: `network` maps (N, C, H, W) [0, 1] pixels to (N, classes) logits."""

    network: nn.Module
    spec: InputSpec
    class_names: list[str]
    name: str
    version: str
    fingerprint: str
    torchscript: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    grad_cam_layer: str | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_torchscript_file(path: Path) -> bool:
    """Return True when `path` is a TorchScript archive (a zip holding code/ and constants)."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in n or n.startswith("code/") for n in archive.namelist())


def build_network(source: str, num_classes: int,
                  input_size: tuple[int, int] | None = None) -> nn.Module:
    """Return an untrained network from `torchvision:NAME` or `package.module:factory`.

    A factory is called with `num_classes=` (and `input_size=(H, W)`, when given) for each
    of those keywords it accepts.
    """
    if ":" not in source:
        raise ConfigError(
            f"expected 'torchvision:NAME', 'package.module:factory' or a TorchScript file, "
            f"got {source!r}",
            field="model.source",
        )
    prefix, _, attr = source.partition(":")
    if prefix == "torchvision":
        try:
            return torchvision.models.get_model(attr, weights=None, num_classes=num_classes)
        except ValueError as err:
            raise ConfigError(str(err), field="model.source") from err
    try:
        module = importlib.import_module(prefix)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import {source!r}: {err}", field="model.source") from err
    params = inspect.signature(factory).parameters
    kwargs: dict[str, object] = {}
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    if "input_size" in params and input_size is not None:
        kwargs["input_size"] = input_size
    net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{source!r} returned {type(net).__name__}, not nn.Module",
                          field="model.source")
    return net


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Return the state dict in `path`, loaded with weights_only=True (no code unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise ModelLoadError(f"cannot load weights {path}: {err}", field="model.weights") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict", field="model.weights")
    return state


def shared_copy(network: nn.Module) -> nn.Module:
    """Return a copy of the module tree that shares the parameters and buffers of `network`.

    Hooks registered on one tree do not touch the other, and no weight memory is doubled.
    The copy's parameters are frozen, like the served network's.
    """
    copied = copy.deepcopy(network)
    copied.load_state_dict(network.state_dict(), assign=True)
    for param in copied.parameters():
        param.requires_grad_(False)
    return copied


def make_relus_unique(network: nn.Module) -> nn.Module:
    """Return `network` with every ReLU a separate, non-inplace module at each call site.

    DeepLift and GuidedBackprop hook ReLU modules: a ReLU reused twice (torchvision ResNet)
    or a functional relu is invisible or double-counted (DESIGN 1.9). ReLU modules are made
    non-inplace; then the forward is traced with torch.fx and every reused ReLU module and
    functional relu gets its own module. If tracing fails, the network is kept as it is and
    a warning is logged.
    """
    for module in network.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    try:
        traced = torch.fx.symbolic_trace(network)
    except Exception as err:  # fx raises many types on dynamic control flow
        log.warning("relu_trace_failed", extra={"error": str(err)})
        return network
    seen: set[str] = set()
    changed = False
    count = 0
    for node in list(traced.graph.nodes):
        is_relu_module = node.op == "call_module" and isinstance(
            traced.get_submodule(node.target), nn.ReLU
        )
        is_relu_function = node.op in ("call_function", "call_method") and node.target in (
            torch.relu, torch.nn.functional.relu, "relu",
        )
        if is_relu_module and node.target not in seen:
            seen.add(node.target)
            continue
        if not (is_relu_module or is_relu_function):
            continue
        count += 1
        name = f"axguard_relu_{count}"
        traced.add_submodule(name, nn.ReLU())
        with traced.graph.inserting_after(node):
            new = traced.graph.call_module(name, args=(node.args[0],))
        node.replace_all_uses_with(new)
        traced.graph.erase_node(node)
        changed = True
    if not changed:
        return network
    traced.graph.lint()
    traced.recompile()
    return traced


def wrap_network(network: nn.Module, spec: InputSpec) -> nn.Module:
    """Return Normalize(mean, std) → network, in eval mode, with frozen parameters."""
    wrapped = nn.Sequential(Normalize(list(spec.mean), list(spec.std)), network)
    wrapped.eval()
    for param in wrapped.parameters():
        param.requires_grad_(False)
    return wrapped


def read_class_names(path: Path | None, num_classes: int | None) -> list[str]:
    """Return class names from a file (one per line) or "0".."N-1"."""
    if path is not None:
        try:
            names = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
        except OSError as err:
            raise ModelLoadError(f"cannot read {path}: {err}", field="model.classes") from err
        if num_classes is not None and len(names) != num_classes:
            raise ConfigError(
                f"{path} has {len(names)} names but num_classes is {num_classes}",
                field="model.classes",
            )
        return names
    if num_classes is None:
        raise ConfigError("give num_classes or a classes file", field="model.num_classes")
    return [str(i) for i in range(num_classes)]


def load_bundle(
    source: str,
    *,
    spec: InputSpec,
    class_names: list[str],
    weights: Path | None,
    name: str | None = None,
    version: str = "1",
    device: str = "cpu",
    grad_cam_layer: str | None = None,
) -> ModelBundle:
    """Return a ModelBundle from a source string, weights file and spec.

    `source` is `torchvision:NAME`, `package.module:factory`, `torchscript:PATH` or a path to
    a TorchScript file. The fingerprint is the sha256 of the weights (or TorchScript) file.
    """
    torch_device = torch.device(device)
    script_path: Path | None = None
    if source.startswith("torchscript:"):
        script_path = Path(source.removeprefix("torchscript:"))
    elif Path(source).suffix in (".pt", ".pth", ".ts") and Path(source).exists():
        script_path = Path(source)
    if script_path is not None:
        if not is_torchscript_file(script_path):
            raise ModelLoadError(f"{script_path} is not a TorchScript archive",
                                 field="model.source")
        with warnings.catch_warnings():
            # torch 2.14 deprecates TorchScript; loading still works and users still ship it.
            warnings.simplefilter("ignore", FutureWarning)
            network: nn.Module = torch.jit.load(str(script_path), map_location="cpu")
        fingerprint = sha256_file(script_path)
        default_name = script_path.stem
        torchscript = True
    else:
        network = build_network(source, len(class_names), (spec.height, spec.width))
        if weights is None:
            raise ConfigError("a state dict file is required for this model",
                              field="model.weights")
        try:
            network.load_state_dict(load_state_dict(weights))
        except RuntimeError as err:
            raise ModelLoadError(f"weights do not fit {source}: {err}",
                                 field="model.weights") from err
        network = make_relus_unique(network)
        fingerprint = sha256_file(weights)
        default_name = source.partition(":")[2]
        torchscript = False
    wrapped = wrap_network(network, spec).to(torch_device)
    bundle = ModelBundle(
        network=wrapped,
        spec=spec,
        class_names=class_names,
        name=name or default_name,
        version=version,
        fingerprint=fingerprint,
        torchscript=torchscript,
        device=torch_device,
        grad_cam_layer=grad_cam_layer,
    )
    _check_output_shape(bundle)
    return bundle


def _check_output_shape(bundle: ModelBundle) -> None:
    """Fail at start-up if the network does not map the input spec to (1, classes)."""
    x = torch.zeros((1, *bundle.spec.shape), device=bundle.device)
    try:
        with torch.inference_mode():
            out = bundle.network(x)
    except Exception as err:
        raise ModelLoadError(f"forward pass on a {tuple(x.shape)} input failed: {err}",
                             field="model.input_size") from err
    if out.dim() != 2 or out.shape[1] != bundle.num_classes:
        raise ModelLoadError(
            f"model returns shape {tuple(out.shape)}, expected (1, {bundle.num_classes})",
            field="model.num_classes",
        )
