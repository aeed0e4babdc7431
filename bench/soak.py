"""Soak: steady mixed load with periodic hostile requests: `make soak DURATION=600`.

Starts `axguard serve` on the demo model with its defaults and, for DURATION seconds, keeps
4 client threads busy with valid requests (encoded PNG checks, tensor checks, verdict-only
checks, 4-image CheckBatches, a short Diagnose now and then, label Feedback for the receipts
it got, a quarter of them sent twice) while a fifth thread sends the seeded hostile cases of
tests/fuzzing.py at about 20 a second. The duplicate filter is set to 20,000 receipts so
that the soak fills it. Every 5 s it records the server's resident memory, open file
descriptors, threads and duplicate-filter entries. Writes
bench/results/soak.{json,md}; exits 1 if any request got INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fuzzing import FORBIDDEN, FUZZ_KEY_ID, FUZZ_SECRET, hostile_cases, run_cases  # noqa: E402
from prometheus_run import free_port  # noqa: E402

from axguard_client import AxguardClient, ClientError  # noqa: E402
from axguard_client.v1 import confidence_pb2 as pb  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EXAMPLES = ROOT / "examples" / "digits"


def proc_stats(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024,
            "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


FILTER_SIZE = 20_000


def filter_entries(metrics_port: int) -> float | None:
    """The server's axguard_feedback_filter_entries, read from /metrics."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=5).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("axguard_feedback_filter_entries{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def main() -> int:
    import tempfile

    duration = float(os.environ.get("DURATION", sys.argv[1] if len(sys.argv) > 1 else 600))
    port, metrics_port = free_port(), free_port()
    keys = Path(tempfile.mkdtemp()) / "receipt-keys"
    keys.write_text(f"{FUZZ_KEY_ID} {FUZZ_SECRET}\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "axguard.cli", "serve", "--port", str(port), "--metrics-port",
         str(metrics_port), "--log-level", "WARNING", "--feedback-key-file", str(keys)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "AXGUARD_FEEDBACK__DUPLICATE_FILTER_SIZE": str(FILTER_SIZE)})
    target = f"127.0.0.1:{port}"
    digits = [p.read_bytes() for p in sorted(EXAMPLES.glob("digit_*.png"))]
    tensor = pb.Image(tensor=pb.Tensor(shape=[3, 32, 32],
                                       data=np.full((3, 32, 32), 0.5, "<f4").tobytes()))
    codes: Counter = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    samples = []
    try:
        with AxguardClient(target, timeout=5) as probe:
            deadline = time.time() + 120
            while True:
                try:
                    probe.check(digits[0])
                    break
                except ClientError:
                    assert time.time() < deadline and server.poll() is None
                    time.sleep(0.3)

        def valid_load(worker: int) -> None:
            rng = np.random.default_rng(worker)
            labels: list[tuple[str, int]] = []
            with AxguardClient(target, timeout=30) as client:
                while not stop.is_set():
                    kind = int(rng.integers(100))
                    try:
                        if kind < 40:
                            digit = int(rng.integers(10))
                            response = client.check(digits[digit])
                            ok = response.prediction.class_index == digit
                            name = "check_png" if ok else "check_png_wrong_answer"
                            labels.append((response.receipt, digit))
                        elif kind < 45 and labels:
                            again = labels[: len(labels) // 4]  # already sent: duplicates
                            sent = client.feedback(labels + again)
                            name = ("feedback" if sent.errors == 0 and
                                    sent.counted + sent.duplicates == len(labels) + len(again)
                                    else "feedback_refused")
                            labels = []
                        elif kind < 60:
                            client.check(pb.CheckRequest(image=tensor))
                            name = "check_tensor"
                        elif kind < 80:
                            client.check(digits[1], verdict_only=True)
                            name = "verdict_only"
                        elif kind < 98:
                            client.check_batch(digits[:4])
                            name = "check_batch"
                        else:
                            list(client.diagnose(digits[3], max_steps=20))
                            name = "diagnose"
                        code = "OK"
                    except ClientError as err:
                        name, code = "valid", err.code.name
                    with lock:
                        codes[(name, code)] += 1

        def hostile_load() -> None:
            seed = 0
            with grpc.insecure_channel(target) as channel:
                while not stop.is_set():
                    started = time.time()
                    report = run_cases(channel, list(hostile_cases(seed, 20)), threads=2)
                    with lock:
                        for (_kind, code), n in report.codes.items():
                            codes[("hostile", code)] += n
                    seed += 1
                    time.sleep(max(0.0, 1.0 - (time.time() - started)))

        threads = [threading.Thread(target=valid_load, args=(w,)) for w in range(4)]
        threads.append(threading.Thread(target=hostile_load))
        for t in threads:
            t.start()
        start = time.time()
        while time.time() - start < duration:
            samples.append({"t": round(time.time() - start, 1), **proc_stats(server.pid),
                            "requests": sum(codes.values()),
                            "filter_entries": filter_entries(metrics_port)})
            time.sleep(5)
        stop.set()
        for t in threads:
            t.join(60)
        samples.append({"t": round(time.time() - start, 1), **proc_stats(server.pid),
                        "requests": sum(codes.values()),
                        "filter_entries": filter_entries(metrics_port)})
    finally:
        alive = server.poll() is None
        server.terminate()
        server.wait(30)
    forbidden = sum(n for (_, code), n in codes.items() if grpc.StatusCode[code] in FORBIDDEN)
    wrong = sum(n for (name, _), n in codes.items() if name == "check_png_wrong_answer")
    # Drift after the first minute (warm-up, allocator arenas) in MiB per 10 minutes.
    late = [s for s in samples if s["t"] >= 60] or samples
    slope = (np.polyfit([s["t"] for s in late], [s["rss_mib"] for s in late], 1)[0] * 600
             if len(late) > 2 else float("nan"))
    result = {
        "command": f"make soak DURATION={duration:g}", "machine": f"{platform.machine()}, 2 cores",
        "seconds": duration, "server_alive": alive, "requests": sum(codes.values()),
        "codes": {f"{n} {c}": k for (n, c), k in sorted(codes.items())},
        "internal_or_unknown": forbidden, "wrong_answers": wrong,
        "rss_mib": {"first": samples[0]["rss_mib"], "max": max(s["rss_mib"] for s in samples),
                    "last": samples[-1]["rss_mib"], "slope_after_1_min_per_10_min": slope},
        "fds": {"first": samples[0]["fds"], "max": max(s["fds"] for s in samples),
                "last": samples[-1]["fds"]},
        "threads": {"first": samples[0]["threads"], "max": max(s["threads"] for s in samples),
                    "last": samples[-1]["threads"]},
        "duplicate_filter": {"size": FILTER_SIZE, "max_entries": max(
            (s["filter_entries"] or 0) for s in samples), "last": samples[-1]["filter_entries"]},
        "samples": samples,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    r, f, t = result["rss_mib"], result["fds"], result["threads"]
    md = (f"# Soak ({result['command']}, {result['machine']})\n\n"
          f"{result['requests']:,} requests in {duration:.0f} s; INTERNAL/UNKNOWN: {forbidden}; "
          f"wrong answers: {wrong}; server alive at the end: {alive}\n\n"
          f"| | first | max | last |\n|---|---|---|---|\n"
          f"| RSS (MiB) | {r['first']:.0f} | {r['max']:.0f} | {r['last']:.0f} |\n"
          f"| open file descriptors | {f['first']} | {f['max']} | {f['last']} |\n"
          f"| threads | {t['first']} | {t['max']} | {t['last']} |\n"
          f"| duplicate-filter entries (size {FILTER_SIZE:,}) | {samples[0]['filter_entries']} "
          f"| {result['duplicate_filter']['max_entries']:.0f} "
          f"| {result['duplicate_filter']['last']} |\n\n"
          f"RSS drift after the first minute: {slope:+.1f} MiB per 10 minutes\n\n"
          f"codes: {result['codes']}\n")
    (RESULTS / "soak.md").write_text(md)
    print(md)
    refused = sum(n for (name, _), n in codes.items() if name == "feedback_refused")
    bounded = result["duplicate_filter"]["max_entries"] <= FILTER_SIZE
    return 0 if forbidden == 0 and alive and wrong == 0 and not refused and bounded else 1


if __name__ == "__main__":
    raise SystemExit(main())
