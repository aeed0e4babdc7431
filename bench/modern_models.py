"""Check cost on modern architectures (engine level, defaults: Saliency + Deconvolution, SUM),
as a ratio to a plain batched forward measured in the same run: torchvision's ConvNeXt-T,
Swin-T, EfficientNet-B0 and MobileNetV3-S at 64×64 and ResNet-18 beside them, untrained (the
cost does not depend on the weights), batch 8. Writes bench/results/modern_models.{json,md}.
`make bench-modern` (~3 min)."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import RESULTS, engine_level  # noqa: E402

from axguard.engine.model import InputSpec, load_bundle  # noqa: E402

ARCHITECTURES = ("resnet18", "convnext_tiny", "swin_t", "efficientnet_b0", "mobilenet_v3_small")
SPEC = InputSpec(3, 64, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
REPEATS = 3  # runs of the measurement; each reports its own ratio, the median is stated


def main() -> None:
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in ARCHITECTURES:
            network = torchvision.models.get_model(name, weights=None, num_classes=10)
            weights = Path(folder) / f"{name}.safetensors"
            save_file({k: v.detach().clone().contiguous()
                       for k, v in network.state_dict().items()}, str(weights))
            bundle = load_bundle(f"torchvision:{name}", spec=SPEC,
                                 class_names=[str(i) for i in range(10)], weights=weights,
                                 name=name)
            runs = [engine_level(bundle, [8], repeats=5)[0] for _ in range(REPEATS)]
            ratios = [r["check_cost_vs_plain"] for r in runs]
            rows.append({"model": name, "batch": 8, "input": "64x64",
                         "cost_vs_plain_median": statistics.median(ratios),
                         "cost_vs_plain_range": [min(ratios), max(ratios)],
                         "speedup_vs_naive_median": statistics.median(
                             r["check_speedup_vs_naive"] for r in runs),
                         "plain_ips_median": statistics.median(r["plain_ips"] for r in runs)})
    (RESULTS / "modern_models.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model (64×64, batch 8) | check cost ÷ plain forward (median, range of 3) "
             "| ÷ naive per-image Captum | plain forward images/s |", "|---|---|---|---|"]
    for r in rows:
        low, high = r["cost_vs_plain_range"]
        lines.append(f"| {r['model']} | {r['cost_vs_plain_median']:.2f}× "
                     f"({low:.2f}–{high:.2f}) | {r['speedup_vs_naive_median']:.2f}× faster "
                     f"| {r['plain_ips_median']:.0f} |")
    (RESULTS / "modern_models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
