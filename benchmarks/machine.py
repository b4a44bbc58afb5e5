"""What the numbers were measured on."""
from __future__ import annotations

import os
import platform
from importlib import metadata


def cpu_model() -> str:
    """The CPU's name and, on x86, its int8 instructions, e.g. "AMD EPYC (AVX2, no VNNI)": machines of one name
    differ in them, and int8 inference with them (the ONNX engine runs unfused without VNNI: cxr_edge/cpu.py)."""
    name, flags = "", None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and flags is None:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    if flags is None:
        return name
    isa = ("AVX-512 VNNI" if "avx512_vnni" in flags else "AVX-VNNI" if "avx_vnni" in flags
           else "AVX2, no VNNI" if "avx2" in flags else "no AVX2")
    return f"{name} ({isa})"


def describe() -> dict:
    versions = {}
    for pkg in ("numpy", "pillow", "onnxruntime", "ai-edge-litert", "tensorflow-cpu", "keras"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
            "python": platform.python_version(), "os": platform.platform(), "versions": versions}
