"""In-browser classification (``cxr-edge export-web``) against the Python runtime, on the 624 official test
scans: per-scan time in headless Chromium (onnxruntime-web, WebAssembly, one thread; file to record: decode,
preprocessing, gate, model, heatmap) beside ``Classifier.classify`` (one thread, gate on), and parity: the
largest probability difference and label agreement against the Python runtime on the same ONNX model, and
against the default LiteRT engine.

Targets (issue 35): browser per-scan time at most 4x the Python runtime's; max |dp| <= 0.02 and identical
labels on >= 99.5% of the scans (same model, ONNX). Run on its own (minutes; Debian's chromium and
Playwright needed): ``python -m benchmarks.browser [--limit N]``, writing ``benchmarks/results/browser.json``
and ``.md``."""
from __future__ import annotations

import argparse
import functools
import http.server
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.common import add_out, write_results

CHROMIUM = "/usr/bin/chromium"
MAX_RATIO, MAX_DP, MIN_AGREE = 4.0, 0.02, 0.995


@contextmanager
def static_server(root: Path):
    """``root`` on a loopback static server (Python's http.server): yields its URL."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()


def run_page(url: str, files: list[Path], chromium: str = CHROMIUM, timeout: float = 120.0) -> tuple[list, list]:
    """Open the page at ``url`` in headless Chromium (DNS cut but for 127.0.0.1), give it ``files``, wait for
    one record each: (records, URLs of requests that left the page's origin)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        page = browser.new_page()
        outside: list = []
        page.on("request", lambda r: None if r.url.startswith((url, "data:")) else outside.append(r.url))
        page.goto(url)
        page.wait_for_function("() => window.cxr !== undefined")  # a function: the page's CSP forbids eval
        page.evaluate("() => window.cxr.ready")
        page.set_input_files("#files", [str(f) for f in files])
        end = time.monotonic() + timeout
        while page.evaluate("() => window.cxr.results.length") < len(files):
            if time.monotonic() > end:
                raise TimeoutError(f"the page classified {page.evaluate('() => window.cxr.results.length')} of "
                                   f"{len(files)} files in {timeout:.0f} s")
            time.sleep(0.2)
        records = page.evaluate("() => window.cxr.results.map(({heatmap, ...r}) => ({...r, heatmap: !!heatmap}))")
        browser.close()
    return records, outside


def python_times(files: list[Path], backend: str) -> tuple[list, list]:
    """(records, seconds) of ``Classifier.classify`` per file, one thread, after one warm-up."""
    from cxr_edge import Classifier

    clf = Classifier(backend=backend, threads=1)
    clf.classify(files[0])
    recs, secs = [], []
    for f in files:
        t0 = time.perf_counter()
        r = clf.classify(f)
        secs.append(time.perf_counter() - t0)
        recs.append(r.to_dict())
    return recs, secs


def parity(got: list, want: list) -> dict:
    ok = [(g, w) for g, w in zip(got, want) if g.get("status") == "ok" and w.get("status") == "ok"]
    dp = [max(abs(g["probabilities"][k] - v) for k, v in w["probabilities"].items()) for g, w in ok]
    same = sum(g.get("status") == w.get("status", "error") and g.get("label") == w.get("label") for g, w in zip(got, want))
    return {"compared": len(ok), "max_abs_dp": max(dp, default=float("nan")), "mean_max_abs_dp": float(np.mean(dp)),
            "over_0.02": int(sum(d > MAX_DP for d in dp)), "same_outcome": same, "agreement": same / len(want)}


def measure(files: list[Path], chromium: str = CHROMIUM) -> dict:
    from benchmarks.machine import describe
    from cxr_edge.webexport import export_web

    onnx_recs, onnx_s = python_times(files, "onnx")
    with tempfile.TemporaryDirectory() as tmp, static_server(export_web(Path(tmp) / "site")) as url:
        got, outside = run_page(url, files, chromium, timeout=60 + 2.0 * len(files))
    onnx_s += python_times(files, "onnx")[1]  # before and after the browser: drift hits both sides
    lite_recs, lite_s = python_times(files, "tflite")
    browser_ms = [g["ms"] for g in got[1:]]  # the first includes the WASM compile's warm-up
    py_ms = statistics.median(onnx_s) * 1000
    out = {"machine": describe(), "scans": len(files), "outside_requests": outside,
           "browser_ms": {"median": statistics.median(browser_ms), "p95": float(np.percentile(browser_ms, 95))},
           "python_onnx_ms": {"median": py_ms, "p95": float(np.percentile(onnx_s, 95) * 1000)},
           "python_tflite_ms": {"median": statistics.median(lite_s) * 1000},
           "ratio": statistics.median(browser_ms) / py_ms,
           "parity_vs_python_onnx": parity(got, onnx_recs), "parity_vs_python_tflite": parity(got, lite_recs),
           "statuses": {s: sum(g["status"] == s for g in got) for s in ("ok", "rejected", "error")}}
    p = out["parity_vs_python_onnx"]
    out["targets"] = [
        {"target": f"browser per-scan time at most {MAX_RATIO}x the Python runtime (1 thread)",
         "measured": f"{out['ratio']:.2f}x ({out['browser_ms']['median']:.1f} ms vs {py_ms:.1f} ms, median)",
         "met": out["ratio"] <= MAX_RATIO},
        {"target": f"max abs dp <= {MAX_DP} and identical labels on >= {MIN_AGREE:.1%} of the scans (vs the Python runtime)",
         "measured": f"max abs dp {p['max_abs_dp']:.6f}, same outcome {p['same_outcome']}/{len(files)}",
         "met": p["max_abs_dp"] <= MAX_DP and p["agreement"] >= MIN_AGREE}]
    return out


def markdown(r: dict) -> str:
    lines = ["# In-browser classification (`cxr-edge export-web`)", "",
             f"Machine: {r['machine']['cpu']} ({r['machine']['usable_cores']} cores, shared). {r['scans']} official "
             "test scans; headless Chromium (Debian), onnxruntime-web WASM, 1 thread; Python: `Classifier.classify`, "
             "1 thread, gate on. Requests off the page's origin: "
             f"{len(r['outside_requests'])}.", "",
             "| | median ms / scan | p95 |", "|---|---:|---:|",
             f"| browser (file to record) | {r['browser_ms']['median']:.1f} | {r['browser_ms']['p95']:.1f} |",
             f"| Python, ONNX Runtime | {r['python_onnx_ms']['median']:.1f} | {r['python_onnx_ms']['p95']:.1f} |",
             f"| Python, LiteRT (default) | {r['python_tflite_ms']['median']:.1f} | |", "",
             "| parity of the browser's records | vs Python ONNX (same model) | vs Python LiteRT |", "|---|---:|---:|"]
    a, b = r["parity_vs_python_onnx"], r["parity_vs_python_tflite"]
    for key, fmt in (("max_abs_dp", "{:.6f}"), ("over_0.02", "{}"), ("same_outcome", "{}"), ("agreement", "{:.4f}")):
        lines.append(f"| {key} | {fmt.format(a[key])} | {fmt.format(b[key])} |")
    lines += ["", f"Outcomes in the browser: {r['statuses']}.", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in r["targets"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.browser", description=__doc__)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/chest_xray")
    ap.add_argument("--limit", type=int, default=0, help="only the first N test scans")
    ap.add_argument("--chromium", default=CHROMIUM)
    add_out(ap)
    a = ap.parse_args(argv)
    files = sorted((a.data / "test").rglob("*.jpeg"))[: a.limit or None]
    r = measure(files, a.chromium)
    write_results(a.out, "browser", r, markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
