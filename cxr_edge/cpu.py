"""What this CPU's int8 kernels can be trusted with (``cxr_edge.engines``' ONNX engine).

On x86 CPUs without VNNI (AVX2 only: Intel before Ice Lake, AMD before Zen 4, most Intel Macs) ONNX Runtime's
fused int8 kernels sum pairs of u8 x s8 products in 16 bits with saturation (``VPMADDUBSW``). Large
activations times large weights overflow, and the shipped model's labels change there: 3 of the 9 test scans,
probabilities off by up to 0.62, on an AVX2 AMD EPYC (2026-12-06). On such CPUs the ONNX engine runs a QDQ graph
unfused (ONNX Runtime's ``session.disable_quant_qdq``): the int8 weights and activation ranges as exported,
computed in float, which agrees with LiteRT (and with the fused kernels on VNNI CPUs), at about ONNX float32's
speed. LiteRT (the default engine) and ARM CPUs do not have this problem.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from typing import Optional

X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@functools.lru_cache(maxsize=None)
def int8_isa() -> Optional[str]:
    """This x86 CPU's int8 dot-product instructions: "AVX-512 VNNI", "AVX-VNNI", "AVX2, no VNNI" or "no AVX2";
    None where it cannot be told (not x86, or no flags to read). Read once per process."""
    if platform.machine().lower() not in X86:
        return None
    flags = None
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((set(line.split(":", 1)[-1].split()) for line in f if line.startswith("flags")), None)
    if flags is not None:
        return ("AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-VNNI" if "avx_vnni" in flags
                else "AVX2, no VNNI" if "avx2" in flags else "no AVX2")
    try:  # macOS, Windows: numpy's own CPU dispatch knows AVX-512 VNNI (not AVX-VNNI: those run unfused)
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return None
    return ("AVX-512 VNNI" if __cpu_features__.get("AVX512VNNI") else
            "AVX2, no VNNI" if __cpu_features__.get("AVX2") else "no AVX2")


def onnx_int8_fused() -> bool:
    """Whether ONNX Runtime may run int8 graphs with its fused kernels here: everywhere but x86 without VNNI
    (module docstring); ``CXR_EDGE_ONNX_INT8=fused`` or ``unfused`` decides instead (for measuring)."""
    forced = os.environ.get("CXR_EDGE_ONNX_INT8", "").strip().lower()
    if forced in ("fused", "unfused"):
        return forced == "fused"
    if platform.machine().lower() not in X86:
        return True
    return int8_isa() in ("AVX-512 VNNI", "AVX-VNNI")


def onnx_session_options(ort, opts=None):
    """``opts`` (or new ``ort.SessionOptions``) set as the runtime sets them for int8 graphs on this CPU: unfused
    where the fused kernels saturate (:func:`onnx_int8_fused`); for every ONNX Runtime session that must give
    the runtime's numbers (``cxr_edge.engines``, the export's parity checks)."""
    opts = opts if opts is not None else ort.SessionOptions()
    if not onnx_int8_fused():
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return opts
