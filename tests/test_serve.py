"""``cxr-edge serve``: the REST API through Starlette's test client, with the embedded default model.

Every answer is compared with what ``cxr-edge classify --json`` prints for the same file, so the service
cannot drift from the one inference path."""
from __future__ import annotations

import base64
import io
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi_offline", reason="needs the serve extra: pip install 'cxr-edge[serve]'")
pytest.importorskip("httpx2", reason="the test client needs httpx2")
from fastapi.testclient import TestClient  # noqa: E402

from cxr_edge.bundle import load_bundle  # noqa: E402
from cxr_edge.cli import cli  # noqa: E402
from cxr_edge.labels import CLASS_NAMES  # noqa: E402
from cxr_edge.serve import ModelPool, create_app  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "chest_xray"
SCANS = sorted(DATA.rglob("*.jpeg"))
SCAN = DATA / "test" / "PNEUMONIA" / "person100_bacteria_477.jpeg"


def wait_ready(client: TestClient, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = client.get("/healthz")
        if r.status_code == 200:
            return r.json()
        assert r.json()["status"] == "loading", r.json()
        time.sleep(0.05)
    raise AssertionError("the model did not load")


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    return ModelPool.load(workers=2)  # the embedded default bundle, loaded once for this module


def make_client(pool: ModelPool, **kw) -> TestClient:
    return TestClient(create_app(lambda: pool, **kw))


@pytest.fixture(scope="module")
def client(pool):
    with make_client(pool) as c:
        wait_ready(c)
        yield c


def cli_records(paths: list[Path]) -> list[dict]:
    """What ``cxr-edge classify --json`` prints for these files, with ``path`` cut to the file name."""
    res = CliRunner().invoke(cli, ["classify", "--json", *map(str, paths)])
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == len(paths), res.output
    return [{**row, "path": Path(row["path"]).name} for row in rows]


def dicom_bytes(pixels: np.ndarray, **extra) -> bytes:
    pytest.importorskip("pydicom")
    from cxr_edge.dicom import gray_to_dicom

    return gray_to_dicom(pixels.astype(np.uint16) * 16, bits_stored=12, PatientName="Test^Phantom", **extra)


def colour_photo() -> bytes:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:400]
    rgb = np.stack([xx * 255 // 400, yy * 255 // 300, 128 + 0 * xx], -1) + rng.integers(0, 30, (300, 400, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG")
    return buf.getvalue()


def test_healthz_says_ready_only_after_the_model_loaded(pool):
    release = threading.Event()

    def slow_loader():
        release.wait(10)
        return pool

    with TestClient(create_app(slow_loader)) as c:
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        busy = c.post("/v1/classify", files={"file": ("a.jpeg", SCAN.read_bytes())})
        assert busy.status_code == 503 and "loading" in busy.json()["detail"]
        release.set()
        ready = wait_ready(c)
        assert ready["model"]["name"] == load_bundle(None).name and ready["model"]["heatmaps"] is True
        assert c.post("/v1/classify", files={"file": ("a.jpeg", SCAN.read_bytes())}).status_code == 200


def test_a_failed_model_load_is_reported(tmp_path):
    from cxr_edge.classifier import Classifier

    with TestClient(create_app(lambda: Classifier(model=tmp_path))) as c:
        for _ in range(200):
            r = c.get("/healthz")
            if r.json()["status"] != "loading":
                break
            time.sleep(0.02)
        assert r.status_code == 503 and r.json()["status"] == "failed" and str(tmp_path) in r.json()["error"]
        assert c.get("/v1/model").status_code == 503


def test_scans_answer_the_cli_records(client):
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in SCANS[:4]]
    files[0] = ("file", ("C:\\scans\\" + SCANS[0].name, SCANS[0].read_bytes(), "image/jpeg"))  # a client path
    r = client.post("/v1/classify", files=files)
    assert r.status_code == 200
    assert r.json()["results"] == cli_records(SCANS[:4])
    raw = client.post("/v1/classify", params={"name": SCAN.name}, content=SCAN.read_bytes(),
                      headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200 and raw.json()["results"] == cli_records([SCAN])


def test_heatmap_on_request(client):
    r = client.post("/v1/classify", params={"heatmap": "true"}, files={"file": (SCAN.name, SCAN.read_bytes())})
    record = r.json()["results"][0]
    head, data = record.pop("heatmap").split(",", 1)
    assert head == "data:image/png;base64" and record == cli_records([SCAN])[0]
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert img.format == "PNG" and img.mode == "RGB" and max(img.size) <= 512
    with Image.open(SCAN) as scan:  # the overlay keeps the scan's aspect ratio and adds colour to a gray scan
        assert abs(img.size[0] / img.size[1] - scan.size[0] / scan.size[1]) < 0.01
    rgb = np.asarray(img, np.int16)
    assert (rgb[..., 0] - rgb[..., 2]).max() > 60
    assert "heatmap" not in client.post("/v1/classify", files={"file": ("a", SCAN.read_bytes())}).json()["results"][0]
    png = client.post("/v1/heatmap", content=SCAN.read_bytes())
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-label"] == record["label"] and png.content == base64.b64decode(data)


def test_dicom(client, tmp_path):
    with Image.open(SCAN) as img:
        pixels = np.asarray(img.convert("L"))
    data = dicom_bytes(pixels)
    (tmp_path / "scan.dcm").write_bytes(data)
    r = client.post("/v1/classify", files={"file": ("scan.dcm", data, "application/dicom")})
    assert r.status_code == 200
    record = r.json()["results"][0]
    assert record == cli_records([tmp_path / "scan.dcm"])[0] and record["label"] in CLASS_NAMES
    jpeg = cli_records([SCAN])[0]
    assert record["label"] == jpeg["label"]
    assert all(abs(record["probabilities"][c] - jpeg["probabilities"][c]) < 0.05 for c in CLASS_NAMES)


def test_colour_photo_is_rejected_not_labelled(client):
    assert "ood" in load_bundle(None).card, "the default bundle ships a gate"
    r = client.post("/v1/classify", files={"file": ("holiday.jpg", colour_photo(), "image/jpeg")})
    assert r.status_code == 200
    (record,) = r.json()["results"]
    assert record["status"] == "rejected" and record["reason"] and "label" not in record
    assert client.post("/v1/heatmap", content=colour_photo()).status_code == 422


def test_bad_files_get_a_one_line_reason_and_the_server_keeps_serving(client, monkeypatch):
    scan = SCAN.read_bytes()
    cases = {"notes.txt": b"this is not an image\n", "cut.jpeg": scan[: len(scan) // 3], "empty.png": b"\x89PNG"}
    for name, data in cases.items():
        r = client.post("/v1/classify", files={"file": (name, data)})
        assert r.status_code == 422, name
        detail = r.json()["detail"]
        assert detail.startswith(f"{name}: ") and "\n" not in detail and "Traceback" not in detail
        assert r.json()["results"] == [{"path": name, "error": detail[len(name) + 2:]}]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # the scan becomes a decompression bomb
    bomb = client.post("/v1/classify", files={"file": ("bomb.jpeg", scan)})
    assert bomb.status_code == 422 and "too large" in bomb.json()["detail"]
    monkeypatch.undo()
    mixed = client.post("/v1/classify", files=[("file", ("cut.jpeg", cases["cut.jpeg"])), ("file", (SCAN.name, scan))])
    assert mixed.status_code == 200
    bad, good = mixed.json()["results"]
    assert "error" in bad and good == cli_records([SCAN])[0]
    for bad_request in ({"content": b""}, {"files": {"other": ("a.jpeg", scan)}},
                        {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data"}}):
        r = client.post("/v1/classify", **bad_request)
        assert r.status_code == 400 and "\n" not in r.json()["detail"], bad_request


def test_oversize_upload_is_413(pool):
    scan = SCAN.read_bytes()
    limit = len(scan) + 1000
    with make_client(pool, max_upload=limit) as c:
        wait_ready(c)
        big = scan + b"\0" * 2000
        assert c.post("/v1/classify", content=big).status_code == 413
        r = c.post("/v1/classify", files={"file": ("big.jpeg", big)})
        assert r.status_code == 413 and str(limit) in r.json()["detail"]
        chunked = c.post("/v1/classify", content=iter([scan, b"\0" * 2000]))  # no Content-Length
        assert chunked.status_code == 413
        assert c.post("/v1/classify", content=scan).status_code == 200


def test_uploads_are_never_written_to_disk(client, monkeypatch):
    def no_disk(self):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", no_disk)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    big = SCAN.read_bytes() + b"\0" * (3 * 2**20)  # trailing bytes after the JPEG's end: still decodable
    r = client.post("/v1/classify", files={"file": (SCAN.name, big)})
    assert r.status_code == 200 and r.json()["results"] == cli_records([SCAN])


def test_token(pool):
    with make_client(pool, token="s3cret") as c:
        assert wait_ready(c)["auth"] is True  # /healthz and the page stay public; /v1 needs the token
        assert c.get("/").status_code == 200
        files = {"file": (SCAN.name, SCAN.read_bytes())}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = c.post("/v1/classify", files=files, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert c.get("/v1/model", headers=headers).status_code == 401
        ok = c.post("/v1/classify", files=files, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["results"] == cli_records([SCAN])


def test_model_card_openapi_docs_and_page(client):
    assert client.get("/v1/model").json() == load_bundle(None).card
    schema = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/model", "/v1/heatmap", "/healthz"} <= set(schema["paths"])
    body = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["type"] == "array"
    docs = client.get("/docs").text
    page = client.get("/").text
    assert "Not a medical device" in page and "Content-Security-Policy" in client.get("/").headers
    for html in (docs, page):  # every script and stylesheet is served here, none from a CDN
        refs = [part.split('"')[1] for part in html.split("src=")[1:] + html.split("href=")[1:]]
        local = [ref for ref in refs if not ref.startswith(("data:", "#"))]
        assert local and all(ref.startswith("/") for ref in local), local
        for ref in local:
            assert client.get(ref).status_code == 200, ref


def test_concurrent_requests_do_not_mix_results(client):
    files = SCANS[:6]
    expected = {r["path"]: r for r in cli_records(files)}

    def one(i: int) -> tuple[str, dict]:
        path = files[i % len(files)]
        r = client.post("/v1/classify", files={"file": (path.name, path.read_bytes())})
        return path.name, r.json()["results"][0]

    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(one, range(24)))
    assert all(record == expected[name] for name, record in answers)


def test_cli_serve_guards(monkeypatch, tmp_path):
    runner = CliRunner()
    public = runner.invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert public.exit_code == 2 and "--token" in public.output and "--insecure-no-auth" in public.output
    no_model = runner.invoke(cli, ["serve", "--port", "0", "--model", str(tmp_path)])
    assert no_model.exit_code == 2 and "cannot load the model" in no_model.output
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = runner.invoke(cli, ["serve", "--port", str(port)])
    assert busy.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.output
    assert len(busy.output.strip().splitlines()) == 1
    monkeypatch.delitem(sys.modules, "cxr_edge.serve")
    monkeypatch.setitem(sys.modules, "fastapi_offline", None)  # as if the extra were not installed
    missing = runner.invoke(cli, ["serve"])
    assert missing.exit_code == 2 and 'pip install "cxr-edge[serve]"' in missing.output
    assert len(missing.output.strip().splitlines()) == 1


# ------------------------------------------------------------------- limits (cxr_edge/serve_limits.py)


def test_past_max_concurrency_is_503_at_once_not_a_queue(pool):
    """Two requests in progress (waiting for the two model slots the test holds) fill --max-concurrency 2: a
    third is refused at once with 503 and Retry-After; the two then answer the CLI's records."""
    expected = cli_records([SCAN])
    with make_client(pool, max_concurrency=2, request_timeout=60) as c:
        wait_ready(c)
        held = [pool.slot() for _ in range(pool.size)]
        for h in held:
            h.__enter__()
        try:
            with ThreadPoolExecutor(2) as ex:
                waiting = [ex.submit(c.post, "/v1/classify", files={"file": (SCAN.name, SCAN.read_bytes())})
                           for _ in range(2)]
                end = time.monotonic() + 20
                while c.get("/healthz").json()["limits"]["in_progress"] < 2:
                    assert time.monotonic() < end
                    time.sleep(0.02)
                t0 = time.monotonic()
                busy = c.post("/v1/classify", files={"file": (SCAN.name, SCAN.read_bytes())})
                assert time.monotonic() - t0 < 2 and not any(w.done() for w in waiting)
                assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
                assert "--max-concurrency 2" in busy.json()["detail"]
                assert c.get("/healthz").status_code == 200  # GET is never limited
                for h in held:
                    h.__exit__(None, None, None)
                held = []
                answers = [w.result(timeout=30) for w in waiting]
        finally:
            for h in held:
                h.__exit__(None, None, None)
        assert [a.status_code for a in answers] == [200, 200]
        assert all(a.json()["results"] == expected for a in answers)
        limits = c.get("/healthz").json()["limits"]
        assert limits["refused_busy"] == 1 and limits["in_progress"] == 0
        assert limits["max_pixels"] == Image.MAX_IMAGE_PIXELS and limits["request_timeout_s"] == 60


def test_an_answer_past_the_time_limit_is_503(pool):
    with make_client(pool, request_timeout=0.5) as c:
        wait_ready(c)
        held = [pool.slot() for _ in range(pool.size)]
        for h in held:
            h.__enter__()
        try:
            t0 = time.monotonic()
            late = c.post("/v1/classify", files={"file": (SCAN.name, SCAN.read_bytes())})
            assert time.monotonic() - t0 < 5
        finally:
            for h in held:
                h.__exit__(None, None, None)
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert "time limit (0.5 s" in late.json()["detail"]
        ok = c.post("/v1/classify", files={"file": (SCAN.name, SCAN.read_bytes())})
        assert ok.status_code == 200 and ok.json()["results"] == cli_records([SCAN])


def test_a_dribbling_upload_gets_408_and_others_are_served_meanwhile():
    """A real server (``--request-timeout 2``): a client that sends its headers and then a byte a second is
    cut off with 408 after 2 s, while a normal request made meanwhile is answered at once."""
    import http.client
    import socket

    from benchmarks.serve import multipart, start_server, stop_server

    proc, url = start_server("--request-timeout", "2")
    host, port = url.split("//")[1].rstrip("/").rsplit(":", 1)
    slow = None
    try:
        slow = socket.create_connection((host, int(port)), timeout=10)
        body, ctype = multipart(SCAN.name, SCAN.read_bytes())
        slow.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        t0 = time.monotonic()
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": ctype})
        fast = conn.getresponse()
        assert fast.status == 200 and time.monotonic() - t0 < 3
        assert json.loads(fast.read())["results"] == cli_records([SCAN])
        answer, sent = b"", 100
        while b"\r\n\r\n" not in answer and time.monotonic() - t0 < 8:
            try:
                slow.sendall(body[sent:sent + 1])
                sent += 1
                slow.settimeout(1.0)
                answer += slow.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 1.5 < time.monotonic() - t0 < 6
    finally:
        if slow is not None:
            slow.close()
        stop_server(proc)
