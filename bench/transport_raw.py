"""How much a thinner Python transport could give: `make bench-transport`
(writes bench/results/transport_raw.{json,md}).

Measured in one run, 8 client threads (each its own connection) in this process, the
server in another:
1. a bare echo RPC on grpcio's thread-pool server and on its asyncio server (`grpc.aio`),
   with the demo check's request size (a 3×32×32 float tensor, 12 KB) and a response of
   the size of its answer: the ceiling of any servicer on that server;
2. the Check handler alone (bench/aio_check_server.py: real engine, batcher, converters,
   metrics and receipts) on each of the two servers;
3. the axguard server (demo model, defaults): prediction_only and full checks.
The aio ÷ thread-pool ratios of (1) and (2) bound what porting the servicers to grpc.aio
can give.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from throughput import RESULTS, image_request, load, start_server

from axguard.demo.bundle import load_demo_bundle

ECHO_SERVER = r"""
import asyncio, sys
from concurrent import futures
import grpc
reply = b"r" * 240
same = lambda b: b
def handle(request, context): return reply
async def handle_async(request, context): return reply
def handlers(fn):
    return [grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(fn, same, same)})]
if sys.argv[1] == "threads":
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers(handlers(handle))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()
else:
    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(handlers(handle_async))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()
    asyncio.run(main())
"""


def echo_rate(kind: str, clients: int = 8, total: int = 6000) -> float:
    """Requests per second of the bare echo server `kind` ("threads" or "aio")."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, kind], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline())
        payload = b"x" * (3 * 32 * 32 * 4 + 40)
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}",
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(clients)]
        calls = [c.unary_unary("/bench.Echo/Call") for c in channels]
        for call in calls:
            call(payload)
        left = iter(range(total))
        lock = threading.Lock()

        def worker(call) -> None:  # noqa: ANN001
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                call(payload)

        threads = [threading.Thread(target=worker, args=(c,)) for c in calls]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rate = total / (time.perf_counter() - start)
        for c in channels:
            c.close()
        return rate
    finally:
        proc.kill()
        proc.wait()


def handler_rates(kind: str, spec) -> dict:  # noqa: ANN001
    """Requests per second of the Check handler alone on server `kind`."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "aio_check_server.py"),
                             kind], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        port = int(proc.stdout.readline())
        return {path: load(f"127.0.0.1:{port}", image_request(spec, path == "prediction_only"),
                           8, 3000, own_connections=True)["throughput"]
                for path in ("prediction_only", "check")}
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    spec = load_demo_bundle().spec
    out: dict = {"clients": 8}
    for kind in ("threads", "aio", "threads", "aio"):  # interleaved: the machine drifts
        out.setdefault(f"echo_{kind}", []).append(echo_rate(kind))
        print(kind, out[f"echo_{kind}"][-1], flush=True)
    for kind in ("threads", "aio", "threads", "aio"):
        out.setdefault(f"handler_{kind}", []).append(handler_rates(kind, spec))
        print(kind, out[f"handler_{kind}"][-1], flush=True)
    proc, address = start_server([], calibration="")
    address = address.replace("0.0.0.0", "127.0.0.1")
    try:
        for name, prediction_only in (("axguard_prediction_only", True),
                                      ("axguard_check", False)):
            out[name] = load(address, image_request(spec, prediction_only), 8, 3000,
                             own_connections=True)["throughput"]
            print(name, out[name], flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    threads, aio = (max(out["echo_threads"]), max(out["echo_aio"]))
    out["aio_over_threads"] = aio / threads
    best = {(kind, path): max(r[path] for r in out[f"handler_{kind}"])
            for kind in ("threads", "aio") for path in ("prediction_only", "check")}
    out["handler_aio_over_threads"] = {path: best[("aio", path)] / best[("threads", path)]
                                       for path in ("prediction_only", "check")}
    lines = ["# Transport ceiling (8 clients, demo-sized requests, one run)", "",
             "| server | requests/s |", "|---|---|",
             f"| bare echo, grpcio thread pool (best of 2) | {threads:.0f} |",
             f"| bare echo, grpc.aio (best of 2) | {aio:.0f} |",
             *[f"| Check handler alone, {path}, {name} (best of 2) | {best[(kind, path)]:.0f} |"
               for path in ("prediction_only", "check")
               for kind, name in (("threads", "thread pool"), ("aio", "grpc.aio"))],
             f"| axguard, prediction_only | {out['axguard_prediction_only']:.0f} |",
             f"| axguard, full check (bundled calibration) | {out['axguard_check']:.0f} |",
             "", f"grpc.aio ÷ thread pool: bare echo {out['aio_over_threads']:.2f}×, Check "
             "handler " + ", ".join(f"{p} {r:.2f}×" for p, r in
                                    out["handler_aio_over_threads"].items())]
    (RESULTS / "transport_raw.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "transport_raw.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())
