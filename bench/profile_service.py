"""Where the serving process spends its GIL: py-spy on a demo server under load.

`python bench/profile_service.py [NAME]` starts `axguard serve` (the bundled demo model and
calibration, default settings), sends single-image Checks from 8 clients (one connection
each) while `py-spy record --gil` samples the server for 20 s, and writes
bench/results/profile_service[_NAME].{txt,json}: the share of GIL-holding samples by layer
(engine, serving, transport, grpc, protobuf, prometheus_client, torch, …) by the innermost
frame, and the axguard functions with the most samples inclusive and exclusive.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from throughput import image_request, load, start_server

from axguard.demo.bundle import load_demo_bundle

RESULTS = Path(__file__).resolve().parent / "results"
SECONDS = int(os.environ.get("PROFILE_SECONDS", "20"))


def layer_of(filename: str) -> str:
    """The layer a frame's file belongs to."""
    path = "/" + filename.replace("\\\\", "/")  # py-spy names files relative to sys.path
    if "/axguard/" in path and "axguard_client" not in path:
        part = path.split("/axguard/")[-1].split("/")[0]
        return f"axguard.{part.removesuffix('.py')}"
    for name in ("grpc", "google/protobuf", "prometheus_client", "torchvision", "torch",
                 "captum", "numpy",
                 "concurrent", "threading", "logging", "json", "hmac", "hashlib"):
        if f"/{name}/" in path or path.endswith(f"/{name}.py"):
            return name.replace("/", ".")
    return "other"


def summarise(raw: str) -> dict:
    """Layer shares (innermost frame) and the top axguard functions from py-spy's raw
    (folded) output: `frame;frame;… count` per line, outermost first."""
    layers: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    exclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        # A frame reads "function (file:line)"; the first one may name the thread.
        parsed = []
        for frame in frames:
            if "(" in frame and frame.endswith(")"):
                function, _, where = frame[:-1].rpartition(" (")
                parsed.append((function, where.rsplit(":", 1)[0]))
        if not parsed:
            continue
        leaf_function, leaf_file = parsed[-1]
        layers[layer_of(leaf_file)] += n
        if layer_of(leaf_file).startswith("axguard."):
            exclusive[f"{layer_of(leaf_file)}.{leaf_function}"] += n
        for function, filename in {(f, p) for f, p in parsed
                                   if layer_of(p).startswith("axguard.")}:
            inclusive[f"{layer_of(filename)}.{function}"] += n
    share = {k: round(v / total, 4) for k, v in layers.most_common()}
    return {"samples": total, "layer_share_innermost": share,
            "axguard_inclusive": {k: round(v / total, 4) for k, v in inclusive.most_common(25)},
            "axguard_exclusive": {k: round(v / total, 4) for k, v in exclusive.most_common(25)}}


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    spec = load_demo_bundle().spec
    proc, address = start_server([], calibration="")
    address = address.replace("0.0.0.0", "127.0.0.1")
    try:
        stop = threading.Event()
        result: dict = {}

        def keep_loading() -> None:
            while not stop.is_set():
                result.update(load(address, image_request(spec, False), 8, 2000,
                                   own_connections=True))

        loader = threading.Thread(target=keep_loading, daemon=True)
        loader.start()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "raw.txt"
            subprocess.run([py_spy, "record", "--pid", str(proc.pid), "--duration",
                            str(SECONDS), "--gil", "--format", "raw", "--output", str(out),
                            "--nonblocking"], check=True, capture_output=True)
            raw = out.read_text(errors="replace")  # py-spy can emit a stray byte in a frame name
        stop.set()
        loader.join(timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    summary = {"load": result, **summarise(raw)}
    suffix = f"_{name}" if name else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"profile_service{suffix}.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# py-spy --gil, demo server, 8 clients, {SECONDS} s: "
             f"{summary['samples']} samples",
             f"load: {result.get('throughput', 0):.0f} checks/s", "",
             "## by layer (innermost frame)"]
    lines += [f"{v:7.2%}  {k}" for k, v in summary["layer_share_innermost"].items()]
    lines += ["", "## axguard functions, inclusive"]
    lines += [f"{v:7.2%}  {k}" for k, v in summary["axguard_inclusive"].items()]
    lines += ["", "## axguard functions, exclusive"]
    lines += [f"{v:7.2%}  {k}" for k, v in summary["axguard_exclusive"].items()]
    text = "\n".join(lines) + "\n"
    (RESULTS / f"profile_service{suffix}.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
