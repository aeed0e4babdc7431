"""Model bundles: the network wrapped with its normalisation, input spec and class names.

The served network is `Standardize(mean, std)` followed by the user's network, so every
tensor the engine sees is pixel space, float32 in [0, 1] (DESIGN 1.1).
"""

from __future__ import annotations

import collections
import copy
import hashlib
import importlib
import inspect
import io
import logging
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import ConfigError, ModelLoadError
from .activations import TraceReport, make_activations_unique, reused_activations

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
    exported: bool = False
    """A torch.export ExportedProgram (.pt2): like TorchScript, no modules to hook."""
    trace: TraceReport = field(default_factory=TraceReport)
    """How the activations were made unique (or why fx could not trace the network)."""
    memory_format: str = "contiguous"
    """Layout of the network's 4-D weights: "contiguous" (NCHW) or "channels_last" (NHWC;
    torch's CPU and cuDNN kernels are often faster with it). Set by set_memory_format."""

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def hookable(self) -> bool:
        """True when the network is made of nn.Modules that hooks and swaps can reach (not
        TorchScript, not an ExportedProgram): every method is possible."""
        return not (self.torchscript or self.exported)

    @property
    def model_format(self) -> str:
        """"module", "torchscript" or "exported_program"."""
        return "torchscript" if self.torchscript else (
            "exported_program" if self.exported else "module")


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def has_image_weights(bundle: ModelBundle) -> bool:
    """True when the network has 4-D weights (convolutions), whose layout channels_last
    changes; TorchScript and exported programs are left as loaded."""
    return bundle.hookable and any(p.dim() == 4 for p in bundle.network.parameters())


def set_memory_format(bundle: ModelBundle, name: str) -> None:
    """Lay the network's 4-D weights out as `name` (MEMORY_FORMATS), in place. Inputs stay
    NCHW: a convolution with channels_last weights runs its channels_last kernel and
    gives the same numbers."""
    if name not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {name!r}; known: {sorted(MEMORY_FORMATS)}")
    with torch.no_grad():  # never inference_mode: its tensors could not be recorded later
        bundle.network.to(memory_format=MEMORY_FORMATS[name])
    bundle.memory_format = name


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


SOURCE_FORMS = ("'torchvision:NAME', 'timm:NAME', 'package.module:factory', a TorchScript "
                "file or a torch.export .pt2 file")


def _require_timm_model(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"timm has no architecture {name!r} (timm.list_models() lists "
                          "them)", field="model.source")


def timm_defaults(name: str) -> tuple[tuple[int, int, int], tuple[float, ...],
                                      tuple[float, ...]] | None:
    """(input C×H×W, mean, std) of timm's pretrained configuration of an architecture (no
    download: the configuration ships with timm); None when it has none. ConfigError for a
    name timm does not know."""
    import timm.models

    _require_timm_model(name)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001  (no pretrained configuration: the settings decide)
        return None
    if cfg is None or not cfg.input_size:
        return None
    return tuple(cfg.input_size), tuple(cfg.mean), tuple(cfg.std)  # type: ignore[return-value]


def build_network(source: str, num_classes: int,
                  input_size: tuple[int, int] | None = None) -> nn.Module:
    """Return an untrained network from `torchvision:NAME`, `timm:NAME` or
    `package.module:factory`; nothing is downloaded.

    A factory is called with `num_classes=` (and `input_size=(H, W)`, when given) for each
    of those keywords it accepts.
    """
    if ":" not in source:
        raise ConfigError(f"expected {SOURCE_FORMS}, got {source!r}", field="model.source")
    prefix, _, attr = source.partition(":")
    if prefix == "torchvision":
        try:
            return torchvision.models.get_model(attr, weights=None, num_classes=num_classes)
        except ValueError as err:
            raise ConfigError(str(err), field="model.source") from err
    if prefix == "timm":
        import timm

        _require_timm_model(attr)
        return timm.create_model(attr, pretrained=False, num_classes=num_classes)
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
    """Return the state dict in `path`: a `.safetensors` file (no pickle at all), or a torch
    file loaded with weights_only=True (no code unpickled)."""
    if Path(path).suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load weights {path}: {err}",
                                 field="model.weights") from err
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


class Standardize(nn.Module):
    """(x − mean) / std per channel, as torchvision's Normalize computes it, with mean and
    std kept as (1, C, 1, 1) buffers: Normalize validates its arguments and builds both
    tensors on every call, a cost paid on each of a check's several forwards. The buffers
    are not persistent, so the state dict is the user's network's alone."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def wrap_network(network: nn.Module, spec: InputSpec) -> nn.Module:
    """Return Standardize(mean, std) → network, in eval mode, with frozen parameters."""
    wrapped = nn.Sequential(Standardize(spec.mean, spec.std), network)
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


def check_exported_archive(path: Path) -> None:
    """Refuse a .pt2 archive that would unpickle anything when torch.export loads it: every
    weight and constant must be stored as raw tensor bytes, and its example inputs must load
    with weights_only=True (torch.export.load falls back to a full unpickle otherwise)."""
    import json

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ModelLoadError(f"{path} is not a torch.export archive: {err}",
                             field="model.source") from err
    with archive:
        names = archive.namelist()
        if not any(n.endswith("/archive_format") for n in names):
            raise ModelLoadError(f"{path} is not a torch.export archive (no archive_format)",
                                 field="model.source")
        for name in names:
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                config = json.loads(archive.read(name)).get("config", {})
                pickled = [k for k, v in config.items() if v.get("use_pickle", True)]
                if pickled:
                    raise ModelLoadError(
                        f"{path} stores {pickled[:3]} pickled, which loading would execute; "
                        "export with plain tensors", field="model.source")
            elif "/sample_inputs/" in name:
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as err:
                    raise ModelLoadError(f"{path}: its example inputs need a full unpickle "
                                         f"({type(err).__name__})", field="model.source") from err


class ExportedModule(nn.Module):
    """The module of an ExportedProgram: its graph is fixed in eval mode (train() would
    raise), and a program exported for one batch size (`batch`) runs on any batch in chunks
    of it."""

    def __init__(self, program: nn.Module, batch: int | None) -> None:
        super().__init__()
        self.program = program
        self.batch = batch

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode  # the exported graph itself has no train mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is None or x.shape[0] == self.batch:
            return self.program(x)
        outs = []
        for start in range(0, x.shape[0], self.batch):
            chunk = x[start:start + self.batch]
            short = self.batch - chunk.shape[0]
            if short:  # pad the last chunk; its padding rows are dropped
                chunk = torch.cat([chunk, chunk[-1:].expand(short, *chunk.shape[1:])])
            outs.append(self.program(chunk)[:self.batch - short])
        return torch.cat(outs)


def load_exported(path: Path, spec: InputSpec) -> nn.Module:
    """Return the module of a torch.export ExportedProgram (.pt2), checked first by
    check_exported_archive; a program exported for one batch size runs in chunks of it."""
    check_exported_archive(path)
    try:
        program = torch.export.load(str(path)).module()
    except Exception as err:  # noqa: BLE001  (torch raises many types for a bad archive)
        raise ModelLoadError(f"cannot load {path}: {err}", field="model.source") from err
    for batch in (2, 1):
        try:
            with torch.no_grad():
                program(torch.zeros((batch, *spec.shape)))
        except Exception:  # noqa: BLE001, S112  (a guard on the batch size: try the next)
            continue
        return ExportedModule(program, None if batch == 2 else 1)
    raise ModelLoadError(f"{path} does not run on a {list(spec.shape)} input",
                         field="model.input_size")


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

    `source` is `torchvision:NAME`, `timm:NAME`, `package.module:factory` (weights: a state
    dict, `.safetensors` or a torch file), `torchscript:PATH` or a TorchScript file, or a
    `.pt2` file (torch.export). The fingerprint is the sha256 of the weights (or program)
    file.
    """
    torch_device = torch.device(device)
    script_path: Path | None = None
    if source.startswith("torchscript:"):
        script_path = Path(source.removeprefix("torchscript:"))
    elif Path(source).suffix in (".pt", ".pth", ".ts") and Path(source).exists():
        script_path = Path(source)
    trace = TraceReport()
    torchscript = exported = False
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
    elif Path(source).suffix == ".pt2":
        program_path = Path(source)
        if not program_path.is_file():
            raise ModelLoadError(f"no such file {program_path}", field="model.source")
        network = load_exported(program_path, spec)
        fingerprint = sha256_file(program_path)
        default_name = program_path.stem
        exported = True
    else:
        network = build_network(source, len(class_names), (spec.height, spec.width))
        if weights is None:
            raise ConfigError("a state dict file is required for this model",
                              field="model.weights")
        state = load_state_dict(weights)
        if getattr(state, "_metadata", None) is None:
            # safetensors keeps no module versions, which some modules' loaders read
            # (torchvision's MNASNet): those of the architecture just built stand in.
            state = collections.OrderedDict(state)
            state._metadata = getattr(network.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
        try:
            network.load_state_dict(state)
        except RuntimeError as err:
            raise ModelLoadError(f"weights do not fit {source}: {err}",
                                 field="model.weights") from err
        # Traced in eval mode: the served graph (GoogLeNet and Inception return their
        # auxiliary heads only in training).
        network, trace = make_activations_unique(network.eval())
        fingerprint = sha256_file(weights)
        default_name = source.partition(":")[2]
    wrapped = wrap_network(network, spec).to(torch_device)
    if trace.error is not None:  # fx could not help: which activations are still shared
        trace.reused = reused_activations(
            wrapped, torch.zeros((1, *spec.shape), device=torch_device))
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
        exported=exported,
        trace=trace,
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
