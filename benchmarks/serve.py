"""The web service under load: ``cxr-edge serve`` in its own process on 127.0.0.1 (a free port), 8 client
threads with keep-alive connections send 400 multipart ``POST /v1/classify`` requests in all (40 with
``quick``), each one of the real scans in ``tests/data``; every answer is checked against
``Classifier.classify(...).to_dict()`` of the same file (what ``cxr-edge classify --json`` prints).
Reports p50/p95/max latency per request and requests/s over the whole run.

    python -m benchmarks.serve [--quick] [--requests N] [--clients N] [-- extra serve options]
    python -m benchmarks.serve --soak [--requests 5000] [--clients 16]   (benchmarks/serve_soak.py)
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from benchmarks.serve_client import PROJECT, SCANS, multipart, start_server, stop_server  # noqa: F401 (re-exported)

CLIENTS = 8
REQUESTS = 400
QUICK_REQUESTS = 40


def available() -> bool:
    """Whether the serve extra is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("fastapi", "fastapi_offline", "uvicorn", "python_multipart"))


def expected_records(model=None) -> dict[str, dict]:
    from cxr_edge import Classifier

    clf = Classifier(model=model)
    return {p.name: {**clf.classify(p).to_dict(), "path": p.name} for p in SCANS}


def run(quick: bool = False, requests: int | None = None, clients: int = CLIENTS, model=None,
        serve_options: tuple[str, ...] = ()) -> dict:
    """The load test against a fresh server (``model``: a bundle folder, default the embedded one)."""
    n = requests or (QUICK_REQUESTS if quick else REQUESTS)
    expected = expected_records(model)
    if model is not None:
        serve_options = ("--model", str(model), *serve_options)
    bodies = [(p.name, *multipart(p.name, p.read_bytes())) for p in SCANS]
    proc, url = start_server(*serve_options)
    host = urllib.parse.urlsplit(url)
    try:
        local = threading.local()

        def one(i: int) -> tuple[float, bool, str]:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
            name, body, ctype = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                local.conn = None
                return time.perf_counter() - t0, False, f"{name}: {type(exc).__name__}: {exc}"
            dt = time.perf_counter() - t0
            try:
                got = json.loads(payload)["results"]
            except (ValueError, KeyError):
                return dt, False, f"{name}: HTTP {resp.status} {payload[:200]!r}"
            ok = resp.status == 200 and got == [expected[name]]
            return dt, ok, "" if ok else f"{name}: HTTP {resp.status} {str(got)[:200]}"

        with ThreadPoolExecutor(clients) as ex:  # warm up every connection and the server
            list(ex.map(one, range(clients)))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as ex:
            answers = list(ex.map(one, range(n)))
        wall = time.perf_counter() - t0
    finally:
        stop_server(proc)
    lat = np.array([a[0] for a in answers]) * 1000
    wrong = [a[2] for a in answers if not a[1]]
    return {"command": "cxr-edge serve --host 127.0.0.1 --port 0 " + " ".join(serve_options),
            "endpoint": "POST /v1/classify (multipart, one scan per request, no heatmap)",
            "clients": clients, "requests": n, "correct": n - len(wrong), "wrong": wrong[:5],
            "scans": [p.name for p in SCANS], "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1), "max_ms": round(float(lat.max()), 1),
            "requests_per_s": round(n / wall, 1), "wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--soak", action="store_true", help="the soak: a mix of inputs, slow clients, memory")
    ap.add_argument("serve_options", nargs="*", help="extra cxr-edge serve options (after --)")
    args = ap.parse_args(argv)
    if args.soak:
        from benchmarks import serve_soak

        return serve_soak.main(args.requests or 5000, args.clients if args.clients != CLIENTS else 16)
    res = run(args.quick, args.requests, args.clients, serve_options=tuple(args.serve_options))
    print(json.dumps(res, indent=2))
    return 0 if res["correct"] == res["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
