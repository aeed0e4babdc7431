"""The paper's experiments as commands: truncated models, the fine-tuning recipe and the
figures page (real training on real digits, a real browser)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
import torchvision

from axguard.builder import build_bundle
from axguard.calibration.datasets import load_labelled_images
from axguard.cli import main
from axguard.config import load_settings
from axguard.demo.data import load_split
from axguard.engine.activations import make_activations_unique
from axguard.engine.model import build_network
from axguard.paper.figures import conv_stages
from axguard.paper.finetune import FinetuneOptions, accuracy, finetune
from axguard.paper.models import truncated
from conftest import ROOT, chromium


def test_truncated_networks_keep_the_papers_modules():
    resnet = truncated("resnet34", 5, (64, 64))
    full = torchvision.models.resnet34()
    assert [type(m) for m in resnet.body] == [type(m) for m in list(full.children())[:8]]
    assert resnet.fc.in_features == 512 * 2 * 2 and resnet.fc.out_features == 5
    alexnet = truncated("alexnet", 3, (64, 64))
    assert [type(m) for m in alexnet.body] == [type(m) for m in
                                               list(torchvision.models.alexnet().features)[:6]]
    # As a model source: the factory gets the classes and the input size.
    net = build_network("axguard.paper.models:truncated_resnet18", 3, (32, 32))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_pretrained_weights_come_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    full = torchvision.models.resnet18()
    torch.save(full.state_dict(), tmp_path / "r18.pt")
    net = truncated("resnet18", 4, (32, 32), tmp_path / "r18.pt")
    assert torch.equal(net.body[0].weight, full.conv1.weight)


def test_conv_stages_are_leaf_convs_of_each_stage():
    traced, _ = make_activations_unique(torchvision.models.resnet18())
    assert conv_stages(traced) == ["conv1", "layer1.1.conv2", "layer2.1.conv2",
                                   "layer3.1.conv2", "layer4.1.conv2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three digit classes in the ImageFolder layout: train and val."""
    root = tmp_path_factory.mktemp("digits")
    for split, folder, per_class in (("train", "train", 25), ("calibration", "val", 10)):
        data = load_split(split)
        seen: dict[int, int] = {}
        for image, label in zip(data.images, data.labels, strict=True):
            label = int(label)
            if label < 3 and seen.get(label, 0) < per_class:
                seen[label] = seen.get(label, 0) + 1
                (root / folder / str(label)).mkdir(parents=True, exist_ok=True)
                image.convert("L").save(root / folder / str(label) / f"{sum(seen.values())}.png")
    return root


def test_finetune_follows_the_stop_rule_and_writes_a_servable_model(folders, tmp_path):
    options = FinetuneOptions(arch="resnet18", data=folders / "train", val=folders / "val",
                              out=tmp_path / "model", input_size=16, target_accuracy=1.0,
                              min_iterations=30, max_iterations=30, eval_every=10)
    result = finetune(options, progress=False)
    assert result.iterations == 30  # min = max: the rule cannot stop earlier or later
    assert [h["iteration"] for h in result.history] == [10, 20, 30]
    record = json.loads((tmp_path / "model" / "finetune.json").read_text())
    assert record["options"]["learning_rate"] == 0.001
    assert record["options"]["betas"] == [0.5, 0.999]
    assert record["options"]["batch_size"] == 32
    # The written settings serve the model exactly as trained: same accuracy on val.
    settings = load_settings(tmp_path / "model" / "model.yaml")
    bundle = build_bundle(settings.model, settings.attribution)
    assert bundle.class_names == ["0", "1", "2"] and bundle.spec.shape == (3, 16, 16)
    val = load_labelled_images(str(folders / "val"), bundle.class_names)
    assert accuracy(bundle.network, val, bundle.spec) == pytest.approx(result.val_accuracy)
    # A low target stops at the first evaluation after min_iterations.
    early = finetune(FinetuneOptions(**{**options.__dict__, "target_accuracy": 1e-9,
                                        "min_iterations": 20, "max_iterations": 100,
                                        "out": tmp_path / "early"}), progress=False)
    assert early.iterations == 20 and early.reached_target


def test_finetune_cli_refuses_a_bad_target(folders, tmp_path, capsys):
    code = main(["finetune", "--data", str(folders / "train"), "--val", str(folders / "val"),
                 "--out", str(tmp_path / "x"), "--target-accuracy", "1.5"])
    assert code == 2 and "target_accuracy: must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.system
def test_paper_figures_page_in_headless_chromium(tmp_path, demo_engine, capsys):
    out = tmp_path / "figures"
    assert main(["paper-figures", "--data", "builtin:digits-test", "--out", str(out),
                 "--gax-images", "2", "--gax-steps", "20"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # The errors are the demo model's own on the test split.
    x, y = load_split("test").tensors(demo_engine.bundle.spec)
    with torch.no_grad():
        wrong = int((demo_engine.bundle.network(x).argmax(dim=1) != y).sum())
    assert summary["images"] == len(y) and summary["errors"] == wrong
    assert len(summary["gaps"]) == 12  # six methods × SUM and PRODUCT
    assert set(summary["layer_grad_cam"]) == {"0", "3"}  # the demo CNN's two conv stages
    assert len(summary["gax"]["steps"]) == 2 and max(summary["gax"]["steps"]) <= 20
    gaps = {(g["method"], g["ax_process"]): g for g in summary["gaps"]}
    saliency = gaps[("saliency", "sum")]
    assert saliency["labelled_gap"] == pytest.approx(
        saliency["labelled_correct_mean"] - saliency["labelled_wrong_mean"])
    assert np.isfinite([g["label_free_gap"] for g in summary["gaps"]]).all()
    page = out / "index.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium(), *flags, "--virtual-time-budget=5000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-figures="4"' in dom and 'data-figures-loaded="4"' in dom
    assert "Figure 4: GAX CO over steps" in dom and "Figure 8: Layer Grad-CAM" in dom
    assert f"{wrong} wrong" in dom


def test_paper_demo_script_is_runnable_as_documented():
    # `make paper-demo` runs this script; its own run is timed in the README (minutes).
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "python"),
                           str(ROOT / "scripts" / "paper_demo.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--input-size" in done.stdout
