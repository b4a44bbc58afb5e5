"""The web page in a real browser: ``cxr-edge serve`` in a subprocess on 127.0.0.1, headless Chromium (the
Debian package, driven by Playwright) drops a scan, a colour photo and a broken file on the page and sees the
label with its heatmap, the rejection and the error, then downloads the CSV.

The screenshot goes to pytest's temporary folder; ``CXR_EDGE_SCREENSHOT=docs/serve.png`` writes it there
instead (that is how the README's picture is made). Skips with one line where Chromium or Playwright is
missing (``.ci/run`` installs Chromium with apt-get)."""
from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi_offline", reason="needs the serve extra: pip install 'cxr-edge[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")

ROOT = Path(__file__).resolve().parent.parent
SCAN = ROOT / "tests" / "data" / "chest_xray" / "test" / "PNEUMONIA" / "person100_bacteria_477.jpeg"
CHROMIUM = next((p for p in (os.environ.get("CXR_EDGE_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                             shutil.which("chromium")) if p and Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium) for the browser test")


@pytest.fixture(scope="module")
def server():
    """``python -m cxr_edge serve --port 0`` on 127.0.0.1; yields its URL once /healthz says ready."""
    from benchmarks.serve import start_server, stop_server

    proc, url = start_server()
    try:
        yield url
    finally:
        stop_server(proc)


def test_page_in_chromium(server, tmp_path):
    photo = tmp_path / "holiday-photo.jpg"
    yy, xx = np.mgrid[0:300, 0:400]
    Image.fromarray(np.stack([xx * 255 // 400, yy * 255 // 300, 150 + 0 * xx], -1).astype(np.uint8)).save(photo)
    broken = tmp_path / "truncated-scan.jpeg"
    broken.write_bytes(SCAN.read_bytes()[:5000])

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 900}, accept_downloads=True)
            offsite = []
            page.on("request", lambda req: req.url.startswith(server) or req.url.startswith(("data:", "blob:"))
                    or offsite.append(req.url))
            page.goto(server)
            notice = page.locator("#notice")
            assert notice.is_visible() and "Not a medical device" in notice.inner_text()
            page.locator("#model.ready").wait_for(timeout=20_000)
            page.set_input_files("#files", [str(SCAN), str(photo), str(broken)])

            ok = page.locator(".card.ok")
            ok.locator("img.heatmap").wait_for(timeout=30_000)
            label = ok.locator(".label").inner_text().strip().lower()
            assert label in ("normal", "bacterial", "viral")
            shown = page.evaluate("() => { const i = document.querySelector('.card.ok img.heatmap');"
                                  " return [i.complete, i.naturalWidth, i.naturalHeight]; }")
            assert shown[0] and shown[1] > 100 and shown[2] > 100, shown
            assert ok.locator(".bar-row").count() == 3
            rejected = page.locator(".card.rejected")
            rejected.wait_for(timeout=30_000)
            assert "Rejected" in rejected.inner_text() and "colour photo" in rejected.inner_text()
            error = page.locator(".card.error")
            error.wait_for(timeout=30_000)
            assert "Unreadable" in error.inner_text() and "truncated-scan.jpeg" in error.inner_text()
            assert page.locator("#results tbody tr").count() == 3

            with page.expect_download() as dl:
                page.click("#csv")
            rows = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
            by_name = {r["path"]: r for r in rows}
            assert set(by_name) == {SCAN.name, photo.name, broken.name}
            assert by_name[SCAN.name]["label"] == label and by_name[SCAN.name]["status"] == "ok"
            assert by_name[photo.name]["status"] == "rejected" and by_name[broken.name]["status"] == "error"
            assert float(by_name[SCAN.name][label]) == max(float(by_name[SCAN.name][c])
                                                           for c in ("normal", "bacterial", "viral"))
            assert offsite == [], offsite

            shot = Path(os.environ.get("CXR_EDGE_SCREENSHOT") or tmp_path / "serve.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            with Image.open(shot) as img:  # 256 colours: a small file for the README
                img.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(shot, optimize=True)

            page.goto(server + "docs")  # the OpenAPI docs page renders from local assets too
            page.locator(".opblock-summary-path", has_text="/v1/classify").first.wait_for(timeout=20_000)
            assert offsite == [], offsite
        finally:
            browser.close()


def test_page_asks_a_busy_server_again(server):
    """A 503 (past --max-concurrency, with Retry-After) is not the file's fault: the page asks again and shows
    the label; a server error is shown as "Not classified", not as an unreadable file."""
    calls = []

    def busy_once(route):
        calls.append(route.request.url)
        if len(calls) == 1:
            route.fulfill(status=503, headers={"Retry-After": "1", "content-type": "application/json"},
                          body='{"detail": "busy: 1 requests in progress; retry shortly"}')
        else:
            route.continue_()

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.route("**/v1/classify*", busy_once)
            page.goto(server)
            page.locator("#model.ready").wait_for(timeout=20_000)
            page.set_input_files("#files", [str(SCAN)])
            page.locator(".card.ok").wait_for(timeout=30_000)
            assert len(calls) == 2 and page.locator(".card.error").count() == 0
            page.unroute("**/v1/classify*")
            page.route("**/v1/classify*", lambda route: route.fulfill(
                status=500, headers={"content-type": "application/json"}, body='{"detail": "internal error"}'))
            page.set_input_files("#files", [str(SCAN)])
            error = page.locator(".card.error")
            error.wait_for(timeout=30_000)
            assert "Not classified" in error.inner_text() and "Unreadable" not in error.inner_text()
        finally:
            browser.close()
