"""Memory of engine processes, and its growth over 10,000 requests: `make bench-processes`.

For the demo model (bundled calibration) and ResNet-34 (2 classes, 224², random weights),
starts `axguard serve` with the engine in the serving process (`--engine-processes 0`) and
with the defaults (the start-up rule), and records the resident memory (VmRSS) of the
serving process and of each engine process after the warm-up. For the demo it then sends
10,000 single-image Checks from 8 clients (own connections) and records the memory again
after the first 1,000 (allocators settle) and after all of them: the growth is the
difference. Writes bench/results/memory_processes.{json,md}.
"""

from __future__ import annotations

import json
import platform
import signal
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from throughput import IMAGENET, image_request, load, rss_mb, start_server

from axguard.demo.bundle import load_demo_bundle

RESULTS = Path(__file__).resolve().parent / "results"
REQUESTS = 10_000
SETTLE = 1_000


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def is_engine(pid: int) -> bool:
    """An engine process (multiprocessing's spawn), not its resource tracker."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in command


def memory(pid: int) -> dict:
    """Resident MiB of the serving process, of each engine process and of other children
    (multiprocessing's resource tracker)."""
    kids = children(pid)
    engines = [rss_mb(c) for c in kids if is_engine(c)]
    others = [rss_mb(c) for c in kids if not is_engine(c)]
    return {"serving_mb": rss_mb(pid), "engine_processes_mb": engines, "other_mb": others,
            "total_mb": rss_mb(pid) + sum(engines) + sum(others)}


def measure(name: str, args: list[str], spec, soak: bool) -> list[dict]:
    rows = []
    for label, extra in (("engine in the serving process", ["--engine-processes", "0"]),
                         ("defaults", [])):
        proc, address = start_server([*args, *extra], calibration="" if soak else "none")
        address = address.replace("0.0.0.0", "127.0.0.1")
        try:
            row = {"model": name, "config": label, "after_warm_up": memory(proc.pid)}
            if soak:
                request = image_request(spec, False)
                load(address, request, 8, SETTLE, own_connections=True)
                row["after_settle"] = memory(proc.pid)
                result = load(address, request, 8, REQUESTS, own_connections=True)
                row["after_requests"] = memory(proc.pid)
                row["requests"] = REQUESTS
                row["throughput"] = result["throughput"]
                row["growth_mb"] = (row["after_requests"]["total_mb"]
                                    - row["after_settle"]["total_mb"])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(payload: dict) -> str:
    out = ["# Memory of engine processes", "", f"Machine: {payload['machine']}", "",
           "| model | server | serving process MiB | engine processes MiB | total MiB "
           "| extra per engine process MiB |", "|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in payload["rows"]):
        rows = [r for r in payload["rows"] if r["model"] == model]
        alone = rows[0]["after_warm_up"]["total_mb"]
        for r in rows:
            m = r["after_warm_up"]
            count = len(m["engine_processes_mb"])
            extra = f"{(m['total_mb'] - alone) / count:.0f}" if count else "–"
            out.append(f"| {model} | {r['config']} | {m['serving_mb']:.0f} | "
                       f"{', '.join(f'{v:.0f}' for v in m['engine_processes_mb']) or '–'} | "
                       f"{m['total_mb']:.0f} | {extra} |")
    out += ["", f"## Growth over {REQUESTS:,} single-image Checks (demo, 8 clients)", "",
            "| server | total MiB after 1,000 | after 11,000 | growth MiB | checks/s |",
            "|---|---|---|---|---|"]
    for r in payload["rows"]:
        if "growth_mb" in r:
            out.append(f"| {r['config']} | {r['after_settle']['total_mb']:.0f} | "
                       f"{r['after_requests']['total_mb']:.0f} | {r['growth_mb']:+.1f} | "
                       f"{r['throughput']:.0f} |")
    return "\n".join(out) + "\n"


def main() -> int:
    rows = measure("demo", [], load_demo_bundle().spec, soak=True)
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "resnet34-2.pt"
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet34(num_classes=2).state_dict(), weights)
        rows += measure("resnet34", ["--model", "torchvision:resnet34", "--weights",
                                     str(weights), "--num-classes", "2", "--input-size",
                                     "224"], IMAGENET, soak=False)
    payload = {"machine": f"{platform.machine()}, torch {torch.__version__}", "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_processes.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / "memory_processes.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
