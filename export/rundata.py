"""What ``python -m export.convert`` reads: the run to export (``_resolve_run``: the one named, or the best
finished run by validation metric) and its data (``run_data``: ``ExportData``, the validation split that decides,
the official test set that is only reported, training images for int8 calibration)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cxr_edge.preprocess import InputSpec, to_input


@dataclass
class Split:
    x: np.ndarray  # float32[N, S, S, 1] model inputs
    y: np.ndarray  # labels


@dataclass
class ExportData:
    """Validation decides (int8 retries, the temperature); the official test set is only reported;
    ``calibration(n)`` gives n training images for int8 calibration."""
    val: Split
    test: Split | None
    calibration: Callable[[int], np.ndarray]

    def splits(self) -> dict[str, Split]:
        return {"validation": self.val, **({"official_test": self.test} if self.test is not None else {})}


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
        print(f"warning: {run_dir.name} has no metrics.json (a run brought back without it, or unfinished); "
              "exporting its weights", file=sys.stderr)
    return run_dir, metrics


def run_data(cfg: dict, spec: InputSpec, data_arg: str | None) -> ExportData:
    """The run's protocol: its validation split, the official test set, and a seeded pool of its
    training images for calibration (decoded as needed)."""
    from train import data

    root = data.data_dir(data_arg)
    splits = data.run_splits(root, cfg)

    def arrays(records) -> Split:
        return Split(to_input(data.load_images(records, spec.size), spec), data.labels_of(records))

    train = splits["train"]
    order = np.random.default_rng(cfg.get("seed", 0)).permutation(len(train))
    pool = [np.empty((0, spec.size, spec.size, 1), np.float32)]

    def calibration(n: int) -> np.ndarray:
        n = min(n, len(train))
        if len(pool[0]) < n:
            more = arrays([train[i] for i in order[len(pool[0]):n]]).x
            pool[0] = np.concatenate([pool[0], more])
        return pool[0][:n]

    t0 = time.monotonic()
    d = ExportData(arrays(splits["val"]), arrays(data.list_split(root, "test")), calibration)
    print(f"{len(d.val.y)} validation / {len(d.test.y)} official test images ({time.monotonic() - t0:.0f} s)")
    return d
