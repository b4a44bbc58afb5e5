"""Fit the out-of-distribution gate (``cxr_edge/ood.py``) and write it into a model bundle.

    python -m train.ood BUNDLE_DIR [--data DIR] [--n-train 1500] [--quantile 0.995] [--seed 0]

Fits a PCA basis of standardized 16x16 thumbnails on a seeded subsample of the patient-grouped protocol's
train split, and sets the rejection threshold to the ``quantile`` of the scores of its validation split (so
about 0.5% of validation scans are rejected by design). The official test split is never read. Images go
through ``train.data.load_images`` (``cxr_edge.preprocess.load_gray``, the one preprocessing definition).
Writes ``ood.npz`` into BUNDLE_DIR and an ``"ood"`` entry (with its sha256) into its ``card.json``; every
other field of the card is kept.
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_edge.bundle import CARD_NAME, sha256_file
from cxr_edge.ood import (DEFAULT_MAX_COLOUR_FRACTION, DEFAULT_MIN_STD, DEFAULT_THUMB, CHROMA_LEVEL, features,
                          ppca_score)

GATE_FILE = "ood.npz"
DEFAULT_COMPONENTS = 16
DEFAULT_QUANTILE = 0.995


AUGMENTATIONS = ("border crop 5-15%", "central crop to 75-90% of the width or of the height (another aspect "
                 "ratio, squashed back)", "rotation -7..7 degrees", "shift up to 6%")


def augment(gray: np.ndarray, seed: int = 0) -> np.ndarray:
    """One random geometric variant per ``uint8[N, S, S]`` image (seeded): what other chest X-rays differ
    by (framing, aspect ratio, tilt), so that the gate does not learn this data set's exact framing."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(gray)
    s = gray.shape[1]
    for i, g in enumerate(gray):
        img = Image.fromarray(g, "L")
        kind = int(rng.integers(4))
        if kind == 0:
            m = int(s * rng.uniform(0.05, 0.15))
            img = img.crop((m, m, s - m, s - m))
        elif kind == 1:
            f = rng.uniform(0.75, 0.9)
            cut = int(s * (1 - f) / 2)
            img = img.crop((cut, 0, s - cut, s) if rng.random() < 0.5 else (0, cut, s, s - cut))
        elif kind == 2:
            img = img.rotate(float(rng.uniform(-7, 7)), resample=Image.Resampling.BILINEAR, fillcolor=0)
        else:
            dx, dy = (int(v) for v in rng.integers(-int(0.06 * s), int(0.06 * s) + 1, 2))
            img = img.rotate(0, translate=(dx, dy), fillcolor=0)
        out[i] = np.asarray(img.resize((s, s), Image.Resampling.LANCZOS) if img.size != (s, s) else img)
    return out


def fit_gate(train_gray: np.ndarray, val_gray: np.ndarray, quantile: float = DEFAULT_QUANTILE,
             thumb: int = DEFAULT_THUMB, n_components: int = DEFAULT_COMPONENTS,
             max_colour_fraction: float = DEFAULT_MAX_COLOUR_FRACTION, min_std: float = DEFAULT_MIN_STD,
             augment_seed: int | None = 0) -> tuple[dict, dict]:
    """(arrays for ``ood.npz``, card parameters without path/sha256) from ``uint8[N, S, S]`` train and
    validation images. The PCA is fitted on the train images plus one geometric variant of each
    (``augment``; ``augment_seed=None``: none). The threshold is the ``quantile`` of the scores of the
    validation images as they are (not augmented)."""
    if len(train_gray) < 2 or len(val_gray) < 1:
        raise ValueError("need at least 2 training and 1 validation image")
    train_gray = np.asarray(train_gray, np.uint8)
    if augment_seed is not None:
        train_gray = np.concatenate([train_gray, augment(train_gray, augment_seed)])
    x, _ = features(train_gray, thumb)
    d = x.shape[1]
    k = int(min(n_components, len(x) - 1, d - 1))
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2 / max(1, len(x) - 1)
    var = np.concatenate([var, np.zeros(d - len(var))])
    floor = max(float(var[0]) * 1e-6, 1e-9)  # a few training images: keep every variance positive
    eigvals = np.maximum(var[:k], floor)
    resid_var = max(float(var[k:].mean()), floor)
    arrays = {"mean": mean, "components": vt[:k], "eigvals": eigvals, "resid_var": np.float64(resid_var)}

    xv, sd_val = features(val_gray, thumb)
    val_scores = ppca_score(xv, mean, vt[:k], eigvals, resid_var)
    threshold = float(np.quantile(val_scores, quantile))
    train_scores = ppca_score(x, mean, vt[:k], eigvals, resid_var)
    params = {
        "threshold": round(threshold, 4), "thumb": thumb, "components": k,
        "max_colour_fraction": max_colour_fraction, "chroma_level": CHROMA_LEVEL, "min_std": min_std,
        "features": (f"load_gray(224) -> {thumb}x{thumb} box-filter thumbnail, standardized per image "
                     f"(zero mean, unit variance); score = PPCA: squared Mahalanobis distance in {k} principal "
                     "components + squared reconstruction residual / mean discarded variance. Also rejected: "
                     f"colour images (share of pixels with max(R,G,B)-min(R,G,B) > {CHROMA_LEVEL} above "
                     f"{max_colour_fraction}) and uniform images (thumbnail std < {min_std} gray levels)"),
        "fitted_on": {"train_images": int(len(x)),
                      "augmentation": "none" if augment_seed is None else
                      f"each train image + one seeded variant (seed {augment_seed}): " + "; ".join(AUGMENTATIONS),
                      "val_images": int(len(xv)), "quantile": quantile,
                      "val_score_median": round(float(np.median(val_scores)), 4),
                      "train_score_median": round(float(np.median(train_scores)), 4),
                      "val_rejected_by_score": int((val_scores > threshold).sum()),
                      "val_rejected_uniform": int((sd_val < min_std).sum()),
                      "explained_variance": round(float(var[:k].sum() / var.sum()), 4)},
    }
    return arrays, params


def write_gate(bundle_dir: str | Path, arrays: dict, card_params: dict) -> dict:
    """Save ``ood.npz`` into ``bundle_dir`` and set the card's ``"ood"`` entry (path, sha256, bytes + params);
    the card's other fields are kept as they are. Returns the new ``"ood"`` entry."""
    root = Path(bundle_dir)
    card_path = root / CARD_NAME
    card = json.loads(card_path.read_text())
    path = root / GATE_FILE
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    entry = {"path": GATE_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size, **card_params}
    card["ood"] = entry
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    tmp.replace(card_path)
    return entry


def main(argv: list[str] | None = None) -> None:
    from train.data import data_dir, load_images, protocol_splits
    from cxr_edge.preprocess import load_gray_colour

    ap = argparse.ArgumentParser(prog="python -m train.ood", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="model bundle folder to write ood.npz + card entry into")
    ap.add_argument("--data", default=None, help="chest_xray folder (Kaggle layout)")
    ap.add_argument("--n-train", type=int, default=1500, help="seeded subsample of the train split")
    ap.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    ap.add_argument("--components", type=int, default=DEFAULT_COMPONENTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    if not (args.bundle / CARD_NAME).is_file():
        ap.error(f"{args.bundle} has no {CARD_NAME}")
    root = data_dir(args.data)
    splits = protocol_splits(root, "grouped")
    train, val = splits["train"], splits["val"]
    rng = np.random.default_rng(args.seed)
    if len(train) > args.n_train:
        train = [train[i] for i in sorted(rng.choice(len(train), args.n_train, replace=False))]
    size = int(json.loads((args.bundle / CARD_NAME).read_text()).get("input", {}).get("size", 224))
    tr = load_images(train, size, workers=args.workers)
    va = load_images(val, size, workers=args.workers)
    arrays, params = fit_gate(tr, va, args.quantile, n_components=args.components)
    colour = np.array([load_gray_colour(r.path, size)[1] for r in val])
    params["fitted_on"].update({
        "data": "train/ grouped protocol (patient-grouped, seed 0): PCA on a seeded subsample of its train "
                "split, threshold on its val split; official test/ not read",
        "seed": args.seed, "val_max_colour_fraction": round(float(colour.max()), 4),
        "val_rejected_colour": int((colour > params["max_colour_fraction"]).sum()),
        "date": datetime.date.today().isoformat()})
    entry = write_gate(args.bundle, arrays, params)
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
