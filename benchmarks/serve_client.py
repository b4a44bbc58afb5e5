"""What the web service benchmarks share (``benchmarks/serve.py``, ``benchmarks/serve_soak.py``): the real scans
of ``tests/data``, ``cxr-edge serve`` started in its own process on a free loopback port and stopped, and a
multipart body for ``POST /v1/classify``."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
SCANS = sorted((PROJECT / "tests" / "data" / "chest_xray").rglob("*.jpeg"))


def start_server(*options: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``python -m cxr_edge serve --port 0 OPTIONS`` on 127.0.0.1; returns the process and its URL once
    ``/healthz`` says ready. Its log (stderr) is drained in a thread so that it never blocks."""
    proc = subprocess.Popen([sys.executable, "-m", "cxr_edge", "serve", "--host", "127.0.0.1", "--port", "0",
                             *options], cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found = threading.Event()
    lines: list[str] = []
    url: list[str] = []

    def drain() -> None:
        for line in proc.stderr:
            if len(lines) < 200:
                lines.append(line)
            m = re.search(r"listening on (http://\S+/)", line)
            if m and not url:
                url.append(m.group(1))
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    end = time.monotonic() + timeout
    try:
        found.wait(timeout)
        if not url:
            raise RuntimeError(f"cxr-edge serve did not start: {''.join(lines)[-500:]}")
        while True:
            try:
                with urllib.request.urlopen(url[0] + "healthz", timeout=5) as r:
                    if json.load(r)["status"] == "ready":
                        return proc, url[0]
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"cxr-edge serve did not get ready: {''.join(lines)[-500:]}")
            time.sleep(0.1)
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
