"""Latency and cost on this CPU: end to end through the public API against the bare decode, inference
alone (batch 1 and batched, 1 and 2 threads), Keras float predict as the reference, CLI cold start and
peak memory, model file sizes, installed sizes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.accuracy import Artifact
from benchmarks.timing import alternate, stats
from cxr_edge import Classifier
from cxr_edge.preprocess import preprocess


def bare_decode(path: Path) -> None:
    with Image.open(path) as im:
        im.load()


def end_to_end(bundle: Path, scan: Path, repeats: int, threads: int = 2) -> dict:
    """``Classifier.classify`` on a full-resolution JPEG, per backend, alternating with the bare full
    decode of the same file (the floor: no classifier can avoid reading its input)."""
    from cxr_edge.bundle import load_bundle

    fns = {"bare JPEG decode (Pillow, full resolution)": lambda: bare_decode(scan)}
    for backend in load_bundle(bundle).backends():
        clf = Classifier(model=bundle, backend=backend, threads=threads)
        fns[f"end to end, {backend} ({threads} threads)"] = (lambda c=clf: c.classify(scan))
    with Image.open(scan) as im:
        size = im.size
    return {"scan": scan.name, "scan_pixels": list(size), "scan_bytes": scan.stat().st_size,
            "timings": alternate(fns, repeats)}


def inference(artifacts: list[Artifact], x1: dict, repeats: int, refs: dict, batch: int = 32) -> dict:
    """Model execution alone on preprocessed input: batch 1 with 1 and 2 threads, all alternating, Keras
    float ``predict`` alongside (``refs``: name -> (InputSpec, predict function)); then batched
    throughput."""
    fns, throughput = {}, {}
    for a in artifacts:
        for threads in (1, 2):
            run = a.predictor(threads)
            fns[f"{a.name}, batch 1, {threads} thread{'s' * (threads > 1)}"] = (
                lambda r=run, x=x1[a.spec]: r(x))
    for name, (spec, fn) in refs.items():
        fns[f"{name}, batch 1"] = (lambda r=fn, x=x1[spec]: r(x))
    timings = alternate(fns, repeats)
    batched = [(a.name, a.spec, a.predictor(2)) for a in artifacts]
    batched += [(name, spec, fn) for name, (spec, fn) in refs.items()]
    for name, spec, run in batched:
        xb = np.repeat(x1[spec], batch, axis=0)
        run(xb)
        t = []
        for _ in range(max(3, repeats // 10)):
            t0 = time.perf_counter()
            run(xb)
            t.append(time.perf_counter() - t0)
        s = stats(t)
        throughput[name] = {"batch": batch, **s, "images_per_s": batch / (s["median_ms"] / 1000)}
    return {"batch1": timings, "batched": throughput}


def cli_cold_start(scan: Path, bundle: Path | None, repeats: int = 5) -> dict:
    """Process start to first result of ``cxr-edge classify --json`` (a fresh process each time) and its
    peak resident memory."""
    exe = shutil.which("cxr-edge")
    cmd = [exe] if exe else [sys.executable, "-m", "cxr_edge"]
    cmd += ["classify", "--json", str(scan)] + (["--model", str(bundle)] if bundle else [])
    # A child forked from this (large) process would count our pages in its peak RSS, so a small
    # launcher process starts the CLI and reports the CLI's own wall time and peak RSS.
    launcher = ("import json, subprocess, sys, time\n"
                "t0 = time.perf_counter()\n"
                "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
                "out, err = p.communicate()\n"
                "import resource\n"
                "print(json.dumps({'wall': time.perf_counter() - t0, 'rc': p.returncode, 'ok': b'\"label\"' in out,"
                " 'rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'err': err.decode()[-300:]}))\n")
    walls, rss = [], []
    for _ in range(repeats):
        res = json.loads(subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True,
                                        text=True, check=True).stdout)
        if res["rc"] != 0 or not res["ok"]:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res['err']}")
        walls.append(res["wall"])
        rss.append(res["rss_kib"] / 1024)  # KiB -> MiB on Linux
    return {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
            **stats(walls), "peak_rss_mib": float(np.median(rss))}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def installed_sizes(project: Path) -> dict:
    """Site-packages size of a fresh venv with ``pip install .`` (runtime only) against one that adds
    TensorFlow (what running the Keras model needs)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("runtime", []), ("runtime + tensorflow-cpu", ["tensorflow-cpu==2.21.0"])):
            venv = Path(tmp) / name.replace(" ", "")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(project), *extra]
            subprocess.run(pip, check=True, stdout=subprocess.DEVNULL)
            site = next((venv / "lib").glob("python*/site-packages"))
            out[name] = {"site_packages_mib": _du(site) / 2**20}
    return out


def preprocessed_one(scan: Path, specs) -> dict:
    return {spec: preprocess(scan, spec) for spec in specs}
