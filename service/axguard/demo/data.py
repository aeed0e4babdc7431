"""The digits data: scikit-learn's bundled `load_digits` (1,797 real 8 x 8 scans, no download).

Split, fixed by seed 0 and stratified by class: 60% train, 20% calibration, 20% test.
Every image goes through axguard.engine.preprocess.image_to_tensor, the serving path, so an 8 x 8
PNG of a digit sent to the server becomes exactly the tensor the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ..engine.model import InputSpec
from ..engine.preprocess import image_to_tensor

SPLIT_SEED = 0
SPLITS = ("train", "calibration", "test")
CLASS_NAMES = [str(d) for d in range(10)]


@dataclass
class DigitsSplit:
    """One split: PIL images (8 x 8, mode L), their labels and their load_digits indices."""

    images: list[Image.Image]
    labels: np.ndarray
    indices: np.ndarray

    def tensors(self, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ((N, C, H, W) float32 in [0, 1], (N,) int64) through the serving path."""
        x = torch.stack([image_to_tensor(img, spec) for img in self.images])
        return x, torch.as_tensor(self.labels, dtype=torch.long)


def digit_image(values: np.ndarray) -> Image.Image:
    """Return an 8 x 8 grayscale image from load_digits values 0..16 (16 = ink)."""
    return Image.fromarray(np.round(values * (255.0 / 16.0)).astype(np.uint8), mode="L")


def load_split(name: str) -> DigitsSplit:
    """Return the named split ("train", "calibration" or "test")."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
    digits = load_digits()
    index = np.arange(len(digits.target))
    train, rest = train_test_split(
        index, test_size=0.4, random_state=SPLIT_SEED, stratify=digits.target
    )
    calibration, test = train_test_split(
        rest, test_size=0.5, random_state=SPLIT_SEED, stratify=digits.target[rest]
    )
    chosen = {"train": train, "calibration": calibration, "test": test}[name]
    images = [digit_image(digits.images[i]) for i in chosen]
    return DigitsSplit(images, digits.target[chosen].astype(np.int64), np.asarray(chosen))


def export_pngs(name: str, out_dir: Path, limit: int | None = None) -> list[Path]:
    """Write a split's images as `<label>/<index>.png` (ImageFolder layout); return the paths."""
    split = load_split(name)
    paths = []
    for i, (img, label) in enumerate(zip(split.images, split.labels, strict=True)):
        if limit is not None and i >= limit:
            break
        path = Path(out_dir) / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        paths.append(path)
    return paths
