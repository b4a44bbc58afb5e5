"""Timing side by side: candidates run alternately in one process after warm-up, so that drift in the
machine's load hits all of them alike."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def stats(samples_s: list[float]) -> dict:
    a = np.asarray(samples_s) * 1000.0
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)),
            "min_ms": float(a.min()), "n": int(len(a))}


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, dict]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: stats(v) for k, v in samples.items()}
