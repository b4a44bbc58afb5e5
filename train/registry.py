"""The run registry: every ``runs/<run id>/metrics.json``, ranked by validation metric."""
from __future__ import annotations

import json
from pathlib import Path

from train.fit import RUNS_DIR


def list_runs(runs_dir: Path | None = None, protocol: str | None = "grouped") -> list[dict]:
    """Finished runs (those with metrics and weights), best validation accuracy first (macro-F1 breaks
    ties). Only the patient-grouped protocol by default: leaky runs never compete."""
    out = []
    for m in sorted(Path(runs_dir or RUNS_DIR).glob("*/metrics.json")):
        info = json.loads(m.read_text())
        if protocol and info.get("protocol") != protocol:
            continue
        if not any(m.parent.glob("weights*.npz")):
            continue
        out.append({"run_id": info["run_id"], "dir": str(m.parent), "model": info["model"],
                    "protocol": info["protocol"], "pretrained": info["pretrained"],
                    "val_accuracy": info["val"]["accuracy"], "val_macro_f1": info["val"]["macro_f1"]})
    return sorted(out, key=lambda r: (-r["val_accuracy"], -r["val_macro_f1"], r["run_id"]))


def best_run(model: str | None = None, runs_dir: Path | None = None) -> dict:
    runs = [r for r in list_runs(runs_dir) if model is None or r["model"] == model]
    if not runs:
        raise LookupError(f"no finished run{' of ' + model if model else ''} in {runs_dir or RUNS_DIR}")
    return runs[0]


def load_run(run_dir: str | Path):
    """Rebuild a run's inference model (no augmentation) with its best weights.
    Returns ``(keras model, InputSpec, config dict)``."""
    from train.models import assign, build, load_named

    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    built = build(cfg["model"], input_size=cfg["input_size"], dropout=cfg.get("dropout", 0.0),
                  batchnorm=cfg.get("batchnorm", False))
    assign(built.model, load_named(run_dir / "weights.npz"))
    return built.model, built.spec, cfg
