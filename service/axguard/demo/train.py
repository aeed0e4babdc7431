"""Train the demo model: `python -m axguard.demo.train [--epochs N] [--out DIR]`.

Fixed seed, the split of axguard.demo.data; writes weights.pt (state dict), model.json
(input spec, classes, split and measured accuracy) and classes.txt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ..engine.model import InputSpec, sha256_file, wrap_network
from .data import CLASS_NAMES, SPLIT_SEED, load_split
from .network import build_demo_net

ASSETS = Path(__file__).parent / "assets"
INPUT_SIZE = 32
SEED = 0


def demo_spec(mean: tuple[float, ...] = (0.5, 0.5, 0.5),
              std: tuple[float, ...] = (0.5, 0.5, 0.5)) -> InputSpec:
    """Return the demo model's input spec (3 x 32 x 32 with the given normalisation)."""
    return InputSpec(3, INPUT_SIZE, INPUT_SIZE, tuple(mean), tuple(std))


def accuracy(network: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Return the share of correct argmax predictions."""
    network.eval()
    with torch.inference_mode():
        return float((network(x).argmax(dim=1) == y).float().mean())


def train_demo(*, epochs: int = 30, seed: int = SEED, lr: float = 1e-3,
               batch_size: int = 64) -> tuple[nn.Module, InputSpec, dict[str, float]]:
    """Return (trained network without normalisation, its spec, accuracies per split)."""
    torch.manual_seed(seed)
    raw = demo_spec()
    x_train, y_train = load_split("train").tensors(raw)
    # The normalisation comes from the training images, one value per channel.
    mean = tuple(round(float(v), 4) for v in x_train.mean(dim=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in x_train.std(dim=(0, 2, 3)))
    spec = demo_spec(mean, std)
    network = build_demo_net(len(CLASS_NAMES))
    model = wrap_network(network, spec)
    for param in model.parameters():
        param.requires_grad_(True)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            optimiser.zero_grad()
            loss_fn(model(x_train[batch]), y_train[batch]).backward()
            optimiser.step()
    metrics = {"train": accuracy(model, x_train, y_train)}
    for split in ("calibration", "test"):
        metrics[split] = accuracy(model, *load_split(split).tensors(spec))
    for param in model.parameters():
        param.requires_grad_(False)
    return network, spec, metrics


def write_assets(network: nn.Module, spec: InputSpec, metrics: dict[str, float],
                 out: Path, epochs: int) -> None:
    """Write weights.pt, classes.txt and model.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "weights.pt"
    torch.save(network.state_dict(), weights)
    (out / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    meta = {
        "name": "digits-cnn",
        "version": "1",
        "source": "axguard.demo.network:build_demo_net",
        "input": {"channels": spec.channels, "height": spec.height, "width": spec.width,
                  "mean": list(spec.mean), "std": list(spec.std)},
        "data": "sklearn.datasets.load_digits, split seed "
                f"{SPLIT_SEED}: 60% train / 20% calibration / 20% test, stratified",
        "training": {"epochs": epochs, "seed": SEED, "optimiser": "Adam lr 1e-3, batch 64"},
        "accuracy": {k: round(v, 4) for k, v in metrics.items()},
        "fingerprint": sha256_file(weights),
    }
    (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args(argv)
    network, spec, metrics = train_demo(epochs=args.epochs)
    write_assets(network, spec, metrics, args.out, args.epochs)
    print(json.dumps({"accuracy": metrics, "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
