"""Labelled images for calibration and evaluation.

`DIR` in the ImageFolder layout (`DIR/<class name>/*.png|jpg|jpeg|bmp|tif|tiff`), with class
folders named like the model's classes; or `builtin:digits` (the demo model's calibration
split) and `builtin:digits-test` (its test split). Images are decoded by the serving path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.model import InputSpec
from ..engine.preprocess import decode_image, image_to_tensor
from ..errors import InvalidInput

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
BUILTIN = {"builtin:digits": "calibration", "builtin:digits-test": "test"}


@dataclass
class LabelledImages:
    """Named labelled images, decoded lazily in batches."""

    source: str
    names: list[str]
    labels: list[int]
    _loaders: list

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int, spec: InputSpec) -> torch.Tensor:
        """Return image `index` as (C, H, W) float32 in [0, 1]."""
        return self._loaders[index](spec)

    def batches(self, spec: InputSpec, batch_size: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
        """Yield ((B, C, H, W) float32 in [0, 1], labels) batches in order."""
        for start in range(0, len(self), batch_size):
            loaders = self._loaders[start : start + batch_size]
            yield (torch.stack([load(spec) for load in loaders]),
                   self.labels[start : start + batch_size])


def _file_loader(path: Path):
    def load(spec: InputSpec) -> torch.Tensor:
        try:
            return decode_image(path.read_bytes(), spec, max_pixels=200_000_000,
                                field=str(path))
        except InvalidInput as err:
            raise InvalidInput(f"cannot read {path}: {err}") from err

    return load


def load_labelled_images(source: str, class_names: list[str]) -> LabelledImages:
    """Return the labelled images of `source` (a folder or a builtin name)."""
    if source in BUILTIN:
        from ..demo.data import load_split

        split = load_split(BUILTIN[source])
        if class_names != [str(d) for d in range(10)]:
            raise InvalidInput(f"{source} needs a model with the classes 0..9", field="data")
        loaders = [(lambda spec, img=img: image_to_tensor(img, spec)) for img in split.images]
        names = [f"{source}#{int(i)}" for i in split.indices]
        return LabelledImages(source, names, [int(v) for v in split.labels], loaders)
    root = Path(source)
    if not root.is_dir():
        raise InvalidInput(f"{source} is neither a folder nor one of {', '.join(BUILTIN)}",
                           field="data")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [p.name for p in folders if p.name not in class_names]
    if unknown:
        raise InvalidInput(f"folders {unknown} are not classes of the model "
                           f"({', '.join(class_names)})", field="data")
    names, labels, loaders = [], [], []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                names.append(str(path.relative_to(root)))
                labels.append(class_names.index(folder.name))
                loaders.append(_file_loader(path))
    if not labels:
        raise InvalidInput(f"no images under {source}/<class name>/", field="data")
    return LabelledImages(source, names, labels, loaders)
