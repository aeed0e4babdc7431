"""GPU speed-ups that might change the scores, measured against fp32 on the same machine:
`python bench/gpu_precision.py [OUT.json]` (needs a CUDA device).

For a torchvision ResNet-34 (random weights, 224×224) and the demo CNN, batch 32: the
axguard check (Saliency + Deconvolution, SUM) in fp32 NCHW (baseline), with the model's weights
in channels_last, and with the AX forward (the extra batched forward) under bf16
autocast. Reports images/s and the largest CO-score difference from the baseline, absolute
and relative to the scores' spread (a change in ranking is what would matter to a flag).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from common import timed
from gpu_check import resnet34

from axguard.demo.bundle import load_demo_bundle
from axguard.engine import CheckItem, Engine


class Bf16AxEngine(Engine):
    """The engine with its extra (AX) forward under bf16 autocast."""

    def _forward_chunks(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return [t.float() for t in super()._forward_chunks(inputs)]


def scores(engine: Engine, items: list[CheckItem]) -> torch.Tensor:
    results = engine.check(items, resolved=True)
    return torch.tensor([[s.score for s in r.scores] for r in results])


def measure(bundle, n: int = 32, repeats: int = 10) -> list[dict]:
    x = torch.rand(n, *bundle.spec.shape, generator=torch.Generator().manual_seed(3))
    rows = []
    base_engine = Engine(bundle)
    items = [base_engine.resolve(CheckItem(img)) for img in x]
    base = scores(base_engine, items)
    spread = float(base.std()) or 1.0
    variants = {"fp32": base_engine, "bf16 AX forward": Bf16AxEngine(bundle)}
    for name, engine in variants.items():
        t = timed(lambda e=engine: e.check(items, resolved=True), repeats,
                  sync=torch.cuda.synchronize)
        diff = float((scores(engine, items) - base).abs().max())
        rows.append({"model": bundle.name, "variant": name, "images_per_s": n / t,
                     "co_max_abs_diff": diff, "co_diff_over_std": diff / spread})
        print(rows[-1], flush=True)
    # channels_last: the served network's weights in NHWC memory layout (the engine's own
    # copies share them), so activations follow in NHWC.
    bundle.network.to(memory_format=torch.channels_last)
    engine = Engine(bundle)
    t = timed(lambda: engine.check(items, resolved=True), repeats, sync=torch.cuda.synchronize)
    diff = float((scores(engine, items) - base).abs().max())
    rows.append({"model": bundle.name, "variant": "channels_last", "images_per_s": n / t,
                 "co_max_abs_diff": diff, "co_diff_over_std": diff / spread})
    print(rows[-1], flush=True)
    bundle.network.to(memory_format=torch.contiguous_format)
    return rows


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("gpu_precision.json")
    assert torch.cuda.is_available(), "no CUDA device"
    payload = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
               "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    with tempfile.TemporaryDirectory() as tmp:
        payload["rows"] = (measure(resnet34(Path(tmp), "cuda"))
                           + measure(load_demo_bundle(device="cuda"), repeats=30))
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
