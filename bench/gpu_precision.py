"""GPU speed-ups that might change the scores, measured against fp32 on the same machine:
`python bench/gpu_precision.py [OUT.json]` (needs a CUDA device).

For a torchvision ResNet-34 (random weights, 224×224) and the demo CNN, batch 32: the
axguard check (Saliency + Deconvolution, SUM) in fp32 NCHW (baseline), with the model's weights
in channels_last, with the AX forward (the extra batched forward) under bf16
autocast, and with the AX forward replayed from a CUDA graph (captured once per input
size, fp32). Reports images/s and the largest CO-score difference from the baseline, absolute
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
from axguard.engine.core import CheckItem, Engine


class Bf16AxEngine(Engine):
    """The engine with its extra (AX) forward under bf16 autocast."""

    def _forward_chunks(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return [t.float() for t in super()._forward_chunks(inputs)]


class CudaGraphAxEngine(Engine):
    """The engine with its extra (AX) forward replayed from a CUDA graph, one graph per
    joined input size (the benchmark's batch is fixed, so one capture)."""

    def __init__(self, bundle, **kwargs) -> None:
        super().__init__(bundle, **kwargs)
        self._graphs: dict[tuple, tuple] = {}

    def _forward_chunks(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if not inputs:
            return []
        sizes = [len(t) for t in inputs]
        # The served network is Normalize → model; Normalize copies its mean and std to the
        # device on every call, which a capture forbids, so it runs outside the graph.
        normalize, model = self.bundle.network[0], self.bundle.network[1]
        with torch.no_grad():
            joined = normalize(torch.cat(inputs))
        key = tuple(joined.shape)
        if key not in self._graphs:
            static_in = joined.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(3):  # warm-up on a side stream, as capture requires
                    model(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                static_out = model(static_in).float()
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(joined)
        graph.replay()
        return list(static_out.clone().split(sizes))


def scores(engine: Engine, items: list[CheckItem]) -> torch.Tensor:
    results = engine.check(items)
    return torch.tensor([[s.score for s in r.scores] for r in results])


def measure(bundle, n: int = 32, repeats: int = 10) -> list[dict]:
    x = torch.rand(n, *bundle.spec.shape, generator=torch.Generator().manual_seed(3))
    rows = []
    base_engine = Engine(bundle)
    items = [base_engine.resolve(CheckItem(img)) for img in x]
    base = scores(base_engine, items)
    spread = float(base.std()) or 1.0
    variants = {"fp32": base_engine, "bf16 AX forward": Bf16AxEngine(bundle),
                "CUDA graph AX forward": CudaGraphAxEngine(bundle)}
    for name, engine in variants.items():
        t = timed(lambda e=engine: e.check(items), repeats,
                  sync=torch.cuda.synchronize)
        diff = float((scores(engine, items) - base).abs().max())
        rows.append({"model": bundle.name, "variant": name, "images_per_s": n / t,
                     "co_max_abs_diff": diff, "co_diff_over_std": diff / spread})
        print(rows[-1], flush=True)
    # channels_last: the served network's weights in NHWC memory layout (the engine's own
    # copies share them), so activations follow in NHWC.
    bundle.network.to(memory_format=torch.channels_last)
    engine = Engine(bundle)
    t = timed(lambda: engine.check(items), repeats, sync=torch.cuda.synchronize)
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
