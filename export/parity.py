"""Parity of exported artifacts with the Keras float model, measured through the runtime's own engines
(``cxr_edge.engines.open_engine``), so what is reported is what users get."""
from __future__ import annotations

import numpy as np

from train.metrics import classification_metrics

MAX_INT8_DROP_PP = 0.5  # int8 may lose at most this much 3-class accuracy (validation split) vs float


def predict(path, backend: str, x: np.ndarray, threads: int | None = None, batch: int = 32) -> np.ndarray:
    from cxr_edge.engines import open_engine

    engine = open_engine(path, backend, threads)
    return np.concatenate([engine.run(x[i:i + batch]) for i in range(0, len(x), batch)])


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
        drop_pp = 100.0 * (ref - a["validation"]["accuracy"])
        a["validation_drop_pp"] = round(drop_pp, 3)
        if a["precision"] == "int8" and drop_pp > MAX_INT8_DROP_PP + 1e-9:
            bad.append(f"{a['format']}: validation accuracy {a['validation']['accuracy']:.4f} is "
                       f"{drop_pp:.2f} pp below float {ref:.4f} (limit {MAX_INT8_DROP_PP} pp)")
    return bad


def to_markdown(report: dict) -> str:
    k = report["keras"]
    lines = [f"# Export parity: run `{report['training_run']}`", "",
             f"Model `{report['model']}`, {report['date']}. Every artifact run through "
             f"`cxr_edge.engines` ({report['threads']} threads) and compared with the Keras float32 model. "
             f"Gate: int8 loses at most {MAX_INT8_DROP_PP} pp 3-class accuracy on the **validation** split "
             f"(the official test set is reported, never used to decide). "
             f"Calibration: {report['calibration']} training images.", "",
             f"Gate: **{'passed' if report['gate']['passed'] else 'FAILED'}**", ""]
    for split, title in (("validation", "Validation split"), ("official_test", "Official test set")):
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
    notes = []
    for a in report["artifacts"]:
        for i, t in enumerate(a.get("attempts", []), 1):
            opts = {k: v for k, v in t.items() if k not in ("validation_accuracy", "drop_pp")}
            notes.append(f"- {a['format']} attempt {i} {opts}: validation accuracy "
                         f"{t['validation_accuracy']:.4f} (drop {t['drop_pp']:.2f} pp vs float)")
    if notes:
        lines += ["## Int8 attempts", ""] + notes + [""]
    if report["gate"]["failures"]:
        lines += ["## Gate failures", ""] + [f"- {f}" for f in report["gate"]["failures"]] + [""]
    return "\n".join(lines)
