"""The paper's fine-tuning recipe (section 3, Table 1) on a user's ImageFolder data.

A truncated torchvision network (models.py) with a new linear layer, trained with Adam
(lr 0.001, betas (0.5, 0.999), no weight decay) on batches of 32 drawn uniformly at random
from the training images, until the validation accuracy reaches the target after at least
`min_iterations`, or at `max_iterations`. Images go through the serving path (decoded,
grayscale stacked to 3 channels, resized to the input size, Normalize in the model), so the
written model is served exactly as it was trained.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn
from torchvision.transforms import Normalize
from tqdm import tqdm

from ..calibration.datasets import LabelledImages, load_labelled_images
from ..engine.model import InputSpec
from ..errors import InvalidInput
from .models import ARCHES, FACTORIES, truncated

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_BYTES = 1 << 30
"""Training images are decoded once and kept when they fit in this; else per batch."""


@dataclass
class FinetuneOptions:
    """One fine-tuning run (defaults: the paper's)."""

    arch: str
    data: Path
    val: Path
    out: Path
    weights: Path | None = None
    input_size: int = 256
    target_accuracy: float = 0.9
    min_iterations: int = 2400
    max_iterations: int = 240_000
    batch_size: int = 32
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    eval_every: int = 100
    seed: int = 0
    name: str | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


@dataclass
class FinetuneResult:
    """What a run did and wrote."""

    iterations: int
    val_accuracy: float
    reached_target: bool
    seconds: float
    history: list[dict] = field(default_factory=list)
    """{"iteration", "loss", "val_accuracy"} at every evaluation."""
    config_file: str = ""


def class_names_of(root: Path) -> list[str]:
    """The class folders of an ImageFolder root, sorted (the model's class order)."""
    if not root.is_dir():
        raise InvalidInput(f"{root} is not a folder of class folders", field="data")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(names) < 2:
        raise InvalidInput(f"{root} needs at least 2 class folders", field="data")
    return names


def accuracy(model: nn.Module, images: LabelledImages, spec: InputSpec,
             batch_size: int = 64) -> float:
    """Share of `images` the model classifies right."""
    model.eval()
    right = 0
    with torch.inference_mode():
        for x, y in images.batches(spec, batch_size):
            right += int((model(x).argmax(dim=1) == torch.as_tensor(y)).sum())
    return right / len(images)


def finetune(options: FinetuneOptions, progress: bool = True) -> FinetuneResult:
    """Train, write model.pt, classes.txt, model.yaml and finetune.json into options.out."""
    if options.arch not in ARCHES:
        raise InvalidInput(f"unknown arch {options.arch!r}; valid: {', '.join(ARCHES)}",
                           field="arch")
    if not 0 < options.target_accuracy <= 1:
        raise InvalidInput("must be in (0, 1]", field="target_accuracy")
    if not 1 <= options.min_iterations <= options.max_iterations:
        raise InvalidInput("need 1 <= min_iterations <= max_iterations",
                           field="min_iterations")
    torch.manual_seed(options.seed)
    classes = class_names_of(Path(options.data))
    train = load_labelled_images(str(options.data), classes)
    val = load_labelled_images(str(options.val), classes)
    size = (options.input_size, options.input_size)
    spec = InputSpec(3, *size, tuple(options.mean), tuple(options.std))
    network = truncated(options.arch, len(classes), size, options.weights)
    # Normalize → network, as the server wraps it (wrap_network, minus the freezing).
    model = nn.Sequential(Normalize(list(spec.mean), list(spec.std)), network)
    optimiser = torch.optim.Adam(network.parameters(), lr=options.learning_rate,
                                 betas=options.betas, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    labels = torch.as_tensor(train.labels)
    cached = None
    if len(train) * spec.channels * spec.height * spec.width * 4 <= CACHE_BYTES:
        cached = torch.cat([x for x, _ in train.batches(spec, 256)])
    generator = torch.Generator().manual_seed(options.seed)
    history: list[dict] = []
    start = time.perf_counter()
    acc, iteration, loss_value = 0.0, 0, float("nan")
    bar = tqdm(total=options.max_iterations, disable=not progress, unit="it",
               desc=f"finetune {options.arch}")
    while iteration < options.max_iterations:
        model.train()
        index = torch.randint(len(train), (options.batch_size,), generator=generator)
        x = cached[index] if cached is not None else torch.stack(
            [train.load(int(i), spec) for i in index])
        loss = loss_fn(model(x), labels[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        iteration += 1
        loss_value = loss.item()
        bar.update(1)
        if iteration % options.eval_every == 0 or iteration == options.max_iterations:
            acc = accuracy(model, val, spec)
            history.append({"iteration": iteration, "loss": loss_value, "val_accuracy": acc})
            bar.set_postfix(loss=f"{loss_value:.3f}", val_acc=f"{acc:.3f}")
            if acc >= options.target_accuracy and iteration >= options.min_iterations:
                break
    bar.close()
    result = FinetuneResult(iteration, acc, acc >= options.target_accuracy,
                            time.perf_counter() - start, history)
    result.config_file = str(write_model(options, network, classes, result))
    return result


def write_model(options: FinetuneOptions, network: nn.Module, classes: list[str],
                result: FinetuneResult) -> Path:
    """Write the state dict, the classes and a settings file `axguard serve --config`
    takes; return the settings file's path."""
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), out / "model.pt")
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    name = options.name or f"{options.arch}-finetuned"
    settings = {"model": {
        "source": FACTORIES[options.arch],
        "weights": str((out / "model.pt").resolve()),
        "classes": str((out / "classes.txt").resolve()),
        "input_size": [options.input_size, options.input_size],
        "channels": 3, "mean": list(options.mean), "std": list(options.std),
        "name": name}}
    config = out / "model.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    record = {"options": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in asdict(options).items()},
              "result": asdict(result), "classes": classes}
    (out / "finetune.json").write_text(json.dumps(record, indent=1) + "\n")
    return config
