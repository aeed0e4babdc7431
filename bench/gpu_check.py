"""GPU checks, run where a CUDA device is at hand: `python bench/gpu_check.py [OUT.json]`.

1. The shared pass equals Captum on CUDA (Saliency, Deconvolution, GuidedBackprop,
   InputXGradient) on the demo CNN and a torchvision ResNet-34 (random weights, 224×224).
2. The engine on CUDA equals the engine on the CPU: predictions, CO scores and every
   evidence family of the flag (boundary, counterfactuals, perturbation, views).
3. Throughput on the GPU (images/s, median of repeats): plain batched forward, the naive
   Captum path (Saliency + Deconvolution, separate forwards) and the axguard check, for
   the demo CNN and ResNet-34 at batches 1, 8, 32 and 128.
Prints and writes JSON; needs torch, torchvision, captum and pydantic only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from captum.attr import Deconvolution, GuidedBackprop, InputXGradient, Saliency
from common import naive_check, timed

from axguard.demo.bundle import load_demo_bundle
from axguard.engine.core import CheckItem, Engine, EvidencePlan
from axguard.engine.model import InputSpec, load_bundle
from axguard.engine.sharedpass import SharedPass
from axguard.flag.verdict import Family, MethodPair

IMAGENET = InputSpec(3, 224, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def resnet34(folder: Path, device: str):
    torch.manual_seed(0)
    path = folder / "resnet34.pt"
    torch.save(torchvision.models.resnet34(num_classes=1000).state_dict(), path)
    return load_bundle("torchvision:resnet34", spec=IMAGENET,
                       class_names=[str(i) for i in range(1000)], weights=path,
                       name="resnet34", device=device)


def shared_vs_captum(bundle, n: int = 8) -> dict:
    x = torch.rand(n, *bundle.spec.shape, generator=torch.Generator().manual_seed(1)).to(
        bundle.device)
    shared = SharedPass(bundle.network)
    leaf, logits = shared.forward(x)
    targets = logits.detach().argmax(dim=1)
    ours = shared.heatmaps(leaf, logits, targets, ["saliency", "deconvolution",
                                                   "guided_backprop", "input_x_gradient"])
    out = {}
    for name, cls, kwargs in (("saliency", Saliency, {"abs": False}),
                              ("deconvolution", Deconvolution, {}),
                              ("guided_backprop", GuidedBackprop, {}),
                              ("input_x_gradient", InputXGradient, {})):
        ref = cls(bundle.network).attribute(x.clone().requires_grad_(True), target=targets,
                                            **kwargs).detach()
        scale = float(ref.abs().max()) or 1.0
        out[name] = float((ours[name] - ref).abs().max()) / scale
    return out


def all_families_flag(calibration):
    families = [Family(name="msp"), Family(name="boundary"),
                Family(name="counterfactual", method="saliency"),
                Family(name="counterfactual", method="deconvolution"),
                Family(name="perturbation", epsilon=0.01),
                Family(name="views", views=("shift:1:0", "rotate:5")),
                Family(name="co", pairs=(MethodPair(method="saliency", ax_process="sum"),))]
    names = [f for fam in families for f in fam.features()]
    from axguard.flag.verdict import FlagModel, RiskModel

    flag = FlagModel(families=families, mode="false_alarm", threshold=0.5,
                     risk_model=RiskModel(features=names, mean=[0.0] * len(names),
                                          scale=[1.0] * len(names),
                                          coef=[-1.0] + [0.0] * (len(names) - 1),
                                          intercept=0.0, regularisation_c=1.0))
    return calibration.model_copy(update={"flag": flag})


def engine_cuda_vs_cpu() -> dict:
    from axguard.demo.bundle import ASSETS
    from axguard.flag.artifact import load_artifact

    artifact = all_families_flag(load_artifact(ASSETS / "calibration.json"))
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    results = {}
    for device in ("cpu", "cuda"):
        engine = Engine(load_demo_bundle(device=device), calibration=artifact)
        items = [CheckItem(img, methods=("saliency", "deconvolution")) for img in x]
        results[device] = engine.check_with_evidence(items)
    (cpu, ev_cpu), (gpu, ev_gpu) = results["cpu"], results["cuda"]
    diffs = {"same_predictions": all(a.class_index == b.class_index
                                     for a, b in zip(cpu, gpu, strict=True)),
             "co_max_abs_diff": max(abs(sa.score - sb.score) for a, b in zip(cpu, gpu,
                                                                            strict=True)
                                    for sa, sb in zip(a.scores, b.scores, strict=True)),
             "risk_max_abs_diff": max(abs(a.verdict.risk - b.verdict.risk)
                                      for a, b in zip(cpu, gpu, strict=True))}
    feats = {}
    for r_cpu, r_gpu in zip(cpu, gpu, strict=True):
        for name, value in r_cpu.verdict.features.items():
            other = r_gpu.verdict.features[name]
            rel = abs(value - other) / max(abs(value), 1e-6)
            feats[name] = max(feats.get(name, 0.0), rel)
    diffs["feature_max_rel_diff"] = feats
    diffs["plan"] = str(EvidencePlan.of(artifact.flag.families))
    assert ev_cpu is not None and ev_gpu is not None
    return diffs


def throughput(bundle, batches: list[int], repeats: int) -> list[dict]:
    engine = Engine(bundle)
    rows = []
    for n in batches:
        x = torch.rand(n, *bundle.spec.shape, generator=torch.Generator().manual_seed(n))
        xd = x.to(bundle.device)
        items = [engine.resolve(CheckItem(img)) for img in x]

        def plain(xd: torch.Tensor = xd) -> None:
            with torch.inference_mode():
                bundle.network(xd)

        sync = torch.cuda.synchronize
        t_plain = timed(plain, repeats, sync=sync)
        t_naive = timed(lambda xd=xd: naive_check(bundle.network, xd), repeats, sync=sync)
        t_check = timed(lambda items=items: engine.check(items), repeats,
                        sync=sync)
        rows.append({"model": bundle.name, "batch": n, "plain_ips": n / t_plain,
                     "naive_ips": n / t_naive, "check_ips": n / t_check,
                     "check_cost_vs_plain": t_check / t_plain,
                     "check_speedup_vs_naive": t_naive / t_check})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    import tempfile

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = Path(args[0]) if args else Path("gpu_check.json")
    assert torch.cuda.is_available(), "no CUDA device"
    torch.backends.cudnn.benchmark = False
    payload = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if "--throughput-only" in sys.argv:  # e.g. an older engine on PYTHONPATH, same machine
        with tempfile.TemporaryDirectory() as tmp:
            payload["throughput"] = (
                throughput(load_demo_bundle(device="cuda"), [1, 8, 32, 128], 20)
                + throughput(resnet34(Path(tmp), "cuda"), [1, 8, 32, 128], 5))
        out.write_text(json.dumps(payload, indent=1, default=float) + "\n")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        demo = load_demo_bundle(device="cuda")
        resnet = resnet34(Path(tmp), "cuda")
        payload["shared_vs_captum_rel_max_diff"] = {
            "digits-cnn": shared_vs_captum(demo), "resnet34": shared_vs_captum(resnet)}
        print(payload, flush=True)
        payload["engine_cuda_vs_cpu"] = engine_cuda_vs_cpu()
        print(payload["engine_cuda_vs_cpu"], flush=True)
        payload["throughput"] = (throughput(demo, [1, 8, 32, 128], 20)
                                 + throughput(resnet, [1, 8, 32, 128], 5))
    out.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    print(json.dumps(payload, indent=1, default=float))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())
