"""Export a trained run to model bundles, measure parity, optionally install the embedded default.

    python -m export.convert [--run ID] [--out DIR] [--calibration N] [--install-default]

Without ``--run`` the best finished run by *validation* metric (``train.registry.best_run``) is exported.
Writes, under ``--out`` (default ``runs/<id>/bundles``):

* ``<name>-float32/``: model.tflite + model.onnx in float32,
* ``<name>-float16/``: model.tflite with float16 weights,
* ``<name>-int8/``: model.tflite (full-integer int8) + model.onnx (int8 QDQ), float32 in / out,
* ``parity.json`` / ``parity.md``: every artifact against the Keras float model, on the validation
  split and the official test set.

Int8 must lose at most 0.5 pp validation accuracy; when it does not, the int8 conversion is retried
(more calibration images; for ONNX also the classifier head kept in float), and the command exits with
status 3 and says why if no attempt passes. ``--install-default`` (gate passed only) copies the int8
bundle to ``cxr_edge/models/default/`` and the report to ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cxr_edge.bundle import CARD_NAME, DEFAULT_BUNDLE, Bundle, write_bundle  # noqa: E402
from cxr_edge.preprocess import InputSpec, to_input  # noqa: E402
from export import onnx as onnx_x  # noqa: E402
from export import parity  # noqa: E402
from export import savedmodel, tflite  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
# format name -> (backend, precision)
FORMATS = {"tflite-float32": ("tflite", "float32"), "tflite-float16": ("tflite", "float16"),
           "tflite-int8": ("tflite", "int8"), "onnx-float32": ("onnx", "float32"),
           "onnx-int8": ("onnx", "int8")}
FILE_NAMES = {"tflite": "model.tflite", "onnx": "model.onnx"}
BUNDLE_GROUPS = {"float32": ("tflite-float32", "onnx-float32"), "float16": ("tflite-float16",),
                 "int8": ("tflite-int8", "onnx-int8")}


def _check_formats(formats) -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown formats {unknown}; choose from {list(FORMATS)}")
    backends = [FORMATS[f][0] for f in formats]
    if len(set(backends)) != len(backends):
        raise ValueError(f"a bundle holds one model per backend, got {list(formats)}")


def build_artifact(saved_model: Path, fmt: str, dest: Path, calibration: np.ndarray | None,
                   work: Path, **options) -> Path:
    """One model file from the SavedModel. ``options`` (int8 ONNX): those of
    ``export.onnx.quantize_int8`` (per_channel, reduce_range, exclude_op_types, activations)."""
    backend, precision = FORMATS[fmt]
    if backend == "tflite":
        return tflite.convert(saved_model, dest, precision, calibration if precision == "int8" else None)
    fp32 = work / "float32.onnx"
    if not fp32.is_file():
        onnx_x.from_saved_model(saved_model, fp32)
    if precision == "float32":
        shutil.copyfile(fp32, dest)
        return dest
    return onnx_x.quantize_int8(fp32, dest, calibration, **options)


def _card(name: str, version: str, spec: InputSpec, formats, extra: dict | None) -> dict:
    card = {"name": name, "version": version, "input": spec.to_card(),
            "files": {FORMATS[f][0]: {"precision": FORMATS[f][1], "format": f} for f in formats},
            "precision": "+".join(sorted({FORMATS[f][1] for f in formats})),
            "date": time.strftime("%Y-%m-%d"), "exported_by": "export.convert"}
    card.update(extra or {})
    return card


def make_bundle(model, spec: InputSpec, out_dir: str | Path, calibration: np.ndarray,
                formats=("tflite-int8", "onnx-int8"), name: str = "cxr-edge", version: str = "0.0.0",
                card_extra: dict | None = None) -> Bundle:
    """Export a Keras inference model into one bundle folder (one model file per backend).
    ``calibration``: float32[N, S, S, 1] model inputs (preprocessed with ``spec``) for int8."""
    _check_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration = np.asarray(calibration, np.float32)
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        work = Path(tmp)
        saved = savedmodel.save(model, work / "saved_model", spec.size)
        files = {}
        for fmt in formats:
            backend = FORMATS[fmt][0]
            files[backend] = build_artifact(saved, fmt, out_dir / FILE_NAMES[backend], calibration, work)
    return write_bundle(out_dir, _card(name, version, spec, formats, card_extra), files)


# ---- the CLI: a run to bundles + parity report ---------------------------------------------------------

def _resolve_run(run: str | None) -> tuple[Path, dict]:
    from train.fit import RUNS_DIR
    from train.registry import best_run

    if run is None:
        best = best_run()
        print(f"best run by validation accuracy: {best['run_id']} (val acc {best['val_accuracy']:.4f})")
        run_dir = Path(best["dir"])
    else:
        run_dir = Path(run) if Path(run).is_dir() else RUNS_DIR / run
    if not (run_dir / "config.json").is_file():
        raise SystemExit(f"{run_dir}: not a run folder (no config.json)")
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if not metrics:
        print(f"warning: {run_dir.name} has no metrics.json (unfinished run?); exporting its last weights",
              file=sys.stderr)
    return run_dir, metrics


class _Data:
    """Validation, official test, and a seeded pool of calibration images of the run's protocol."""

    def __init__(self, cfg: dict, spec: InputSpec, data_arg: str | None):
        from train import data

        self.data, self.spec = data, spec
        root = data.data_dir(data_arg)
        splits = data.protocol_splits(root, cfg.get("protocol", "grouped"), cfg.get("val_fraction", 0.15),
                                      cfg.get("seed", 0))
        self.train = splits["train"]
        self.order = np.random.default_rng(cfg.get("seed", 0)).permutation(len(self.train))
        self.val, self.test = splits["val"], data.list_split(root, "test")
        self._calib = np.empty((0, spec.size, spec.size, 1), np.float32)

    def arrays(self, records):
        return to_input(self.data.load_images(records, self.spec.size), self.spec), self.data.labels_of(records)

    def calibration(self, n: int) -> np.ndarray:
        n = min(n, len(self.train))
        if len(self._calib) < n:
            more = [self.train[i] for i in self.order[len(self._calib):n]]
            self._calib = np.concatenate([self._calib, self.arrays(more)[0]])
        return self._calib[:n]


def _ladder(fmt: str, n: int) -> list[dict]:
    """Int8 attempts, in order, until one passes the gate."""
    if fmt == "tflite-int8":
        return [{"calibration": n}, {"calibration": 3 * n}]
    head = ("Softmax", "MatMul", "Gemm")
    return [{"calibration": n}, {"calibration": 3 * n},
            {"calibration": 3 * n, "exclude_op_types": head},
            {"calibration": 3 * n, "exclude_op_types": head, "activations": "uint8"}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run id or folder (default: best finished run by validation metric)")
    ap.add_argument("--out", help="output folder (default runs/<id>/bundles)")
    ap.add_argument("--calibration", type=int, default=300, help="training images for int8 calibration")
    ap.add_argument("--install-default", action="store_true",
                    help="install the int8 bundle as the runtime's embedded default model")
    ap.add_argument("--name", help="bundle name (default cxr-edge-<model>)")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the parity measurement")
    ap.add_argument("--data", help="Kaggle-layout data folder (default as train)")
    ap.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS),
                    help="artifacts to build (default all); --install-default needs both int8 ones")
    ap.add_argument("--no-ood-gate", dest="ood_gate", action="store_false",
                    help="do not fit the non-CXR gate (train.ood) into the int8 bundle")
    a = ap.parse_args(argv)

    run_dir, run_metrics = _resolve_run(a.run)
    cfg = json.loads((run_dir / "config.json").read_text())
    out = Path(a.out) if a.out else run_dir / "bundles"
    name = a.name or "cxr-edge-" + cfg["model"].replace("efficientnet_", "").replace("_", "-")
    if cfg.get("protocol", "grouped") != "grouped":
        print(f"warning: run protocol {cfg.get('protocol')!r} trains on images of the official test set; "
              "its official-test numbers are not a held-out measurement", file=sys.stderr)
    from train.registry import load_run

    model, spec, _ = load_run(run_dir)  # the inference model (no augmentation), best weights
    pretrained = run_metrics.get("pretrained") or cfg.get("weights") or "none"

    t0 = time.monotonic()
    d = _Data(cfg, spec, a.data)
    x_val, y_val = d.arrays(d.val)
    x_test, y_test = d.arrays(d.test)
    print(f"{len(x_val)} validation / {len(x_test)} official test images ({time.monotonic() - t0:.0f} s)")
    ref = {"validation": model.predict(x_val, batch_size=32, verbose=0),
           "official_test": model.predict(x_test, batch_size=32, verbose=0)}
    ys = {"validation": y_val, "official_test": y_test}
    xs = {"validation": x_val, "official_test": x_test}
    report = {"training_run": run_dir.name, "model": cfg["model"], "pretrained": pretrained,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": a.threads, "calibration": a.calibration,
              "protocol": cfg.get("protocol", "grouped"), "input": spec.to_card(),
              "keras": {s: parity.compare(ys[s], ref[s], ref[s]) for s in ys}, "artifacts": []}

    def measure(fmt: str, path: Path) -> dict:
        backend, precision = FORMATS[fmt]
        res = {"format": fmt, "backend": backend, "precision": precision, "bytes": path.stat().st_size}
        for s in ys:
            res[s] = parity.compare(ys[s], parity.predict(path, backend, xs[s], a.threads), ref[s])
        print(f"  {fmt:<15} {res['bytes'] / 2**20:6.2f} MiB  val acc {res['validation']['accuracy']:.4f} "
              f"agree {res['validation']['agreement']:.4f} max|dp| {res['validation']['max_abs_diff']:.4f}  "
              f"test acc {res['official_test']['accuracy']:.4f}", flush=True)
        return res

    ref_acc = report["keras"]["validation"]["accuracy"]
    print(f"  {'keras-float32':<15}             val acc {ref_acc:.4f}  "
          f"test acc {report['keras']['official_test']['accuracy']:.4f}", flush=True)
    bundles: dict[str, tuple[Path, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        work = Path(tmp)
        saved = savedmodel.save(model, work / "saved_model", spec.size)
        for group, formats in BUNDLE_GROUPS.items():
            formats = tuple(f for f in formats if f in a.formats)
            if not formats:
                continue
            bdir = out / f"{name}-{group}"
            if bdir.exists():
                shutil.rmtree(bdir)
            bdir.mkdir(parents=True)
            files = {}
            for fmt in formats:
                backend, precision = FORMATS[fmt]
                dest = bdir / FILE_NAMES[backend]
                attempts = _ladder(fmt, a.calibration) if precision == "int8" else [{}]
                tried = []
                for opts in attempts:
                    opts = dict(opts)
                    n = opts.pop("calibration", 0)
                    calib = d.calibration(n) if n else None
                    build_artifact(saved, fmt, dest, calib, work, **opts)
                    res = measure(fmt, dest)
                    drop = 100 * (ref_acc - res["validation"]["accuracy"])
                    tried.append({"calibration": len(calib) if calib is not None else 0, **opts,
                                  "validation_accuracy": res["validation"]["accuracy"], "drop_pp": round(drop, 3)})
                    if precision != "int8" or drop <= parity.MAX_INT8_DROP_PP + 1e-9:
                        break
                    print(f"  {fmt}: {drop:.2f} pp below float on validation, retrying", flush=True)
                if precision == "int8":
                    res["attempts"], res["options"] = tried, {k: v for k, v in tried[-1].items()
                                                              if k not in ("validation_accuracy", "drop_pp")}
                res["path"] = str(dest.relative_to(out))
                report["artifacts"].append(res)
                files[backend] = dest
            bundles[group] = (bdir, formats, files)

    failures = parity.gate(report)
    report["gate"] = {"split": "validation", "max_int8_drop_pp": parity.MAX_INT8_DROP_PP,
                      "passed": not failures, "failures": failures}
    by_fmt = {r["format"]: r for r in report["artifacts"]}
    for group, (bdir, formats, files) in bundles.items():
        primary = by_fmt[formats[0]]
        metrics = {"validation": primary["validation"]["metrics"],
                   "official_test": primary["official_test"]["metrics"], "measured_with": formats[0],
                   "by_backend": {FORMATS[f][0]: {s: by_fmt[f][s]["metrics"] for s in ys} for f in formats},
                   "parity": {FORMATS[f][0]: {s: {k: v for k, v in by_fmt[f][s].items() if k != "metrics"}
                                              for s in ys} for f in formats}}
        extra = {"training_run": run_dir.name, "model": cfg["model"], "pretrained": pretrained,
                 "metrics": metrics}
        if group == "int8":
            extra["calibration_images"] = {FORMATS[f][0]: by_fmt[f]["options"]["calibration"] for f in formats}
        b = write_bundle(bdir, _card(f"{name}" if group == "int8" else f"{name}-{group}", a.version, spec,
                                     formats, extra), files)
        for f in formats:
            entry = b.card["files"][FORMATS[f][0]]
            by_fmt[f]["sha256"] = entry["sha256"]
    (out / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "parity.md").write_text(parity.to_markdown(report))
    print(f"bundles and parity report in {out}")
    if failures:
        print("EXPORT FAILED: int8 accuracy gate (validation split):\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 3
    if "int8" in bundles:  # what ships with the int8 bundle: calibration and the non-CXR gate
        from export.calibrate import calibrate_bundle

        int8_dir, int8_formats, _ = bundles["int8"]
        rec = calibrate_bundle(int8_dir, run_dir, FORMATS[int8_formats[0]][0], val=(x_val, y_val))
        print(f"temperature {rec['temperature']:.3f} fitted on validation (ECE {rec['val_ece']['before']:.3f}"
              f" -> {rec['val_ece']['after']:.3f})")
        from export.cam import add_cam

        if add_cam(model, spec.size, int8_dir):
            print("class-activation model (features.tflite, cam.npz) added to the int8 bundle")
        if a.ood_gate:
            from train.ood import main as fit_ood_gate

            fit_ood_gate([str(int8_dir)] + (["--data", a.data] if a.data else []))
    if a.install_default:
        if "int8" not in bundles or len(bundles["int8"][1]) != 2:
            print("--install-default needs the tflite-int8 and onnx-int8 artifacts", file=sys.stderr)
            return 2
        install_default(bundles["int8"][0], out)
    return 0


def install_default(bundle_dir: Path, report_dir: Path, dest: Path | None = None,
                    results: Path | None = None) -> Path:
    """Copy an int8 bundle (model.tflite, model.onnx, card.json, ood.npz) to the runtime's embedded default
    folder and the parity report to ``benchmarks/results/``."""
    dest, results = Path(dest or DEFAULT_BUNDLE), Path(results or RESULTS_DIR)
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(bundle_dir.iterdir()):  # model files, card.json and the gate's ood.npz
        if f.is_file():
            shutil.copyfile(f, dest / f.name)
    results.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report_dir / "parity.json", results / "parity.json")
    shutil.copyfile(report_dir / "parity.md", results / "parity.md")
    print(f"installed {bundle_dir.name} as the embedded default ({dest}); report in {results}")
    return dest


if __name__ == "__main__":
    sys.exit(main())
