"""Fixed-shape batches, so that every step function compiles once (JAX/XLA recompile for each new shape).

- Training: ``FixedBatches`` reshuffles every epoch and drops the partial last batch (every image is still
  seen, in other epochs); it yields ``(x, y, sample_weight)``, with optional mixup and class weights, and
  soft targets for distillation.
- Validation and prediction: ``predict_fixed`` pads the last batch with zeros and cuts the padding off the
  result, so ``predict`` sees one shape too.
- ``CompileCounter`` counts XLA compilations per jitted function name (from JAX's compile log), and
  ``enable_jax_cache`` turns on JAX's persistent compilation cache (a second process running the same graph
  reads the compiled step from disk).
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

import keras


class FixedBatches(keras.utils.PyDataset):
    """``x``: float32[N, S, S, 1]; ``y``: float32[N, K] targets (one-hot or soft); ``w``: float32[N]."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, w: np.ndarray | None = None,
                 mixup: float = 0.0, seed: int = 0, transform=None, **kwargs):
        super().__init__(**kwargs)
        if len(x) == 0:
            raise ValueError("no training images")
        batch = min(batch, len(x))  # a tiny set (tests): one batch of all of it
        self.x, self.y, self.batch, self.mixup = x, y, batch, mixup
        self.transform = transform  # transform(x_batch, idx, rng) -> x_batch, before mixup (train.aspect)
        self.w = np.ones(len(x), np.float32) if w is None else w.astype(np.float32)
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(x))

    def __len__(self) -> int:
        return len(self.x) // self.batch

    def __getitem__(self, i: int):
        idx = np.sort(self.order[i * self.batch:(i + 1) * self.batch])
        x, y, w = self.x[idx], self.y[idx], self.w[idx]
        if self.transform is not None:
            x = self.transform(x, idx, self.rng)
        if self.mixup > 0:
            lam = np.float32(self.rng.beta(self.mixup, self.mixup))
            perm = self.rng.permutation(len(idx))
            x = lam * x + (1 - lam) * x[perm]
            y = lam * y + (1 - lam) * y[perm]
            w = lam * w + (1 - lam) * w[perm]
        return x, y, w

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.x))


def predict_fixed(model, x: np.ndarray, batch: int) -> np.ndarray:
    """``model.predict`` in batches of exactly ``batch`` (zero-padded), float32 probabilities."""
    n = len(x)
    pad = (-n) % batch
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    return np.asarray(model.predict(x, batch_size=batch, verbose=0), np.float32)[:n]


class CompileCounter(logging.Handler):
    """Counts JAX compilations by function name while installed (``with CompileCounter() as c``)."""

    _PATTERN = re.compile(r"Finished XLA compilation of (?:jit\()?([\w.<>]+)\)? in ([\d.e+-]+) s")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.counts: Counter = Counter()
        self.seconds: Counter = Counter()
        self._jax = None

    def emit(self, record: logging.LogRecord) -> None:
        m = self._PATTERN.search(record.getMessage())
        if m:
            self.counts[m.group(1)] += 1
            self.seconds[m.group(1)] += float(m.group(2))

    def __enter__(self):
        if keras.backend.backend() != "jax":
            return self
        import jax
        self._jax = jax
        self._old = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)
        self._loggers = [logging.getLogger(n) for n in ("jax._src.dispatch", "jax._src.interpreters.pxla")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.addHandler(self)
            lg.setLevel(logging.DEBUG)
            lg.propagate = False
        return self

    def __exit__(self, *exc):
        if self._jax is not None:
            self._jax.config.update("jax_log_compiles", self._old)
            for lg, level in zip(self._loggers, self._levels):
                lg.removeHandler(self)
                lg.setLevel(level)
                lg.propagate = True
        return False

    def steps(self) -> dict:
        """Compilations of Keras' step functions: ``{"train_step": n, "predict_step": n, ...}``."""
        return {k: v for k, v in self.counts.items() if k.endswith("_step") or k.endswith("step_fn")}


def enable_jax_cache(path: str | None = None) -> str | None:
    """JAX's persistent compilation cache in ``$CXR_EDGE_JAX_CACHE`` (default ``~/.cache/cxr-edge/jax``)."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    path = path or os.environ.get("CXR_EDGE_JAX_CACHE") or str(Path.home() / ".cache" / "cxr-edge" / "jax")
    Path(path).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
