"""Turned and inverted chest films: refused with their true reason (``cxr_edge.reorient``), through
``Classifier`` as every door uses it.

    python -m benchmarks.orientation [--split test|val] [--model BUNDLE] [--n 120] [--out benchmarks/results]

Official test scans (a seeded sample; reported, never used to choose anything) turned a quarter turn either
way, a half turn, inverted (a negative) and mirrored left to right, each through ``Classifier.classify_many``:
how many are refused with the true reason ("turned film" with the right turn, "inverted image"), refused with
another reason, or labelled. The other side: gate_dev's and adult_dev's films and the generated
non-radiographs of ``benchmarks.ood`` must never be given either reason (none of them is a turned or inverted
chest film). ``--split val``: the patient-grouped validation split instead, to decide on. Writes
``orientation[-val].json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from benchmarks.machine import describe
from cxr_edge.classifier import Classifier
from cxr_edge.ood import REASONS

TARGET = 0.95  # of each kind of turned or inverted chest film refused with its true reason
# (name, how the file is made from an upright scan, the start of the true reason; None: it should be labelled)
KINDS = (("upright", lambda g: g, None),
         ("turned_clockwise", lambda g: g.transpose(Image.Transpose.ROTATE_270),
          f"{REASONS['turned']} (a frontal chest X-ray turned 90 degrees clockwise"),
         ("turned_counterclockwise", lambda g: g.transpose(Image.Transpose.ROTATE_90),
          f"{REASONS['turned']} (a frontal chest X-ray turned 90 degrees counterclockwise"),
         ("upside_down", lambda g: g.transpose(Image.Transpose.ROTATE_180),
          f"{REASONS['turned']} (a frontal chest X-ray upside down"),
         ("negative", ImageOps.invert, f"{REASONS['inverted']} ("),
         ("mirrored", ImageOps.mirror, None))
FALSE_REASONS = (REASONS["turned"], REASONS["inverted"])


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _outcome(r, want: str | None) -> str:
    if r.status == "ok":
        return "labelled"
    if r.status == "error":
        return "error"
    if want is not None and r.reason.startswith(want):
        return "true reason"
    return "refused: " + r.reason.split(" (")[0]


def measure(model=None, data_root=None, n: int = 120, seed: int = 0, split: str = "test", log=print) -> dict:
    from benchmarks.ood import make_non_cxr
    from benchmarks.robustness import split_records
    from train import ood as fit
    from train.data import data_dir

    clf = Classifier(model=model)
    paths = [r.path for r in split_records(split, data_dir(data_root))]
    pick = sorted(np.random.default_rng(seed).choice(len(paths), min(n, len(paths)), replace=False))
    grays = [Image.open(paths[i]).convert("L") for i in pick]
    t0 = time.perf_counter()
    kinds = {}
    for name, make, want in KINDS:
        outcomes = Counter(_outcome(r, want) for r in clf.classify_many(_png(make(g)) for g in grays))
        kinds[name] = {"n": len(grays), "expected": "labelled" if want is None else want.split(" (")[0],
                       "true_reason" if want else "labelled": outcomes["true reason" if want else "labelled"],
                       "outcomes": dict(sorted(outcomes.items()))}
        log(f"  {name}: {dict(outcomes)}")
    seconds = time.perf_counter() - t0
    others = [(it.path, it.category) for it in fit.gate_dev_items(fit.DEFAULT_GATE_DEV)
              + fit.adult_dev_items(fit.DEFAULT_ADULT_DEV)]
    with tempfile.TemporaryDirectory(prefix="cxr_orient_") as tmp:
        others += make_non_cxr(Path(tmp) / "non_cxr")
        given = [(Path(p).name, kind, r.reason) for (p, kind), r in zip(others, clf.classify_many(p for p, _ in others))
                 if r.status == "rejected" and r.reason.startswith(FALSE_REASONS)]
    return {"machine": describe(), "model": clf.model.to_dict(), "backend": clf.backend, "split": split,
            "scans": len(grays),
            "seed": seed, "kinds": kinds, "seconds_turned_sets": round(seconds, 1),
            "others": {"n": len(others), "given_turned_or_inverted": [list(g) for g in given]}}


def targets(res: dict) -> list[dict]:
    k = res["kinds"]
    wrong = [n for n in k if n not in ("upright", "mirrored")]
    rates = {n: k[n]["true_reason"] / k[n]["n"] for n in wrong}
    false = res["others"]["given_turned_or_inverted"]
    what = "official test" if res.get("split", "test") == "test" else "validation"
    return [{"target": f"input gate: {what} scans turned (90 degrees either way, 180) or inverted, refused "
                       f"with the true reason >= {TARGET:.0%} of each",
             "measured": ", ".join(f"{n} {k[n]['true_reason']}/{k[n]['n']}" for n in wrong),
             "met": min(rates.values()) >= TARGET},
            {"target": "input gate: no other image (gate_dev, adult_dev, generated non-radiographs) called turned "
                       "or inverted",
             "measured": f"{len(false)}/{res['others']['n']}" + (f" ({', '.join(g[0] for g in false)})" if false else ""),
             "met": not false}]


def markdown(res: dict) -> list[str]:
    lines = ["| film | expected | true reason or labelled | outcomes |", "|---|---|---|---|"]
    for name, k in res["kinds"].items():
        got = k.get("true_reason", k.get("labelled"))
        lines.append(f"| {name} | {k['expected']} | {got}/{k['n']} | "
                     + ", ".join(f"{o} {c}" for o, c in k["outcomes"].items()) + " |")
    o = res["others"]
    lines += ["", f"Other images given either reason: {len(o['given_turned_or_inverted'])} of {o['n']} (gate_dev, "
                  "adult_dev and the generated non-radiographs)."]
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.orientation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model bundle (default: the shipped one)")
    ap.add_argument("--data", default=None, help="the chest_xray folder (default: ../shared/data/chest_xray)")
    ap.add_argument("--n", type=int, default=120, help="scans sampled (seed 0)")
    ap.add_argument("--split", choices=["test", "val"], default="test",
                    help="the official test, or the patient-grouped validation split (to decide on)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    res = measure(args.model, args.data, args.n, split=args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "orientation" + ("-val" if args.split == "val" else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    m = res["machine"]
    what = "official test" if args.split == "test" else "validation"
    head = [f"# Turned and inverted chest films ({res['scans']} {what} scans)", "",
            f"Measured by `python -m benchmarks.orientation --split {args.split}` on {m['cpu']}, {res['model']['name']} "
            f"{res['model']['version']} ({res['backend']}).", ""]
    rows = targets(res)
    tail = ["", *[f"- {t['target']}: {'met' if t['met'] else 'NOT met'} ({t['measured']})" for t in rows]]
    (out / f"{stem}.md").write_text("\n".join(head + markdown(res) + tail) + "\n")
    print("\n".join(tail))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
