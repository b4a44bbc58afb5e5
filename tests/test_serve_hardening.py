"""``cxr-edge serve`` against what a hostile or careless client on this host does (found by an audit): a request
that times out must keep its concurrency slot until its work ends, a page on another domain pointed at
127.0.0.1 (DNS rebinding) gets nothing, ``/local/`` stays closed when a token is required and is written once,
results are not cached, a client that disconnects mid-upload leaves no traceback in the log."""
from __future__ import annotations

import http.client
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi_offline", reason="needs the serve extra: pip install 'cxr-edge[serve]'")
pytest.importorskip("httpx2", reason="the test client needs httpx2")
from fastapi.testclient import TestClient  # noqa: E402

from cxr_edge.serve import ModelPool, create_app  # noqa: E402
from cxr_edge.serve_limits import host_of, is_loopback  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "chest_xray"
SCAN = DATA / "test" / "PNEUMONIA" / "person100_bacteria_477.jpeg"
PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return ModelPool.load(workers=1)


def ready(c: TestClient) -> None:
    end = time.monotonic() + 60
    while c.get("/healthz").status_code != 200:
        assert time.monotonic() < end
        time.sleep(0.05)


def in_progress(c: TestClient) -> int:
    return c.get("/healthz").json()["limits"]["in_progress"]


def post(c: TestClient):
    return c.post("/v1/classify", files={"file": (SCAN.name, SCAN.read_bytes())})


def test_a_timed_out_request_keeps_its_slot_until_its_work_ends(pool):
    # The model is held, so the classification waits; the request is answered 503 at the time limit, but its
    # work is still queued: it keeps the one slot (a new request is refused as busy) until that work is done.
    # Before, the slot was freed with the answer, and each timed-out request left work behind the limit.
    with TestClient(create_app(lambda: pool, max_concurrency=1, request_timeout=0.5)) as c:
        ready(c)
        held = pool.slot()
        held.__enter__()
        try:
            late = post(c)
            assert late.status_code == 503 and "time limit" in late.json()["detail"]
            assert in_progress(c) == 1
            busy = post(c)
            assert busy.status_code == 503 and "--max-concurrency 1" in busy.json()["detail"]
        finally:
            held.__exit__(None, None, None)
        end = time.monotonic() + 30
        while in_progress(c):  # the late work runs now, then frees the slot
            assert time.monotonic() < end
            time.sleep(0.02)
        ok = post(c)
        assert ok.status_code == 200 and ok.json()["results"][0]["status"] == "ok"
        assert ok.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("header, local", [("127.0.0.1:8000", True), ("localhost", True), ("[::1]:80", True),
                                           ("127.0.0.2", True), ("attacker.example:8000", False),
                                           ("127.0.0.1.attacker.example", False), ("", False),
                                           ("192.168.1.10:8000", False)])
def test_host_header(header, local):
    assert is_loopback(host_of(header)) is local


def test_a_loopback_server_answers_only_requests_naming_this_machine(pool):
    with TestClient(create_app(lambda: pool, local_only=True), base_url="http://127.0.0.1:8000") as c:
        ready(c)
        assert c.get("/v1/model").status_code == 200
        assert c.get("/v1/model", headers={"Host": "localhost:8000"}).status_code == 200
        rebound = c.get("/v1/model", headers={"Host": "attacker.example:8000"})
        assert rebound.status_code == 400 and "localhost only" in rebound.json()["detail"]
        assert c.post("/v1/classify", files={"file": (SCAN.name, SCAN.read_bytes())},
                      headers={"Host": "attacker.example"}).status_code == 400


def test_local_page_is_closed_with_a_token_and_written_once_without(pool, monkeypatch):
    import cxr_edge.webexport as webexport

    calls: list[Path] = []

    def slow_export(site: Path, bundle_root) -> Path:  # the real export copies ~19 MB; only its count matters
        calls.append(site)
        time.sleep(0.3)
        site.mkdir(parents=True)
        (site / "index.html").write_text("<!doctype html><title>page</title>")
        return site

    monkeypatch.setattr(webexport, "export_web", slow_export)
    with TestClient(create_app(lambda: pool, token="s3cret")) as c:
        ready(c)
        shut = c.get("/local/")
        assert shut.status_code == 404 and "token" in shut.json()["detail"] and not calls
    with TestClient(create_app(lambda: pool)) as c:
        ready(c)
        with ThreadPoolExecutor(6) as ex:
            pages = list(ex.map(lambda _: c.get("/local/"), range(6)))
        assert [p.status_code for p in pages] == [200] * 6 and len(calls) == 1
        assert calls[0].exists()
    assert not calls[0].exists()  # removed when the server stops


def test_a_failed_local_export_is_tried_once_and_names_no_server_path(pool, monkeypatch):
    import cxr_edge.webexport as webexport

    calls = []

    def failing(site, bundle_root):
        calls.append(site)
        raise webexport.WebExportError(f"bundle {bundle_root} has no onnx model")

    monkeypatch.setattr(webexport, "export_web", failing)
    with TestClient(create_app(lambda: pool)) as c:
        ready(c)
        answers = [c.get("/local/") for _ in range(3)]
    assert [a.status_code for a in answers] == [404] * 3 and len(calls) == 1
    assert all("/" not in a.json()["detail"] for a in answers), answers[0].json()
    assert not calls[0].parent.exists()


def test_a_client_that_disconnects_mid_upload_leaves_no_traceback(tmp_path):
    from benchmarks.serve_client import stop_server

    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cxr_edge", "serve", "--host", "127.0.0.1", "--port", "0"],
                                cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=log)
    try:
        end, port = time.monotonic() + 120, None
        while port is None:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", log_path.read_text())
            port = int(m.group(1)) if m else None
            assert proc.poll() is None and time.monotonic() < end, log_path.read_text()
            time.sleep(0.1)
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < end
            time.sleep(0.1)
        data = SCAN.read_bytes()
        for _ in range(3):  # headers and part of the body, then gone
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(f"POST /v1/classify?name=a.jpeg HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                      f"application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data[:1000])
            time.sleep(0.2)
            s.close()
        rebound = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        rebound.request("GET", "/v1/model", headers={"Host": "attacker.example"})
        assert rebound.getresponse().status == 400  # the real server binds loopback: local_only is on
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/classify?name=b.jpeg", body=data,
                     headers={"Content-Type": "application/octet-stream"})
        assert conn.getresponse().status == 200
        time.sleep(0.5)
    finally:
        stop_server(proc)
    text = log_path.read_text()
    assert "Traceback" not in text and "ClientDisconnect" not in text, text[-3000:]
