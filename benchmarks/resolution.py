"""What a smaller model input would buy issue 10's end-to-end target (``Classifier.classify`` at most 3x the
bare JPEG decode, one thread): the cost of the runtime's own steps at each input size, measured, not
projected from FLOPs.

    python -m benchmarks.resolution [--sizes 128 160 192 224] [--files 40] [--repeats 3]

For each size it builds EfficientNet-Lite0 with the ImageNet weights (the backbone the shipped model
fine-tunes; the weights do not change the cost), exports it the way ``python -m export.convert`` does
(dual output, int8 TFLite, calibrated on train scans) and then, on full-resolution official test JPEGs
(timing only: no label is read), alternates per file: the bare full decode, ``load_gray`` at each size
(decode + reduce + squash, the runtime's preprocessing) and one model pass at each size (batch 1, one
thread). ``load_gray + model`` is a lower bound of ``classify`` at that size: it leaves out the input
gate and building the result, which ``python -m benchmarks`` measures for the shipped model.

Writes ``resolution.json`` and ``resolution.md`` (default ``benchmarks/results/``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.latency import bare_decode
from benchmarks.machine import describe
from benchmarks.timing import stats
from cxr_edge.engines import open_engine
from cxr_edge.preprocess import load_gray, to_input
from train.data import data_dir

PROJECT = Path(__file__).resolve().parent.parent
TARGET = 3.0  # issue 10: classify <= 3x the bare decode


def export_int8(model_name: str, size: int, calibration_files: list[Path], work: Path,
                weights: str | None = "imagenet") -> tuple[Path, dict]:
    """``model_name`` at ``size`` px exported as the shipped bundles are (dual output, int8 TFLite):
    the model file and how its weights were set."""
    from export import savedmodel
    from export.cam import dual_output
    from export.convert import build_artifact
    from train.models import build

    try:
        built = build(model_name, input_size=size, weights=weights)
        how = weights or "random"
    except Exception as exc:  # no cached ImageNet port and no way to make one: the cost is the same
        built = build(model_name, input_size=size, weights=None)
        how = f"random (ImageNet weights unavailable: {type(exc).__name__})"
    work.mkdir(parents=True, exist_ok=True)
    saved = savedmodel.save(dual_output(built.model), work / "saved", size)
    calibration = to_input(np.stack([load_gray(f, size) for f in calibration_files]), built.spec)
    path = build_artifact(saved, "tflite-int8", work / "model.tflite", calibration, work)
    return path, {"weights": how, "spec": built.spec}


def measure(models: dict[int, tuple[Path, object]], files: list[Path], repeats: int) -> dict:
    """Per file, alternating: bare decode, then ``load_gray`` and one model pass at every size."""
    engines = {s: open_engine(p, "tflite", threads=1) for s, (p, _) in models.items()}
    bare_s: list[float] = []
    load_s: dict[int, list[float]] = {s: [] for s in models}
    model_s: dict[int, list[float]] = {s: [] for s in models}
    for f in files:
        inputs = {s: to_input(load_gray(f, s), spec) for s, (_, spec) in models.items()}
        bare_decode(f)
        for s, e in engines.items():  # warm-up
            e.run(inputs[s])
        for _ in range(repeats):
            t = time.perf_counter()
            bare_decode(f)
            bare_s.append(time.perf_counter() - t)
            for s, e in engines.items():
                t0 = time.perf_counter()
                load_gray(f, s)
                t1 = time.perf_counter()
                e.run(inputs[s])
                t2 = time.perf_counter()
                load_s[s].append(t1 - t0)
                model_s[s].append(t2 - t1)
    bare = stats(bare_s)
    rows = []
    for s in sorted(models):
        load, model = stats(load_s[s]), stats(model_s[s])
        total = float(np.median(np.add(load_s[s], model_s[s])) * 1000.0)
        rows.append({"size": s, "load_gray": load, "model": model, "load_plus_model_median_ms": total,
                     "ratio_lower_bound": total / bare["median_ms"],
                     "model_alone_ratio": model["median_ms"] / bare["median_ms"]})
    return {"files": len(files), "repeats": repeats, "threads": 1, "bare_decode": bare, "sizes": rows}


def run(sizes: list[int], n_files: int = 40, repeats: int = 3, model_name: str = "efficientnet_lite0",
        data: Path | None = None, weights: str | None = "imagenet", work: Path | None = None) -> dict:
    try:
        root = data_dir(str(data) if data else None)
    except FileNotFoundError as exc:
        return {"skipped": str(exc)}
    test = sorted((root / "test").rglob("*.jpeg"))
    train = sorted((root / "train").rglob("*.jpeg"))
    if not test or not train:
        return {"skipped": f"{root} lacks the official test or train scans"}
    rng = np.random.default_rng(0)
    files = [test[i] for i in sorted(rng.choice(len(test), min(n_files, len(test)), replace=False))]
    calibration = [train[i] for i in sorted(rng.choice(len(train), min(64, len(train)), replace=False))]
    tmp = Path(work) if work else Path(tempfile.mkdtemp(prefix="cxr-edge-resolution-"))
    models, how = {}, {}
    for s in sizes:
        print(f"resolution: exporting {model_name} at {s} px (int8 TFLite)", flush=True)
        path, info = export_int8(model_name, s, calibration, tmp / f"{s}", weights)
        models[s] = (path, info["spec"])
        how[s] = {"weights": info["weights"], "model_bytes": path.stat().st_size}
    print(f"resolution: timing {len(files)} official test JPEGs x {repeats}", flush=True)
    out = {"model": model_name, **measure(models, files, repeats)}
    for row in out["sizes"]:
        row.update(how[row["size"]])
    smallest = out["sizes"][0]
    out["target"] = TARGET
    out["any_size_within_target"] = any(r["ratio_lower_bound"] <= TARGET for r in out["sizes"])
    out["finding"] = (
        f"{model_name} at {smallest['size']} px, the smallest size measured: load_gray + one model pass "
        f"{smallest['load_plus_model_median_ms']:.1f} ms = {smallest['ratio_lower_bound']:.2f}x the bare decode "
        f"({out['bare_decode']['median_ms']:.1f} ms) before the input gate; "
        + ("some size is within" if out["any_size_within_target"] else "no size measured is within")
        + f" {TARGET:g}x even as a lower bound.")
    return out


def markdown(r: dict) -> str:
    if "skipped" in r:
        return f"# Input size vs issue 10's end-to-end target\n\n{r['skipped']}\n"
    m = r["machine"]
    lines = ["# Input size vs issue 10's end-to-end target", "",
             f"Generated by `{r['command']}` on {r['date']}; {m['cpu']}, {m['usable_cores']} usable cores. "
             f"{r['model']} exported as the shipped bundles are (dual output, int8 TFLite), one thread, batch 1; "
             f"{r['files']} full-resolution official test JPEGs (timing only) x {r['repeats']}, each file's steps "
             f"alternating. Bare full decode: median {r['bare_decode']['median_ms']:.2f} ms.", "",
             "| input px | load_gray ms | model pass ms | load_gray + model ms | x bare decode (lower bound of "
             "classify) | model alone x bare decode | model file |",
             "|---|---|---|---|---|---|---|"]
    for row in r["sizes"]:
        lines.append(f"| {row['size']} | {row['load_gray']['median_ms']:.2f} | {row['model']['median_ms']:.2f} | "
                     f"{row['load_plus_model_median_ms']:.2f} | {row['ratio_lower_bound']:.2f}x | "
                     f"{row['model_alone_ratio']:.2f}x | {row['model_bytes'] / 2**20:.2f} MiB |")
    lines += ["", f"Target: `Classifier.classify` <= {r['target']:g}x the bare decode. {r['finding']}", "",
              "The lower bound leaves out the input gate and building the result (`python -m benchmarks` "
              "measures both for the shipped model: `fast_path.gate`). Weights: "
              + ", ".join(sorted({row['weights'] for row in r['sizes']})) + " (the cost does not depend on them)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.resolution", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 192, 224])
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=None, help="the Kaggle layout (default: ../shared/data/chest_xray)")
    ap.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    date = time.strftime("%Y-%m-%d %H:%M")
    r = run(sorted(set(args.sizes)), args.files, args.repeats, data=args.data)
    r = {"command": "python -m benchmarks.resolution " + " ".join(argv if argv is not None else sys.argv[1:]),
         "date": date, "machine": describe(), **r}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resolution.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    (args.out / "resolution.md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
