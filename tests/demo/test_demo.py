"""The bundled demo model: the training script learns, and the committed numbers are true."""

from __future__ import annotations

import pytest

from axguard.demo.bundle import ASSETS, demo_metadata
from axguard.demo.data import load_split
from axguard.demo.train import accuracy, train_demo, write_assets
from axguard.engine.model import sha256_file


def test_training_briefly_learns_well_above_chance(tmp_path):
    network, spec, metrics = train_demo(epochs=2)
    assert metrics["test"] > 0.6  # chance is 0.1
    write_assets(network, spec, metrics, tmp_path, epochs=2)
    assert {p.name for p in tmp_path.iterdir()} == {"weights.pt", "model.json", "classes.txt"}


def test_committed_accuracy_is_what_the_committed_weights_measure(demo_bundle):
    meta = demo_metadata()
    assert meta["fingerprint"] == sha256_file(ASSETS / "weights.pt") == demo_bundle.fingerprint
    for split in ("calibration", "test"):
        x, y = load_split(split).tensors(demo_bundle.spec)
        assert accuracy(demo_bundle.network, x, y) == pytest.approx(meta["accuracy"][split],
                                                                     abs=1e-4)


def test_splits_are_disjoint_and_stratified():
    splits = {name: load_split(name) for name in ("train", "calibration", "test")}
    assert {k: len(v.labels) for k, v in splits.items()} == {
        "train": 1078, "calibration": 359, "test": 360}
    indices = [set(s.indices.tolist()) for s in splits.values()]
    assert not (indices[0] & indices[1]) and not (indices[0] & indices[2])
    assert not (indices[1] & indices[2])
    assert len(indices[0] | indices[1] | indices[2]) == 1797
    labels = load_split("test").labels
    assert set(labels.tolist()) == set(range(10))
