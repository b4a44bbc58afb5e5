"""Train on a lent GPU (the workplace's ``device`` tool): what to carry there and what to bring back.

    python -m train.lease prepare            # here: fills .gpu/ (data, compact ImageNet weights, wheels)
    bash train/lease.sh                      # there: the device command (carry [".gpu"])
    python -m train.lease pack "$OUT"        # there, called by lease.sh: best runs into $OUT
    python -m train.lease unpack FILES_DIR   # here: the returned files into runs/

The lease returns at most 8 files of 16 MiB, so weights travel split and in float16 (1-D arrays such as
batch-norm statistics stay float32), and everything else of every run travels in one tarball.

What happened on 2026-11-26 (H200, JAX 0.11.2, Keras 3.15.1): the tooling worked end to end (carry,
install, data decode, model build, pack), but no run finished an epoch. Three groups in parallel
(DenseNet201 batch 16 with in-graph augmentation, Lite0, Lite2; 470 s) and then DenseNet201 alone
(batch 64, no augmentation, bf16; 265 s) both compiled (~150-200 s) and then ran far below the
~1050 img/s measured elsewhere. The cause was not found within the 15-minute budget; leads: Keras'
NumPy-array data path under JAX, and (on the CPU, where the same JAX steps were measured) depthwise
convolutions and the image-transform layers being very slow in XLA. Try a short probe (a few timed
``train_on_batch`` calls per configuration) before a long run.
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

from train.models import load_named, save_named

GPU_DIR = Path(".gpu")
WHEELS = ("keras==3.15.1", "namex", "optree")
FAMILIES = ("densenet201", "efficientnet_lite0", "efficientnet_lite2")


def prepare(data_root: Path) -> None:
    from train import lite

    data = GPU_DIR / "data" / "chest_xray" / "train"
    if not data.exists():
        shutil.copytree(data_root / "train", data)
    cache = GPU_DIR / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    for variant in ("lite0", "lite2"):
        w = {k: v for k, v in lite.imagenet_weights(variant).items() if not k.startswith("_imagenet_fc")}
        [name] = save_named(w, cache / f"efficientnet-{variant}-imagenet.npz", compact=True,
                            max_bytes=1 << 40)
    whl = GPU_DIR / "whl"
    whl.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(whl), *WHEELS], check=True)
    total = sum(f.stat().st_size for f in GPU_DIR.rglob("*") if f.is_file())
    print(f"{GPU_DIR}: {total / 2**20:.1f} MiB to carry")


def pack(out: Path, runs_dir: Path = Path("runs")) -> None:
    """Best run per family (by validation accuracy) with weights; all runs' records in one tarball."""
    from train.registry import list_runs

    out.mkdir(parents=True, exist_ok=True)
    chosen = {}
    for fam in FAMILIES:
        runs = [Path(r["dir"]) for r in list_runs(runs_dir) if r["model"] == fam]
        if not runs:  # none finished (cut by the lease's clock): the newest one with weights, if any
            runs = sorted(d for d in runs_dir.glob(f"*/") if any(d.glob("weights*.npz"))
                          and json.loads((d / "config.json").read_text())["model"] == fam)[-1:]
        if runs:
            chosen[fam] = runs[0].name
            save_named(load_named(runs[0] / "weights.npz"), out / f"{runs[0].name}.weights.npz",
                       compact=True)
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for f in sorted(runs_dir.rglob("*")):
            if f.is_file() and not f.name.startswith("weights"):
                tar.add(f, arcname=str(f.relative_to(runs_dir.parent)))
        blob = json.dumps(chosen, indent=2).encode()
        info = tarfile.TarInfo("runs/returned.json")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    print("returned:", json.dumps(chosen))


def unpack(files: Path, runs_dir: Path = Path("runs")) -> None:
    with tarfile.open(files / "runs.tar.gz") as tar:
        tar.extractall(runs_dir.parent, filter="data")
    for f in files.glob("*.weights*.npz"):
        run_id, rest = f.name.split(".weights", 1)
        dest = runs_dir / run_id
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest / f"weights{rest}")
        print(f"{dest}/weights{rest}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.lease")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data")
    sub.add_parser("pack").add_argument("out")
    sub.add_parser("unpack").add_argument("files")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        from train.data import data_dir
        prepare(data_dir(args.data))
    elif args.cmd == "pack":
        pack(Path(args.out))
    else:
        unpack(Path(args.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
