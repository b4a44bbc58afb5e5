"""Fit the input gate (``cxr_edge/ood.py``) of a model bundle and write it into the bundle.

    python -m train.ood BUNDLE_DIR [--data DIR] [--gate-dev DIR] [--n-train 1200] [--C 5] [--grid 3]
                                   [--grid-components 64] [--stretched 1] [--stretched-dev 4]
                                   [--clinical-variants 1] [--seed 0]

The shipped gate (cxr_edge/models/default) is refitted with exactly
``python -m train.ood cxr_edge/models/default --C 5`` (every other setting at its default; the card's
``ood.fitted_on.command`` spells them all out).

The gate reads the bundle model's own last feature map (``cxr_edge.ood.embedder``: ``Classifier.predict_full``
on dual-output bundles, else ``features.tflite``): its global average (the penultimate embedding) and, with
``--grid G`` (default 3; 0: the older global-average gates), its layout: the map average-pooled on a ``G x G``
grid, each cell's vector projected onto the first ``--grid-components`` principal components of frontal
training scans' cells (``fit_layout``). Where things are in the frame tells a frontal chest X-ray from a knee, a
hand or a whole-spine film that the global average alone confuses with one. A bundle exported with
``--fine-features`` (``export.cam.feature_tensor``) gives a finer map: the last map on the stride-16 grid
plus the stride-16 layer's own channels (9x9x1952 for Lite0 at 144 px, whose last map is only 5x5), and the
gate reads all of it. Its head is a linear softmax over
four classes (``frontal_chest``, ``lateral_chest``, ``other_body_part``, ``not_radiograph``), fitted
(scikit-learn, multinomial logistic regression, balanced class weights) on:

- positives: a seeded subsample of the patient-grouped protocol's **train** split, each scan as it is, one
  geometric variant (framing, aspect ratio, tilt: ``augment``) and ``--train-variants`` ``variants`` (flips,
  tilt, brightness/contrast/gamma: washed-out portable films are frontal chest X-rays too), ``--clinical-variants``
  ``clinical`` variants (films as clinics produce them: collimation frames, letterboxing to a landscape frame,
  tall/wide crops keeping the lungs, tilt, edge enhancement, burned-in text and lead markers; these teach the head
  only: the layout basis and the density model are fitted on the other frontal rows, ``GateData.basis``), plus the adult
  frontal chest X-rays of ``gate_dev`` (``--gate-dev``, by default ``../shared/data/gate_dev``) with variants
  (``--variants`` + ``--frontal-variants``);
- negatives: gate_dev's lateral chest views and radiographs of other body parts, with seeded variants
  (``variants``: flips, crops, rotations, brightness/contrast/gamma); "long films" (``stretched``: a strip of
  2.5-4.5x the frame's aspect ratio squashed back to a square, as a whole-spine or long-leg film reaches the
  model) made from train scans (``--stretched`` per scan) and from gate_dev's lateral views and other
  radiographs (``--stretched-dev`` each), as ``other_body_part``; and generated images that are not
  radiographs (``make_non_cxr``: document pages, screenshots, photo-like scenes, textures, gray and colour).

The rejection threshold on the score ``logsumexp(other logits) - frontal logit`` is chosen on the grouped
**validation** split only (``choose_threshold``): the decision boundary 0, raised just enough that at most
``--max-val-reject`` of the validation scans would be refused. A density check (``fit_density``: Mahalanobis
distance in the first ``--density-components`` principal components of the frontal training vectors) catches
what none of the head's classes describes; its threshold is the ``1 - max_val_reject`` quantile of the
validation scans' distances. A polarity check (``fit_polarity``: a logistic regression on the standardized
16x16 thumbnail, train scans against their negatives, no gate_dev) refuses negative images; its threshold is
chosen on the validation split the same way. The official test split is never read.
``gate_dev`` is cross-validated (``cross_validate``: folds grouped by patient / body part and source; each fold
refits everything, layout projection included, without the fold's images and any variant of them) and the
per-category rates go into the card's ``ood.fitted_on.gate_dev_cv``. The 3-class classifier never sees
gate_dev: this only fits the gate. Writes ``ood.npz`` into BUNDLE_DIR and an ``"ood"`` entry (with its sha256)
into its ``card.json``; every other field of the card is kept.

The gate's pieces live in ``train.gate_synth`` (variants of scans, generated non-radiographs),
``train.gate_data`` (gate_dev, the embedded rows of a fit), ``train.gate_fit`` (the head, the checks, their
thresholds) and ``train.gate_cv`` (cross-validation); their names are importable from here too. This module
writes the gate (``write_gate``, ``card_entry``) and is the command (``main``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np

from cxr_edge.bundle import CARD_NAME, load_bundle, sha256_file
from cxr_edge.ood import CHROMA_LEVEL, DEFAULT_MAX_COLOUR_FRACTION, DEFAULT_MIN_STD, EMBED_CLASSES, Gate, embedder
from train.gate_data import (ADULT_LABEL, DEFAULT_ADULT_DEV, DEFAULT_GATE_DEV, DEFAULT_VARIANTS, EMBED_BATCH,
                             GATE_DEV_CLASSES, DevItem, GateData, adult_dev_items, body_part, collect, embed_images,
                             gate_dev_items, patient_of, shifted)  # noqa: F401
from train.gate_fit import (ABSENT_LOGIT, ADULT_CHECK, ADULT_VAL_SHARE, CHEST_CHECK, DEFAULT_C,
                            DEFAULT_DENSITY_COMPONENTS, DEFAULT_GRID_COMPONENTS, DEFAULT_MAX_VAL_REJECT, HALF_ARRAYS,
                            POLARITY, _f16, _f32, _principal, choose_threshold, fit_adult, fit_density, fit_gate,
                            fit_head, fit_layout, fit_polarity, fit_sideways, fit_updown, gate_vectors,
                            scores_of)  # noqa: F401
from train.gate_cv import cross_validate, cv_summary, expected_outcome  # noqa: F401
from train.gate_synth import (AUGMENTATIONS, CLINICAL, DEFAULT_SYNTH, MARKER_WORDS, STRETCH, TEXTURES, WORDS,
                              _aspect_crop, _burn_text, _collimate, _document, _letterbox, _marker_text, _photo_like,
                              _screenshot, _text_line, _texture, augment, clinical, stretched, synth_non_radiographs,
                              variants)  # noqa: F401

GATE_FILE = "ood.npz"
# The shipped gate's settings are the defaults (with train.gate_fit's DEFAULT_C, DEFAULT_MAX_VAL_REJECT,
# DEFAULT_DENSITY_COMPONENTS, DEFAULT_GRID_COMPONENTS, train.gate_data's DEFAULT_VARIANTS and train.gate_synth's
# DEFAULT_SYNTH): `python -m train.ood BUNDLE` rebuilds it
DEFAULT_ADULT_VARIANTS = 6  # acquisition shifts (train.shifts.random_shift) and annotations per adult frontal film
DEFAULT_FRONTAL_VARIANTS = 0  # more variants of each gate_dev adult frontal X-ray
DEFAULT_TRAIN_VARIANTS = 1  # photometric + geometric variants per train scan (frontal_chest)
DEFAULT_CLINICAL = 5  # clinic-style variants per train scan (frontal_chest: frames, text, crops; ``clinical``)
DEFAULT_GRID = 3  # layout: the feature map pooled on a 3 x 3 grid (0: global average only, the older gates)
DEFAULT_STRETCHED = 1  # "long film" variants per train scan (other_body_part)
DEFAULT_STRETCHED_DEV = 4  # "long film" variants per gate_dev lateral view / other radiograph (other_body_part)


def write_gate(bundle_dir: str | Path, arrays: dict, card_params: dict) -> dict:
    """Save ``ood.npz`` into ``bundle_dir`` and set the card's ``"ood"`` entry (path, sha256, bytes + params);
    the card's other fields are kept as they are. Returns the new ``"ood"`` entry."""
    Gate({k: np.asarray(v) for k, v in arrays.items()}, card_params)  # ValueError before anything is written
    root = Path(bundle_dir)
    card_path = root / CARD_NAME
    card = json.loads(card_path.read_text())
    path = root / GATE_FILE
    stored = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if k in HALF_ARRAYS:
            half = v.astype(np.float16)
            if not np.array_equal(half.astype(v.dtype), v):
                raise ValueError(f"{k}: not float16 values (fit it through fit_layout / fit_density)")
            v = half
        stored[k] = v
    np.savez(path, **stored)
    entry = {"path": GATE_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size, **card_params}
    card["ood"] = entry
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(card_path)
    Gate.from_bundle(root, card)  # what was written loads
    return entry


def _shown(folder: Path) -> str:
    """A folder as a card may name it: relative to this checkout's parent (``../shared/data/gate_dev``), or
    its name alone; never a path of the machine that fitted the gate."""
    here = Path(__file__).resolve().parent.parent
    try:
        return str(Path("..") / Path(folder).resolve().relative_to(here.parent))
    except ValueError:
        return Path(folder).name


def card_entry(emb_params: dict, fitted_on: dict, cv: dict | None) -> dict:
    """The card's ``"ood"`` parameters (without path/sha256/bytes)."""
    return {
        "max_colour_fraction": DEFAULT_MAX_COLOUR_FRACTION, "chroma_level": CHROMA_LEVEL, "min_std": DEFAULT_MIN_STD,
        "threshold": emb_params.get("threshold"),  # the embedding head's, as `cxr-edge info` shows it
        "embedding": emb_params,
        "features": ("before the model: colour photo (share of pixels with max(R,G,B)-min(R,G,B) > "
                     f"{CHROMA_LEVEL} above {DEFAULT_MAX_COLOUR_FRACTION}) and blank image (16x16 thumbnail std < "
                     f"{DEFAULT_MIN_STD} gray levels); after it: a linear softmax head and a density check on the "
                     "model's penultimate global-average-pooled embedding"
                     + (" and the layout of its last feature map ({0}x{0} grid cells, {1} principal components "
                        "each)".format(emb_params["layout"]["grid"], emb_params["layout"]["components"])
                        if emb_params.get("layout") else "")
                     + " over " + ", ".join(EMBED_CLASSES)
                     + ("; for what it accepts, an adult-vs-child check on the same vector (the intended "
                        "population)" if emb_params.get("adult") else "")),
        "fitted_on": {**fitted_on, **({"gate_dev_cv": {k: v for k, v in cv.items() if k != "rows"}} if cv else {})},
    }


def main(argv: list[str] | None = None) -> None:
    from train.data import data_dir, load_images, protocol_splits

    ap = argparse.ArgumentParser(prog="python -m train.ood", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="model bundle folder to write ood.npz + card entry into")
    ap.add_argument("--data", default=None, help="chest_xray folder (Kaggle layout); only train/ is read")
    ap.add_argument("--gate-dev", type=Path, default=DEFAULT_GATE_DEV, help="gate_dev folder (MANIFEST.csv)")
    ap.add_argument("--adult-dev", type=Path, default=DEFAULT_ADULT_DEV,
                    help="adult frontal films for the adult_chest class (MANIFEST.csv; skipped when absent)")
    ap.add_argument("--adult-variants", type=int, default=DEFAULT_ADULT_VARIANTS,
                    help="acquisition-shifted and clinic-style variants of each adult frontal film (each kind)")
    ap.add_argument("--n-train", type=int, default=1200, help="seeded subsample of the grouped train split")
    ap.add_argument("--variants", type=int, default=DEFAULT_VARIANTS, help="variants per gate_dev image")
    ap.add_argument("--frontal-variants", type=int, default=DEFAULT_FRONTAL_VARIANTS,
                    help="more variants of each gate_dev frontal chest X-ray (on top of --variants)")
    ap.add_argument("--train-variants", type=int, default=DEFAULT_TRAIN_VARIANTS,
                    help="variants (flip, tilt, brightness/contrast/gamma) per train scan, on top of the geometric one")
    ap.add_argument("--clinical-variants", type=int, default=DEFAULT_CLINICAL,
                    help="clinic-style variants (collimation, letterboxing, crops, tilt, burned-in text) per train scan")
    ap.add_argument("--n-synth", type=int, default=DEFAULT_SYNTH, help="generated non-radiographs per kind")
    ap.add_argument("--max-val-reject", type=float, default=DEFAULT_MAX_VAL_REJECT)
    ap.add_argument("--C", type=float, default=DEFAULT_C, help="inverse L2 strength of the head")
    ap.add_argument("--density-components", type=int, default=DEFAULT_DENSITY_COMPONENTS,
                    help="principal components of the density check (0: head only)")
    ap.add_argument("--grid", type=int, default=DEFAULT_GRID,
                    help="layout: pool the model's feature map on a GRID x GRID grid too (0: global average only)")
    ap.add_argument("--grid-components", type=int, default=DEFAULT_GRID_COMPONENTS,
                    help="principal components kept per grid cell")
    ap.add_argument("--stretched", type=int, default=DEFAULT_STRETCHED,
                    help="'long film' variants (other_body_part) per train scan")
    ap.add_argument("--stretched-dev", type=int, default=DEFAULT_STRETCHED_DEV,
                    help="'long film' variants (other_body_part) per gate_dev lateral view / other radiograph")
    ap.add_argument("--folds", type=int, default=5, help="gate_dev cross-validation folds (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None,
                    help="an .npz of the embedded rows: read when it exists (and was made with the same settings), "
                         "else written after embedding; a refit of the heads then takes minutes, not the embedding")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="inference threads for the embeddings")
    args = ap.parse_args(argv)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {msg}", flush=True)

    if not (args.bundle / CARD_NAME).is_file():
        ap.error(f"{args.bundle} has no {CARD_NAME}")
    bundle = load_bundle(args.bundle)
    size = bundle.spec.size
    root = data_dir(args.data)
    splits = protocol_splits(root, "grouped")  # the official test/ is not listed, let alone read
    train, val = splits["train"], splits["val"]
    rng = np.random.default_rng(args.seed)
    if len(train) > args.n_train:
        train = [train[i] for i in sorted(rng.choice(len(train), args.n_train, replace=False))]
    try:
        items = gate_dev_items(args.gate_dev)
    except FileNotFoundError as exc:
        ap.error(f"{exc}; pass --gate-dev DIR (see ../shared/data/gate_dev/README.md)")
    items += adult_dev_items(args.adult_dev)
    train_gray = load_images(train, size, workers=args.workers)
    val_gray = load_images(val, size, workers=args.workers)
    settings = json.dumps({k: str(v) for k, v in sorted(vars(args).items())
                           if k not in ("bundle", "cache", "folds", "C", "max_val_reject", "density_components",
                                        "grid_components", "workers", "threads")}
                          | {"model": bundle.card.get("training_run", ""), "items": len(items)})
    cached = None
    if args.cache and args.cache.is_file():
        with np.load(args.cache) as z:
            if str(z["settings"]) == settings:
                cached = (GateData(z["x"], z["y"], z["dev"], z["basis"], z["head"]), z["val_x"])
                log(f"embedded rows read from {args.cache}")
            else:
                log(f"{args.cache} was made with other settings: embedding again")
    if cached is None:
        embed = embedder(bundle, threads=args.threads, grid=args.grid)
        cached = collect(embed, size, train_gray, val_gray, items, args.variants, args.seed, log,
                         args.n_synth, args.stretched, args.stretched_dev, args.frontal_variants,
                         args.train_variants, args.clinical_variants, args.adult_variants)
        if args.cache:
            d = cached[0]
            np.savez(args.cache, x=d.x, y=d.y, dev=d.dev, basis=d.basis, head=d.head, val_x=cached[1], settings=settings)
    data, val_x = cached
    cv = None
    if args.folds:
        cv = cross_validate(data, val_x, items, args.folds, args.C, args.max_val_reject, args.seed,
                            args.density_components, args.grid, args.grid_components)
        for cat, r in cv["by_category"].items():
            log(f"gate_dev CV {cat}: {r['correct']}/{r['n']} right (expected: {r['expected']}; reasons "
                f"{r['reasons']}); wrong: {r['wrong']}")
    arrays, params = fit_gate(data, val_x, args.C, args.max_val_reject, args.seed, args.density_components,
                              args.grid, args.grid_components)
    fitted_on = {
        "data": "train/ grouped protocol (patient-grouped, seed 0): head on a seeded subsample of its train "
                "split (+ one geometric variant, --train-variants photometric ones and --stretched long films "
                "each), thresholds on its val split; official test/ not read",
        "train_images": len(train), "gate_dev": _shown(args.gate_dev), "gate_dev_images": len(items),
        "adult_dev": _shown(args.adult_dev), "adult_variants": args.adult_variants,
        "adult": "adult frontal films (gate_dev's frontal_chest_other and adult_dev) as adult_chest, each with "
                 "--variants variants and --adult-variants acquisition-shifted (train.shifts.random_shift) or "
                 "annotated (train.shifts.annotate) and --adult-variants clinic-style ones (these two kinds in the adult "
                 "check only, not in the head); one shifted or annotated variant of each train scan as frontal_chest",
        "gate_dev_variants": args.variants, "gate_dev_frontal_variants": args.frontal_variants,
        "train_variants": args.train_variants,
        "clinical_variants": args.clinical_variants,
        "clinical": f"{args.clinical_variants} per train scan (train.ood.clinical: {CLINICAL}), as frontal_chest; "
                    "not in the layout basis nor the density model",
        "augmentation": "; ".join(AUGMENTATIONS),
        "generated": "document pages, screenshots, photo-like scenes, solid colours, textures (train.ood."
                     "synth_non_radiographs, seed %d, %d per kind)" % (args.seed + 1, args.n_synth),
        "generated_per_kind": args.n_synth,
        "long_films": f"{args.stretched} per train scan, {args.stretched_dev} per gate_dev lateral view and other "
                      f"radiograph (train.ood.stretched: "
                      f"{STRETCH}), as other_body_part",
        "stretched_per_train": args.stretched, "stretched_per_gate_dev": args.stretched_dev,
        "command": (f"python -m train.ood BUNDLE --C {args.C:g} --grid {args.grid} --grid-components "
                    f"{args.grid_components} --density-components {args.density_components} --stretched "
                    f"{args.stretched} --stretched-dev {args.stretched_dev} --n-train "
                    f"{args.n_train} --train-variants {args.train_variants} --clinical-variants {args.clinical_variants} "
                    f"--variants "
                    f"{args.variants} --frontal-variants {args.frontal_variants} --n-synth {args.n_synth} "
                    f"--max-val-reject {args.max_val_reject:g} --adult-variants {args.adult_variants} "
                    f"--seed {args.seed}"),
        "seed": args.seed, "date": datetime.date.today().isoformat(),
        "seconds": round(time.monotonic() - t0, 1)}
    pol_arrays, pol_params = fit_polarity(train_gray, val_gray, args.seed, args.max_val_reject,
                                          n_clinical=args.clinical_variants)
    arrays.update(pol_arrays)
    log(f"polarity check: threshold {pol_params['threshold']}, validation scans refused "
        f"{pol_params['val_rejected']}/{pol_params['val_images']}, their negatives refused "
        f"{pol_params['val_inverted_refused']}/{pol_params['val_images']}")
    questions = {}  # cxr_edge.reorient's: a film upside down, on its side
    for key, fit_question in (("updown", fit_updown), ("sideways", fit_sideways)):
        q_arrays, questions[key] = fit_question(train_gray, val_gray, args.seed, args.max_val_reject,
                                                n_clinical=args.clinical_variants)
        arrays.update(q_arrays)
        q = questions[key]
        log(f"{key} question: threshold {q['threshold']}, validation scans flagged {q['val_rejected']}/"
            f"{q['val_images']}, so turned {q['val_turned_flagged']}/{q['val_turned']}")
    entry = write_gate(args.bundle, arrays, {**card_entry(params, fitted_on, cv), "polarity": pol_params, **questions})
    log(f"wrote {args.bundle / GATE_FILE}: threshold {params['threshold']}, "
        f"validation scans refused {params['val_rejected']}/{params['val_images']}")
    print(json.dumps({k: v for k, v in entry.items() if k != "fitted_on"}, indent=2))


if __name__ == "__main__":
    main()
