"""Test-time averaging on the validation split: does averaging over a few cheap views pay (issue 31)?

    python -m benchmarks.tta [--plan train/plans/tta.json] [--only NAME ...] [--limit N] [--out benchmarks/results]

Each row of the plan is a set of views; a view is one affine warp of the model-size image
(``[rotation in degrees, zoom, shift down, shift right]``, the kind of warp ``train.augment.RandomAffine``
trained the model on: output pixel -> input pixel ``c + zoom * R(theta) (out - c) + shift * side``, bilinear,
edge pixels repeated) or ``"hflip"``. The shipped model's calibrated probabilities are averaged over the views;
the gate reads the first view only (it was fitted on one pass). Every row is measured like
``python -m benchmarks.robustness --split val``: the validation split, clean and under every acquisition shift,
through ``Classifier.classify_many`` (gate on, a refusal counts as wrong). The plan's rule (written before any
row was measured) is applied to the accuracy clauses here; its speed clause costs one model pass per view.
The official test split is never read. Writes ``tta.json`` and ``tta.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_results
from benchmarks.machine import describe
from benchmarks.robustness import RESULTS, measure, shifted_summary, split_records
from cxr_edge.classifier import Classifier
from cxr_edge.model import calibrate
from cxr_edge.preprocess import to_input
from train import data as data_mod
from train.shifts import SHIFTS

PLAN = Path(__file__).resolve().parent.parent / "train" / "plans" / "tta.json"
MIN_GAIN_PP, MAX_CLEAN_LOSS_PP = 1.0, 0.5  # the plan's rule (train/plans/tta.json "about")


def warp(gray: np.ndarray, view) -> np.ndarray:
    """``uint8[N, S, S]`` seen through ``view`` (see the module docstring), ``uint8[N, S, S]``."""
    if view == "hflip":
        return np.ascontiguousarray(gray[:, :, ::-1])
    deg, zoom, down, right = (float(v) for v in view)
    _, h, w = gray.shape
    cos, sin = math.cos(math.radians(deg)) * zoom, math.sin(math.radians(deg)) * zoom
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    ix = np.clip(cx + cos * (xx - cx) - sin * (yy - cy) + right * w, 0, w - 1)
    iy = np.clip(cy + sin * (xx - cx) + cos * (yy - cy) + down * h, 0, h - 1)
    x0, y0 = np.floor(ix).astype(int), np.floor(iy).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = ix - x0, iy - y0
    g = gray.astype(np.float64)
    out = (g[:, y0, x0] * (1 - fx) * (1 - fy) + g[:, y0, x1] * fx * (1 - fy)
           + g[:, y1, x0] * (1 - fx) * fy + g[:, y1, x1] * fx * fy)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class AveragingClassifier(Classifier):
    """:class:`Classifier` whose probabilities are the mean over ``views`` (the first view's pass also gives
    the gate its embedding, as one pass would)."""

    def __init__(self, views: list, **kwargs):
        super().__init__(**kwargs)
        self.views = list(views)

    def _averaged(self, first: np.ndarray, gray: np.ndarray, engine) -> np.ndarray:
        total = first.astype(np.float64)
        for view in self.views[1:]:
            total += calibrate((engine or self.engine).run(to_input(warp(gray, view), self.spec)), self.temperature)
        return (total / len(self.views)).astype(np.float32)

    def predict(self, gray, engine=None):
        return self._averaged(super().predict(warp(gray, self.views[0]), engine), gray, engine)

    def predict_full(self, gray, engine=None):
        probs, embedding, features = super().predict_full(warp(gray, self.views[0]), engine)
        return self._averaged(probs, gray, engine), embedding, features


def verdicts(rows: dict) -> dict:
    """The plan's accuracy clauses for every row against the first row (the single view)."""
    ref = next(iter(rows.values()))
    out = {}
    for name, r in rows.items():
        gain = 100 * (r["shifted_mean"] - ref["shifted_mean"])
        clean = 100 * (r["clean"] - ref["clean"])
        worst_ok = r["worst_accuracy"] >= ref["worst_accuracy"]
        out[name] = {"shifted_gain_pp": round(gain, 2), "clean_change_pp": round(clean, 2),
                     "worst_no_worse": worst_ok,
                     "passes": bool(gain >= MIN_GAIN_PP and clean >= -MAX_CLEAN_LOSS_PP and worst_ok)}
    return out


def choose(rows: dict, ver: dict):
    """The row the plan's rule ships (None: one view stays): among rows past the first that pass, the highest
    shifted mean; within 0.2 pp of it, the one with fewer views."""
    passing = [n for n, v in ver.items() if v["passes"] and n != next(iter(rows))]
    if not passing:
        return None
    best = max(rows[n]["shifted_mean"] for n in passing)
    near = [n for n in passing if best - rows[n]["shifted_mean"] <= 0.002]
    return min(near, key=lambda n: (rows[n]["passes"], -rows[n]["shifted_mean"]))


def markdown(rep: dict) -> str:
    m = rep["machine"]
    lines = ["# Test-time averaging on the validation split (`python -m benchmarks.tta`)", "",
             f"{rep['n']} validation scans, clean and under {len(SHIFTS) - 1} acquisition shifts; int8 model "
             f"{rep['model']['name']} {rep['model']['version']} ({rep['model']['backend']}) through Classifier, gate "
             f"on; {m['cpu']}, {rep['date']}. Rule (`train/plans/tta.json`, written before these rows ran): "
             f"shifted mean at least +{MIN_GAIN_PP:g} pp over one view, worst shift no worse, clean at most "
             f"{MAX_CLEAN_LOSS_PP:g} pp under, and the speed target.", "",
             "| views | model passes | clean | shifted mean | gain (pp) | worst shift | passes |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rep["rows"].items():
        v = rep["verdicts"][name]
        lines.append(f"| {name} | {r['passes']} | {r['clean']:.4f} | {r['shifted_mean']:.4f} | "
                     f"{v['shifted_gain_pp']:+.2f} | {r['worst_shift']} {r['worst_accuracy']:.4f} | "
                     f"{'yes' if v['passes'] else 'no'} |")
    chosen = rep["chosen"]
    lines += ["", f"Chosen: {chosen}." if chosen else "Chosen: none; the shipped model keeps one view.", ""]
    return "\n".join(lines)


def run(plan_path: Path = PLAN, only=(), limit: int = 0, data=None, log=print) -> dict:
    plan = json.loads(Path(plan_path).read_text())
    records = split_records("val", data_mod.data_dir(data), limit)
    clf = AveragingClassifier(plan["rows"][0]["views"], threads=1)
    rows = {}
    for row in plan["rows"]:
        if only and row["name"] not in only and row is not plan["rows"][0]:
            continue
        clf.views = list(row["views"])
        t0 = time.perf_counter()
        res = measure(clf, records, list(SHIFTS), log=lambda _: None)
        mean, worst = shifted_summary(res)
        r = rows[row["name"]] = {"views": row["views"], "passes": len(row["views"]), "clean": res["none"]["accuracy"],
                                 "shifted_mean": mean, "worst_shift": worst, "worst_accuracy": res[worst]["accuracy"],
                                 "accuracy": {k: v["accuracy"] for k, v in res.items()},
                                 "refused": {k: v["refused"] for k, v in res.items()},
                                 "seconds": round(time.perf_counter() - t0, 1)}
        log(f"{row['name']:10s} clean {r['clean']:.4f}  shifted mean {mean:.4f}  worst {worst} {r['worst_accuracy']:.4f}")
    ver = verdicts(rows)
    model = {**clf.model.to_dict(), "backend": clf.backend}
    return {"command": "python -m benchmarks.tta", "split": "val", "n": len(records), "model": model,
            "machine": describe(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "verdicts": ver,
            "chosen": choose(rows, ver)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tta", description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", type=Path, default=PLAN)
    ap.add_argument("--only", nargs="*", default=(), help="rows to measure (the first, one view, always is)")
    ap.add_argument("--limit", type=int, default=0, help="a seeded sample of N validation scans (0: all)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rep = run(args.plan, args.only, args.limit, args.data)
    write_results(args.out, "tta", rep, markdown(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
