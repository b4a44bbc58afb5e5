"""Fit one model configuration and record the run in ``runs/<run id>/``.

Backend-agnostic Keras 3: TensorFlow on the CPU here, JAX on a lent GPU. A run directory holds
``config.json``, ``history.csv``, ``weights.npz`` (best epoch by validation loss), ``metrics.json``
(validation metrics, what the weights started from, the machine) and ``curve.png``.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cxr_edge.labels import CLASS_NAMES
from cxr_edge.preprocess import to_input
from train import data as data_mod
from train.metrics import classification_metrics
from train.models import assign, build, named_weights, save_named

RUNS_DIR = Path(os.environ.get("CXR_EDGE_RUNS", "runs"))


@dataclass
class FitConfig:
    model: str = "efficientnet_lite0"
    input_size: int = 224
    weights: str | None = None  # None, "imagenet", or a weights file
    dropout: float = 0.2
    batchnorm: bool = False  # baseline only
    freeze_bn: bool = True  # pretrained backbones: keep batch-norm statistics (see README)
    trainable_from: str = ""  # freeze every layer before the first one whose name starts with this
    augment: bool = True  # rotation 30 deg, zoom 0.2, shift 0.1, no flips
    optimizer: str = "sgd"  # sgd (momentum 0.9) or adam
    lr: float = 1e-3
    schedule: str = "constant"  # constant or cosine
    batch: int = 16
    epochs: int = 100
    patience: int = 10  # early stopping on val loss, best weights restored
    label_smoothing: float = 0.0
    class_weight: bool = False  # balanced class weights
    precision: str = "float32"  # float32 or bf16 (mixed, GPU)
    protocol: str = "grouped"  # grouped (patient-grouped val from train/) or seed (report, leaky)
    val_fraction: float = 0.15
    seed: int = 0
    deadline_s: float | None = None  # stop after this many seconds of training (best weights kept)
    limit: int = 0  # smoke tests: a seeded sample of N images per split (0 = all)
    name: str = ""  # run id prefix; the report-table row name, say
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _callbacks(cfg: FitConfig, run_dir: Path, core):
    import keras

    class BestWeights(keras.callbacks.Callback):
        """Early stopping on val loss with the best epoch's weights kept and written to disk, and a
        wall-clock deadline, so that a run cut short still leaves its best weights behind."""

        def __init__(self):
            super().__init__()
            self.best, self.best_epoch, self.wait = np.inf, -1, 0
            self.start = time.monotonic()
            self.best_weights = None
            self.deadline_hit = False

        def on_epoch_end(self, epoch, logs=None):
            loss = float(logs["val_loss"])
            if loss < self.best:
                self.best, self.best_epoch, self.wait = loss, epoch, 0
                self.best_weights = named_weights(core)
                save_named(self.best_weights, run_dir / "weights.npz")
            else:
                self.wait += 1
            if self.wait >= cfg.patience:
                self.model.stop_training = True
            if cfg.deadline_s and time.monotonic() - self.start > cfg.deadline_s:
                print(f"deadline of {cfg.deadline_s:.0f} s reached after epoch {epoch + 1}", flush=True)
                self.model.stop_training = True
                self.deadline_hit = True

    return [BestWeights(), keras.callbacks.CSVLogger(str(run_dir / "history.csv"))]


def _augmenter():
    import keras
    from keras import layers

    kw = dict(fill_mode="nearest", dtype="float32")
    return keras.Sequential([
        layers.RandomRotation(30 / 360, **kw),
        layers.RandomZoom(0.2, **kw),
        layers.RandomTranslation(0.1, 0.1, **kw),
    ], name="augment")


def _optimizer(cfg: FitConfig, steps_per_epoch: int):
    import keras

    lr = cfg.lr
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=cfg.epochs * steps_per_epoch)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def machine() -> dict:
    import keras

    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "backend": keras.backend.backend(), "keras": keras.__version__}
    if keras.backend.backend() == "jax":
        import jax
        info["device"] = str(jax.devices()[0].device_kind)
    else:
        info["device"] = "cpu"
    return info


def new_run_dir(cfg: FitConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{cfg.name or cfg.model}"
    run_dir, i = RUNS_DIR / base, 1
    while run_dir.exists():
        run_dir, i = RUNS_DIR / f"{base}-{i}", i + 1
    run_dir.mkdir(parents=True)
    return run_dir


def fit(cfg: FitConfig, root: Path | None = None, arrays: dict | None = None) -> Path:
    """Train ``cfg`` and return its run directory. ``arrays`` ({split: (uint8 images, labels)}) lets a
    caller that trains several models share decoded images; it must come from ``cfg``'s protocol."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    if cfg.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    run_dir = new_run_dir(cfg)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if arrays is None:
        arrays = load_arrays(cfg, data_mod.data_dir(str(root) if root else None))

    built = build(cfg.model, input_size=cfg.input_size, weights=cfg.weights, dropout=cfg.dropout,
                  batchnorm=cfg.batchnorm)
    core = built.model
    if cfg.freeze_bn and cfg.weights:
        for layer in _all_layers(core):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    if cfg.trainable_from:
        names = [layer.name for layer in core.layers]
        first = next(i for i, n in enumerate(names) if n.startswith(cfg.trainable_from))
        for layer in core.layers[:first]:
            layer.trainable = False
    x_tr, y_tr = to_input(arrays["train"][0], built.spec), arrays["train"][1]
    x_va, y_va = to_input(arrays["val"][0], built.spec), arrays["val"][1]

    inp = keras.Input(x_tr.shape[1:], name="image")
    x = _augmenter()(inp) if cfg.augment else inp
    model = keras.Model(inp, core(x), name="trainer")
    steps = int(np.ceil(len(x_tr) / cfg.batch))
    model.compile(optimizer=_optimizer(cfg, steps),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=["accuracy"])
    class_weight = None
    if cfg.class_weight:
        counts = np.bincount(y_tr, minlength=len(CLASS_NAMES))
        class_weight = {i: len(y_tr) / (len(CLASS_NAMES) * c) for i, c in enumerate(counts)}
    print(f"run {run_dir.name}: {cfg.model} on {len(x_tr)} train / {len(x_va)} val images, "
          f"pretrained={built.pretrained}, {core.count_params():,} parameters", flush=True)
    callbacks = _callbacks(cfg, run_dir, core)
    t0 = time.monotonic()
    eye = np.eye(len(CLASS_NAMES), dtype=np.float32)
    model.fit(x_tr, eye[y_tr], validation_data=(x_va, eye[y_va]), batch_size=cfg.batch,
              epochs=cfg.epochs, class_weight=class_weight, callbacks=callbacks, verbose=2)
    train_s = time.monotonic() - t0
    best = callbacks[0]
    if best.best_weights is not None:
        assign(core, best.best_weights)
    probs = core.predict(x_va, batch_size=64, verbose=0)
    metrics = {
        "run_id": run_dir.name, "model": cfg.model, "pretrained": built.pretrained,
        "protocol": cfg.protocol, "input": built.spec.to_card(), "params": int(core.count_params()),
        "best_epoch": best.best_epoch + 1, "epochs_run": len(_read_history(run_dir)),
        "deadline_hit": best.deadline_hit,
        "train_seconds": round(train_s, 1), "machine": machine(),
        "val": classification_metrics(y_va, probs),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if "test" in arrays:  # seed protocol only: its own (leaky) test portion, never the official test
        metrics["seed_test"] = classification_metrics(
            arrays["test"][1], core.predict(to_input(arrays["test"][0], built.spec), batch_size=64, verbose=0))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot(run_dir)
    print(f"run {run_dir.name}: best epoch {metrics['best_epoch']}, val accuracy "
          f"{metrics['val']['accuracy']:.4f}, macro-F1 {metrics['val']['macro_f1']:.4f}", flush=True)
    return run_dir


def load_arrays(cfg: FitConfig, root: Path) -> dict:
    splits = data_mod.protocol_splits(root, cfg.protocol, cfg.val_fraction, cfg.seed)
    if cfg.limit:
        rng = np.random.default_rng(cfg.seed)
        splits = {k: [v[i] for i in sorted(rng.choice(len(v), min(cfg.limit, len(v)), replace=False))]
                  for k, v in splits.items()}
    return {k: (data_mod.load_images(v, cfg.input_size), data_mod.labels_of(v)) for k, v in splits.items()}


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _plot(run_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_history(run_dir)
    if not rows:
        return
    ep = [int(r["epoch"]) + 1 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, ax in (("loss", a), ("accuracy", b)):
        ax.plot(ep, [float(r[key]) for r in rows], label="train")
        ax.plot(ep, [float(r[f"val_{key}"]) for r in rows], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(run_dir / "curve.png", dpi=90)
    plt.close(fig)
