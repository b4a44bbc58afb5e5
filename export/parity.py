"""Parity of exported artifacts with the Keras float model, measured through the runtime's own engines
(``cxr_edge.engines.open_engine``), so what is reported is what users get."""
from __future__ import annotations

import numpy as np

from train.metrics import classification_metrics

MAX_INT8_DROP_PP = 0.5  # int8 may lose at most this much 3-class accuracy (validation split) vs float
MAX_MODEL_BYTES = 6 * 2**20  # issue 10: every model file at most 6 MiB ...
MAX_BUNDLE_BYTES = 8 * 2**20  # ... and a bundle at most 8 MiB


def predict(path, backend: str, x: np.ndarray, threads: int | None = None, batch: int = 32) -> np.ndarray:
    from cxr_edge.engines import open_engine

    engine = open_engine(path, backend, threads)
    return np.concatenate([engine.run(x[i:i + batch]) for i in range(0, len(x), batch)])


def features(path, backend: str, x: np.ndarray, threads: int | None = None) -> np.ndarray | None:
    """The feature-map output (the rank-4 one) of a model file on ``x``, read with the engines' libraries
    directly (an independent check of the file; the runtime's own path is tested in tests/test_heatmap.py);
    ``None`` for a single-output model."""
    x = np.asarray(x, np.float32)
    if backend == "onnx":
        import onnxruntime as ort

        from cxr_edge.cpu import onnx_session_options  # the runtime's kernels on this CPU

        sess = ort.InferenceSession(str(path), onnx_session_options(ort), providers=["CPUExecutionProvider"])
        outs = sess.run(None, {sess.get_inputs()[0].name: x})
    else:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path), num_threads=threads or 1)
        interp.resize_tensor_input(interp.get_input_details()[0]["index"], list(x.shape))
        interp.allocate_tensors()
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        outs = [interp.get_tensor(d["index"]) for d in interp.get_output_details()]
    four = [np.asarray(o, np.float32) for o in outs if np.ndim(o) == 4]
    return four[0] if four else None


def cam_diff(feats: np.ndarray | None, ref_feats: np.ndarray, weights: np.ndarray,
             classes: np.ndarray) -> dict | None:
    """How far the class-activation maps (``export.cam.cam_maps``, 0..1) from an artifact's feature map
    ``feats`` lie from those of the Keras feature map ``ref_feats``, each image's map taken for
    ``classes[i]`` (the float model's label: the map a user is shown). ``{"mean", "max"}`` absolute
    difference over images and map cells."""
    from export.cam import cam_maps

    if feats is None:
        return None
    d = np.stack([np.abs(cam_maps(feats, weights, k) - cam_maps(ref_feats, weights, k))
                  for k in range(weights.shape[1])], 1)[np.arange(len(classes)), np.asarray(classes)]
    return {"mean": float(d.mean()), "max": float(d.max())}


def drop_pp(ref_accuracy: float, accuracy: float) -> float:
    """How many percentage points ``accuracy`` lies below the float model's ``ref_accuracy``."""
    return 100.0 * (ref_accuracy - accuracy)


def compare(y: np.ndarray, probs: np.ndarray, ref: np.ndarray) -> dict:
    """Metrics of ``probs`` against labels ``y``, and its agreement with the reference ``ref``."""
    diff = np.abs(np.asarray(probs, np.float64) - np.asarray(ref, np.float64))
    m = classification_metrics(y, probs)
    return {"n": int(len(y)), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "agreement": float((probs.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "metrics": m}


def gate(report: dict) -> list[str]:
    """Int8 artifacts whose validation accuracy is more than MAX_INT8_DROP_PP below the float model's."""
    ref = report["keras"]["validation"]["accuracy"]
    bad = []
    for a in report["artifacts"]:
        drop = drop_pp(ref, a["validation"]["accuracy"])
        a["validation_drop_pp"] = round(drop, 3)
        if a["precision"] == "int8" and drop > MAX_INT8_DROP_PP + 1e-9:
            bad.append(f"{a['format']}: validation accuracy {a['validation']['accuracy']:.4f} is "
                       f"{drop:.2f} pp below float {ref:.4f} (limit {MAX_INT8_DROP_PP} pp)")
    return bad


def _calibration_note(report: dict) -> str:
    used = report.get("calibration", {}).get("used", {})
    if not used:
        return ""
    note = "Int8 calibration: " + ", ".join(f"{f} {n} training images" for f, n in used.items()) + "."
    prep = report.get("int8_preparation")
    if prep:
        bc = prep["bias_correction"]
        note += (" The int8 converters read the model prepared by `export.prequant`: gray input "
                 f"{'folded into the first convolution' if prep['gray_input_folded'] else 'not folded'}, "
                 f"biases of {bc['layers']} layers corrected for int8 kernel rounding (input means over "
                 f"{bc['calibration_images']} calibration images).")
    return note


def to_markdown(report: dict) -> str:
    k = report["keras"]
    lines = [f"# Export parity: run `{report['training_run']}`", "",
             f"Model `{report['model']}`, {report['date']}. Every artifact run through "
             f"`cxr_edge.engines` ({report['threads']} threads) and compared with the Keras float32 model. "
             f"Gate: int8 loses at most {MAX_INT8_DROP_PP} pp 3-class accuracy on the **validation** split "
             f"(the official test set is reported, never used to decide). " + _calibration_note(report), "",
             f"Gate: **{'passed' if report['gate']['passed'] else 'FAILED'}**", ""]
    for split, title in (("validation", "Validation split"), ("official_test", "Official test set")):
        if split not in k:
            continue
        lines += [f"## {title} (n = {k[split]['n']})", "",
                  "| artifact | size | accuracy | macro-F1 | agreement | max abs Δp | mean abs Δp |",
                  "|---|---:|---:|---:|---:|---:|---:|",
                  f"| Keras float32 | | {k[split]['accuracy']:.4f} | {k[split]['macro_f1']:.4f} | | | |"]
        for a in report["artifacts"]:
            s = a[split]
            lines.append(f"| {a['format']} | {a['bytes'] / 2**20:.2f} MiB | {s['accuracy']:.4f} | "
                         f"{s['macro_f1']:.4f} | {s['agreement']:.4f} | {s['max_abs_diff']:.4f} | "
                         f"{s['mean_abs_diff']:.5f} |")
        lines.append("")
    cams = [a for a in report["artifacts"] if a.get("cam_diff") is not None]
    if cams:
        lines += ["## Heatmaps from the feature-map output", "",
                  "Class-activation maps (0..1, for the float model's label) from each artifact's second output "
                  "against the Keras float model's, on the first validation images: mean / largest absolute "
                  "difference per map cell " + ", ".join(f"{a['format']} {a['cam_diff']['mean']:.4f} / "
                                                         f"{a['cam_diff']['max']:.4f}" for a in cams) + ".", ""]
    notes = []
    for a in report["artifacts"]:
        for i, t in enumerate(a.get("attempts", []), 1):
            opts = {k: v for k, v in t.items() if k not in ("validation_accuracy", "drop_pp")}
            notes.append(f"- {a['format']} attempt {i} {opts}: validation accuracy "
                         f"{t['validation_accuracy']:.4f} (drop {t['drop_pp']:.2f} pp vs float)")
    if notes:
        lines += ["## Int8 attempts", ""] + notes + [""]
    if report.get("size"):
        lines += ["## Bundle sizes", "",
                  f"Limits: every model file at most {MAX_MODEL_BYTES / 2**20:.0f} MiB, a bundle at most "
                  f"{MAX_BUNDLE_BYTES / 2**20:.0f} MiB.", ""]
    for group, size in report.get("size", {}).items():
        lines.append(f"- bundle {group}: {size['total_bytes'] / 2**20:.2f} MiB in all"
                     + ("; " + "; ".join(size["problems"]) if size["problems"] else ""))
    lines.append("")
    if report["gate"]["failures"]:
        lines += ["## Gate failures", ""] + [f"- {f}" for f in report["gate"]["failures"]] + [""]
    return "\n".join(lines)
