"""What the numbers were measured on."""
from __future__ import annotations

import os
import platform
from importlib import metadata

from cxr_edge.cpu import int8_isa


def cpu_model() -> str:
    """The CPU's name and, on x86, its int8 instructions, e.g. "AMD EPYC (AVX2, no VNNI)": machines of one name
    differ in them, and int8 inference with them (the ONNX engine runs unfused without VNNI: cxr_edge/cpu.py)."""
    name = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    isa = int8_isa()
    return f"{name} ({isa})" if isa else name


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
