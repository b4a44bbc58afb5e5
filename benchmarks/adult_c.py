"""The adult check's candidates (issue 30): the gate_dev / adult_dev cross-validation with one setting of the
gate's fit replaced, every other setting as the shipped gate was fitted.

    python -m benchmarks.adult_c [--plan train/plans/adult.json] [--bundle cxr_edge/models/default] [--out DIR]

A plan row sets ``adult_c`` (the adult check's C; ``train/plans/adult.json``), ``adult_floor`` (its threshold's
floor, null for none; ``adult5.json``), ``n_train`` (how many
training scans the gate is fitted on; ``adult2.json``) and/or ``adult_variants`` (of each kind per adult film;
``adult3.json``). The embedded rows (training and validation scans, gate_dev and adult_dev with their
variants) are built once per ``n_train`` and ``adult_variants``, as
``benchmarks.ood.gate_dev_cv`` builds them, and every plan row runs ``benchmarks.ood.run_cv`` on them, plus one
fit on all rows for the validation refusals. The plan's ``rule`` (written before any row was measured) is applied
here. The official test split is never read. Writes ``<plan name>.json`` and ``.md`` into ``--out``
(``adult_c`` for ``adult.json``).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from benchmarks.common import add_out, write_results
from benchmarks.machine import describe
from benchmarks.ood import ADULT_CATEGORIES, cv_inputs, run_cv
from cxr_edge.bundle import DEFAULT_BUNDLE, load_bundle

PROJECT = Path(__file__).resolve().parent.parent
PLAN = PROJECT / "train" / "plans" / "adult.json"
RULE = {"min_more_adults": 2, "max_val_refused_by_adult_check": 1, "val_refused_at_most_reference": False,
        "tie": "adult_c nearest the reference"}  # adult.json's rule, for a plan without a "rule"


def _shown(path: Path) -> str:
    """``path`` relative to the project where it is inside it (a committed report names no folder of this machine)."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT))
    except ValueError:
        return str(path)


def measure(plan: dict, bundle_dir: Path, data_root: Path | None = None) -> dict:
    from train import ood as fit
    from train.data import DEFAULT_DATA

    bundle = load_bundle(bundle_dir)
    out = {"bundle": _shown(bundle_dir), "machine": describe(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "rule": {**RULE, **plan.get("rule", {})}, "embed_s": {}, "rows": []}
    fitted = bundle.card["ood"].get("fitted_on", {})
    inputs, built_for = None, object()
    for row in plan["rows"]:
        key = (row.get("n_train"), row.get("adult_variants"))
        if key != built_for:  # rows of one n_train and adult_variants share their embedded rows (plans list them so)
            inputs, built_for = None, key
            t0 = time.perf_counter()
            inputs = cv_inputs(bundle, data_root or DEFAULT_DATA, fit.DEFAULT_GATE_DEV, n_train=key[0],
                               adult_variants=key[1])
            out["embed_s"]["/".join(str(k) if k is not None else "card" for k in key)] = round(time.perf_counter() - t0, 1)
        t = time.perf_counter()
        changes = {"adult_c": float(row["adult_c"])} if "adult_c" in row else {}
        if "adult_floor" in row:  # None: the threshold is the validation quantile whatever its sign
            changes["adult_floor"] = None if row["adult_floor"] is None else float(row["adult_floor"])
        cv = run_cv(inputs, **changes)
        _, params = fit.fit_gate(inputs["data"], inputs["val_x"], **{**inputs["fit"], **changes})
        out["rows"].append({"name": row["name"], "adult_c": row.get("adult_c", inputs["fit"]["adult_c"] or inputs["fit"]["c"]),
                            "n_train": row.get("n_train", fitted.get("train_images")),
                            "adult_variants": row.get("adult_variants", fitted.get("adult_variants")),
                            "adult_floor": changes.get("adult_floor", inputs["fit"]["adult_floor"]),
                            "adults_as_adult": cv["adults"]["correct"], "adults": cv["adults"]["n"],
                            "by_category": {k: {"correct": v["correct"], "n": v["n"], "wrong": v["wrong"]}
                                            for k, v in cv["by_category"].items()},
                            "val_refused_by_adult_check": params["adult"]["val_rejected"],
                            "val_refused": params["val_rejected"],
                            "adult_threshold": params["adult"]["threshold"], "seconds": round(time.perf_counter() - t, 1)})
        print(f"{row['name']}: adults {out['rows'][-1]['adults_as_adult']}/{out['rows'][-1]['adults']}", flush=True)
    return decide(out)


def decide(out: dict) -> dict:
    """The plan's rule (``out["rule"]``): against the shipped row (the first), at least ``min_more_adults`` more
    adults refused as adult, no other category with fewer correct, at most ``max_val_refused_by_adult_check``
    validation scans refused by the adult check (and, with ``val_refused_at_most_reference``, no more refused by
    all checks than the shipped row); the most adults among those that pass, a tie to the C nearest the shipped
    one, the smaller ``n_train`` or the fewer ``adult_variants`` (``tie``)."""
    rule, ref = out["rule"], out["rows"][0]
    passing = []
    for r in out["rows"][1:]:
        others = all(r["by_category"][k]["correct"] >= ref["by_category"][k]["correct"]
                     for k in ref["by_category"] if k not in ADULT_CATEGORIES)
        r["passes"] = (r["adults_as_adult"] >= ref["adults_as_adult"] + rule["min_more_adults"] and others
                       and r["val_refused_by_adult_check"] <= rule["max_val_refused_by_adult_check"]
                       and (not rule["val_refused_at_most_reference"] or r["val_refused"] <= ref["val_refused"]))
        if r["passes"]:
            passing.append(r)

    def tie(r) -> float:
        if rule["tie"] == "smaller n_train":
            return -r["n_train"]
        if rule["tie"] == "fewer adult_variants":
            return -r["adult_variants"]
        return -abs(math.log(r["adult_c"] / ref["adult_c"]))

    best = max(passing, key=lambda r: (r["adults_as_adult"], tie(r)), default=None)
    out["chosen"] = best["name"] if best else ref["name"]
    return out


def markdown(out: dict, plan_path: Path = PLAN) -> str:
    rule = out["rule"]
    cats = [k for k in out["rows"][0]["by_category"] if k not in ADULT_CATEGORIES]
    varied = [k for k in ("adult_c", "adult_floor", "n_train", "adult_variants")
              if len({r.get(k) for r in out["rows"]}) > 1]
    heads = {"adult_c": "adult C", "adult_floor": "adult threshold floor", "n_train": "training scans",
             "adult_variants": "variants per adult film"}
    lines = [f"# The adult check's candidates: {_shown(plan_path)} (issue 30)", "",
             f"`python -m benchmarks.adult_c --plan {_shown(plan_path)}` on {out['machine']['cpu']} "
             f"({out['machine']['usable_cores']} cores), {out['date']}: gate_dev and adult_dev cross-validated (5 "
             "folds, chest views grouped by patient, other radiographs by body part), every setting as the shipped "
             f"gate except {' and '.join(heads[k] for k in varied) or 'none'}. Rule ({_shown(plan_path)}, written "
             f"before): at least {rule['min_more_adults']} more adults refused as adult than the shipped row, no "
             f"other category worse, at most {rule['max_val_refused_by_adult_check']} validation scan refused by the "
             "adult check" + (", no more validation scans refused by all checks than the shipped row"
                              if rule["val_refused_at_most_reference"] else "") + ".", "",
             "| row | " + "".join(f"{heads[k]} | " for k in varied) + "adults refused as adult | " + " | ".join(cats)
             + " | validation refused (adult check / all) | adult threshold | passes |",
             "|---|" + "---|" * len(varied) + "---|" + "---|" * len(cats) + "---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['name']} | " + "".join(("none" if r[k] is None else f"{r[k]:g}") + " | " for k in varied)
                     + f"{r['adults_as_adult']}/{r['adults']} | "
                     + " | ".join(f"{r['by_category'][k]['correct']}/{r['by_category'][k]['n']}" for k in cats)
                     + f" | {r['val_refused_by_adult_check']} / {r['val_refused']} | {r['adult_threshold']:.2f} | "
                     + ("(shipped)" if r is out["rows"][0] else ("yes" if r["passes"] else "no")) + " |")
    lines += ["", f"Chosen: {out['chosen']}.", "", "Wrong per row (cross-validated; gate_dev and adult_dev are development sets):", ""]
    for r in out["rows"]:
        wrong = [w for k, v in r["by_category"].items() for w in v["wrong"]]
        lines.append(f"- {r['name']}: " + ("; ".join(wrong) or "none"))
    return "\n".join(lines) + "\n"


def result_name(plan_path: Path) -> str:
    """``adult_c`` for train/plans/adult.json (its results' name since it was first run), else the plan's stem."""
    return "adult_c" if Path(plan_path).name == "adult.json" else Path(plan_path).stem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.adult_c", description=__doc__.split("\n")[0])
    ap.add_argument("--plan", type=Path, default=PLAN)
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--data", type=Path, default=None)
    add_out(ap)
    args = ap.parse_args(argv)
    out = measure(json.loads(args.plan.read_text()), args.bundle, args.data)
    write_results(args.out, result_name(args.plan), out, markdown(out, args.plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
