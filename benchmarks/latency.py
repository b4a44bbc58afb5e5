"""Latency and cost on this CPU: end to end through the public API against the bare decode, inference
alone (batch 1 and batched, 1 and 2 threads), Keras float predict as the reference, CLI cold start and
peak memory, model file sizes, installed sizes."""
from __future__ import annotations

import json
import shutil
import statistics
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
    decode of the same file (the floor: no classifier can avoid reading its input). One backend at a time,
    the other's classifier gone: two engines' thread pools alternating on the same cores spin against each
    other (on 2 cores, TFLite at 2 threads measured 6.8 ms so against 5.1 ms alone). The bare decode's row
    is the first backend's round."""
    from cxr_edge.bundle import load_bundle

    bare = "bare JPEG decode (Pillow, full resolution)"
    timings: dict = {}
    for backend in load_bundle(bundle).backends():
        clf = Classifier(model=bundle, backend=backend, threads=threads)
        name = f"end to end, {backend} ({threads} threads)"
        got = alternate({bare: lambda: bare_decode(scan), name: lambda c=clf: c.classify(scan)}, repeats)
        timings.setdefault(bare, got[bare])
        timings[name] = got[name]
        del clf
    with Image.open(scan) as im:
        size = im.size
    return {"scan": scan.name, "scan_pixels": list(size), "scan_bytes": scan.stat().st_size,
            "timings": timings}


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


def _clean_copy(project: Path, dest: Path) -> Path:
    """The project's sources without build outputs: an in-tree ``build/`` left by an earlier ``pip install``
    keeps files that no longer exist (setuptools copies into it and never deletes) and would be measured."""
    ignore = shutil.ignore_patterns("build", "dist", ".venv*", "runs", ".git", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "results")
    return Path(shutil.copytree(project, dest, ignore=ignore))


def installed_sizes(project: Path) -> dict:
    """Site-packages size of a fresh venv with ``pip install .`` (the runtime: one inference engine, chosen
    by platform markers in pyproject.toml) against one that adds TensorFlow (what running the Keras model
    needs); also without the venv's own pip/setuptools, and the packages installed."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = _clean_copy(project, Path(tmp) / "src")
        for name, extra in (("runtime", []), ("runtime + tensorflow-cpu", ["tensorflow-cpu==2.21.0"])):
            venv = Path(tmp) / name.replace(" ", "")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src), *extra]
            subprocess.run(pip, check=True, stdout=subprocess.DEVNULL)
            site = next((venv / "lib").glob("python*/site-packages"))
            tooling = sum(_du(p) for p in site.iterdir() if p.is_dir() and p.name.split("-")[0].lower()
                          in VENV_TOOLING)
            out[name] = {"site_packages_mib": _du(site) / 2**20,
                         "without_venv_tooling_mib": (_du(site) - tooling) / 2**20,
                         "without_venv_tooling_mb": (_du(site) - tooling) / 1e6,
                         "packages": sorted(p.name.split("-")[0] for p in site.glob("*.dist-info"))}
    return out


VENV_TOOLING = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "wheel")  # what `python -m venv` brings


def preprocessed_one(scan: Path, specs) -> dict:
    return {spec: preprocess(scan, spec) for spec in specs}


# --- the fast path (issue 10): end to end on many scans, folder throughput, format agreement, gate cost ------

def end_to_end_many(bundle: Path | None, files: list[Path], repeats: int = 3, threads: int = 1) -> dict:
    """``Classifier.classify`` (default backend, ``threads`` inference threads, gate on) on each of ``files``
    (full-resolution JPEGs), alternating with the bare full decode of the same file, ``repeats`` times
    each after one warm-up: medians over all samples and their ratio (target <= 3)."""
    clf = Classifier(model=bundle, threads=threads)
    bare_s, e2e_s = [], []
    for f in files:
        bare_decode(f)
        clf.classify(f)
        for _ in range(repeats):
            t0 = time.perf_counter()
            bare_decode(f)
            t1 = time.perf_counter()
            clf.classify(f)
            t2 = time.perf_counter()
            bare_s.append(t1 - t0)
            e2e_s.append(t2 - t1)
    bare, e2e = stats(bare_s), stats(e2e_s)
    return {"files": len(files), "repeats": repeats, "threads": threads, "backend": clf.backend,
            "gate": clf.gate is not None, "bare_decode": bare, "classify": e2e,
            "ratio": e2e["median_ms"] / bare["median_ms"]}


def gate_cost(bundle: Path | None, files: list[Path], repeats: int = 3) -> dict:
    """The input gate on its own: ``check_pixels`` (before the model) and ``check_embedding`` (after it) per
    image, and ``Classifier.classify`` with the gate against without it (same files, alternating)."""
    from cxr_edge.preprocess import load_gray_colour

    gated, bare = Classifier(model=bundle, threads=1), Classifier(model=bundle, threads=1, ood=False)
    if gated.gate is None:
        return {"skipped": "this bundle has no input gate"}
    gate = gated.gate
    pix, emb, on, off = [], [], [], []
    for f in files:
        gray, colour = load_gray_colour(f, gated.spec.size)
        features = gated.predict_full(gray[None])[2]  # the model's feature map: the gate's vector is built from it
        for _ in range(repeats):
            t0 = time.perf_counter()
            gate.check_pixels(gray, colour)
            t1 = time.perf_counter()
            if features is not None:
                gate.check_embedding(gate.embedding_of(features)[0])
            t2 = time.perf_counter()
            gated.classify(f)
            t3 = time.perf_counter()
            bare.classify(f)
            t4 = time.perf_counter()
            pix.append(t1 - t0)
            emb.append(t2 - t1)
            on.append(t3 - t2)
            off.append(t4 - t3)
    out = {"files": len(files), "check_pixels": stats(pix), "classify_with_gate": stats(on),
           "classify_without_gate": stats(off), "embedding_check": bool(getattr(gate, "has_embedding", False))}
    if out["embedding_check"]:
        out["check_embedding"] = stats(emb)
    out["overhead_ms"] = out["classify_with_gate"]["median_ms"] - out["classify_without_gate"]["median_ms"]
    return out


def folder_throughput(folder: Path, bundle: Path | None = None, threads: int | None = None,
                      repeats: int = 3) -> dict:
    """Wall time of ``cxr-edge classify --json FOLDER`` (a fresh process: start-up and model load included)
    against a sequential bare decode of the same files in this process (target <= 2.5x), alternating
    ``repeats`` times (bare decode, then the CLI), so that both see the same machine; the medians count and
    every run is listed."""
    from cxr_edge.cli import expand_inputs

    files = [Path(p) for p in expand_inputs((str(folder),))]
    exe = shutil.which("cxr-edge")
    cmd = [exe] if exe else [sys.executable, "-m", "cxr_edge"]
    cmd += ["classify", "--json", str(folder)] + (["--model", str(bundle)] if bundle else [])
    cmd += ["--threads", str(threads)] if threads else []
    for f in files:  # warm the page cache for both
        f.read_bytes()
    bares, walls = [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for f in files:
            bare_decode(f)
        bares.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode not in (0, 1) or len(rows) != len(files):
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-300:]}")
    wall, bare = statistics.median(walls), statistics.median(bares)
    return {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)), "files": len(files),
            "classified": sum("label" in r for r in rows), "repeats": len(walls), "cli_wall_s": wall,
            "bare_decode_s": bare, "images_per_s": len(files) / wall, "ratio": wall / bare,
            "runs": [{"cli_wall_s": round(w, 3), "bare_decode_s": round(b, 3), "ratio": round(w / b, 3)}
                     for w, b in zip(walls, bares)]}


def containers(jpeg: Path, root: Path, upscale: int = 1) -> dict[str, Path]:
    """The scan of ``jpeg`` as the containers a user may hold: its own bytes, its decoded pixels as 8-bit PNG,
    16-bit PNG (widened by scaling and by shifting), palette PNG, RGBA PNG, TIFF and (with pydicom) DICOM
    (8-bit, and 12-bit widened by shifting), and a progressive JPEG with its baseline twin (a
    progressive file can only be made by re-encoding: it is compared with a baseline re-encode).
    ``upscale``: first enlarge the scan and save that as the baseline JPEG, for a scan big enough to be
    reduced before the resize."""
    if upscale > 1:
        with Image.open(jpeg) as img:
            big = img.convert("L").resize((img.size[0] * upscale, img.size[1] * upscale), Image.Resampling.LANCZOS)
        big.save(root / "baseline.jpeg", quality=95)
        jpeg = root / "baseline.jpeg"
    with Image.open(jpeg) as img:
        gray = img.convert("L")
    arr = np.asarray(gray)
    rgba = Image.merge("RGB", [gray] * 3)
    rgba.putalpha(255)
    out = {"baseline JPEG": jpeg}
    for name, file, img, kw in [("progressive JPEG", "p.jpeg", gray, {"progressive": True, "quality": 95}),
                                ("baseline JPEG q95", "b.jpeg", gray, {"quality": 95}),
                                ("8-bit PNG", "g8.png", gray, {}),
                                ("16-bit PNG", "g16.png", Image.fromarray(arr.astype(np.uint16) * 257), {}),
                                ("16-bit PNG, shifted", "g16s.png", Image.fromarray(arr.astype(np.uint16) << 8), {}),
                                ("palette PNG", "p.png", gray.convert("P"), {}),
                                ("RGBA PNG", "rgba.png", rgba, {}), ("TIFF", "g.tif", gray, {})]:
        img.save(root / file, **kw)
        out[name] = root / file
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return out
    from cxr_edge.dicom import gray_to_dicom

    (root / "scan.dcm").write_bytes(gray_to_dicom(arr, BodyPartExamined="CHEST", ViewPosition="PA"))
    out["DICOM"] = root / "scan.dcm"
    (root / "scan12.dcm").write_bytes(gray_to_dicom(arr.astype(np.uint16) << 4, bits_stored=12,
                                                    BodyPartExamined="CHEST", ViewPosition="PA"))
    out["DICOM 12-bit"] = root / "scan12.dcm"
    return out


def format_agreement(bundle: Path | None, scans: list[Path], tolerance: float = 0.02) -> dict:
    """Each scan in every container through ``Classifier.classify_many`` (gate off): the largest probability
    difference from the original JPEG (the progressive JPEG: from its baseline twin), per container."""
    from cxr_edge.labels import CLASS_NAMES

    clf = Classifier(model=bundle, ood=False)
    worst: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-formats-") as tmp:
        for i, scan in enumerate(scans):
            root = Path(tmp) / str(i)
            root.mkdir()
            files = containers(scan, root)
            res = dict(zip(files, clf.classify_many(list(files.values()))))
            p = {k: np.array([r.probabilities[c] for c in CLASS_NAMES]) for k, r in res.items()}
            for name, v in p.items():
                if name in ("baseline JPEG", "baseline JPEG q95"):  # the references (a re-encode is lossy)
                    continue
                ref = p["baseline JPEG q95" if name == "progressive JPEG" else "baseline JPEG"]
                worst[name] = max(worst.get(name, 0.0), float(np.abs(v - ref).max()))
    return {"scans": len(scans), "tolerance": tolerance, "max_abs_diff": worst,
            "agree": all(v <= tolerance for v in worst.values())}


def dct_scaled_gray(path: Path, size: int) -> np.ndarray:
    """The road not taken: the same reduction factor done by libjpeg's DCT scaling (``draft``) instead of
    ``Image.reduce`` on the full decode, then the same Lanczos squash (for the comparison only)."""
    from cxr_edge.preprocess import reduction_factor

    with Image.open(path) as img:
        w, h = img.size
        f = reduction_factor(w, h, size)
        img.draft("L", (-(-w // f), -(-h // f)))  # libjpeg scales by 1/2, 1/4 or 1/8 at most
        img = img.convert("L")
        done = max(1, round(w / img.size[0]))
        if f > done:  # what DCT scaling could not do (past 1/8)
            img = img.reduce(f // done)
        return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def resize_fidelity(scans: list[Path], size: int = 224) -> dict:
    """On full-resolution scans, for the runtime's ``KEEP`` and for ``keep=2``: the mean absolute gray-level
    difference of reduce-then-squash (``reduction_factor``, as ``load_gray`` does it) from a Lanczos squash of
    the full decode (how the training copies were made), and the median milliseconds of reduce + resize."""
    from cxr_edge.preprocess import KEEP, reduction_factor

    keeps = sorted({KEEP, 2})
    diff: dict = {k: [] for k in keeps}
    ms: dict = {k: [] for k in keeps}
    for path in scans:
        with Image.open(path) as img:
            full = img.convert("L")
        ref = np.asarray(full.resize((size, size), Image.Resampling.LANCZOS), np.float32)
        for k in keeps:
            t0 = time.perf_counter()
            ours = full.reduce(reduction_factor(*full.size, size, keep=k)).resize((size, size),
                                                                                  Image.Resampling.LANCZOS)
            ms[k].append(1000 * (time.perf_counter() - t0))
            diff[k].append(float(np.abs(np.asarray(ours, np.float32) - ref).mean()))
    return {"scans": len(scans), "size": size, "runtime_keep": KEEP,
            "mean_abs_gray_diff": {f"keep={k}": float(np.mean(v)) for k, v in diff.items()},
            "reduce_resize_median_ms": {f"keep={k}": float(np.median(v)) for k, v in ms.items()}}


def dct_scaling_gap(bundle: Path | None, scans: list[Path]) -> dict:
    """Largest probability difference between the shipped path and the DCT-scaled variant of the same JPEGs
    (``dct_scaled_gray``): why the runtime does not use ``draft``."""
    from cxr_edge.preprocess import load_gray

    clf = Classifier(model=bundle, ood=False)
    size = clf.spec.size
    ours = clf.predict(np.stack([load_gray(p, size) for p in scans]))
    dct = clf.predict(np.stack([dct_scaled_gray(p, size) for p in scans]))
    d = np.abs(ours - dct).max(axis=1)
    return {"scans": len(scans), "max_abs_diff": float(d.max()), "over_0.02": int((d > 0.02).sum())}


def fast_path(bundle: Path | None, test_files: list[Path], folder: Path, quick: bool = False) -> dict:
    """Everything issue 10 asks the benchmark for, on official test JPEGs: ``classify`` vs bare decode (one
    thread), the gate's cost, the folder throughput of the CLI, format agreement and the DCT-scaling gap; and
    the resize's fidelity and cost on the official ``val/`` scans."""
    rng = np.random.default_rng(0)
    pick = lambda n: [test_files[i] for i in sorted(rng.choice(len(test_files), min(n, len(test_files)), replace=False))]  # noqa: E731
    sample = pick(8 if quick else 40)
    out = {"end_to_end": end_to_end_many(bundle, sample, repeats=2 if quick else 5),
           "gate": gate_cost(bundle, sample[:8] if quick else sample, repeats=2 if quick else 3),
           "formats": format_agreement(bundle, pick(2 if quick else 10)),
           "dct_scaling": dct_scaling_gap(bundle, pick(8 if quick else 100))}
    val = sorted((folder.parent / "val").rglob("*.jpeg"))  # the official val/ scans: full resolution, not test
    if val:
        from cxr_edge.bundle import load_bundle

        size = load_bundle(bundle).spec.size  # the shipped model's input side
        out["resize_fidelity"] = resize_fidelity(val[:4] if quick else val, size)
    if not quick:
        out["folder"] = folder_throughput(folder, bundle)
    return out
