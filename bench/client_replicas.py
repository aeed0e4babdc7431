"""One client, three demo replicas on loopback: how 300 Checks spread, and how many calls
fail while one replica is stopped (SIGTERM) under a 4-thread load; the client's defaults
against gRPC's (pick_first, no retries, no health checking), as the client was before.
Writes bench/results/client_replicas.json. `make bench-client` (~2 min)."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_client_replicas import DIGIT, all_of, start_replica, wait_serving  # noqa: E402

from axguard_client import AxguardClient  # noqa: E402

GRPC_DEFAULTS = {"retry": None, "load_balancing": "pick_first",
                 "channel_options": [("grpc.service_config",
                                      json.dumps({"loadBalancingConfig": [{"pick_first": {}}]}))]}


def spread(replicas: list, options: dict) -> list[float]:
    before = [r.answered() for r in replicas]
    with AxguardClient(all_of(replicas), timeout=30, **options) as client:
        for _ in range(300):
            client.check(DIGIT)
    return [r.answered() - b for r, b in zip(replicas, before, strict=True)]


def stop_one_under_load(replicas: list, options: dict) -> dict:
    """4 threads of Checks; after 3 s SIGTERM the replica the first address names (where
    pick_first sends everything); 3 s more."""
    calls, failures, stop = [0], [], threading.Event()
    lock = threading.Lock()

    def load() -> None:
        with AxguardClient(all_of(replicas), timeout=30, **options) as client:
            while not stop.is_set():
                try:
                    client.check(DIGIT)
                    with lock:
                        calls[0] += 1
                except Exception as err:  # noqa: BLE001  (counted)
                    with lock:
                        failures.append(type(err).__name__)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    started = time.perf_counter()
    code = replicas[0].stop()
    drained = time.perf_counter() - started
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return {"answered": calls[0], "failed": len(failures), "exit_code": code,
            "drain_seconds": round(drained, 2)}


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, options in (("client defaults", {}), ("grpc defaults", GRPC_DEFAULTS)):
            replicas = [start_replica(Path(folder), f"{name[:4]}-{i}", connection_age=None)
                        for i in range(3)]
            try:
                for r in replicas:
                    wait_serving(r)
                results[name] = {"spread_of_300": spread(replicas, options),
                                 "one_stopped": stop_one_under_load(replicas, options)}
            finally:
                for r in replicas:
                    r.stop()
            print(name, results[name], flush=True)
    out = ROOT / "bench" / "results" / "client_replicas.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
