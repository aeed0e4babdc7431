"""Receipts and feedback: `make bench-feedback`.

1. Verification on one core: FeedbackBook.count (HMAC check, age, model, label, duplicate
   filter) over distinct receipts, in this process's one thread; signing (the cost added to
   every check) likewise.
2. Through gRPC: `axguard serve` on the demo model with a key file, Feedback requests of
   1,000 items from one client thread (client and server share this machine's cores).
3. Memory of the duplicate filter at its default size (tracemalloc), and that it stays at
   its size when fed twice as many receipts.

Writes bench/results/feedback.{json,md}; exits 1 below the 5,000 receipts/s target.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
EXAMPLES = ROOT / "examples" / "digits"
TARGET_PER_SECOND = 5000


def _book(keys_path: Path, capacity: int):  # noqa: ANN202
    from axguard.serving.feedback import FeedbackBook, ReceiptKeys

    return FeedbackBook(ReceiptKeys(keys_path), fingerprint="ab" * 32, num_classes=10,
                        max_age_seconds=7 * 86400, max_clock_skew_seconds=300,
                        duplicate_capacity=capacity)


def verification(keys_path: Path, n: int) -> dict:
    book = _book(keys_path, capacity=2 * n)
    start = time.perf_counter()
    receipts = [book.issue(f"request-{i:08d}", "cal-0123456789ab", i % 10, 0.01 * (i % 100),
                           i % 17 == 0) for i in range(n)]
    sign_s = time.perf_counter() - start
    start = time.process_time()
    wall = time.perf_counter()
    for i, r in enumerate(receipts):
        book.count(r, i % 10)
    cpu_s, wall_s = time.process_time() - start, time.perf_counter() - wall
    start = time.perf_counter()
    for i, r in enumerate(receipts[: n // 2]):
        book.count(r, i % 10)  # duplicates
    dup_s = time.perf_counter() - start
    return {"receipts": n, "verify_per_second_cpu": n / cpu_s,
            "verify_per_second_wall": n / wall_s, "duplicates_per_second": (n // 2) / dup_s,
            "sign_per_second": n / sign_s, "sign_us_per_check": sign_s / n * 1e6,
            "receipt_chars": len(receipts[0])}


def filter_memory(capacity: int) -> dict:
    from axguard.serving.feedback import DuplicateFilter

    tracemalloc.start()
    dup = DuplicateFilter(capacity)
    for i in range(2 * capacity):
        dup.add(i.to_bytes(16, "big"), i, oldest_valid_ms=0)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"capacity": capacity, "fed": 2 * capacity, "entries": len(dup),
            "mib": current / 2**20, "bytes_per_entry": current / len(dup),
            "forgotten_early": dup.forgotten_early}


def through_grpc(keys_path: Path, requests: int) -> dict:
    from axguard_client import AxguardClient, ClientError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "axguard.cli", "serve", "--port", str(port), "--metrics-port",
         "0", "--log-level", "WARNING", "--feedback-key-file", str(keys_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    try:
        with AxguardClient(target, timeout=60) as client:
            deadline = time.time() + 120
            while True:
                try:
                    client.check(EXAMPLES / "digit_0.png")
                    break
                except ClientError:
                    assert time.time() < deadline and server.poll() is None
                    time.sleep(0.3)
            digits = [p.read_bytes() for p in sorted(EXAMPLES.glob("digit_*.png"))]
            receipts = []
            while len(receipts) < requests * 1000:
                receipts += [(r.receipt, i % 10) for i, r in
                             enumerate(client.check_batch(digits * 10, prediction_only=True))]
            client.feedback(receipts[:1000])  # warm
            start = time.perf_counter()
            counted = 0
            for k in range(1, requests):
                counted += client.feedback(receipts[k * 1000:(k + 1) * 1000]).counted
            seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)
    return {"items_per_request": 1000, "requests": requests - 1, "counted": counted,
            "per_second": counted / seconds}


def main() -> int:
    from axguard.config import FeedbackSettings

    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        keys.write_text("k1 " + "s" * 44 + "\n")
        ver = verification(keys, 50_000)
        memory = filter_memory(FeedbackSettings().duplicate_filter_size)
        rpc = through_grpc(keys, 21)
    result = {"command": "make bench-feedback",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "verification": ver, "duplicate_filter": memory, "grpc": rpc,
              "target_per_second": TARGET_PER_SECOND}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "feedback.json").write_text(json.dumps(result, indent=1) + "\n")
    md = (f"# Feedback ({result['command']}, {result['machine']})\n\n"
          f"| | per second |\n|---|---|\n"
          f"| verify + count, one thread (CPU time) | {ver['verify_per_second_cpu']:,.0f} |\n"
          f"| verify + count, one thread (wall) | {ver['verify_per_second_wall']:,.0f} |\n"
          f"| duplicates recognised (wall) | {ver['duplicates_per_second']:,.0f} |\n"
          f"| receipts signed (wall) | {ver['sign_per_second']:,.0f} "
          f"({ver['sign_us_per_check']:.1f} µs per check) |\n"
          f"| Feedback over gRPC, 1,000 items a request | {rpc['per_second']:,.0f} |\n\n"
          f"Receipt: {ver['receipt_chars']} characters. Duplicate filter at its default size "
          f"{memory['capacity']:,} after {memory['fed']:,} receipts: {memory['entries']:,} "
          f"entries, {memory['mib']:.1f} MiB ({memory['bytes_per_entry']:.0f} bytes each), "
          f"{memory['forgotten_early']:,} forgotten early.\n")
    (RESULTS / "feedback.md").write_text(md)
    print(md)
    return 0 if ver["verify_per_second_cpu"] >= TARGET_PER_SECOND else 1


if __name__ == "__main__":
    raise SystemExit(main())
