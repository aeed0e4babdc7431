"""A native front, evaluated (issue 26): NVIDIA Triton's server binary (shipped in the
`nvidia-pytriton` wheel) in front of the axguard engine, against axguard's own server, on
the same Open Inference Protocol load.

Run by `make bench-triton` in its own environment (.venv-pytriton: Debian's python3.11,
whose patch version the Triton Python-backend stub was built for; tritonclient needs
protobuf < 7, so axguard is installed there without its gRPC dependencies: the engine
imports none). Both servers serve the demo model with its bundled calibration; the load is
tritonclient's gRPC client from 8 threads, each with its own connection, sending one FP32
image per ModelInfer and asking for class_index, risk, likely_wrong and co_scores.

Writes bench/results/pytriton_front.{json,md}.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUTPUTS = ("class_index", "risk", "likely_wrong", "co_scores")
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "8"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "2000"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def serve_with_triton(ports: dict[str, int]) -> None:
    """Serve the demo engine behind tritonserver (runs in a child process)."""
    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from axguard.demo.bundle import ASSETS, load_demo_bundle
    from axguard.engine import CheckItem, Engine
    from axguard.flag import load_artifact

    bundle = load_demo_bundle()
    engine = Engine(bundle, calibration=load_artifact(ASSETS / "calibration.json"))
    engine.warm_up()
    torch.set_num_threads(1)

    @batch
    def infer(tensor: np.ndarray) -> dict[str, np.ndarray]:
        results = engine.check([CheckItem(torch.from_numpy(image)) for image in tensor])
        return {
            "class_index": np.array([[r.class_index] for r in results], dtype=np.int32),
            "risk": np.array([[r.verdict.risk] for r in results], dtype=np.float32),
            "likely_wrong": np.array([[r.verdict.likely_wrong] for r in results], dtype=bool),
            "co_scores": np.array([[s.score for s in r.scores] for r in results],
                                  dtype=np.float32),
        }

    config = TritonConfig(grpc_port=ports["grpc"], http_port=ports["http"],
                          metrics_port=ports["metrics"])
    with Triton(config=config) as triton:
        triton.bind(
            model_name="digits-cnn", infer_func=infer,
            inputs=[Tensor(name="tensor", dtype=np.float32, shape=tuple(bundle.spec.shape))],
            outputs=[Tensor(name="class_index", dtype=np.int32, shape=(1,)),
                     Tensor(name="risk", dtype=np.float32, shape=(1,)),
                     Tensor(name="likely_wrong", dtype=np.bool_, shape=(1,)),
                     Tensor(name="co_scores", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(max_batch_size=32, batcher=DynamicBatcher(
                max_queue_delay_microseconds=2000)))
        triton.run()  # starts tritonserver and waits until the model is ready
        print("SERVING", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()


def load(url: str) -> dict:
    """ModelInfer of one image from CLIENTS threads: throughput and latencies."""
    import tritonclient.grpc as grpcclient

    data = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(REQUESTS))

    def worker(_: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        inputs = [grpcclient.InferInput("tensor", list(data.shape), "FP32")]
        inputs[0].set_data_from_numpy(data)
        outputs = [grpcclient.InferRequestedOutput(o) for o in OUTPUTS]
        client.infer("digits-cnn", inputs, outputs=outputs)  # warm the connection
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            start = time.perf_counter()
            client.infer("digits-cnn", inputs, outputs=outputs)
            with lock:
                latencies.append(time.perf_counter() - start)
        client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        list(pool.map(worker, range(CLIENTS)))
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"requests": REQUESTS, "clients": CLIENTS, "throughput": REQUESTS / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def wait_for(proc: subprocess.Popen, marker: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if marker in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return
    raise RuntimeError(f"server exited with {proc.wait()} before {marker!r}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    if sys.argv[1:2] == ["--serve-triton"]:
        serve_with_triton(json.loads(sys.argv[2]))
        return 0
    native_python = os.environ.get("AXGUARD_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    rows = []
    for front in ("axguard", "triton"):
        for run in range(RUNS):
            if front == "triton":
                ports = {k: free_port() for k in ("grpc", "http", "metrics")}
                proc = subprocess.Popen([sys.executable, __file__, "--serve-triton",
                                         json.dumps(ports)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, cwd=ROOT)
                wait_for(proc, "SERVING")
                url = f"127.0.0.1:{ports['grpc']}"
            else:
                port = free_port()
                proc = subprocess.Popen([native_python, "-m", "axguard.cli", "serve", "--port",
                                         str(port), "--metrics-port", "0"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, cwd=ROOT)
                wait_for(proc, '"serving"')
                url = f"127.0.0.1:{port}"
            try:
                row = {"front": front, "run": run, **load(url)}
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            print(row, flush=True)
            rows.append(row)
    medians = {f: statistics.median(r["throughput"] for r in rows if r["front"] == f)
               for f in ("axguard", "triton")}
    payload = {"rows": rows, "median_throughput": medians,
               "triton_vs_axguard": medians["triton"] / medians["axguard"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pytriton_front.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = ["# Triton's server binary (nvidia-pytriton) in front of the axguard engine", "",
             f"Demo model, bundled calibration, one FP32 image per ModelInfer, {CLIENTS} "
             f"tritonclient gRPC clients (own connections), {REQUESTS} requests a run.", "",
             "| front | run | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['front']} | {r['run']} | {r['throughput']:.0f} | {r['p50_ms']:.1f} | "
              f"{r['p99_ms']:.1f} |" for r in rows]
    lines += ["", f"Median: axguard {medians['axguard']:.0f} req/s, Triton front "
              f"{medians['triton']:.0f} req/s ({payload['triton_vs_axguard']:.2f}×)."]
    (RESULTS / "pytriton_front.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
