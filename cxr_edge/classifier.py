"""Classify chest X-ray files with a model bundle.

    from cxr_edge import Classifier
    clf = Classifier()                        # the embedded default bundle, TFLite if available
    result = clf.classify("scan.jpg")         # Result(path, label, probabilities, model)
    for r in clf.classify_many(paths):        # Result, RejectedResult or ErrorResult per path, in order;
        print(r.to_dict())                    #   never raises for a bad input file

Out-of-distribution gate (``cxr_edge.ood``): when the bundle's card has an ``"ood"`` entry, every input is
first checked by it (``Classifier(..., ood=False)`` bypasses it). Inputs it rejects (photos, documents,
screenshots, ...) never reach the model and come back as a :class:`RejectedResult` (``status == "rejected"``,
a one-line ``reason``, no label); accepted ones are :class:`Result` s whose ``to_dict()`` gains
``"status": "ok"``. Without a gate, results are exactly as before (no ``status`` key).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping, Optional, Union

import numpy as np

from cxr_edge.bundle import Bundle, BundleError, load_bundle
from cxr_edge.engines import available_backends, open_engine
from cxr_edge.labels import CLASS_NAMES
from cxr_edge.ood import Gate
from cxr_edge.preprocess import PreprocessError, _reason, load_gray, load_gray_colour, to_input

PathLike = Union[str, os.PathLike]
DEFAULT_BATCH = 8


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    sha256: str
    backend: str

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


@dataclass(frozen=True)
class Result:
    """One classified file. ``probabilities`` is a read-only mapping class name -> probability."""

    path: str
    label: str
    probabilities: Mapping[str, float] = field(hash=False)
    model: ModelInfo
    gated: bool = field(default=False, compare=False)  # the OOD gate accepted it: to_dict() has "status"
    ok: bool = field(default=True, init=False)
    status: str = field(default="ok", init=False)

    def to_dict(self) -> dict:
        return {"path": self.path, **({"status": "ok"} if self.gated else {}), "label": self.label,
                "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
                "model": self.model.to_dict()}


@dataclass(frozen=True)
class ErrorResult:
    """A file that could not be classified, with a one-line reason."""

    path: str
    error: str
    ok: bool = field(default=False, init=False)
    status: str = field(default="error", init=False)

    def to_dict(self) -> dict:
        return {"path": self.path, "error": self.error}


@dataclass(frozen=True)
class RejectedResult:
    """A readable image that the OOD gate refused to label (not a chest X-ray), with a one-line reason and
    the gate's score (``inf`` for the colour and uniform-image checks). ``ok`` is False: it has no label."""

    path: str
    reason: str
    score: float
    model: ModelInfo
    ok: bool = field(default=False, init=False)
    status: str = field(default="rejected", init=False)
    label = None

    @property
    def error(self) -> str:  # for code that prints the reason of anything that is not ok
        return f"rejected: {self.reason}"

    def to_dict(self) -> dict:
        return {"path": self.path, "status": "rejected", "reason": self.reason, "model": self.model.to_dict()}


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature scaling of probabilities: ``softmax(log(p) / T)`` row-wise."""
    if temperature == 1.0:
        return probs
    logits = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def default_backend(bundle: Bundle) -> str:
    """TFLite if its runtime is importable and the bundle has it, else ONNX."""
    have = available_backends()
    for backend in ("tflite", "onnx"):
        if backend in have and backend in bundle.backends():
            return backend
    raise BundleError(f"no usable backend: bundle {bundle.root} has {bundle.backends() or 'no models'}, "
                      f"installed runtimes: {have or 'none'} (pip install ai-edge-litert or onnxruntime)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class Classifier:
    """A loaded model bundle ready to classify files.

    ``model``: a bundle folder or its ``card.json`` (``None``: the embedded default bundle).
    ``backend``: ``"tflite"`` or ``"onnx"`` (``None``: TFLite if importable, else ONNX).
    ``threads``: CPU threads for inference (``None``: the runtime's default).
    ``ood``: use the bundle's out-of-distribution gate when its card has one (``False``: bypass it).
    Raises :class:`BundleError` for a missing/corrupt bundle (including a sha256 mismatch of a model file
    or of the gate's ``ood.npz``) and
    :class:`EngineError` when the model file cannot be loaded.
    """

    def __init__(self, model: Optional[PathLike] = None, backend: Optional[str] = None,
                 threads: Optional[int] = None, batch_size: int = DEFAULT_BATCH, ood: bool = True):
        self.bundle = load_bundle(model)
        self.backend = backend or default_backend(self.bundle)
        model_path, sha = self.bundle.model_file(self.backend, verify=True)
        self.gate: Optional[Gate] = Gate.from_bundle(self.bundle.root, self.bundle.card) if ood else None
        self.engine = open_engine(model_path, self.backend, threads=threads)
        self.spec = self.bundle.spec
        raw = self.bundle.card.get("temperature")
        try:
            temperature = 1.0 if raw is None else float(raw)
        except (TypeError, ValueError):
            temperature = float("nan")
        if not (math.isfinite(temperature) and temperature > 0):
            raise BundleError(f"{self.bundle.root}: temperature must be a positive number, got {raw!r}")
        self.temperature = temperature
        self.model = ModelInfo(self.bundle.name, self.bundle.version, sha, self.backend)
        self.batch_size = max(1, int(batch_size))

    @property
    def card(self) -> dict:
        return self.bundle.card

    def predict(self, gray: np.ndarray) -> np.ndarray:
        """``uint8[N, S, S]`` (from ``load_gray``) to calibrated probabilities ``float32[N, 3]``."""
        probs = self.engine.run(to_input(gray, self.spec))
        return calibrate(probs, self.temperature)

    def _result(self, path: PathLike, probs: np.ndarray) -> Result:
        p = {name: float(v) for name, v in zip(CLASS_NAMES, probs)}
        return Result(str(path), CLASS_NAMES[int(np.argmax(probs))], MappingProxyType(p), self.model,
                      gated=self.gate is not None)

    def _gray(self, path: PathLike):
        """``load_gray`` without a gate; with one, the gray image or the gate's :class:`RejectedResult`."""
        if self.gate is None:
            return load_gray(path, self.spec.size)
        gray, colour = load_gray_colour(path, self.spec.size)
        verdict = self.gate.check(gray, colour)
        return gray if verdict.ok else RejectedResult(str(path), verdict.reason, verdict.score, self.model)

    def classify(self, path: PathLike) -> Union[Result, RejectedResult]:
        """Classify one file. Raises :class:`PreprocessError` when it is not a readable image; returns a
        :class:`RejectedResult` when the bundle's OOD gate refuses it."""
        gray = self._gray(path)
        if isinstance(gray, RejectedResult):
            return gray
        return self._result(path, self.predict(gray[None])[0])

    def _load(self, path: PathLike):
        try:
            return self._gray(path)
        except PreprocessError as exc:
            return ErrorResult(str(path), _one_line(exc))
        except Exception as exc:  # never let one file stop a batch
            return ErrorResult(str(path), f"unexpected error: {_one_line(_reason(exc))}")

    def _predict_loaded(self, items: list) -> list:
        loaded = [(p, g) for p, g in items if not isinstance(g, (ErrorResult, RejectedResult))]
        out = {}
        if loaded:
            try:
                probs = self.predict(np.stack([g for _, g in loaded]))
                out = {i: self._result(p, pr) for i, ((p, _), pr) in enumerate(zip(loaded, probs))}
            except Exception:
                # A batch failed: retry one by one so that only the culprit (if any) fails.
                for i, (p, g) in enumerate(loaded):
                    try:
                        out[i] = self._result(p, self.predict(g[None])[0])
                    except Exception as exc1:
                        out[i] = ErrorResult(str(p), f"inference failed: {_one_line(_reason(exc1))}")
        results, k = [], 0
        for p, g in items:
            if isinstance(g, (ErrorResult, RejectedResult)):
                results.append(g)
            else:
                results.append(out[k])
                k += 1
        return results

    def classify_many(self, paths: Iterable[PathLike]) -> Iterator[Union[Result, RejectedResult, ErrorResult]]:
        """Classify files in batches; yields a :class:`Result`, :class:`RejectedResult` (OOD gate) or
        :class:`ErrorResult` per path, in order."""
        batch = []
        for path in paths:
            batch.append((path, self._load(path)))
            if len(batch) >= self.batch_size:
                yield from self._predict_loaded(batch)
                batch = []
        if batch:
            yield from self._predict_loaded(batch)
