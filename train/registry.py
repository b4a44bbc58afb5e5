"""The run registry: every ``runs/<run id>/metrics.json``, ranked by validation metric.

Only runs of the patient-grouped protocol compete: a ``--protocol seed`` run trains on images whose
patients (and the official test images) are also in its evaluation, so its validation numbers are
inflated and it must never be chosen. A run counts as grouped only when both its ``config.json`` (what
it was asked to do) and its ``metrics.json`` (what it recorded) say so. The official test set plays no
part in the ranking."""
from __future__ import annotations

import json
import os
from pathlib import Path

RUNS_DIR = Path(os.environ.get("CXR_EDGE_RUNS", "runs"))  # where ``train.fit`` records runs
GROUPED = "grouped"


def _protocol(run_dir: Path, metrics: dict) -> str | None:
    """The run's protocol when config.json and metrics.json agree (a missing config.json defers to
    metrics.json); ``None`` when they disagree or neither says."""
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    said = {p for p in (cfg.get("protocol"), metrics.get("protocol")) if p}
    return said.pop() if len(said) == 1 else None


def list_runs(runs_dir: Path | None = None, protocol: str | None = GROUPED) -> list[dict]:
    """Finished runs (those with validation metrics and weights), best validation accuracy first
    (validation macro-F1 breaks ties, then the run id). Only the patient-grouped protocol by default:
    leaky runs never compete. ``protocol=None`` lists every run (for display, never for choosing)."""
    out = []
    for m in sorted(Path(runs_dir or RUNS_DIR).glob("*/metrics.json")):
        info = json.loads(m.read_text())
        proto = _protocol(m.parent, info)
        if protocol and proto != protocol:
            continue
        if "val" not in info or not any(m.parent.glob("weights*.npz")):
            continue
        out.append({"run_id": info.get("run_id", m.parent.name), "dir": str(m.parent), "model": info["model"],
                    "protocol": proto, "pretrained": info.get("pretrained", "none"),
                    "val_accuracy": float(info["val"]["accuracy"]),
                    "val_macro_f1": float(info["val"]["macro_f1"])})
    return sorted(out, key=lambda r: (-r["val_accuracy"], -r["val_macro_f1"], r["run_id"]))


def best_run(model: str | None = None, runs_dir: Path | None = None) -> dict:
    """The best patient-grouped run by validation metric (of ``model`` when given)."""
    runs = [r for r in list_runs(runs_dir, protocol=GROUPED) if model is None or r["model"] == model]
    if not runs:
        raise LookupError(f"no finished run{' of ' + model if model else ''} in {runs_dir or RUNS_DIR}")
    return runs[0]


def load_run(run_dir: str | Path):
    """Rebuild a run's inference model (no augmentation) with its best weights (``weights.npz``, or the
    ``weights.part*.npz`` a GPU lease brings back; float16-compacted weights are widened).
    Returns ``(keras model, InputSpec, config dict)``."""
    from train.models import assign, build, load_named

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    built = build(cfg["model"], input_size=cfg["input_size"], dropout=cfg.get("dropout", 0.0),
                  batchnorm=cfg.get("batchnorm", False), intensity=cfg.get("intensity", "none"))
    assign(built.model, load_named(run_dir / "weights.npz"))
    return built.model, built.spec, cfg
