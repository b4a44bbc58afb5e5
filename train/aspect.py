"""The squash shortcut, and the augmentation that takes it away.

Every image is squashed to a square (``cxr_edge.preprocess``), so a film's width/height ratio survives as
a horizontal compression of the anatomy. In Kermany's ``train/`` that ratio follows the class: of the films
whose size is known (``train.data.original_aspects``), normal ones have a median ratio of 1.21 and pneumonia
ones 1.49-1.51. A model can therefore tell normal from pneumonia partly by how squashed the chest looks, and
it does: widening or narrowing the validation scans by the ratio between the classes moves the shipped
model's answers (``python -m train.aspect BUNDLE``). Films from elsewhere have whatever ratio their
detector gave them, so the cue is worse than useless there.

``AspectResample`` removes it from training: each epoch, every training image is rescaled horizontally as
if its film had had a ratio drawn from the pooled ratios of all classes, ``s = r_new / r_own``. Where an
image's own ratio is unknown it is drawn from the known ratios of its class, so the ratio the model sees is
independent of the class in either case. The resample is one linear interpolation along the rows, edge
pixels repeated (as ``train.augment.RandomAffine`` fills), done on the batch before the model's own
augmentation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_edge.labels import CLASS_NAMES

LIMITS = (0.6, 1.67)  # the horizontal scale is kept within these (a film 1.67x wider or narrower at most)


def hscale(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Rescale each image of ``x[N, H, W, ...]`` horizontally about its centre: output column ``j`` reads
    input column ``c + s * (j - c)`` (``s > 1`` squeezes the content, as a wider film squashed to the same
    square would be; ``s < 1`` widens it), linear between columns, edge columns repeated."""
    x = np.asarray(x)
    n, w = x.shape[0], x.shape[2]
    c = (w - 1) / 2.0
    src = c + np.asarray(s, np.float64).reshape(n, 1) * (np.arange(w) - c)
    src = np.clip(src, 0, w - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, w - 1)
    t = (src - i0).astype(np.float32)
    rows = np.arange(n)[:, None]
    a, b = x[rows, :, i0], x[rows, :, i1]  # [N, W, H, ...]
    t = t.reshape(n, w, *([1] * (x.ndim - 2)))
    out = a * (1 - t) + b * t
    if x.dtype.kind != "f":
        out = np.rint(out)
    return np.moveaxis(out, 1, 2).astype(x.dtype)


class AspectResample:
    """``transform(x, idx, rng)`` for ``train.batches.FixedBatches``: a fresh class-independent ratio for
    each training image each time it is drawn. ``aspects``: each training image's own ratio (``NaN`` where
    unknown), ``labels`` their classes."""

    def __init__(self, aspects: np.ndarray, labels: np.ndarray):
        aspects = np.asarray(aspects, np.float64)
        labels = np.asarray(labels)
        known = np.isfinite(aspects)
        if not known.any():
            raise ValueError("aspect resampling needs the original size of some training images "
                             "(MANIFEST.csv beside the data, or full-size files)")
        self.aspects, self.labels = aspects, labels
        self.pool = aspects[known]
        self.by_class = {}
        for k in np.unique(labels):
            mine = aspects[known & (labels == k)]
            if len(mine) == 0 and (~known & (labels == k)).any():
                raise ValueError(f"no known original size among the {CLASS_NAMES[int(k)]} training images")
            self.by_class[int(k)] = mine

    def scales(self, own: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Horizontal scales taking images of ratios ``own`` (``NaN``: drawn from the training ratios of
        their class, ``labels``) to ratios drawn from all training films."""
        own = np.array(own, np.float64)
        for i in np.flatnonzero(~np.isfinite(own)):
            pool = self.by_class[int(labels[i])]
            own[i] = pool[rng.integers(len(pool))]
        new = self.pool[rng.integers(len(self.pool), size=len(own))]
        return np.clip(new / own, *LIMITS)

    def __call__(self, x: np.ndarray, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return hscale(x, self.scales(self.aspects[idx], self.labels[idx], rng))


def neutral_copies(resample: "AspectResample", x: np.ndarray, labels: np.ndarray, aspects: np.ndarray,
                   copies: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A validation set as films would come if their ratio did not follow the class: ``copies`` fixed
    draws of each image, rescaled from its own ratio (``aspects``, or one of its class's training ratios
    where unknown) to one of the training films' pooled ratios. What a run under ``aspect`` validates on
    (``val_neutral_*``): the plain validation split carries the same shortcut as training and rewards it."""
    rng = np.random.default_rng(seed)
    xs = [hscale(x, resample.scales(aspects, labels, rng)) for _ in range(copies)]
    return np.concatenate(xs), np.tile(labels, copies)


def class_ratio(aspects: np.ndarray, labels: np.ndarray) -> dict:
    """Median known ratio per class, and the factor between normal and pneumonia films."""
    med = {CLASS_NAMES[k]: float(np.nanmedian(aspects[labels == k])) for k in np.unique(labels)
           if np.isfinite(aspects[labels == k]).any()}
    normal = med.get("normal")
    pneumonia = [v for k, v in med.items() if k != "normal"]
    factor = float(np.mean(pneumonia) / normal) if normal and pneumonia else float("nan")
    return {"median": med, "factor": factor}


def swapped_accuracy(predict, gray: np.ndarray, labels: np.ndarray, factor: float) -> dict:
    """Accuracy and per-class recall on ``gray[N, S, S]`` as they are and with the classes' ratios swapped:
    normal scans squeezed by ``factor`` (as if filmed as wide as pneumonia films), pneumonia scans widened
    by it. ``predict(gray[N, S, S]) -> probs[N, K]``. A model that reads anatomy moves little; one that
    reads the squash loses normals one way and pneumonia the other."""
    out = {}
    normal = CLASS_NAMES.index("normal")
    s = np.where(labels == normal, factor, 1.0 / factor)
    for name, images in (("as_is", gray), ("swapped", hscale(gray, s))):
        out[name] = accuracy_and_recall(predict(images), labels)
    return out


def accuracy_and_recall(probs: np.ndarray, labels: np.ndarray) -> dict:
    """``{"accuracy", "recall": {class: recall}}`` of the argmax of ``probs`` (the classes present)."""
    p = np.asarray(probs).argmax(1)
    return {"accuracy": float(np.mean(p == labels)),
            "recall": {CLASS_NAMES[k]: float(np.mean(p[labels == k] == k)) for k in np.unique(labels)}}


def _predictor(path: Path, backend):
    """``(predict, input size, run config, engine)`` of a bundle (int8 through ``Classifier``) or of a run
    folder (its float Keras model, ``train.registry.load_run``)."""
    import json

    from cxr_edge.preprocess import to_input

    if (path / "card.json").is_file():
        from cxr_edge.classifier import Classifier

        clf = Classifier(path, backend=backend, threads=2)
        run_cfg = Path("runs") / str(clf.card.get("training_run", "")) / "config.json"
        cfg = json.loads(run_cfg.read_text()) if run_cfg.is_file() else {}
        return (lambda g: np.concatenate([clf.predict(a) for a in g])), clf.spec.size, cfg, clf.backend
    from train.batches import predict_fixed
    from train.registry import load_run

    model, spec, cfg = load_run(path)
    return (lambda g: predict_fixed(model, to_input(g, spec), 32)), spec.size, cfg, "keras"


def model_args(prog: str, doc: str, argv):
    """``(args, data folder)`` of a ``MODEL [MODEL ...] [--data D] [--backend B]`` command."""
    import argparse

    from train import data as data_mod

    ap = argparse.ArgumentParser(prog=prog, description=doc)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default=None)
    ap.add_argument("--backend", default=None, help="bundles: tflite or onnx (default: the runtime's)")
    args = ap.parse_args(argv)
    return args, data_mod.data_dir(args.data)


def main(argv=None) -> int:
    """``python -m train.aspect MODEL [MODEL ...]``: each model (a bundle, int8 through ``Classifier``, or
    a run folder, float Keras) on the validation split of its run, as it is and with the classes' ratios
    swapped by the training films' median ratios."""
    import json

    from train import data as data_mod
    from train.metrics import classification_metrics

    args, root = model_args("python -m train.aspect", main.__doc__, argv)
    train = data_mod.list_split(root, "train")
    known = dict(zip((r.path for r in train), data_mod.original_aspects(train, root)))  # read once

    def aspects(records):
        return np.array([known[r.path] for r in records])

    ratio = class_ratio(aspects(train), data_mod.labels_of(train))
    print(json.dumps({"train_ratios": ratio}))
    for model in args.models:
        predict, size, cfg, engine = _predictor(Path(model), args.backend)
        splits = data_mod.run_splits(root, cfg)
        gray, y = data_mod.load_images(splits["val"], size), data_mod.labels_of(splits["val"])
        res = swapped_accuracy(predict, gray, y, ratio["factor"])
        resample = AspectResample(aspects(splits["train"]), data_mod.labels_of(splits["train"]))
        xn, yn = neutral_copies(resample, gray, y, aspects(splits["val"]), seed=data_mod.split_seed_of(cfg))
        m = classification_metrics(yn, predict(xn))
        res["neutral"] = {k: m[k] for k in ("accuracy", "macro_f1", "log_loss")}
        print(json.dumps({"model": str(model), "engine": engine, **res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
