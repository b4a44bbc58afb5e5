"""Export a trained run to model bundles, measure parity, optionally install the embedded default.

    python -m export.convert [--run ID] [--out DIR] [--calibration N] [--install-default]

Without ``--run`` the best finished run by *validation* metric (``train.registry.best_run``) is exported.
A run is a folder ``runs/<id>/`` with ``config.json`` and ``weights.npz`` (or ``weights.part*.npz``, as the
GPU lease brings them back), for any model ``train.models`` builds. Writes, under ``--out`` (default
``runs/<id>/bundles``):

* ``<name>-float32/``: model.tflite + model.onnx in float32,
* ``<name>-float16/``: model.tflite with float16 weights,
* ``<name>-int8/``: model.tflite (full-integer int8) + model.onnx (int8 QDQ), float32 in / out,
* ``parity.json`` / ``parity.md``: every artifact against the Keras float model, on the validation
  split and the official test set.

Every model file has two outputs when the model has a ``features`` layer (``export.cam``): the
probabilities ``[N, 3]`` and the last feature map ``[N, h, w, C]``, so that a label and its heatmap cost
one network pass; the bundle carries the dense head as ``cam.npz``. ``--fine-features LAYER`` puts that map
on ``LAYER``'s finer grid and ``LAYER``'s channels beside it (``export.cam.feature_tensor``): what the input
gate of a small-input model reads (the shipped 144 px model: ``block11_expand_relu``, 9x9).

Only the validation split decides anything: int8 must lose at most 0.5 pp validation accuracy; when it
does not, the int8 conversion is retried (more calibration images; for ONNX also the classifier head kept
in float), and the command exits with status 3 and says why if no attempt passes. The temperature is
fitted on validation. The official test set is measured and reported, never consulted. Calibration
images come from the training split. ``--install-default`` (gate passed, size limits kept) copies the
int8 bundle to ``cxr_edge/models/default/`` and the report to ``benchmarks/results/``; a bundle over the
size limits (a model file over 6 MiB, the bundle over 8 MiB) is not installed (exit status 4) unless
``--allow-oversize``.

The int8 converters read the model as ``export.prequant`` prepares it (gray input folded into the stem,
biases corrected for int8 kernel rounding; ``--no-int8-prep`` skips it); the float artifacts, the float
reference and the heatmap weights are the model as trained.

``make_bundle`` (used by the tests) runs the same path, ``export_model``, for any Keras model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cxr_edge.bundle import DEFAULT_BUNDLE, Bundle, load_bundle, write_bundle  # noqa: E402
from cxr_edge.preprocess import InputSpec  # noqa: E402
from export import cam  # noqa: E402
from export import parity, prequant  # noqa: E402
from export import savedmodel  # noqa: E402
from export.artifacts import (BUNDLE_GROUPS, FILE_NAMES, FORMATS, Target, _check_formats, _ladder,  # noqa: E402
                              build_artifact, int8_with_retries)
from export.calibrate import temperature_record  # noqa: E402
# the formats, one model file and the int8 retry ladder: export/artifacts.py; the run and its data: export/rundata.py
from export.rundata import ExportData, Split, _resolve_run, run_data  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
MAX_MODEL_BYTES, MAX_BUNDLE_BYTES = parity.MAX_MODEL_BYTES, parity.MAX_BUNDLE_BYTES
CAM_CHECK_IMAGES = 32  # validation images on which each artifact's heatmap is compared with Keras's


class ExportError(RuntimeError):
    pass


# ---- the reference: the Keras float model --------------------------------------------------------------

@dataclass
class _Ref:
    probs: dict  # split -> Keras float probabilities
    features: np.ndarray | None  # Keras feature map on the first CAM_CHECK_IMAGES validation images
    cam_weights: np.ndarray | None
    extra: dict = field(default_factory=dict)


# ---- the one export path -----------------------------------------------------------------------------

def _reference(model, data: ExportData, fine: str | None = None) -> _Ref:
    probs = {s: model.predict(d.x, batch_size=32, verbose=0) for s, d in data.splits().items()}
    if not cam.has_features(model):
        return _Ref(probs, None, None)
    feats = cam.keras_features(model, data.val.x[:CAM_CHECK_IMAGES], fine)
    return _Ref(probs, feats, model.get_layer("probs").get_weights()[0])


def _measure(fmt: str, path: Path, data: ExportData, ref: _Ref, threads: int) -> dict:
    backend, precision = FORMATS[fmt]
    res = {"format": fmt, "backend": backend, "precision": precision, "bytes": path.stat().st_size}
    probs = {}
    for s, d in data.splits().items():
        probs[s] = parity.predict(path, backend, d.x, threads)
        res[s] = parity.compare(d.y, probs[s], ref.probs[s])
    if ref.features is not None:
        feats = parity.features(path, backend, data.val.x[:CAM_CHECK_IMAGES], threads)
        labels = ref.probs["validation"][:CAM_CHECK_IMAGES].argmax(1)
        res["cam_diff"] = parity.cam_diff(feats, ref.features, ref.cam_weights, labels)
    res["_val_probs"] = probs["validation"]  # for the temperature; not written to the report
    v, c = res["validation"], res.get("cam_diff")
    print(f"  {fmt:<15} {res['bytes'] / 2**20:6.2f} MiB  val acc {v['accuracy']:.4f} agree {v['agreement']:.4f} "
          f"max|dp| {v['max_abs_diff']:.4f}" + (f"  heatmap |d| mean {c['mean']:.4f} max {c['max']:.4f}" if c else ""),
          flush=True)
    return res


def _build_measured(saved: Path, fmt: str, dest: Path, work: Path, data: ExportData, ref: _Ref,
                    n_calibration: int, threads: int) -> dict:
    if FORMATS[fmt][1] != "int8":
        build_artifact(saved, fmt, dest, None, work)
        return _measure(fmt, dest, data, ref, threads)

    def attempt(opts: dict) -> tuple[dict, dict]:
        calib = np.asarray(data.calibration(opts.pop("calibration")), np.float32)
        build_artifact(saved, fmt, dest, calib, work, **opts)
        return _measure(fmt, dest, data, ref, threads), {"calibration": len(calib), **opts}

    ref_acc = parity.compare(data.val.y, ref.probs["validation"], ref.probs["validation"])["accuracy"]
    return int8_with_retries(fmt, _ladder(fmt, n_calibration), attempt, ref_acc)


def _card(target: Target, version: str, spec: InputSpec, arts: dict, extra: dict) -> dict:
    primary = arts[target.formats[0]]
    splits = [s for s in ("validation", "official_test") if s in primary]
    card = {"name": target.name, "version": version, "input": spec.to_card(),
            "files": {FORMATS[f][0]: {"precision": FORMATS[f][1], "format": f} for f in target.formats},
            "precision": "+".join(sorted({FORMATS[f][1] for f in target.formats})),
            "date": time.strftime("%Y-%m-%d"), "exported_by": "export.convert", **extra}
    card["metrics"] = {**{s: primary[s]["metrics"] for s in splits}, "measured_with": target.formats[0],
                       "by_backend": {FORMATS[f][0]: {s: arts[f][s]["metrics"] for s in splits}
                                      for f in target.formats},
                       "parity": {FORMATS[f][0]: {s: {k: v for k, v in arts[f][s].items() if k != "metrics"}
                                                  for s in splits} for f in target.formats}}
    if any(FORMATS[f][1] == "int8" for f in target.formats):
        card["calibration_images"] = {FORMATS[f][0]: arts[f]["options"]["calibration"]
                                      for f in target.formats if "options" in arts[f]}
    return card


def _write_bundle(model, target: Target, version: str, spec: InputSpec, arts: dict, data: ExportData,
                  extra: dict, fitted_on: str | None, fine: str | None = None) -> Bundle:
    """card.json (metrics, temperature fitted on validation, heatmap entry) + cam.npz."""
    card = _card(target, version, spec, arts, extra)
    if fitted_on:
        rec = temperature_record(data.val.y, arts[target.formats[0]]["_val_probs"],
                                 FORMATS[target.formats[0]][0], fitted_on=fitted_on)
        card.update(temperature=rec["temperature"], calibration=rec)
    entry = cam.write_cam(model, target.dir, fine)
    if entry:
        card["cam"] = entry
    files = {FORMATS[f][0]: target.dir / FILE_NAMES[FORMATS[f][0]] for f in target.formats}
    return write_bundle(target.dir, card, files)


def export_model(model, spec: InputSpec, data: ExportData, targets: list[Target], *, version: str = "0.0.0",
                 n_calibration: int = 300, threads: int = 2, card_extra: dict | None = None,
                 report_extra: dict | None = None, fitted_on: str | None = "validation split",
                 n_calibration_onnx: int | None = None, fine_features: str | None = None,
                 int8_prep: bool = True) -> dict:
    """Export a Keras inference model into ``targets`` (bundle folders), each artifact built (int8: along
    the retry ladder), measured against the float model, gated on validation, and its card written with
    the temperature fitted on validation (``fitted_on`` names the split; ``None``: no temperature).
    ``fine_features``: a layer whose finer map joins the feature output (``export.cam.feature_tensor``).
    ``int8_prep``: the int8 converters read the model with its gray input folded and its biases corrected
    for int8 rounding (``export.prequant``, means over ``n_calibration`` calibration images); the float
    artifacts and the reference always read ``model`` as it is.
    Returns the parity report (``report["gate"]["passed"]``)."""
    for t in targets:
        _check_formats(t.formats)
    ref = _reference(model, data, fine_features)
    report = {**(report_extra or {}), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": threads,
              "input": spec.to_card(), "keras": {s: parity.compare(d.y, ref.probs[s], ref.probs[s])
                                                 for s, d in data.splits().items()}, "artifacts": []}
    print(f"  {'keras-float32':<15}             val acc {report['keras']['validation']['accuracy']:.4f}", flush=True)
    arts: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        work = Path(tmp)
        saved = savedmodel.save(cam.dual_output(model, fine_features), work / "saved_model", spec.size)
        saved_int8 = saved
        if int8_prep and any(FORMATS[f][1] == "int8" for t in targets for f in t.formats):
            ready, report["int8_preparation"] = _int8_model(model, data, n_calibration)
            saved_int8 = savedmodel.save(cam.dual_output(ready, fine_features), work / "saved_int8", spec.size)
        for t in targets:
            t.dir.mkdir(parents=True, exist_ok=True)
            for fmt in t.formats:
                dest = t.dir / FILE_NAMES[FORMATS[fmt][0]]
                n = n_calibration_onnx if fmt.startswith("onnx") and n_calibration_onnx else n_calibration
                source = saved_int8 if FORMATS[fmt][1] == "int8" else saved
                arts[fmt] = _build_measured(source, fmt, dest, work, data, ref, n, threads)
                arts[fmt]["path"] = str(dest)
    for t in targets:
        extra = dict(card_extra or {})
        if t.group == "int8" and "int8_preparation" in report:
            extra["int8_preparation"] = report["int8_preparation"]
        b = _write_bundle(model, t, version, spec, arts, data, extra, fitted_on, fine_features)
        for f in t.formats:
            arts[f]["sha256"] = b.card["files"][FORMATS[f][0]]["sha256"]
    report["artifacts"] = [{k: v for k, v in a.items() if not k.startswith("_")} for a in arts.values()]
    report["calibration"] = {"requested": n_calibration,
                             "used": {f: a["options"]["calibration"] for f, a in arts.items() if "options" in a}}
    failures = parity.gate(report)
    report["gate"] = {"split": "validation", "max_int8_drop_pp": parity.MAX_INT8_DROP_PP,
                      "passed": not failures, "failures": failures}
    report["size"] = {t.group: size_check(t.dir) for t in targets}
    return report


def _int8_model(model, data: ExportData, n_calibration: int):
    """``model`` rewritten for the int8 converters (``export.prequant``), and what was done."""
    t0 = time.monotonic()
    folded = prequant.fold_gray_input(model)
    x = np.asarray(data.calibration(n_calibration), np.float32)
    ready, layers = prequant.bias_correct(folded, x)
    info = {"gray_input_folded": folded is not model,
            "bias_correction": {"layers": layers, "calibration_images": len(x)}}
    print(f"  int8 preparation: gray input folded {info['gray_input_folded']}, bias correction on {layers} "
          f"layers from {len(x)} calibration images ({time.monotonic() - t0:.0f} s)", flush=True)
    return ready, info


def size_check(bundle_dir: Path) -> dict:
    """Bytes of every file in a bundle, against MAX_MODEL_BYTES (model files) and MAX_BUNDLE_BYTES."""
    b = load_bundle(bundle_dir)
    files = {f.name: f.stat().st_size for f in sorted(Path(bundle_dir).iterdir()) if f.is_file()}
    models = {b.card["files"][k]["path"] for k in b.backends()}
    problems = [f"{n}: {s / 2**20:.2f} MiB > {MAX_MODEL_BYTES / 2**20:.0f} MiB" for n, s in files.items()
                if n in models and s > MAX_MODEL_BYTES]
    if sum(files.values()) > MAX_BUNDLE_BYTES:
        problems.append(f"bundle: {sum(files.values()) / 2**20:.2f} MiB > {MAX_BUNDLE_BYTES / 2**20:.0f} MiB")
    return {"bytes": files, "total_bytes": sum(files.values()), "problems": problems}


def make_bundle(model, spec: InputSpec, out_dir: str | Path, calibration: np.ndarray,
                formats=("tflite-int8", "onnx-int8"), name: str = "cxr-edge", version: str = "0.0.0",
                card_extra: dict | None = None, val: tuple | None = None, test: tuple | None = None,
                threads: int = 1, temperature: bool = False, fine_features: str | None = None) -> Bundle:
    """``export_model`` into one bundle folder. ``calibration``: float32[N, S, S, 1] model inputs
    (preprocessed with ``spec``) for int8; ``val`` / ``test``: ``(inputs, labels)``. Without ``val`` the
    calibration images labelled by the float model itself stand in (the gate then measures agreement).
    ``temperature``: fit one on ``val`` (off by default: a handful of test images gives a degenerate one).
    Raises :class:`ExportError` when int8 fails the gate."""
    calibration = np.asarray(calibration, np.float32)
    if val is None:
        val = (calibration, model.predict(calibration, verbose=0).argmax(1))
    data = ExportData(Split(*val), Split(*test) if test is not None else None, lambda n: calibration[:n])
    report = export_model(model, spec, data, [Target("bundle", Path(out_dir), tuple(formats), name)],
                          version=version, n_calibration=len(calibration), threads=threads,
                          card_extra=card_extra, fitted_on="validation split" if temperature else None,
                          fine_features=fine_features)
    if not report["gate"]["passed"]:
        raise ExportError("; ".join(report["gate"]["failures"]))
    return load_bundle(out_dir)


# ---- the CLI: a run to bundles + parity report ---------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m export.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="run id or folder (default: best finished run by validation metric)")
    ap.add_argument("--out", help="output folder (default runs/<id>/bundles)")
    ap.add_argument("--calibration", type=int, default=300, help="training images for int8 calibration "
                    "(the retry ladder may use 3x as many)")
    ap.add_argument("--calibration-onnx", type=int, default=None,
                    help="the same for the ONNX model (default: --calibration); each format's sample starts "
                         "its own ladder, decided on validation")
    ap.add_argument("--install-default", action="store_true",
                    help="install the int8 bundle as the runtime's embedded default model")
    ap.add_argument("--allow-oversize", action="store_true",
                    help=f"install even if a model file exceeds {MAX_MODEL_BYTES / 2**20:.0f} MiB or the "
                    f"bundle {MAX_BUNDLE_BYTES / 2**20:.0f} MiB")
    ap.add_argument("--name", help="bundle name (default cxr-edge-<model>)")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the parity measurement")
    ap.add_argument("--data", help="Kaggle-layout data folder (default as train)")
    ap.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS),
                    help="artifacts to build (default all); --install-default needs both int8 ones")
    ap.add_argument("--fine-features", metavar="LAYER",
                    help="also put LAYER's finer feature map into the feature output, the last map upsampled onto "
                         "its grid (export.cam.feature_tensor; for small inputs: the input gate reads it), e.g. "
                         "block11_expand_relu, Lite0's stride-16 map")
    ap.add_argument("--no-int8-prep", dest="int8_prep", action="store_false",
                    help="convert int8 from the model as trained, without folding its gray input and correcting "
                         "its biases for int8 rounding (export.prequant)")
    ap.add_argument("--no-ood-gate", dest="ood_gate", action="store_false",
                    help="do not fit the non-CXR gate (train.ood) into the int8 bundle")
    return ap


def _targets(out: Path, name: str, formats) -> list[Target]:
    targets = []
    for group, fmts in BUNDLE_GROUPS.items():
        fmts = tuple(f for f in fmts if f in formats)
        if fmts:
            bdir = out / f"{name}-{group}"
            if bdir.exists():
                shutil.rmtree(bdir)
            targets.append(Target(group, bdir, fmts, name if group == "int8" else f"{name}-{group}"))
    return targets


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    from train.registry import load_run

    run_dir, run_metrics = _resolve_run(a.run)
    model, spec, cfg = load_run(run_dir)  # the inference model (no augmentation), best weights
    out = Path(a.out) if a.out else run_dir / "bundles"
    name = a.name or "cxr-edge-" + cfg["model"].replace("efficientnet_", "").replace("_", "-")
    protocol = cfg.get("protocol", "grouped")
    if protocol != "grouped":
        print(f"warning: run protocol {protocol!r} trains on images of the official test set; "
              "its official-test numbers are not a held-out measurement", file=sys.stderr)
    pretrained = run_metrics.get("pretrained") or cfg.get("weights") or "none"
    data = run_data(cfg, spec, a.data)
    targets = _targets(out, name, a.formats)
    info = {"training_run": run_dir.name, "model": cfg["model"], "pretrained": pretrained}
    report = export_model(model, spec, data, targets, version=a.version, n_calibration=a.calibration,
                          n_calibration_onnx=a.calibration_onnx, threads=a.threads, report_extra={**info, "protocol": protocol},
                          card_extra=info, fitted_on=f"validation split of {run_dir.name}",
                          fine_features=a.fine_features, int8_prep=a.int8_prep)
    int8 = next((t for t in targets if t.group == "int8"), None)
    if report["gate"]["passed"] and int8 and a.ood_gate:
        from train.ood import main as fit_ood_gate

        fit_ood_gate([str(int8.dir)] + (["--data", a.data] if a.data else []))
        report["size"]["int8"] = size_check(int8.dir)  # with the gate's ood.npz
    _write_report(report, out)
    return _finish(report, int8, out, a)


def _write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "parity.md").write_text(parity.to_markdown(report))
    print(f"bundles and parity report in {out}")


def _finish(report: dict, int8: Target | None, out: Path, a) -> int:
    if report["gate"]["failures"]:
        print("EXPORT FAILED: int8 accuracy gate (validation split):\n  "
              + "\n  ".join(report["gate"]["failures"]), file=sys.stderr)
        return 3
    for group, s in report["size"].items():  # the limits are the shipped (int8) bundle's; float ones are
        for p in s["problems"]:  # reference artifacts, reported only
            print(f"size limit exceeded ({group}{'' if group == 'int8' else ', not shipped'}): {p}", file=sys.stderr)
    oversize = report["size"].get("int8", {}).get("problems", []) if int8 else []
    if not a.install_default:
        return 0
    if int8 is None or len(int8.formats) != 2:
        print("--install-default needs the tflite-int8 and onnx-int8 artifacts", file=sys.stderr)
        return 2
    if oversize and not a.allow_oversize:
        print("not installed: the int8 bundle breaks the size limits (--allow-oversize to install anyway)",
              file=sys.stderr)
        return 4
    install_default(int8.dir, out)
    return 0


def install_default(bundle_dir: Path, report_dir: Path, dest: Path | None = None,
                    results: Path | None = None) -> Path:
    """Replace the runtime's embedded default bundle with an int8 bundle (every file in it: model files,
    card.json, cam.npz, the gate's ood.npz) and copy the parity report to ``benchmarks/results/``. Files of
    the previous default that the new bundle lacks (an old ``features.tflite``) are removed."""
    dest, results = Path(dest or DEFAULT_BUNDLE), Path(results or RESULTS_DIR)
    dest.mkdir(parents=True, exist_ok=True)
    new = {f.name for f in bundle_dir.iterdir() if f.is_file()}
    for f in dest.iterdir():
        if f.is_file() and f.name not in new:
            f.unlink()
    for name in sorted(new):
        shutil.copyfile(bundle_dir / name, dest / name)
    results.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report_dir / "parity.json", results / "parity.json")
    shutil.copyfile(report_dir / "parity.md", results / "parity.md")
    print(f"installed {bundle_dir.name} as the embedded default ({dest}); report in {results}")
    return dest


if __name__ == "__main__":
    sys.exit(main())
