"""ONNX Runtime's int8 kernels on this CPU (``cxr_edge.cpu``): on x86 without VNNI the fused u8 x s8 kernels
saturate, so the ONNX engine runs QDQ graphs unfused there; the shipped model then labels as LiteRT does."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_edge import cpu
from cxr_edge.bundle import load_bundle
from cxr_edge.engines import available_backends, open_engine
from cxr_edge.preprocess import load_gray, to_input

SCANS = sorted((Path(__file__).resolve().parent / "data" / "chest_xray").rglob("*.jpeg"))


@pytest.mark.parametrize("machine,isa,fused", [("x86_64", "AVX2, no VNNI", False), ("x86_64", "AVX-512 VNNI", True),
                                               ("x86_64", "AVX-VNNI", True), ("AMD64", None, False),
                                               ("x86_64", "no AVX2", False), ("aarch64", None, True),
                                               ("arm64", None, True)])
def test_fused_int8_only_where_the_kernels_do_not_saturate(monkeypatch, machine, isa, fused):
    monkeypatch.delenv("CXR_EDGE_ONNX_INT8", raising=False)
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
    monkeypatch.setattr(cpu, "int8_isa", lambda: isa)
    assert cpu.onnx_int8_fused() is fused
    monkeypatch.setenv("CXR_EDGE_ONNX_INT8", "unfused" if fused else "fused")  # for measuring: either way
    assert cpu.onnx_int8_fused() is not fused


def test_this_cpu_is_read():
    """On Linux the flags come from /proc/cpuinfo: the answer is the flags' presence."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "flags" not in flags or cpu.platform.machine().lower() not in cpu.X86:
        pytest.skip("no x86 flags line in /proc/cpuinfo")
    words = flags.split()
    want = ("AVX-512 VNNI" if "avx512_vnni" in words else "AVX-VNNI" if "avx_vnni" in words
            else "AVX2, no VNNI" if "avx2" in words else "no AVX2")
    assert cpu.int8_isa() == want


@pytest.mark.skipif("onnx" not in available_backends() or "tflite" not in available_backends(),
                    reason="needs both engines")
def test_unfused_int8_labels_the_shipped_scans_as_litert(monkeypatch):
    """Forced unfused on any CPU, the shipped ONNX model gives LiteRT's labels and nearly its probabilities
    (on an x86 CPU without VNNI, the fused kernels gave other labels for 3 of these 9 scans)."""
    monkeypatch.setenv("CXR_EDGE_ONNX_INT8", "unfused")
    bundle = load_bundle()
    x = to_input(np.stack([load_gray(f, bundle.spec.size) for f in SCANS]), bundle.spec)
    engine = open_engine(bundle.root / bundle.card["files"]["onnx"]["path"], "onnx")
    assert engine.int8_fused is False
    onnx_p = engine.run(x)
    lite_p = open_engine(bundle.root / bundle.card["files"]["tflite"]["path"], "tflite").run(x)
    assert np.array_equal(onnx_p.argmax(1), lite_p.argmax(1))
    assert np.abs(onnx_p - lite_p).max() < 0.1
