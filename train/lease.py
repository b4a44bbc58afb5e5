"""Train on a lent GPU (the workplace's ``device`` tool): what to carry there and what to bring back.

    python -m train.lease prepare            # here: fills .gpu/ (data as one zip, ImageNet weights, wheels)
    bash train/lease.sh                      # there: the device command (carry .gpu/data.zip, .gpu/whl,
                                             # .gpu/cache and, if used, .gpu/targets)
    python -m train.lease targets FILE --teachers A,B   # here: teachers' soft targets as one small file
    python -m train.lease teachers           # there, called by lease.sh: the best phase-1 Lite runs
    python -m train.lease pack "$OUT"        # there, called by lease.sh: the runs into $OUT
    python -m train.lease unpack FILES_DIR   # here: the returned files into runs/
    python -m train.lease revalidate         # here: validation metrics of the returned weights

Limits that shape this: the working tree plus what is carried travels at most 64 MiB, and a lease returns
at most 8 files of 16 MiB (64 MiB together). So the ImageNet weights travel as int8 with a scale per
output channel (``train.lite.quantize``: at most half a step, 0.4% of a channel's largest weight), and the
runs come back as one tarball split into 15 MiB parts: every run's records, the students' weights in
float16, and as many other runs' weights as the budget allows (int8 per channel, the same scheme an int8
export uses), in order: best DenseNet201, Lite teachers, baselines, other DenseNet201. A Lite teacher
comes back in float16 instead where that still leaves room for the later ones in int8. ``metrics.json``
says which (``returned_weights``).

History: the first lease (2026-11-26, two attempts) finished no epoch: Keras ran the step eagerly because
the model held RandomRotation/RandomZoom/RandomTranslation, and each new batch shape recompiled. Since
then training uses fixed batch shapes and a compiled augmentation (``train.batches``, ``train.augment``),
and ``python -m train probe`` times the compile and images/s before a long run.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from train.models import load_named, save_named

GPU_DIR = Path(".gpu")
RUNS = Path("runs")
WHEELS = ("keras==3.15.1", "namex", "optree")
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
PART = 15 * 2**20


def prepare(data_root: Path) -> None:
    from train import lite

    data = GPU_DIR / "data" / "chest_xray" / "train"
    if not data.exists():
        shutil.copytree(data_root / "train", data)
    manifest = Path(data_root).parent / "MANIFEST.csv"  # the films' original sizes (train.aspect)
    if manifest.is_file() and not (GPU_DIR / "data" / "MANIFEST.csv").exists():
        shutil.copy(manifest, GPU_DIR / "data" / "MANIFEST.csv")
    archive = GPU_DIR / "data.zip"  # what travels: one file (thousands of small ones count more there)
    if not archive.exists():
        shutil.make_archive(str(archive.with_suffix("")), "zip", GPU_DIR, "data")
    cache = GPU_DIR / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for variant in ("lite0", "lite1", "lite2"):
        w = {k: v for k, v in lite.imagenet_weights(variant).items() if not k.startswith("_imagenet_fc")}
        np.savez(cache / f"efficientnet-{variant}-imagenet.npz", **lite.quantize(w))
    whl = GPU_DIR / "whl"
    whl.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(whl), *WHEELS], check=True)
    total = sum(f.stat().st_size for f in GPU_DIR.rglob("*") if f.is_file())
    print(f"{GPU_DIR}: {total / 2**20:.1f} MiB to carry")


def _runs(runs_dir: Path) -> list[dict]:
    """Finished runs (metrics.json and weights), best validation accuracy first."""
    out = []
    for d in sorted(runs_dir.glob("*/")):
        if (d / "metrics.json").exists() and any(d.glob("weights*.npz")):
            m = json.loads((d / "metrics.json").read_text())
            cfg = json.loads((d / "config.json").read_text())
            out.append({"dir": d, "model": m["model"], "val": m["val"]["accuracy"],
                        "student": bool(cfg.get("teachers")), "protocol": m["protocol"]})
    return sorted(out, key=lambda r: -r["val"])


def teachers(top: int, runs_dir: Path = RUNS) -> list[str]:
    """The ``top`` phase-1 Lite runs by validation accuracy (grouped protocol, not students)."""
    runs = [r for r in _runs(runs_dir) if r["model"] in LITES and not r["student"]
            and r["protocol"] == "grouped"]
    return [r["dir"].name for r in runs[:top]]


def _quantized(weights: dict) -> dict:
    from train.lite import quantize
    return quantize(weights)


def _half(weights: dict) -> dict:
    return {k: v.astype(np.float16) if v.ndim >= 2 else v for k, v in weights.items()}


def _blob(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def pack(out: Path, runs_dir: Path = RUNS, budget_mib: float = 60) -> None:
    """Every run's records plus weights in priority order within the budget, as ``runs.tar.part*``."""
    runs = _runs(runs_dir)
    dn = [r for r in runs if r["model"] == "densenet201"]
    order = ([(r, "float16") for r in runs if r["student"]] + [(r, "int8") for r in dn[:1]]
             + [(r, "int8") for r in runs if r["model"] in LITES and not r["student"]]
             + [(r, "int8") for r in runs if r["model"] == "baseline"] + [(r, "int8") for r in dn[1:]])
    budget, returned = budget_mib * 2**20, {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(runs_dir.rglob("*")):
            if f.is_file() and not f.name.startswith("weights"):
                tar.add(f, arcname=str(f.relative_to(runs_dir.parent)))
        # Lite teachers come back in float16 where that still leaves room for the later ones in int8: the
        # int8-returned Lite2 of the 2026-11-27 lease read 2 pp lower here (float32) than there (bf16), and
        # int8 rounding and bf16 cannot be told apart on int8 weights
        lite = [r["dir"].name for r, fmt in order if fmt == "int8" and r["model"] in LITES]
        lite_weights = {name: load_named(runs_dir / name / "weights.npz") for name in lite}  # read once
        for r, fmt in order:
            name = r["dir"].name
            w = lite_weights[name] if name in lite_weights else load_named(r["dir"] / "weights.npz")
            if name in lite_weights:
                half = _blob(_half(w))
                later = sum(v.size for n in lite[lite.index(name) + 1:] for v in lite_weights[n].values())
                fmt, blob = ("float16", half) if buf.tell() + len(half) + later <= budget else ("int8", None)
            else:
                blob = _blob(_half(w)) if fmt == "float16" else None
            blob = blob or _blob(_quantized(w))
            if buf.tell() + len(blob) > budget:
                continue
            info = tarfile.TarInfo(f"runs/{r['dir'].name}/weights.{fmt}.npz")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            returned[r["dir"].name] = fmt
        note = json.dumps({"returned_weights": returned}, indent=2).encode()
        info = tarfile.TarInfo("runs/returned.json")
        info.size = len(note)
        tar.addfile(info, io.BytesIO(note))
    data = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(data), PART):
        (out / f"runs.tar.part{i // PART}").write_bytes(data[i:i + PART])
    print(f"packed {len(data) / 2**20:.1f} MiB; weights: {json.dumps(returned)}; "
          f"records only: {[r['dir'].name for r in runs if r['dir'].name not in returned]}")


def unpack(files: Path, runs_dir: Path = RUNS) -> None:
    from train.lite import dequantize

    parts = sorted(files.glob("runs.tar.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    data = b"".join(p.read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(runs_dir.parent, filter="data")
    returned = json.loads((runs_dir / "returned.json").read_text())["returned_weights"]
    for run_id, fmt in returned.items():
        src = runs_dir / run_id / f"weights.{fmt}.npz"
        with np.load(src) as z:
            stored = {k: z[k] for k in z.files}
        weights = dequantize(stored) if fmt == "int8" else {k: v.astype(np.float32) for k, v in stored.items()}
        save_named(weights, runs_dir / run_id / "weights.npz", max_bytes=1 << 40)
        src.unlink()
        mpath = runs_dir / run_id / "metrics.json"
        m = json.loads(mpath.read_text())
        m["returned_weights"] = fmt
        mpath.write_text(json.dumps(m, indent=2))
        print(f"{runs_dir / run_id}: weights ({fmt})")


def revalidate(runs_dir: Path = RUNS) -> None:
    """Re-measure validation metrics of runs whose weights came back from a lease (float32 here, the
    weights as returned: int8- or float16-rounded), so that the registry ranks the weights we have. The
    lease's own figure (bf16 inference, unrounded weights) is kept as ``val_on_lease``."""
    from cxr_edge.preprocess import to_input
    from train import data
    from train.metrics import classification_metrics
    from train.registry import load_run

    cache: dict = {}
    for mpath in sorted(runs_dir.glob("*/metrics.json")):
        m = json.loads(mpath.read_text())
        if "returned_weights" not in m or "val_on_lease" in m:
            continue
        model, spec, cfg = load_run(mpath.parent)
        key = (cfg["protocol"], cfg["val_fraction"], data.split_seed_of(cfg), spec.size)
        if key not in cache:
            recs = data.run_splits(data.data_dir(), cfg)["val"]
            cache[key] = (data.load_images(recs, spec.size), data.labels_of(recs))
        gray, y = cache[key]
        probs = model.predict(to_input(gray, spec), batch_size=32, verbose=0)
        m["val_on_lease"], m["val"] = m["val"], classification_metrics(y, probs)
        mpath.write_text(json.dumps(m, indent=2))
        print(f"{mpath.parent.name}: val accuracy {m['val_on_lease']['accuracy']:.4f} on the lease, "
              f"{m['val']['accuracy']:.4f} here ({m['returned_weights']} weights)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.lease")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").add_argument("--data")
    t = sub.add_parser("teachers")
    t.add_argument("--top", type=int, default=3)
    p = sub.add_parser("pack")
    p.add_argument("out")
    p.add_argument("--budget-mib", type=float, default=60)
    sg = sub.add_parser("targets", help="here: a distillation file of teachers' probabilities (carry it)")
    sg.add_argument("out")
    sg.add_argument("--teachers", required=True, help="comma-separated run ids or bundles")
    sg.add_argument("--split-seed", type=int, default=0, help="the students' validation split")
    sub.add_parser("unpack").add_argument("files")
    sub.add_parser("revalidate")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        from train.data import data_dir
        prepare(data_dir(args.data))
    elif args.cmd == "teachers":
        print(",".join(teachers(args.top)))
    elif args.cmd == "targets":
        from train.fit import FitConfig, save_soft_targets
        cfg = FitConfig(teachers=args.teachers.split(","), split_seed=args.split_seed)
        path = save_soft_targets(cfg, Path(args.out))
        print(f"{path}: soft targets of {args.teachers}")
    elif args.cmd == "pack":
        pack(Path(args.out), budget_mib=args.budget_mib)
    elif args.cmd == "revalidate":
        revalidate()
    else:
        unpack(Path(args.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
