"""One bundle's model, ready to run: the part of :class:`cxr_edge.Classifier` that the input gate's tools need
too (``cxr_edge.ood.feature_maps``), without the gate, the lanes or the heatmaps. Imports neither
``cxr_edge.classifier`` nor ``cxr_edge.ood``, so that both can import it.

- :class:`ModelPass`: the bundle, its verified model file opened in an engine, the input spec and the card's
  temperature; ``predict`` / ``predict_full`` run a batch of gray images through it (``Classifier`` is one);
- the thread split of ``Classifier`` (:func:`thread_split`, :func:`usable_cpus`, :func:`single_threaded_blas`),
  the backend choice (:func:`default_backend`) and temperature scaling (:func:`calibrate`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from cxr_edge.bundle import Bundle, BundleError, load_bundle
from cxr_edge.engines import EngineError, available_backends, open_engine
from cxr_edge.preprocess import to_input

PathLike = Union[str, os.PathLike]
MAX_LANES = 8  # classify_many's worker threads when ``threads`` is not given (one per CPU, at most this)


def usable_cpus() -> int:
    """The CPUs this process may use (its affinity: containers, taskset), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))  # the CPUs this process may use (containers, taskset)
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def single_threaded_blas() -> None:
    """Cap the BLAS library's own thread pool at one thread in this process (``threadpoolctl``). cxr-edge's
    numpy work is small (the input gate's products: microseconds); its parallelism is the lanes, workers and
    inference threads it starts itself. Left alone, OpenBLAS gives every lane or worker process a pool of
    busy-waiting threads, one per core: measured on a 2-core AMD EPYC (2026-11-27, the 624 official test
    scans), ``cxr-edge classify`` on a folder took 1.6x the wall time and ``cxr-edge batch --workers 2`` 2-11x
    (3.8 s against 1.8 s with the 144 px bundle, 25.9 s against 2.4 s with the 224 px one). For cxr-edge's own
    processes (the command line, batch workers); a program that imports ``Classifier`` keeps its own setting."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def thread_split(threads: Optional[int]) -> tuple[int, int]:
    """(inference threads of ``classify``, lanes of ``classify_many``): ``threads`` for both when given;
    otherwise ``classify`` runs the model on half the CPUs (rounded up) and ``classify_many`` runs one lane
    per CPU (at most ``MAX_LANES``), each lane one thread that decodes and runs its own model copy."""
    if threads:
        return int(threads), int(threads)
    cpus = usable_cpus()
    return max(1, cpus - cpus // 2), max(1, min(MAX_LANES, cpus))


def checked_threads(threads: Optional[int]) -> tuple[int, int]:
    """:func:`thread_split` of a ``threads`` argument, refused with an :class:`EngineError` under 1."""
    if threads is not None and int(threads) < 1:
        raise EngineError(f"threads must be >= 1, got {threads}")
    return thread_split(threads)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    sha256: str
    backend: str

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of probabilities: ``softmax(log(p) / T)`` row-wise."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def card_temperature(bundle: Bundle) -> float:
    """The card's ``temperature`` (1.0 when absent), refused with a :class:`BundleError` unless it is a
    positive number."""
    raw = bundle.card.get("temperature")
    try:
        temperature = 1.0 if raw is None else float(raw)
    except (TypeError, ValueError):
        temperature = float("nan")
    if not (math.isfinite(temperature) and temperature > 0):
        raise BundleError(f"{bundle.root}: temperature must be a positive number, got {raw!r}")
    return temperature


def default_backend(bundle: Bundle) -> str:
    """TFLite if its runtime is importable and the bundle has it, else ONNX."""
    have = available_backends()
    for backend in ("tflite", "onnx"):
        if backend in have and backend in bundle.backends():
            return backend
    raise BundleError(f"no usable backend: bundle {bundle.root} has {bundle.backends() or 'no models'}, "
                      f"installed runtimes: {have or 'none'} (pip install ai-edge-litert or onnxruntime)")


class ModelPass:
    """A bundle's model (``model``: a bundle folder or its ``card.json``, ``None``: the embedded default) opened
    for ``backend`` (``None``: :func:`default_backend`) with ``threads`` inference threads (``None``: see
    :func:`thread_split`), as ``Classifier(model, backend, threads, ood=False)`` opens it: same checks, same
    errors (:class:`BundleError`, :class:`EngineError`). :class:`cxr_edge.Classifier` is one (it sets these
    attributes itself, with its gate loaded in between)."""

    def __init__(self, model: Optional[PathLike] = None, backend: Optional[str] = None,
                 threads: Optional[int] = None):
        self.bundle = load_bundle(model)
        self.backend = backend or default_backend(self.bundle)
        model_path, sha = self.bundle.model_file(self.backend, verify=True)
        infer_threads, _ = checked_threads(threads)
        self.engine = open_engine(model_path, self.backend, threads=infer_threads)
        self.spec = self.bundle.spec
        self.temperature = card_temperature(self.bundle)
        self.model = ModelInfo(self.bundle.name, self.bundle.version, sha, self.backend)

    @property
    def card(self) -> dict:
        return self.bundle.card

    def predict(self, gray: np.ndarray, engine=None) -> np.ndarray:
        """``uint8[N, S, S]`` (from ``load_gray``) to calibrated probabilities ``float32[N, 3]``."""
        probs = (engine or self.engine).run(to_input(gray, self.spec))
        return calibrate(probs, self.temperature)

    def predict_full(self, gray: np.ndarray, engine=None
                     ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """``uint8[N, S, S]`` to ``(calibrated probabilities float32[N, 3], embedding float32[N, C] or None,
        feature map float32[N, h, w, C] or None)`` from one model pass; the embedding is the feature map's
        global average (the penultimate vector). ``None`` for models with a single output. ``engine``: one
        of the lanes' model copies (default: this model's own)."""
        probs, features = (engine or self.engine).run_full(to_input(gray, self.spec))
        embedding = None if features is None else features.mean(axis=(1, 2), dtype=np.float32)
        return calibrate(probs, self.temperature), embedding, features
