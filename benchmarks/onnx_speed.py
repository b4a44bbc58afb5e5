"""ONNX Runtime int8 against LiteRT int8 and ONNX Runtime float32 (issue 35): inference alone, batch 1, one
thread, the same preprocessed scans, the three engines alternating scan by scan after a warm-up.

Target: ONNX Runtime int8 at most 1.3x LiteRT int8 and faster than ONNX Runtime float32. The float32 graph
is the bundle's float ONNX file where one is given (``--float``), else the shipped QDQ graph with its int8
weights as float (``export.onnx.float_from_qdq``: the same network and the same arithmetic cost as the run's
float export, which lives in runs/, out of git).

On an x86 CPU without VNNI the runtime runs int8 graphs unfused (``cxr_edge.cpu``: the fused u8 x s8 kernels
saturate there); the fused kernels are then measured too, as a row of their own, to show what they would give.

``python -m benchmarks.onnx_speed [--bundle DIR] [--scans N] [--repeats N]`` writes
``benchmarks/results/onnx_speed.json`` and ``.md``; ``python -m benchmarks`` runs it too (a target row)."""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import add_out, write_results
from benchmarks.machine import describe
from benchmarks.timing import alternate
from cxr_edge.bundle import DEFAULT_BUNDLE, load_bundle
from cxr_edge.cpu import onnx_int8_fused
from cxr_edge.engines import open_engine
from cxr_edge.preprocess import preprocess

MAX_RATIO = 1.3
ROWS = ("LiteRT int8", "ONNX Runtime int8", "ONNX Runtime float32")
FUSED = "ONNX Runtime int8, fused kernels (not used here)"


@contextlib.contextmanager
def _fused():
    """Engines opened inside use ONNX Runtime's fused int8 kernels whatever the CPU (``cxr_edge.cpu``)."""
    old = os.environ.get("CXR_EDGE_ONNX_INT8")
    os.environ["CXR_EDGE_ONNX_INT8"] = "fused"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CXR_EDGE_ONNX_INT8", None)
        else:
            os.environ["CXR_EDGE_ONNX_INT8"] = old


def measure(bundle: Path | None, scans: list[Path], repeats: int = 20, float_onnx: Path | None = None) -> dict:
    b = load_bundle(bundle)
    x = [preprocess(s, b.spec) for s in scans]
    source = "given" if float_onnx else "the shipped QDQ graph's weights as float (export.onnx.float_from_qdq)"
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = b.model_file("onnx")[0]
        if float_onnx is None:
            from export.onnx import float_from_qdq

            float_onnx = float_from_qdq(onnx_path, Path(tmp) / "float32.onnx")
        engines = dict(zip(ROWS, (open_engine(b.model_file("tflite")[0], "tflite", 1),
                                  open_engine(onnx_path, "onnx", 1), open_engine(float_onnx, "onnx", 1))))
        fused = onnx_int8_fused()
        if not fused:  # the runtime runs int8 unfused on this CPU: what the fused kernels would give
            with _fused():
                engines[FUSED] = open_engine(onnx_path, "onnx", 1)
        probs = {k: np.concatenate([e.run(xi) for xi in x]) for k, e in engines.items()}
        timings = alternate({k: (lambda e=e: [e.run(xi) for xi in x]) for k, e in engines.items()}, repeats)
    per_scan = {k: {m: v[m] / len(x) for m in ("median_ms", "p95_ms", "min_ms")} for k, v in timings.items()}
    ref = probs["LiteRT int8"]
    lite, q, f = (per_scan[k]["median_ms"] for k in ROWS)
    return {"scans": len(x), "repeats": repeats, "threads": 1, "batch": 1, "per_scan_ms": per_scan,
            "int8_over_litert": q / lite, "int8_over_float": q / f,
            "float_source": source, "onnx_int8": "fused kernels" if fused else
            "unfused (QDQ computed in float: this x86 CPU has no VNNI, cxr_edge.cpu)",
            "max_abs_dp_vs_litert": {k: float(np.abs(p - ref).max()) for k, p in probs.items()},
            "labels_unlike_litert": {k: int((p.argmax(1) != ref.argmax(1)).sum()) for k, p in probs.items()}}


def target(r: dict) -> dict:
    ms = {k: r["per_scan_ms"][k]["median_ms"] for k in ROWS}
    return {"target": f"ONNX Runtime int8 at most {MAX_RATIO}x LiteRT int8 and faster than ONNX Runtime float32 "
                      "(batch 1, 1 thread, alternating, same scans)",
            "measured": f"{r['int8_over_litert']:.2f}x LiteRT, {r['int8_over_float']:.2f}x float "
                        f"({ms['ONNX Runtime int8']:.2f} / {ms['LiteRT int8']:.2f} / {ms['ONNX Runtime float32']:.2f} "
                        f"ms per scan, {r['scans']} scans x {r['repeats']})",
            "met": r["int8_over_litert"] <= MAX_RATIO and r["int8_over_float"] < 1}


def markdown(r: dict) -> str:
    t = target(r)
    lines = ["# ONNX Runtime int8 speed", "", f"Machine: {r.get('machine', {}).get('cpu', '?')}. Batch 1, one thread, "
             f"{r['scans']} official test scans, {r['repeats']} alternating rounds; float32 graph: "
             f"{r['float_source']}; ONNX Runtime int8 as the runtime runs it here: {r.get('onnx_int8', 'fused kernels')}.",
             "", "| engine | median ms / scan | p95 | max abs dp vs LiteRT | labels unlike LiteRT |",
             "|---|---:|---:|---:|---:|"]
    unlike = r.get("labels_unlike_litert", {})
    for k in [*ROWS, *([FUSED] if FUSED in r["per_scan_ms"] else [])]:
        v = r["per_scan_ms"][k]
        lines.append(f"| {k} | {v['median_ms']:.3f} | {v['p95_ms']:.3f} | {r['max_abs_dp_vs_litert'][k]:.4f} | "
                     f"{unlike.get(k, '')} |")
    return "\n".join(lines + ["", f"Target: {t['target']}: **{'met' if t['met'] else 'not met'}** "
                                  f"({t['measured']}).", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.onnx_speed", description=__doc__)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the shipped one)")
    ap.add_argument("--float", dest="float_onnx", type=Path, default=None, help="a float32 ONNX file of the model")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/chest_xray")
    ap.add_argument("--scans", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    add_out(ap)
    a = ap.parse_args(argv)
    files = sorted((a.data / "test").rglob("*.jpeg"))
    scans = [files[i] for i in np.linspace(0, len(files) - 1, min(a.scans, len(files))).astype(int)]
    r = {"machine": describe(), **measure(a.bundle or DEFAULT_BUNDLE, scans, a.repeats, a.float_onnx)}
    write_results(a.out, "onnx_speed", r, markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
