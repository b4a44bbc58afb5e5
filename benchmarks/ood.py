"""How well the input gate (``cxr_edge/ood.py``, ``cxr_edge/dicom.py``) keeps what is not a frontal chest
X-ray away from the classifier, and lets frontal chest X-rays through.

    python -m benchmarks.ood BUNDLE_DIR [--data DIR] [--gate-dev DIR] [--edge-scans 60] [--out FILE.json]

``measure(bundle_dir, data_root)`` (called by ``python -m benchmarks``) reports, with counts:

- ``test_false_reject``: the share of the official test scans (624) that the gate refuses (target <= 0.5%).
  The test split only measures here: the gate's threshold was chosen on the grouped validation split.
- ``gate_dev``: ``../shared/data/gate_dev`` **cross-validated** (``train.ood.cross_validate``, the same recipe
  as ``python -m train.ood``, with this bundle's embeddings; folds grouped by patient, other radiographs by
  body part): per category, the share of lateral chest views and other radiographs refused (target >= 97%)
  and of other hospitals' adult frontal chest X-rays accepted (target >= 97%). Also the shipped gate's own
  decisions on gate_dev (``gate_dev_shipped``; optimistic: it was fitted on these images).
  ``gate_dev.adult_variants``: the held-out adult films' variants (the fit's own kinds: crops, flips, rotation
  and exposure; acquisition shifts, annotations, clinic-style frames and text), judged by the same fold's gate
  with their reasons: how adult films made as other clinics make them fare (optimistic: the fit saw the other
  adults' variants of the same kinds).
- ``dicom``: synthetic DICOM objects (CT, MR, ultrasound in PALETTE COLOR, 32-bit RT dose, a DX hand, a DX
  lateral chest, a DX frontal chest from a test scan) through ``Classifier.classify_many``: none may end as
  an error record; each is classified or refused with its reason.
- ``non_cxr_reject``: the share of images that are not radiographs that it refuses (target >= 95%), per kind:
  scikit-image's bundled sample photographs (never seen by the gate's fit; **scikit-image is required**:
  ``pip install 'cxr-edge[bench]'``; missing, the benchmark stops instead of measuring a smaller set) and
  ``train.ood.synth_non_radiographs`` with another seed than the fit's (documents, screenshots, photo-like
  scenes, solid colours, textures: the same generator as the fit's negatives, so this part is optimistic).
- ``edge_accept``: altered test scans (crops, aspect ratio, rotation, brightness/contrast/gamma, downscaled
  PNG) still accepted.

Every image goes through the runtime's own path: ``cxr_edge.preprocess.load_gray_colour`` from the file on disk
at the bundle's input size, ``Gate.check_pixels``, then ``Gate.check_embedding`` on the gate's vector made from
the model's feature map (``cxr_edge.ood.embedder(bundle, gate=gate)``: ``Gate.embedding_of``, as
``Classifier`` does). The images are made in ``benchmarks/ood_inputs.py``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.ood_inputs import (EDGE_KINDS, SKIMAGE_FILES, SYNTH_SEED, _edge, make_dicoms,  # noqa: F401
                                   make_edge_cases, make_inverted, make_non_cxr, skimage_samples)
from cxr_edge.bundle import load_bundle
from cxr_edge.ood import Gate, embedder
from cxr_edge.preprocess import PreprocessError, load_gray

TARGETS = {"test_false_reject_max": 0.005, "val_false_reject_max": 0.005, "gate_dev_reject_min": 0.97,
           "gate_dev_accept_min": 0.97, "adult_as_adult_min": 0.95, "non_cxr_reject_min": 0.95, "dicom_errors_max": 0}
ADULT_CATEGORIES = ("frontal_chest_other", "adult_dev")  # adult frontal films: refused as adult (issue 30)


def _rate(rows: list[dict], want_ok: bool) -> dict:
    rows = [r for r in rows if not r["reason"].startswith("error: ")]  # unreadable: counted apart
    n = len(rows)
    k = sum(r["ok"] == want_ok for r in rows)
    return {"n": n, "count": k, "rate": round(k / n, 4) if n else None}


def _dicom_check(bundle_dir, folder: Path, scan: str) -> dict:
    """Synthetic DICOMs through ``Classifier.classify_many``: status per object, errors counted."""
    from cxr_edge.classifier import Classifier

    items = make_dicoms(folder, scan)
    clf = Classifier(model=bundle_dir)
    rows = []
    for (path, kind, expected), r in zip(items, clf.classify_many([p for p, _, _ in items])):
        reason = getattr(r, "reason", None) or getattr(r, "error", None) or ""
        rows.append({"kind": kind, "expected": expected, "status": r.status, "label": getattr(r, "label", None),
                     "reason": reason})
    return {"n": len(rows), "errors": sum(r["status"] == "error" for r in rows),
            "as_expected": sum((r["status"] == "rejected") == (r["expected"] == "refuse")
                               and r["status"] != "error" for r in rows),
            "rows": rows}


def measure(gate_bundle_dir, data_root, edge_scans: int = 60, seed: int = 0, keep_rows: bool = False,
            gate_dev=None, cv: bool = True, adult_dev=None) -> dict:
    """The bundle's gate on the official test scans, gate_dev (cross-validated), DICOM objects, non-radiograph
    images and altered test scans."""
    from train.data import list_split
    from train import ood as fit

    bundle = load_bundle(gate_bundle_dir)
    gate = Gate.from_bundle(bundle.root, bundle.card)
    if gate is None:
        raise ValueError(f"{gate_bundle_dir}: the card has no 'ood' gate")
    size = bundle.spec.size
    skimage_samples()  # fail before the long part when scikit-image is missing
    embed = embedder(bundle, gate=gate) if gate.has_embedding else None  # the gate's own vector (layout too)

    def run(items):
        rows = []
        for path, kind in items:
            try:
                ok, reason, score = gate.check_source(path, size, embed)
            except PreprocessError as exc:  # never labelled either: the classifier reports an error/refusal
                ok, reason, score = False, f"error: {exc}", float("inf")
            rows.append({"path": str(path), "kind": kind, "ok": ok, "reason": reason,
                         "score": None if not np.isfinite(score) else round(score, 3)})
        return rows

    test = [r.path for r in list_split(Path(data_root), "test")]
    test_rows = run([(p, "test") for p in test])
    dev_root = Path(gate_dev) if gate_dev else fit.DEFAULT_GATE_DEV
    adult_root = Path(adult_dev) if adult_dev else fit.DEFAULT_ADULT_DEV
    dev_items = fit.gate_dev_items(dev_root) + fit.adult_dev_items(adult_root)
    dev_rows = run([(it.path, it.category) for it in dev_items])
    with tempfile.TemporaryDirectory(prefix="cxr_ood_") as tmp:
        non_rows = run(make_non_cxr(Path(tmp) / "non_cxr"))
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(len(test), min(edge_scans, len(test)), replace=False))
        edge_rows = run(make_edge_cases([test[i] for i in pick], Path(tmp) / "edge"))
        dicom = _dicom_check(bundle.root, Path(tmp) / "dicom", test[int(pick[0])])
        frontal_dev = [it.path for it in dev_items if it.category in ADULT_CATEGORIES]
        inv_rows = run(make_inverted([(test[i], "test") for i in pick] + [(f, "gate_dev frontal") for f in frontal_dev],
                                     Path(tmp) / "inverted"))
    polarity = None
    if gate.has_polarity:  # fitted on train scans only: gate_dev's adult frontal films are held out from it
        scores = gate.polarity_scores(np.stack([load_gray(f, size) for f in frontal_dev]))
        polarity = {"n": len(frontal_dev), "refused": int((scores > gate.pol_threshold).sum()),
                    "max_score": round(float(scores.max()), 3), "threshold": gate.pol_threshold}
    result = {
        "bundle": str(bundle.root), "threshold": gate.emb_threshold if gate.has_embedding else gate.threshold,
        "embedding_head": gate.has_embedding,
        "test_false_reject": {**_rate(test_rows, False),
                              "rejected": [{"path": Path(r["path"]).name, "reason": r["reason"]}
                                           for r in test_rows if not r["ok"]]},
        "gate_dev_shipped": {cat: fit.cv_summary([{"file": Path(r["path"]).name, "accepted": r["ok"], "reason": r["reason"],
                                                   "score": r["score"]} for r in dev_rows if r["kind"] == cat],
                                                 fit.GATE_DEV_CLASSES[cat])
                             for cat in sorted({r["kind"] for r in dev_rows})},
        "val_false_reject": {"n": int(gate.params.get("embedding", {}).get("val_images", 0)),
                             "count": int(gate.params.get("embedding", {}).get("val_rejected", 0))
                             + int((gate.params.get("polarity") or {}).get("val_rejected", 0))},
        "non_cxr_reject": {**_rate(non_rows, False),
                           "by_kind": {k: _rate([r for r in non_rows if r["kind"] == k], False)
                                       for k in sorted({r["kind"] for r in non_rows})},
                           "accepted": [Path(r["path"]).name for r in non_rows if r["ok"]],
                           "unreadable_not_counted": [Path(r["path"]).name for r in non_rows
                                                      if r["reason"].startswith("error: ")]},
        "edge_accept": {**_rate(edge_rows, True),
                        "by_kind": {k: _rate([r for r in edge_rows if r["kind"] == k], True) for k in EDGE_KINDS}},
        "dicom": dicom,
        "inverted_reject": {**_rate(inv_rows, False),
                            "by_kind": {k: _rate([r for r in inv_rows if r["kind"] == k], False)
                                        for k in sorted({r["kind"] for r in inv_rows})},
                            "reasons": sorted({r["reason"].split(" (")[0] for r in inv_rows if not r["ok"]})},
        "polarity_gate_dev_frontal": polarity,
        "targets": TARGETS,
    }
    if cv and gate.has_embedding:
        result["gate_dev"] = gate_dev_cv(bundle, data_root, dev_root, seed=seed, adult_root=adult_root)
    if keep_rows:
        result["rows"] = {"test": test_rows, "gate_dev": dev_rows, "non_cxr": non_rows, "edge": edge_rows}
    return result


def gate_dev_cv(bundle, data_root, dev_root: Path, embed=None, seed: int = 0, adult_root: Path | None = None) -> dict:
    """The cross-validation of the bundle's gate as fitted (``cv_inputs``, then ``run_cv``)."""
    return run_cv(cv_inputs(bundle, data_root, dev_root, embed, seed, adult_root))


def cv_inputs(bundle, data_root, dev_root: Path, embed=None, seed: int = 0, adult_root: Path | None = None,
              n_train: int | None = None, adult_variants: int | None = None) -> dict:
    """``train.ood.cross_validate`` with this bundle's feature maps and the fit's recipe (the card's
    ``ood.fitted_on`` sizes, its layout grid and its generated "long film" negatives where it has them):
    each fold refits the whole gate (layout projection, head, density, thresholds on validation) without
    that fold's gate_dev images and their variants. ``embed``: rows as ``train.ood.collect`` wants them
    (``cxr_edge.ood.embedder(bundle, grid=...)``); made here when not given. ``n_train``: how many training
    scans the seeded subsample draws (default: the card's ``fitted_on.train_images``); ``adult_variants``: of
    each kind per adult film (default: the card's)."""
    from train import ood as fit
    from train.data import load_images, protocol_splits

    card = bundle.card["ood"]
    fitted = card.get("fitted_on", {})
    emb = card.get("embedding", {})
    n_train = int(n_train or fitted.get("train_images", 1200))
    n_variants = int(fitted.get("gate_dev_variants", fit.DEFAULT_VARIANTS))
    splits = protocol_splits(Path(data_root), "grouped")
    train, val = splits["train"], splits["val"]
    rng = np.random.default_rng(int(fitted.get("seed", seed)))
    if len(train) > n_train:
        train = [train[i] for i in sorted(rng.choice(len(train), n_train, replace=False))]
    size = bundle.spec.size
    layout = emb.get("layout") or {}
    grid = int(layout.get("grid", 0))
    if embed is None:
        embed = embedder(bundle, grid=grid)
    items = fit.gate_dev_items(dev_root) + fit.adult_dev_items(adult_root or fit.DEFAULT_ADULT_DEV)
    data, val_x = fit.collect(embed, size, load_images(train, size), load_images(val, size), items, n_variants,
                              int(fitted.get("seed", seed)),
                              n_synth=int(fitted.get("generated_per_kind", fit.DEFAULT_SYNTH)),
                              n_stretched=int(fitted.get("stretched_per_train", 0)),
                              n_stretched_dev=int(fitted.get("stretched_per_gate_dev", 0)),
                              n_frontal_variants=int(fitted.get("gate_dev_frontal_variants", 0)),
                              n_train_variants=int(fitted.get("train_variants", 0)),
                              n_clinical=int(fitted.get("clinical_variants", 0)),
                              n_adult_variants=int(fitted.get("adult_variants", 0) if adult_variants is None
                                                   else adult_variants))
    adult = emb.get("adult") or {}
    return {"data": data, "val_x": val_x, "items": items,
            "fit": {"c": float(emb.get("C", fit.DEFAULT_C)),
                    "max_val_reject": float(emb.get("max_val_reject", fit.DEFAULT_MAX_VAL_REJECT)), "seed": seed,
                    "density_components": int(emb.get("density_components", 0)), "grid": grid,
                    "grid_components": int(layout.get("components", fit.DEFAULT_GRID_COMPONENTS)),
                    "channels": layout.get("channels"),
                    "adult_c": float(adult["C"]) if "C" in adult else None,
                    "adult_floor": adult.get("floor", 0.0)}}


def run_cv(inputs: dict, **changes) -> dict:
    """``train.ood.cross_validate`` over ``cv_inputs``' rows with its fit settings (``changes`` replace some,
    e.g. ``adult_c``), with the adult films' summary."""
    from train import ood as fit

    res = fit.cross_validate(inputs["data"], inputs["val_x"], inputs["items"], **{**inputs["fit"], **changes})
    res["note"] = ("the gate's settings (layout grid and components, C, density components, generated negatives) "
                   "were chosen on this same cross-validation, so its rates are optimistic; gate_dev is a "
                   "development set, not a test set")
    for cat, r in res["by_category"].items():
        r["rate"] = r["correct_rate"]
    adults = [r for r in res["rows"] if r["category"] in ADULT_CATEGORIES]
    if adults:
        res["adults"] = fit.cv_summary(adults, "adult_chest")
    return res


def targets(g: dict) -> list[dict]:
    """``[{"target", "measured", "met"}]`` for ``python -m benchmarks``' target table."""
    out = []
    t = g["test_false_reject"]
    out.append({"target": "input gate: official test scans wrongly rejected <= 0.5%",
                "measured": f"{t['count']}/{t['n']} ({100 * t['rate']:.1f}%)",
                "met": t["rate"] <= TARGETS["test_false_reject_max"]})
    v = g.get("val_false_reject")
    if v and v["n"]:
        out.append({"target": "input gate: validation scans refused <= 0.5% (at most, head and polarity apart)",
                    "measured": f"{v['count']}/{v['n']} ({100 * v['count'] / v['n']:.1f}%)",
                    "met": v["count"] / v["n"] <= TARGETS["val_false_reject_max"]})
    cv = g.get("gate_dev") or {}
    a = cv.get("adults")
    if a:
        out.append({"target": "input gate, cross-validated: adult frontal films (adult_dev + gate_dev) refused as adult "
                              ">= 95%",
                    "measured": f"{a['correct']}/{a['n']} ({100 * a['correct_rate']:.1f}%; reasons {a['reasons']})",
                    "met": a["correct_rate"] >= TARGETS["adult_as_adult_min"]})
    for cat, r in cv.get("by_category", {}).items():
        if cat in ADULT_CATEGORIES:
            continue
        out.append({"target": f"input gate, gate_dev cross-validated: {cat} {r['expected']} (own reason) >= 97%",
                    "measured": f"{r['correct']}/{r['n']} ({100 * r['correct_rate']:.1f}%)",
                    "met": r["correct_rate"] >= TARGETS["gate_dev_accept_min" if r["expected"] == "accept"
                                                        else "gate_dev_reject_min"]})
    n = g["non_cxr_reject"]
    out.append({"target": "input gate: images that are not radiographs rejected >= 95%",
                "measured": f"{n['count']}/{n['n']} ({100 * n['rate']:.1f}%)", "met": n["rate"] >= 0.95})
    d = g["dicom"]
    out.append({"target": "input gate: no error record for a decodable DICOM (classified or refused)",
                "measured": f"{d['errors']} errors, {d['as_expected']}/{d['n']} as expected", "met": d["errors"] == 0})
    return out


def markdown(g: dict) -> list[str]:
    """Report lines (a table per set) from a ``measure`` result."""
    t = g["test_false_reject"]
    lines = ["| set | expected | result |", "|---|---|---|",
             f"| official test scans | accept | {t['n'] - t['count']}/{t['n']} accepted |"]
    for cat, r in (g.get("gate_dev") or {}).get("by_category", {}).items():
        extra = (f"; with --allow-adults {r['accepted_allow_adults']}/{r['n']} classified with a warning"
                 if "accepted_allow_adults" in r else "")
        lines.append(f"| {cat} (cross-validated) | {r['expected']} | {r['correct']}/{r['n']} as expected "
                     f"(refusals: {', '.join(f'{k} {v}' for k, v in r['reasons'].items()) or 'none'}){extra} |")
    for kind, r in ((g.get("gate_dev") or {}).get("adult_variants") or {}).items():
        lines.append(f"| the held-out adult films' variants: {kind} (cross-validated) | reject as adult | "
                     f"{r['correct']}/{r['n']} as expected, {r['accepted']} accepted "
                     f"(refusals: {', '.join(f'{k} {v}' for k, v in r['reasons'].items()) or 'none'}) |")
    n, e, d = g["non_cxr_reject"], g["edge_accept"], g["dicom"]
    lines += [f"| not radiographs (scikit-image photos, generated documents, screenshots, textures) | reject | "
              f"{n['count']}/{n['n']} rejected |",
              f"| altered test scans (crops, rotation, contrast) | accept | {e['count']}/{e['n']} accepted |",
              f"| synthetic DICOM (CT, MR, US palette, RT dose, DX hand/lateral/frontal) | as tagged | "
              f"{d['as_expected']}/{d['n']} as expected, {d['errors']} errors |"]
    inv = g.get("inverted_reject")
    if inv:
        lines.append(f"| inverted (negative) test scans and gate_dev frontal films | reject | {inv['count']}/{inv['n']} "
                     f"rejected ({', '.join(inv['reasons'])}) |")
    pol = g.get("polarity_gate_dev_frontal")
    if pol:
        lines.append(f"| gate_dev frontal films, polarity check alone (fitted without gate_dev) | accept | "
                     f"{pol['n'] - pol['refused']}/{pol['n']} accepted |")
    return lines


def readme_lines(g: dict) -> list[str]:
    """The README results block's gate bullet, from a ``measure`` result (per-category rates)."""
    t, n, d = g["test_false_reject"], g["non_cxr_reject"], g["dicom"]
    parts = [f"{t['count']}/{t['n']} official test scans rejected"]
    for cat, r in (g.get("gate_dev") or {}).get("by_category", {}).items():
        parts.append(f"{cat.replace('_', ' ')} {r['correct']}/{r['n']} {r['expected']}")
    parts.append(f"{n['count']}/{n['n']} non-radiographs rejected")
    parts.append(f"synthetic DICOM {d['as_expected']}/{d['n']} as tagged, {d['errors']} errors")
    if g.get("inverted_reject"):
        inv = g["inverted_reject"]
        parts.append(f"inverted (negative) scans {inv['count']}/{inv['n']} rejected")
    return ["- **Input gate** (gate_dev cross-validated, folds grouped by patient / body part): "
            + "; ".join(parts) + "."]


def main(argv: list[str] | None = None) -> None:
    from train.data import data_dir

    ap = argparse.ArgumentParser(prog="python -m benchmarks.ood", description="input gate rates")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", default=None)
    ap.add_argument("--gate-dev", type=Path, default=None)
    ap.add_argument("--edge-scans", type=int, default=60)
    ap.add_argument("--no-cv", action="store_true", help="skip the gate_dev cross-validation (refits)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    res = measure(args.bundle, data_dir(args.data), edge_scans=args.edge_scans, gate_dev=args.gate_dev,
                  cv=not args.no_cv)
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print("\n".join(markdown(res)))
    for t in targets(res):
        print(f"{'met' if t['met'] else 'NOT MET'}: {t['target']}: {t['measured']}")


if __name__ == "__main__":
    main()
