"""Temperature scaling for a bundle, fitted on the validation split of its training run.

    python -m export.calibrate BUNDLE [--run ID] [--backend tflite]

Writes ``"temperature"`` (the runtime applies ``softmax(log p / T)``) and a ``"calibration"`` record
(validation negative log-likelihood and expected calibration error before and after) into the card. The
official test set is not read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxr_edge.bundle import CARD_NAME, load_bundle
from cxr_edge.engines import open_engine
from cxr_edge.preprocess import to_input
from train import data as data_mod
from train.fit import RUNS_DIR
from train.metrics import apply_temperature, calibration_bins, classification_metrics, fit_temperature


def temperature_record(y, probs, backend: str, fitted_on: str = "validation split") -> dict:
    """The temperature minimising negative log-likelihood of validation labels ``y`` under the model's
    validation probabilities ``probs``, and the card's ``"calibration"`` record (log loss and expected
    calibration error before and after). Callers pass validation data only."""
    t = fit_temperature(y, probs)
    after = apply_temperature(probs, t)
    return {"method": "temperature scaling", "fitted_on": fitted_on, "backend": backend, "n": int(len(y)),
            "temperature": t,
            "val_log_loss": {"before": classification_metrics(y, probs)["log_loss"],
                             "after": classification_metrics(y, after)["log_loss"]},
            "val_ece": {"before": calibration_bins(y, probs)["ece"], "after": calibration_bins(y, after)["ece"]}}


def calibrate_bundle(bundle_dir: Path, run_dir: Path, backend: str = "tflite", data: str | None = None,
                     val: tuple | None = None) -> dict:
    """Fit and write a bundle's temperature on its run's validation split. ``val``: the run's validation
    (inputs, labels) when the caller has them decoded already."""
    bundle = load_bundle(bundle_dir)
    if val is None:
        cfg = json.loads((run_dir / "config.json").read_text())
        root = data_mod.data_dir(data)
        recs = data_mod.run_splits(root, cfg)["val"]
        val = (to_input(data_mod.load_images(recs, bundle.spec.size), bundle.spec), data_mod.labels_of(recs))
    x, y = val
    engine = open_engine(bundle.model_file(backend)[0], backend)
    record = temperature_record(y, engine.run(x), backend, f"validation split of {run_dir.name}")
    card = dict(bundle.card, temperature=record["temperature"], calibration=record)
    (Path(bundle_dir) / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.calibrate")
    ap.add_argument("bundle")
    ap.add_argument("--run", help="training run id (default: the card's training_run)")
    ap.add_argument("--backend", default="tflite")
    ap.add_argument("--data")
    a = ap.parse_args(argv)
    run = a.run or load_bundle(a.bundle).card["training_run"]
    rec = calibrate_bundle(Path(a.bundle), RUNS_DIR / run, a.backend, a.data)
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
