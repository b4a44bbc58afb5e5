"""The web service soaked: ``python -m benchmarks.serve --soak`` starts ``cxr-edge serve`` (``--workers 2
--max-upload-mb 2``, the default limits) and sends 5,000 requests from 16 clients on keep-alive connections,
a mix of good scans (the JPEGs of ``tests/data``), DICOMs of them, colour photos (refused), broken files
(truncated, random bytes, an HTML page) and oversize bodies (3 MB, sent with ``Expect: 100-continue`` as
curl does, so the server refuses them from their headers), while 4 slow clients upload scans a kilobyte every
0.25 s (2 to 18 s a request) for the whole run.

Every answer is checked: good scans, DICOMs and photos must get 200 with the record
``Classifier.classify_many`` gives the same bytes (what ``cxr-edge classify --json`` prints), broken files 422
with theirs, oversize bodies 413. A 503 with ``Retry-After`` (``--max-concurrency``) is documented: it is
counted and the request retried. Reports p50/p95/p99 latency per 500 requests (in completion order), errors,
and the server's resident memory (``VmRSS``) at the start, after the first 500 requests and at the end.
Writes ``benchmarks/results/soak.json`` and ``soak.md``.
"""
from __future__ import annotations

import http.client
import io
import json
import random
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import RESULTS, write_results
from benchmarks.serve_client import SCANS, multipart, start_server, stop_server

MIX = {"scan": 0.55, "dicom": 0.15, "photo": 0.10, "broken": 0.15, "oversize": 0.05}
OPTIONS = ("--workers", "2", "--max-upload-mb", "2")
OVERSIZE = 3 * 2**20


def bodies() -> dict[str, list[tuple[str, bytes]]]:
    """Kind -> [(file name, bytes)]."""
    from cxr_edge.dicom import gray_to_dicom

    scans = [(p.name, p.read_bytes()) for p in SCANS]
    dicoms = []
    for p in SCANS[:4]:
        g = np.asarray(Image.open(p).convert("L"), dtype=np.uint16)
        dicoms.append((p.stem + ".dcm", gray_to_dicom(g * 16, bits_stored=12, PatientName="Soak^Test")))
    photos = []
    rng = np.random.default_rng(0)
    for i in range(3):
        yy, xx = np.mgrid[0:300, 0:400]
        rgb = np.stack([xx * 255 // 400, yy * 255 // 300, 128 + 40 * i + 0 * xx], -1) + rng.integers(0, 30, (300, 400, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG")
        photos.append((f"photo{i}.jpg", buf.getvalue()))
    broken = [("truncated.jpeg", scans[0][1][: len(scans[0][1]) // 3]), ("random.jpg", rng.bytes(5000)),
              ("page.jpg", b"<!DOCTYPE html><html><body>404</body></html>"), ("header.jpeg", scans[1][1][:300])]
    return {"scan": scans, "dicom": dicoms, "photo": photos, "broken": broken,
            "oversize": [("oversize.jpeg", rng.bytes(OVERSIZE))]}


def expected(files: dict) -> dict[str, tuple[int, list]]:
    """File name -> (status, results) the server must answer."""
    from cxr_edge import Classifier
    from cxr_edge.serve import Upload

    clf = Classifier()
    out = {}
    for kind, items in files.items():
        if kind == "oversize":
            out.update({name: (413, None) for name, _ in items})
            continue
        for name, data in items:
            record = next(iter(clf.classify_many([Upload(data, name)]))).to_dict()
            out[name] = (422 if "error" in record else 200, [record])
    return out


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def oversize_request(host: str, port: int, size: int) -> int:
    """Headers only, with ``Expect: 100-continue``: the status the server answers before the body."""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"POST /v1/classify?name=oversize.jpeg HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                  f"application/octet-stream\r\nContent-Length: {size}\r\nExpect: 100-continue\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0


def slow_upload(host: str, port: int, name: str, data: bytes, piece: int = 1024, pause: float = 0.25) -> tuple:
    """One request whose body dribbles in; (status, results, seconds)."""
    body, ctype = multipart(name, data)
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
        for i in range(0, len(body), piece):
            s.sendall(body[i:i + piece])
            time.sleep(pause)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload).get("results"), time.perf_counter() - t0


def soak(requests: int = 5000, clients: int = 16, slow_clients: int = 4, seed: int = 0) -> dict:
    files = bodies()
    want = expected(files)
    r = random.Random(seed)
    kinds = list(MIX)
    plan = []
    for _ in range(requests):
        kind = r.choices(kinds, weights=[MIX[k] for k in kinds])[0]
        plan.append((kind, *r.choice(files[kind])))
    prepared = {name: multipart(name, data) for kind in files for name, data in files[kind] if kind != "oversize"}
    proc, url = start_server(*OPTIONS)
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    lock, done, results, slow_results = threading.Lock(), [0], [], []
    rss = {"start": rss_kib(proc.pid)}
    samples, stop = [], threading.Event()
    next_index = iter(range(requests))

    def monitor() -> None:
        t0 = time.perf_counter()
        while not stop.is_set():
            samples.append((round(time.perf_counter() - t0, 1), done[0], rss_kib(proc.pid)))
            if done[0] >= 500 and "after_500" not in rss:
                rss["after_500"] = rss_kib(proc.pid)
            stop.wait(0.25)

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            kind, name, data = plan[i]
            t0, busy, status, got, err = time.perf_counter(), 0, 0, None, ""
            while True:
                try:
                    if kind == "oversize":
                        status = oversize_request(host, port, len(data))
                    else:
                        body, ctype = prepared[name]
                        conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": ctype})
                        resp = conn.getresponse()
                        status, payload = resp.status, resp.read()
                        got = json.loads(payload).get("results") if status in (200, 422) else payload[:200]
                        if status == 503 and resp.getheader("Retry-After"):
                            busy += 1
                            time.sleep(float(resp.getheader("Retry-After")) / 10)
                            continue
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=60)
                    err = f"{type(exc).__name__}: {exc}"
                break
            dt = time.perf_counter() - t0
            ok = not err and (status, got if kind != "oversize" else None) == want[name]
            with lock:
                results.append((dt, kind, status, ok, busy, err or ("" if ok else f"{name}: {status} {str(got)[:150]}")))
                done[0] += 1
        conn.close()

    def slow_client(k: int) -> None:
        rs = random.Random(seed + 100 + k)
        while not stop.is_set():
            name, data = rs.choice(files["scan"])
            try:
                status, got, dt = slow_upload(host, port, name, data)
                slow_results.append((dt, (status, got) == want[name], status))
            except (OSError, ValueError, IndexError) as exc:
                slow_results.append((0.0, False, f"{type(exc).__name__}: {exc}"))

    try:
        for name, (_, _) in list(prepared.items())[:4]:  # warm-up: the model's first passes
            c = http.client.HTTPConnection(host, port, timeout=60)
            c.request("POST", "/v1/classify", body=prepared[name][0], headers={"Content-Type": prepared[name][1]})
            c.getresponse().read()
            c.close()
        rss["start"] = rss_kib(proc.pid)
        threads = [threading.Thread(target=monitor, daemon=True)]
        threads += [threading.Thread(target=slow_client, args=(k,), daemon=True) for k in range(slow_clients)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the slow clients are connected and dribbling before the load starts
        t0 = time.perf_counter()
        workers = [threading.Thread(target=client) for _ in range(clients)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        wall = time.perf_counter() - t0
        rss["end"] = rss_kib(proc.pid)
        stop.set()
        for t in threads[1:]:
            t.join(30)
    finally:
        stop.set()
        stop_server(proc)
    return summarise(results, slow_results, samples, rss, wall, requests, clients, slow_clients)


def _pct(values: list[float]) -> dict:
    a = np.array(values) * 1000
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)} if len(a) else {}


def summarise(results, slow_results, samples, rss, wall, requests, clients, slow_clients) -> dict:
    from benchmarks import machine

    windows = [{"requests": f"{i + 1}-{i + len(results[i:i + 500])}", **_pct([x[0] for x in results[i:i + 500]])}
               for i in range(0, len(results), 500)]
    status: dict = {}
    for x in results:
        status[str(x[2])] = status.get(str(x[2]), 0) + 1
    wrong = [x[5] for x in results if not x[3]]
    growth = (rss["end"] - rss["after_500"]) / rss["after_500"] if rss.get("after_500") else None
    lat = _pct([x[0] for x in results])
    return {
        "command": "python -m benchmarks.serve --soak", "server": "cxr-edge serve " + " ".join(OPTIONS),
        "requests": requests, "clients": clients, "slow_clients": slow_clients, "mix": MIX,
        "wall_s": round(wall, 1), "requests_per_s": round(requests / wall, 1), "status": status,
        "wrong": len(wrong), "wrong_examples": wrong[:5],
        "server_errors_5xx": sum(v for k, v in status.items() if k.startswith("5")),
        "busy_503_retried": sum(x[4] for x in results), "latency": lat, "latency_by_kind": {
            k: _pct([x[0] for x in results if x[1] == k]) for k in MIX},
        "latency_over_time": windows, "slow_requests": len(slow_results),
        "slow_correct": sum(1 for x in slow_results if x[1]),
        "slow_seconds_median": round(float(np.median([x[0] for x in slow_results])), 1) if slow_results else None,
        "rss_kib": rss, "rss_growth_after_500": round(growth, 3) if growth is not None else None,
        "rss_samples": samples[:: max(1, len(samples) // 60)],
        "targets": {"no wrong answers": not wrong,
                    "no 5xx but documented 503s": all(not k.startswith("5") or k == "503" for k in status),
                    "p99 under 1 s with slow clients connected": lat.get("p99_ms", 1e9) < 1000,
                    "RSS at the end within 20% of after 500": growth is not None and abs(growth) <= 0.2},
        "machine": machine.describe(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def markdown(rep: dict) -> str:
    lat, rss = rep["latency"], rep["rss_kib"]
    lines = ["# Web service soak", "",
             f"`{rep['command']}` against `{rep['server']}` on {rep['machine']['cpu']} "
             f"({rep['machine']['usable_cores']} cores, shared), {rep['date']}.", "",
             f"- {rep['requests']:,} requests from {rep['clients']} clients in {rep['wall_s']} s "
             f"({rep['requests_per_s']} requests/s), mix {rep['mix']}; status counts {rep['status']}",
             f"- wrong answers: {rep['wrong']}; 5xx: {rep['server_errors_5xx']} (503 busy, retried: "
             f"{rep['busy_503_retried']})",
             f"- latency p50 {lat['p50_ms']} ms, p95 {lat['p95_ms']} ms, p99 {lat['p99_ms']} ms, with "
             f"{rep['slow_clients']} slow clients uploading throughout ({rep['slow_requests']} slow requests, "
             f"{rep['slow_correct']} correct, median {rep['slow_seconds_median']} s each)",
             f"- server RSS: {rss['start'] / 1024:.0f} MiB at the start, {rss.get('after_500', 0) / 1024:.0f} MiB "
             f"after 500 requests, {rss['end'] / 1024:.0f} MiB at the end ({rep['rss_growth_after_500'] or 0:+.1%})", "",
             "| requests | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|"]
    lines += [f"| {w['requests']} | {w['p50_ms']} | {w['p95_ms']} | {w['p99_ms']} |" for w in rep["latency_over_time"]]
    lines += ["", "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in rep["targets"].items())]
    return "\n".join(lines) + "\n"


def main(requests: int = 5000, clients: int = 16, out: Path = RESULTS) -> int:
    rep = soak(requests, clients)
    write_results(out, "soak", rep, markdown(rep))
    return 0 if all(rep["targets"].values()) else 1
