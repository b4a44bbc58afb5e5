"""The trainer of a fit (``train.fit``): the compiled model around the inference graph (``build_trainer``), its
optimizer, the validation / early-stopping / deadline callback that keeps the best weights on disk
(``_callbacks``), the machine a run is recorded on (``machine``), and the run's history and learning curve
(``_read_history``, ``_plot``)."""
from __future__ import annotations

import csv
import os
import platform
import time
from pathlib import Path

import numpy as np

from train.batches import predict_fixed
from train.fit_config import FitConfig
from train.metrics import classification_metrics
from train.models import build, named_weights, save_named


def _optimizer(cfg: FitConfig, steps_per_epoch: int):
    import keras

    lr = cfg.lr
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=cfg.epochs * steps_per_epoch)
    ema = {"use_ema": True, "ema_momentum": cfg.ema} if cfg.ema else {}
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr, **ema)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, **ema)
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



def _val_metrics(core, x: np.ndarray, y: np.ndarray, batch: int, prefix: str = "val") -> tuple[dict, dict]:
    """``({prefix}_loss, _accuracy, _macro_f1}, full metrics)`` of ``core`` on ``x``."""
    probs = predict_fixed(core, x, batch)
    m = classification_metrics(y, probs)
    p = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    return {f"{prefix}_loss": float(-np.log(p).mean()), f"{prefix}_accuracy": m["accuracy"],
            f"{prefix}_macro_f1": m["macro_f1"]}, m


def _callbacks(cfg: FitConfig, run_dir: Path, core, x_va: np.ndarray, y_va: np.ndarray, neutral=None,
               shifted=None):
    import keras

    class Validate(keras.callbacks.Callback):
        """Validation metrics from fixed-shape predictions of the inference graph (written into the epoch's
        logs, so CSVLogger records them), early stopping on ``cfg.monitor`` with the best epoch's weights
        kept and written to disk, and a wall-clock deadline, so that a run cut short still leaves its best
        weights behind."""

        def __init__(self):
            super().__init__()
            self.best, self.best_epoch, self.wait = -np.inf, -1, 0
            self.start = time.monotonic()
            self.best_weights = None
            self.deadline_hit = False

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            scores, m = _val_metrics(core, x_va, y_va, cfg.batch)
            logs.update(scores)
            if neutral is not None:
                logs.update(_val_metrics(core, *neutral, cfg.batch, "val_neutral")[0])
            if shifted is not None:  # under acquisition shifts: the neutral copies shifted, and both together
                logs.update(_val_metrics(core, *shifted, cfg.batch, "val_shifted")[0])
                logs["val_robust_loss"] = (logs["val_neutral_loss"] + logs["val_shifted_loss"]) / 2
            logs["seconds"] = round(time.monotonic() - self.start, 1)
            score = -logs[cfg.monitor] if cfg.monitor.endswith("_loss") else logs[cfg.monitor]
            if score > self.best:
                self.best, self.best_epoch, self.wait = score, epoch, 0
                self.best_weights = named_weights(core)
                save_named(self.best_weights, run_dir / "weights.npz")
            else:
                self.wait += 1
            print(f"epoch {epoch + 1}: loss {logs.get('loss', float('nan')):.4f} val_loss "
                  f"{logs['val_loss']:.4f} val_acc {m['accuracy']:.4f} val_f1 {m['macro_f1']:.4f} "
                  + (f"neutral loss {logs['val_neutral_loss']:.4f} acc {logs['val_neutral_accuracy']:.4f} "
                     if neutral is not None else "")
                  + (f"shifted loss {logs['val_shifted_loss']:.4f} acc {logs['val_shifted_accuracy']:.4f} "
                     if shifted is not None else "")
                  + f"({logs['seconds']:.0f} s)", flush=True)
            if self.wait >= cfg.patience:
                self.model.stop_training = True
            if cfg.deadline_s and time.monotonic() - self.start > cfg.deadline_s:
                print(f"deadline of {cfg.deadline_s:.0f} s reached after epoch {epoch + 1}", flush=True)
                self.model.stop_training = True
                self.deadline_hit = True

    # with ``ema`` the moving average is in the model from the end of each epoch (so Validate measures and
    # keeps it) to the start of the next (so training goes on from the raw weights)
    swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema else []
    validate = Validate()
    return validate, swap + [validate, keras.callbacks.CSVLogger(str(run_dir / "history.csv"))]


def build_trainer(cfg: FitConfig, steps_per_epoch: int):
    """The inference model (``Built``) and the compiled trainer around it (augmentation in front)."""
    import keras

    from train.augment import RandomAffine, RandomPhotometric

    built = build(cfg.model, input_size=cfg.input_size, weights=cfg.weights, dropout=cfg.dropout,
                  batchnorm=cfg.batchnorm, intensity=cfg.intensity)
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
    inp = keras.Input((cfg.input_size, cfg.input_size, 1), name="image")
    x = RandomAffine(seed=cfg.seed, name="augment")(inp) if cfg.augment else inp
    if cfg.photometric:
        x = RandomPhotometric(cfg.photometric, seed=cfg.seed + 1, name="photometric")(x)
    model = keras.Model(inp, core(x), name="trainer")
    model.compile(optimizer=_optimizer(cfg, steps_per_epoch),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=["accuracy"],
                  # JAX: XLA, one compile per step function. TensorFlow: a tf.function graph (TF has no XLA
                  # kernel for the image warp)
                  jit_compile=keras.backend.backend() == "jax")
    return built, model



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
