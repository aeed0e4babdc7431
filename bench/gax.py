"""GAX cost on this CPU: `make bench-gax`.

For the demo CNN (32×32) and a torchvision ResNet-18 trained briefly on the digits at
64×64: the share of correct test predictions whose CO reaches the default target (the
calibration's GAX target: 95th percentile of label-free CO on correct calibration
predictions) within the 500-step cap, and the median steps and seconds per image.
Writes bench/results/gax.{json,md}.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from axguard.calibration.calibrate import calibrate
from axguard.calibration.datasets import load_labelled_images
from axguard.demo.bundle import load_demo_bundle
from axguard.demo.data import load_split
from axguard.engine.core import Engine
from axguard.engine.gax import GaxOptions
from axguard.engine.model import InputSpec, load_bundle

RESULTS = Path(__file__).parent / "results"
CAP = 500


def train_resnet(folder: Path, epochs: int = 3, size: int = 64):
    """Return a ResNet-18 bundle trained on the digits train split at size×size."""
    torch.manual_seed(0)
    spec = InputSpec(3, size, size, (0.3048,) * 3, (0.323,) * 3)
    x, y = load_split("train").tensors(spec)
    net = torchvision.models.resnet18(num_classes=10)
    model = nn.Sequential(torchvision.transforms.Normalize(spec.mean, spec.std), net)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y)).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    torch.save(net.state_dict(), folder / "resnet18.pt")
    return load_bundle("torchvision:resnet18", spec=spec,
                       class_names=[str(d) for d in range(10)],
                       weights=folder / "resnet18.pt", name=f"resnet18-digits-{size}")


def measure(bundle, n_images: int) -> dict:
    cal = calibrate(Engine(bundle), load_labelled_images("builtin:digits", bundle.class_names),
                    n_bootstrap=10, progress=False)
    engine = Engine(bundle, calibration=cal)
    x, y = load_split("test").tensors(bundle.spec)
    with torch.inference_mode():
        correct = (bundle.network(x).argmax(dim=1) == y).nonzero().flatten()[:n_images]
    runs = []
    for i in correct.tolist():
        options = GaxOptions(int(y[i]), cal.gax_target, max_steps=CAP)
        *_, last = engine.diagnose(x[i], options)
        runs.append({"reached": last.reached_target, "steps": last.step,
                     "seconds": last.seconds})
    reached = [r for r in runs if r["reached"]]
    return {
        "model": bundle.name, "input": list(bundle.spec.shape),
        "test_accuracy": float(cal.data.accuracy), "gax_target": cal.gax_target,
        "images": len(runs), "reached_share": len(reached) / len(runs),
        "median_steps": statistics.median(r["steps"] for r in runs),
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "median_seconds_per_step": statistics.median(
            r["seconds"] / max(r["steps"], 1) for r in runs),
        "runs": runs,
    }


def main() -> int:
    torch.set_num_threads(2)
    n_demo = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    n_resnet = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(load_demo_bundle(), n_demo),
                   measure(train_resnet(Path(tmp)), n_resnet)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
               "command": "make bench-gax", "cap": CAP, "seconds": round(time.time() - start),
               "results": results}
    (RESULTS / "gax.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = ["| model | input | calibration accuracy | GAX target | images | reached within "
             f"{CAP} steps | median steps | median seconds / image | median ms / step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {'×'.join(map(str, r['input']))} | "
                     f"{r['test_accuracy']:.4f} | {r['gax_target']:.2f} | {r['images']} | "
                     f"{r['reached_share']:.0%} | {r['median_steps']:.0f} | "
                     f"{r['median_seconds']:.2f} | {1000 * r['median_seconds_per_step']:.1f} |")
    table = "\n".join(lines)
    (RESULTS / "gax.md").write_text(f"# GAX cost (correct test predictions)\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
