"""Where a ResNet-34 check spends its time: torch.profiler on engine.check, batch 8.

`python bench/profile_check.py` writes bench/results/profile_resnet34_check.txt.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile, record_function

from axguard.engine.core import CheckItem, Engine
from axguard.engine.model import InputSpec, load_bundle

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        path = Path(tmp) / "r34.pt"
        torch.save(torchvision.models.resnet34(num_classes=1000).state_dict(), path)
        spec = InputSpec(3, 224, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        bundle = load_bundle("torchvision:resnet34", spec=spec,
                             class_names=[str(i) for i in range(1000)], weights=path)
    engine = Engine(bundle)
    items = [CheckItem(img) for img in torch.rand(8, *spec.shape)]
    engine.check(items)
    with torch.inference_mode():
        bundle.network(torch.stack([i.image for i in items]))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("plain_forward_batch8"), torch.inference_mode():
            bundle.network(torch.stack([i.image for i in items]))
        with record_function("axguard_check_batch8"):
            result = engine.check(items)[0]
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    t = result.timing
    header = (f"ResNet-34, 224x224, batch 8, {torch.get_num_threads()} threads\n"
              f"engine stages (ms): forward with graph {t.forward_ms:.0f}, "
              f"two backward passes {t.attribution_ms:.0f}, AX forward of 16 images "
              f"{t.ax_ms:.0f}\n\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile_resnet34_check.txt").write_text(header + table + "\n")
    print(header + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
