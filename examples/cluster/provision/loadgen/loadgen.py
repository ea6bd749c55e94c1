#!/usr/bin/env python3
"""Bounded load for the demo app, for use inside the guest (stdlib only).

    python3 loadgen.py --url http://127.0.0.1:8000 --requests 600 --duration 120 --error-ratio 0.3 --slow-ratio 0.2

Stops at whichever comes first: the request count or the duration. Prints requests by endpoint and status and
latency p50/p95. From the host, `provisioner load` does the same through the forwarded port.
"""

import argparse
import collections
import random
import sys
import threading
import time
import urllib.error
import urllib.request


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=600, help="total requests, at most")
    ap.add_argument("--duration", type=float, default=120, help="seconds, at most")
    ap.add_argument("--error-ratio", type=float, default=0.3, help="share sent to /error")
    ap.add_argument("--slow-ratio", type=float, default=0.2, help="share sent to /slow")
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    if not (0 <= a.error_ratio <= 1 and 0 <= a.slow_ratio <= 1 and a.error_ratio + a.slow_ratio <= 1):
        sys.exit("error: --error-ratio and --slow-ratio must be within 0..1 and sum to at most 1")

    deadline = time.monotonic() + a.duration
    lock = threading.Lock()
    issued = [0]
    counts = collections.Counter()
    latencies = []

    def pick():
        r = random.random()
        if r < a.error_ratio:
            return "/error"
        if r < a.error_ratio + a.slow_ratio:
            return "/slow"
        return "/"

    def worker():
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= a.requests:
                    return
                issued[0] += 1
            path = pick()
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(a.url.rstrip("/") + path, timeout=10) as r:
                    status = str(r.status)
            except urllib.error.HTTPError as e:
                status = str(e.code)
            except OSError as e:
                status = "error: " + type(e).__name__
            with lock:
                counts[(path, status)] += 1
                latencies.append(time.monotonic() - t0)

    threads = [threading.Thread(target=worker) for _ in range(max(1, a.concurrency))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    print(f"{len(latencies)} requests to {a.url}")
    for (path, status), n in sorted(counts.items()):
        print(f"  {path:8} {status:>6} {n}")
    print(f"latency p50 {pct(0.50) * 1000:.0f} ms, p95 {pct(0.95) * 1000:.0f} ms")
    return 0 if latencies else 1


if __name__ == "__main__":
    sys.exit(main())
