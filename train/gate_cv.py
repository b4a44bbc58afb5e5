"""The input gate's gate_dev cross-validation (``train.ood``, ``python -m benchmarks``): each fold refits the whole
gate (``train.gate_fit.fit_gate``) without the fold's gate_dev items and their variants and judges them
(``cross_validate``), the held-out adult films' variants too; per-category counts (``cv_summary``).
Importable from ``train.ood`` too."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_edge.ood import REASONS, Gate
from train.gate_data import GATE_DEV_CLASSES, DevItem, GateData
from train.gate_fit import (DEFAULT_C, DEFAULT_DENSITY_COMPONENTS, DEFAULT_GRID_COMPONENTS, DEFAULT_MAX_VAL_REJECT,
                            fit_gate, gate_vectors)


# a held-out adult film's variant rows by ``GateData.head``: the head's own (train.gate_synth.variants) or the
# adult check's (shifted and clinical, which the head is not fitted on)
ADULT_VARIANT_KINDS = {True: "crops, flips, rotation, exposure (gate_synth.variants)",
                       False: "acquisition shifts, annotations, clinic-style frames and text"}


def cross_validate(data: GateData, val_x: np.ndarray, items: list[DevItem], folds: int = 5,
                   c: float = DEFAULT_C, max_val_reject: float = DEFAULT_MAX_VAL_REJECT, seed: int = 0,
                   density_components: int = None, grid: int = 0,
                   grid_components: int = DEFAULT_GRID_COMPONENTS, channels: int | None = None,
                   adult_c: float | None = None, adult_floor: float | None = 0.0) -> dict:
    """gate_dev cross-validated: its groups (patients; body parts for other radiographs) are dealt into
    ``folds`` folds per category; each fold's original images are judged by a gate fitted without any row of
    that fold (nor their variants, "long film" ones included), its layout projection, head, density and
    thresholds fitted as always (thresholds on validation). Per-category counts."""
    density_components = DEFAULT_DENSITY_COMPONENTS if density_components is None else density_components
    rng = np.random.default_rng(seed)
    fold_of_group: dict[str, int] = {}
    for category in sorted({it.category for it in items}):
        groups = sorted({it.group for it in items if it.category == category})
        for k, g in enumerate(rng.permutation(groups)):
            fold_of_group[str(g)] = k % folds
    item_fold = np.array([fold_of_group[it.group] for it in items])
    rows: list[dict] = []
    variant_rows: list[dict] = []
    for k in range(folds):
        held = np.flatnonzero(item_fold == k)
        if held.size == 0:
            continue
        keep = ~np.isin(data.dev, held)
        arrays, params = fit_gate(data.subset(keep), val_x, c, max_val_reject,
                                  seed, density_components, grid, grid_components, channels, adult_c, adult_floor)
        gate = Gate(arrays, {"embedding": params})
        orig = np.array([np.flatnonzero((data.dev == i))[0] for i in held])  # first row of an item: the original
        vectors = gate_vectors(arrays, data.x[orig], grid)
        for i, v, va in zip(held, gate.embedding_verdicts(vectors), gate.embedding_verdicts(vectors, True)):
            rows.append({"file": Path(items[i].path).name, "category": items[i].category, "fold": k,
                         "accepted": v.ok, "score": round(float(v.score), 3), "reason": v.reason,
                         "accepted_allow_adults": va.ok, "reason_allow_adults": va.reason})
        # the held-out adult films' variants, judged by the same fold's gate (reasons, not only refusals)
        held_adult = [i for i in held if items[i].cls == "adult_chest"]
        var = np.flatnonzero(np.isin(data.dev, held_adult))
        var = var[~np.isin(var, orig)]
        if var.size:
            verdicts = gate.embedding_verdicts(gate_vectors(arrays, data.x[var], grid))
            for j, v in zip(var, verdicts):
                variant_rows.append({"file": Path(items[data.dev[j]].path).name, "category": items[data.dev[j]].category,
                                     "fold": k, "kind": ADULT_VARIANT_KINDS[bool(data.head[j])],
                                     "accepted": v.ok, "score": round(float(v.score), 3), "reason": v.reason})
    out = {"folds": folds, "grouping": "other radiographs by body part, chest views by patient",
           "by_category": {}}
    for category in sorted({r["category"] for r in rows}):
        out["by_category"][category] = cv_summary([r for r in rows if r["category"] == category],
                                                  GATE_DEV_CLASSES[category])
    if variant_rows:  # by kind: the head's variants, and the adult check's own (shifts, annotations, frames)
        out["adult_variants"] = {}
        for kind in ADULT_VARIANT_KINDS.values():
            kept = [r for r in variant_rows if r["kind"] == kind]
            if not kept:
                continue
            summary = cv_summary(kept, "adult_chest")
            del summary["wrong"]  # hundreds of lines: which films instead, with how many of their variants
            wrong: dict[str, int] = {}
            for r in kept:
                if not is_right(r, summary["expected"]):
                    wrong[r["file"]] = wrong.get(r["file"], 0) + 1
            summary["wrong_by_film"] = dict(sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0])))
            out["adult_variants"][kind] = summary
    out["rows"] = rows
    return out


def expected_outcome(cls: str) -> str:
    """What the gate should do with an image of class ``cls``: accept a child's frontal film, refuse an adult's
    as adult, refuse anything else (with its own reason)."""
    return {"frontal_chest": "accept", "adult_chest": "reject as adult"}.get(cls, "reject")


def is_right(row: dict, want: str) -> bool:
    """Whether the gate's verdict on a row (``accepted``, ``reason``) is ``want`` (``expected_outcome``): accepted;
    refused as adult; or refused with another reason than adult."""
    if want == "accept":
        return row["accepted"]
    adult = row["reason"].startswith(REASONS["adult_chest"])
    return not row["accepted"] and (adult if want == "reject as adult" else not adult)


def cv_summary(rows: list[dict], cls: str) -> dict:
    """Counts for one category's cross-validated rows (``accepted``, ``reason``; ``accepted_allow_adults``):
    how many the gate got right by ``expected_outcome``, the refusal reasons, and for adult films how many
    ``allow_adults`` would classify (with a warning)."""
    want = expected_outcome(cls)

    def right(r):
        return is_right(r, want)

    reasons: dict[str, int] = {}
    for r in rows:
        if not r["accepted"]:
            key = r["reason"].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    out = {"n": len(rows), "expected": want, "accepted": sum(r["accepted"] for r in rows),
           "rejected": sum(not r["accepted"] for r in rows), "correct": sum(map(right, rows)),
           "correct_rate": round(sum(map(right, rows)) / max(1, len(rows)), 4), "reasons": reasons,
           "wrong": [f"{r['file']} ({'accepted' if r['accepted'] else 'rejected: ' + r['reason']}, "
                     f"head score {r['score']})" for r in rows if not right(r)]}
    if cls == "adult_chest" and rows and "accepted_allow_adults" in rows[0]:
        out["accepted_allow_adults"] = sum(r["accepted_allow_adults"] for r in rows)
    return out
