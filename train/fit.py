"""Fit one model configuration and record the run in ``runs/<run id>/``.

Backend-agnostic Keras 3: TensorFlow on the CPU here, JAX on a lent GPU. A run directory holds
``config.json``, ``history.csv``, ``weights.npz`` (best epoch by validation loss), ``metrics.json``
(validation metrics, what the weights started from, the machine) and ``curve.png``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cxr_edge.labels import CLASS_NAMES
from cxr_edge.preprocess import to_input
from train import data as data_mod
from train.batches import CompileCounter, FixedBatches, enable_jax_cache, predict_fixed
from train.fit_config import FitConfig
from train.metrics import classification_metrics
from train.models import assign, build
from train.registry import RUNS_DIR
from train.trainer import _callbacks, _plot, _read_history, _val_metrics, build_trainer, machine


def new_run_dir(cfg: FitConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{cfg.name or cfg.model}"
    run_dir, i = RUNS_DIR / base, 1
    while run_dir.exists():
        run_dir, i = RUNS_DIR / f"{base}-{i}", i + 1
    run_dir.mkdir(parents=True)
    return run_dir


def teacher_probs(run_ids: list[str], images_at, batch: int = 64) -> np.ndarray:
    """Mean probabilities of teachers on the training images, ``images_at(size)`` giving them as
    ``uint8[N, size, size]`` at the teacher's own input size (a student may read fewer pixels than its
    teachers): the soft targets that distil an ensemble into one student. A teacher is a finished run
    (``runs/<id>`` or its folder) or a model bundle (a folder with ``card.json``, such as the shipped
    ``cxr_edge/models/default``): its own probabilities, as its engine gives them (no temperature)."""
    from train.models import load_named

    out = []
    for run_id in run_ids:
        run = RUNS_DIR / run_id if not Path(run_id).is_dir() else Path(run_id)
        if (run / "card.json").is_file():
            from cxr_edge.classifier import Classifier

            clf = Classifier(model=run, ood=False, threads=os.cpu_count())
            gray = images_at(clf.spec.size)
            out.append(np.concatenate([clf.engine.run(to_input(gray[i:i + batch], clf.spec))
                                       for i in range(0, len(gray), batch)]))
            continue
        tcfg = json.loads((run / "config.json").read_text())
        t = build(tcfg["model"], input_size=tcfg["input_size"], weights=None, dropout=tcfg["dropout"],
                  batchnorm=tcfg.get("batchnorm", False), intensity=tcfg.get("intensity", "none"))
        assign(t.model, load_named(run / "weights.npz"))
        out.append(predict_fixed(t.model, to_input(images_at(t.spec.size), t.spec), batch))
    return np.mean(out, axis=0)


def _targets(cfg: FitConfig, y: np.ndarray, arrays: dict, root: Path | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Training targets (one-hot, or mixed with an ensemble's soft targets) and per-image weights."""
    eye = np.eye(len(CLASS_NAMES), dtype=np.float32)
    targets = eye[y]
    if cfg.teachers:
        images_at = _training_images_at(cfg, data_mod.data_dir(str(root) if root else None), arrays["train"])
        files = [t for t in cfg.teachers if str(t).endswith(".npz")]
        models = [t for t in cfg.teachers if not str(t).endswith(".npz")]
        parts, counts = [], []
        if models:
            parts.append(teacher_probs(models, images_at))
            counts.append(len(models))
        if files:
            names = train_names(cfg, data_mod.data_dir(str(root) if root else None))
            for f in files:
                probs, n = load_soft_targets(f, names, y)
                parts.append(probs)
                counts.append(n)
        soft = np.average(np.stack(parts), axis=0, weights=counts).astype(np.float32)
        targets = cfg.distill_alpha * targets + (1 - cfg.distill_alpha) * soft
    w = np.ones(len(y), np.float32)
    if cfg.class_weight:
        counts = np.bincount(y, minlength=len(CLASS_NAMES))
        w = (len(y) / (len(CLASS_NAMES) * counts))[y].astype(np.float32)
    return targets.astype(np.float32), w


def _training_images_at(cfg: FitConfig, root: Path, train: tuple[np.ndarray, np.ndarray]):
    """``images_at(size)``: ``cfg``'s training images (``train``: decoded at ``cfg.input_size``, and their
    labels) at a teacher's input size, decoded once per size however many teachers ask."""
    gray, y = train
    at_size = {cfg.input_size: gray}

    def images_at(size: int) -> np.ndarray:
        if size not in at_size:
            other = load_arrays(dataclasses.replace(cfg, input_size=size), root, splits=("train",))
            if not np.array_equal(other["train"][1], y):
                raise ValueError("the teacher's training images are not the student's")
            at_size[size] = other["train"][0]
        return at_size[size]

    return images_at


def split_records(cfg: FitConfig, root: Path) -> dict:
    """``{split: records}`` of ``cfg``'s protocol and validation split (a seeded sample under ``limit``)."""
    parts = data_mod.protocol_splits(root, cfg.protocol, cfg.val_fraction, cfg.split_seed)
    if cfg.limit:
        rng = np.random.default_rng(cfg.split_seed)
        parts = {k: [v[i] for i in sorted(rng.choice(len(v), min(cfg.limit, len(v)), replace=False))]
                 for k, v in parts.items()}
    return parts


def _names(records, root: Path) -> list[str]:
    return [Path(r.path).relative_to(root).as_posix() for r in records]


def train_names(cfg: FitConfig, root: Path) -> list[str]:
    """The training images of ``cfg``'s protocol, as paths relative to the data folder."""
    return _names(split_records(cfg, root)["train"], root)


def save_soft_targets(cfg: FitConfig, out: Path, root: Path | None = None) -> Path:
    """The mean probabilities of ``cfg.teachers`` on ``cfg``'s training images, with the images' names
    and labels, as one small file that a student elsewhere (a GPU lease) can name as its teacher: the
    teachers' weights and their input size need not travel."""
    root = data_mod.data_dir(str(root) if root else None)
    records = split_records(cfg, root)["train"]
    names = _names(records, root)
    y = data_mod.labels_of(records)
    probs = teacher_probs(list(cfg.teachers), _training_images_at(
        cfg, root, (data_mod.load_images(records, cfg.input_size), y)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, probs=probs.astype(np.float32), names=np.array(names), labels=y.astype(np.int32),
                        teachers=np.array([str(t) for t in cfg.teachers]))
    return out


def load_soft_targets(path, names: list[str], y: np.ndarray) -> tuple[np.ndarray, int]:
    """A ``save_soft_targets`` file checked against the student's training images (same names, same
    order, same labels): its probabilities and how many teachers they average."""
    with np.load(path) as z:
        probs, saved, labels, teachers = z["probs"], list(z["names"]), z["labels"], z["teachers"]
    if saved != list(names) or not np.array_equal(labels, y):
        raise ValueError(f"{path}: soft targets for other training images than this run's "
                         f"({len(saved)} saved, {len(names)} here)")
    return probs, max(1, len(teachers))


def fit(cfg: FitConfig, root: Path | None = None, arrays: dict | None = None) -> Path:
    """Train ``cfg`` and return its run directory. ``arrays`` ({split: (uint8 images, labels)}) lets a
    caller that trains several models share decoded images; it must come from ``cfg``'s protocol.

    Every step function compiles once: training batches have one shape (the partial last batch is
    dropped; batches are reshuffled every epoch), validation and prediction are zero-padded to whole
    batches, and the augmentation compiles (``train.augment``). ``metrics.json`` records the number of
    compilations per step function under JAX."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    if cfg.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    enable_jax_cache()
    if arrays is None:
        arrays = load_arrays(cfg, data_mod.data_dir(str(root) if root else None))
    y_tr, y_va = arrays["train"][1], arrays["val"][1]
    resample, val_aspects = _aspect_transform(cfg, root, y_tr)
    framer = None
    if cfg.framing:
        from train.framing import RandomFraming

        framer = RandomFraming(cfg.framing, None, cfg.framing_full)  # checks the fraction before a run folder is made
    acquire = None
    if cfg.acquisition:
        if framer is None:
            raise ValueError("acquisition shifts work on the stored images: they need framing (framing: 0.7)")
        from train.shifts import AcquisitionShift

        acquire = AcquisitionShift(cfg.acquisition)
    if acquire is None and cfg.monitor.startswith(("val_shifted", "val_robust")):
        raise ValueError(f"monitor {cfg.monitor} needs acquisition shifts (acquisition: 0.5)")
    if resample is None and framer is None and cfg.monitor.startswith("val_neutral"):
        raise ValueError(f"monitor {cfg.monitor} needs aspect resampling or framing (aspect: true, "
                         "framing: 0.65)")
    run_dir = new_run_dir(cfg)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    targets, weights = _targets(cfg, y_tr, arrays, root)
    steps = len(y_tr) // cfg.batch
    with CompileCounter() as compiles:
        built, model = build_trainer(cfg, steps)
        core = built.model
        from train.aspect import neutral_copies
        from train.framing import chain, framed_copies

        x_va = to_input(arrays["val"][0], built.spec)
        if framer is None:
            x_tr = to_input(arrays["train"][0], built.spec)
        else:  # windows are cut at the files' resolution, then brought to the input by the transform
            framer.spec = built.spec
            x_tr, stored_va = _stored_images(cfg, root, y_tr, y_va)
        data = FixedBatches(x_tr, targets, cfg.batch, weights, mixup=cfg.mixup, seed=cfg.seed,
                            transform=chain(resample, acquire, framer))
        print(f"run {run_dir.name}: {cfg.model} on {len(x_tr)} train / {len(x_va)} val images, "
              f"pretrained={built.pretrained}, {core.count_params():,} parameters, "
              f"backend {keras.backend.backend()}", flush=True)
        neutral = shifted = None
        source = x_va if framer is None else stored_va
        if resample is not None:
            neutral = neutral_copies(resample, source, y_va, val_aspects, seed=cfg.split_seed)
        if framer is not None:
            xn, yn = neutral or (np.concatenate([source] * 2), np.tile(y_va, 2))
            neutral = (framed_copies(framer, xn, seed=cfg.split_seed), yn)
            if acquire is not None:  # the same draws, each given one seeded acquisition shift first
                from train.shifts import shifted_copies

                shifted = (framed_copies(framer, shifted_copies(xn, cfg.split_seed), seed=cfg.split_seed), yn)
        best, callbacks = _callbacks(cfg, run_dir, core, x_va, y_va, neutral, shifted)
        t0 = time.monotonic()
        model.fit(data, epochs=cfg.epochs, callbacks=callbacks, verbose=0)
        train_s = time.monotonic() - t0
        if best.best_weights is not None:
            assign(core, best.best_weights)
        probs = predict_fixed(core, x_va, cfg.batch)
        neutral_metrics = _val_metrics(core, *neutral, cfg.batch)[1] if neutral is not None else None
        seed_test = None
        if "test" in arrays:  # seed protocol only: its own (leaky) test portion, never the official test
            seed_test = classification_metrics(
                arrays["test"][1], predict_fixed(core, to_input(arrays["test"][0], built.spec), cfg.batch))
    metrics = {
        "run_id": run_dir.name, "model": cfg.model, "pretrained": built.pretrained,
        "protocol": cfg.protocol, "input": built.spec.to_card(), "params": int(core.count_params()),
        "best_epoch": best.best_epoch + 1, "epochs_run": len(_read_history(run_dir)),
        "deadline_hit": best.deadline_hit, "monitor": cfg.monitor,
        "train_seconds": round(train_s, 1), "machine": machine(),
        "compiles": dict(compiles.counts), "compile_seconds": round(sum(compiles.seconds.values()), 1),
        "val": classification_metrics(y_va, probs),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if neutral_metrics is not None:
        metrics["val_neutral"] = neutral_metrics
    if shifted is not None:
        metrics["val_shifted"] = _val_metrics(core, *shifted, cfg.batch)[1]
    if seed_test is not None:
        metrics["seed_test"] = seed_test
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot(run_dir)
    print(f"run {run_dir.name}: best epoch {metrics['best_epoch']}, val accuracy "
          f"{metrics['val']['accuracy']:.4f}, macro-F1 {metrics['val']['macro_f1']:.4f}, "
          f"{train_s:.0f} s, compiles {metrics['compiles']}", flush=True)
    return run_dir


def _stored_images(cfg: FitConfig, root: Path | None, y_tr: np.ndarray, y_va: np.ndarray):
    """``cfg``'s training and validation images as ``uint8[N, 224, 224]``, the resolution Kermany's
    ``train/`` holds (``train.framing.STORED``), for windows cut before the resize."""
    from train.framing import STORED

    stored = load_arrays(dataclasses.replace(cfg, input_size=STORED),
                         data_mod.data_dir(str(root) if root else None), ("train", "val"))
    for split, y in (("train", y_tr), ("val", y_va)):
        if not np.array_equal(stored[split][1], y):
            raise ValueError("framing: the arrays are not this config's images")
    return stored["train"][0], stored["val"][0]


def _aspect_transform(cfg: FitConfig, root: Path | None, y: np.ndarray):
    """``(train.aspect.AspectResample, validation images' own ratios)`` for ``cfg``'s training images when
    ``cfg.aspect``, else ``(None, None)``."""
    if not cfg.aspect:
        return None, None
    from train.aspect import AspectResample

    root = data_mod.data_dir(str(root) if root else None)
    records = split_records(cfg, root)
    if not np.array_equal(data_mod.labels_of(records["train"]), y):
        raise ValueError("aspect resampling: the training arrays are not this config's training images")
    return (AspectResample(data_mod.original_aspects(records["train"], root), y),
            data_mod.original_aspects(records["val"], root))


def probe(cfg: FitConfig, arrays: dict, steps: int = 5) -> dict:
    """Build ``cfg``'s trainer and time it before a long run: the first step (compile + one step), then
    ``steps`` more; images/s and the compile count. Nothing is written."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    if cfg.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    enable_jax_cache()
    y = arrays["train"][1]
    targets, weights = _targets(dataclasses.replace(cfg, teachers=[]), y, arrays)
    with CompileCounter() as compiles:
        built, model = build_trainer(cfg, max(1, len(y) // cfg.batch))
        data = FixedBatches(to_input(arrays["train"][0][: cfg.batch * (steps + 1)], built.spec),
                            targets[: cfg.batch * (steps + 1)], cfg.batch, weights[: cfg.batch * (steps + 1)],
                            mixup=cfg.mixup)
        t0 = time.monotonic()
        model.train_on_batch(*data[0])
        first = time.monotonic() - t0
        t1 = time.monotonic()
        for i in range(1, steps + 1):
            loss = model.train_on_batch(*data[i % len(data)])
        float(np.asarray(loss if np.isscalar(loss) else loss[0]))  # wait for the device
        per_step = (time.monotonic() - t1) / steps
    out = {"name": cfg.name or cfg.model, "batch": cfg.batch, "first_step_s": round(first, 2),
           "step_s": round(per_step, 4), "images_per_s": round(cfg.batch / per_step, 1),
           "compiles": dict(compiles.counts), "backend": keras.backend.backend()}
    print("probe", json.dumps(out), flush=True)
    keras.mixed_precision.set_global_policy("float32")
    return out


def load_arrays(cfg: FitConfig, root: Path, splits: tuple[str, ...] | None = None) -> dict:
    """``{split: (uint8[N, size, size] images, labels)}`` of ``cfg``'s protocol (only ``splits`` if given)."""
    parts = split_records(cfg, root)
    return {k: (data_mod.load_images(v, cfg.input_size), data_mod.labels_of(v)) for k, v in parts.items()
            if splits is None or k in splits}

