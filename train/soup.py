"""Weight averaging of two runs fine-tuned from the same weights (a "model soup", Wortsman et al. 2022).

Two runs that started from one set of weights usually sit in one basin of the loss, so the straight line
between their weights passes through models as good as either, often better, and with the robustness of the
one and the clean accuracy of the other between them (WiSE-FT: averaging a fine-tuned model with its start
keeps the start's accuracy and much of the fine-tune's robustness). Here: the shipped model (clean
accuracy, reads the framing) and a framing-blind fine-tune of it (``train.framing``).

``python -m train.soup RUN_A RUN_B --alpha 0.5`` writes a run folder holding ``(1 - alpha) * A + alpha * B``
(every variable, batch-norm statistics included) with its validation metrics, ready for ``python -m
train.framing`` and ``python -m export.convert --run``. It is one network, one pass: no ensemble at run time.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

MUST_AGREE = ("model", "input_size", "protocol", "split_seed", "val_fraction", "dropout", "batchnorm")


def average(a: dict, b: dict, alpha: float) -> dict:
    """``(1 - alpha) * a + alpha * b`` for every variable; the two must hold the same variables and shapes."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"the runs hold different variables ({len(missing)} differ, {missing[0]} say)")
    out = {}
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{k}: shape {a[k].shape} against {b[k].shape}")
        out[k] = ((1 - alpha) * a[k].astype(np.float64) + alpha * b[k].astype(np.float64)).astype(np.float32)
    return out


def soup(run_a: str | Path, run_b: str | Path, alphas, root: str | Path | None = None) -> list[Path]:
    """For each of ``alphas``, a new run folder (under ``train.fit.RUNS_DIR``) with the average of two runs'
    weights and its metrics on their validation split; both runs' weights and the validation images are
    read once. The runs must share architecture, input size and validation split."""
    from dataclasses import asdict, replace

    from cxr_edge.preprocess import to_input
    from train import data as data_mod
    from train.batches import predict_fixed
    from train.fit import FitConfig, machine, new_run_dir
    from train.metrics import classification_metrics
    from train.models import load_named, save_named
    from train.registry import load_run

    run_a, run_b = Path(run_a), Path(run_b)
    cfg_a, cfg_b = (json.loads((r / "config.json").read_text()) for r in (run_a, run_b))
    for key in MUST_AGREE:
        if cfg_a.get(key) != cfg_b.get(key):
            raise ValueError(f"{run_a.name} and {run_b.name} differ in {key}: {cfg_a.get(key)} / {cfg_b.get(key)}")
    wa, wb = load_named(run_a / "weights.npz"), load_named(run_b / "weights.npz")
    base = FitConfig(**{k: v for k, v in cfg_b.items() if k in FitConfig.__dataclass_fields__})
    val = data_mod.run_splits(data_mod.data_dir(str(root) if root else None), cfg_b)["val"]
    gray, y = data_mod.load_images(val, base.input_size), data_mod.labels_of(val)
    out = []
    for alpha in alphas:
        weights = average(wa, wb, alpha)
        record = {"a": run_a.name, "b": run_b.name, "alpha": alpha}
        cfg = replace(base, name=f"{cfg_b.get('name') or base.model}-soup{alpha:g}",
                      extra={**base.extra, "soup": record},
                      notes=f"weights (1 - {alpha:g}) * {run_a.name} + {alpha:g} * {run_b.name} (python -m train.soup)")
        run_dir = new_run_dir(cfg)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        save_named(weights, str(run_dir / "weights.npz"))
        model, spec, _ = load_run(run_dir)
        metrics = {
            "run_id": run_dir.name, "model": cfg.model, "pretrained": cfg.weights, "protocol": cfg.protocol,
            "input": spec.to_card(), "params": int(model.count_params()), "soup": record, "machine": machine(),
            "val": classification_metrics(y, predict_fixed(model, to_input(gray, spec), 32)),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        out.append(run_dir)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.soup", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.5], help="the weight of RUN_B (0 = RUN_A)")
    ap.add_argument("--data", default=None)
    args = ap.parse_args(argv)
    for alpha, run_dir in zip(args.alpha, soup(args.run_a, args.run_b, args.alpha, args.data)):
        m = json.loads((run_dir / "metrics.json").read_text())["val"]
        print(json.dumps({"run": str(run_dir), "alpha": alpha, "val_accuracy": round(m["accuracy"], 4),
                          "val_macro_f1": round(m["macro_f1"], 4), "recall": m["recall"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
