"""Classify chest X-ray files with a model bundle.

    from cxr_edge import Classifier
    clf = Classifier()                        # the embedded default bundle, TFLite if available
    result = clf.classify("scan.jpg")         # Result(path, label, probabilities, model)
    for r in clf.classify_many(paths):        # Result, RejectedResult or ErrorResult per path, in order;
        print(r.to_dict())                    #   never raises for a bad input file

One model pass per image gives the probabilities and, for dual-output bundles, the last feature map
(``predict_full``): the non-CXR gate reads it (its global average and, for layout gates, its coarse spatial
layout: ``Gate.embedding_of``), and with
``Classifier(heatmaps=True)`` each :class:`Result` carries the class-activation map of its label
(``result.heatmap``, ``cxr_edge.heatmap``).

``classify_many`` runs a small pool of worker threads ("lanes"): each takes the next batch of paths, decodes it
and runs it through its own copy of the model (one inference thread each); Pillow, LiteRT and ONNX Runtime
release the GIL, so the lanes use the cores in parallel, and a core never waits while another decodes.
Results come back in input order. ``threads`` sets the number of lanes (and the inference threads of
``classify``).

Input gate (``cxr_edge.ood``): when the bundle's card has an ``"ood"`` entry, every input is checked by it
(``Classifier(..., ood=False)`` bypasses it): ``Gate.check_pixels`` on the decoded image before the model
(colour photos, blank images), ``Gate.check_embedding`` on the model's embedding after its pass (not a
radiograph, another body part, a lateral view) and then on the image's polarity (a negative), both in
``Gate.check_after_model``. DICOM objects that are not frontal chest radiographs are refused while reading
(:class:`cxr_edge.preprocess.InputRejected`). Refused inputs come back as a :class:`RejectedResult`
(``status == "rejected"``, a one-line ``reason``, no label); accepted ones are :class:`Result` s whose
``to_dict()`` gains ``"status": "ok"``. Without a gate, results are exactly as before (no ``status`` key).
"""
from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping, Optional, Union

import numpy as np

import cxr_edge.reorient as reorient
from cxr_edge.bundle import BundleError, load_bundle
from cxr_edge.engines import EngineError, open_engine
from cxr_edge.heatmap import LegacyFeatures, cam_maps, load_cam_weights
from cxr_edge.labels import CLASS_NAMES
# the model part (also importable from here, as before): cxr_edge/model.py, which cxr_edge.ood imports too
from cxr_edge.model import (MAX_LANES, ModelInfo, ModelPass, calibrate, card_temperature,  # noqa: F401
                            checked_threads, default_backend, single_threaded_blas, thread_split, usable_cpus)
from cxr_edge.ood import POPULATION, Gate
from cxr_edge.preprocess import InputRejected, PreprocessError, load_with_info, to_input

PathLike = Union[str, os.PathLike]
DEFAULT_BATCH = 8


@dataclass(frozen=True)
class Result:
    """One classified file. ``probabilities`` is a read-only mapping class name -> probability."""

    path: str
    label: str
    probabilities: Mapping[str, float] = field(hash=False)
    model: ModelInfo
    gated: bool = field(default=False, compare=False)  # the OOD gate accepted it: to_dict() has "status"
    # Classifier(heatmaps=True): the class-activation map of ``label``, float32[h, w] in 0..1 (not in to_dict)
    heatmap: Optional[np.ndarray] = field(default=None, compare=False, repr=False, hash=False)
    # Classifier(allow_adults=True): why this input is outside the intended population ("adult ..."), else ""
    warning: str = ""
    ok: bool = field(default=True, init=False)
    status: str = field(default="ok", init=False)

    def to_dict(self) -> dict:
        return {"path": self.path, **({"status": "ok"} if self.gated else {}), "label": self.label,
                "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
                **({"warning": self.warning} if self.warning else {}), "model": self.model.to_dict()}


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


ADULT_YEARS = 18  # a DICOM patient age of at least this many years is outside the intended population


@dataclass(frozen=True)
class _Decoded:
    """A decoded input on its way to the model: its gray image and, under ``allow_adults``, its population
    warning from the DICOM tags."""

    gray: np.ndarray
    warning: str = ""


def one_line(text) -> str:
    """A message (or an exception's) on one line; an exception without a message gives its type name."""
    line = " ".join(str(text).split())
    return line or (type(text).__name__ if isinstance(text, BaseException) else "")


class Classifier(ModelPass):
    """A loaded model bundle ready to classify files.

    ``model``: a bundle folder or its ``card.json`` (``None``: the embedded default bundle).
    ``backend``: ``"tflite"`` or ``"onnx"`` (``None``: TFLite if importable, else ONNX).
    ``threads``: CPU threads for ``classify``'s inference and the number of ``classify_many``'s lanes
    (``None``: see :func:`thread_split`).
    ``ood``: use the bundle's input gate when its card has one (``False``: bypass it).
    ``heatmaps``: attach the class-activation map of the label to each :class:`Result` (the bundle needs
    ``cam.npz``; dual-output models give it from the same pass).
    ``allow_adults``: classify adult chest X-rays (a DICOM PatientAge of 18 years or more, or the gate's adult
    check on the pixels) instead of refusing them; their :class:`Result` carries a ``warning``.
    Raises :class:`BundleError` for a missing/corrupt bundle (including a sha256 mismatch of a model file,
    of the gate's ``ood.npz`` or, with ``heatmaps``, of ``cam.npz``) and :class:`EngineError` when the model
    file cannot be loaded.
    """

    def __init__(self, model: Optional[PathLike] = None, backend: Optional[str] = None,
                 threads: Optional[int] = None, batch_size: int = DEFAULT_BATCH, ood: bool = True,
                 heatmaps: bool = False, decode_threads: Optional[int] = None, allow_adults: bool = False):
        # decode_threads: classify_many's lanes instead of ``threads`` (0: decode and infer in the calling
        # thread with this classifier's engine: one process = one core, as a batch worker wants)
        # ModelPass's attributes are set here, not by ModelPass.__init__: the gate loads between the model file's
        # check and the engine's opening (errors come in the same order as before) and the engines open through
        # this module's ``open_engine``
        self.bundle = load_bundle(model)
        self.backend = backend or default_backend(self.bundle)
        model_path, sha = self.bundle.model_file(self.backend, verify=True)
        self.gate: Optional[Gate] = Gate.from_bundle(self.bundle.root, self.bundle.card) if ood else None
        infer_threads, self.decode_threads = checked_threads(threads)
        if decode_threads is not None:
            self.decode_threads = max(0, int(decode_threads))
        self.engine = open_engine(model_path, self.backend, threads=infer_threads)
        self._model_path = model_path
        self._lane_engines: queue.SimpleQueue = queue.SimpleQueue()  # idle one-thread engines of the lanes
        self._legacy_lock = threading.Lock()  # LegacyFeatures' interpreter is not safe across threads
        self.spec = self.bundle.spec
        self.temperature = card_temperature(self.bundle)
        self.model = ModelInfo(self.bundle.name, self.bundle.version, sha, self.backend)
        self.batch_size = max(1, int(batch_size))
        self.heatmaps = bool(heatmaps)
        self.allow_adults = bool(allow_adults)
        self._cam_weights = load_cam_weights(self.bundle) if heatmaps else None
        has_features = getattr(self.engine, "has_features", False)
        self._legacy_features = LegacyFeatures(self.bundle, infer_threads) if heatmaps and not has_features else None
        self._gate_needs_embedding = bool(self.gate is not None and self.gate.has_embedding)
        if self.gate is not None and self.gate.needs_feature_map and not has_features:
            raise BundleError(f"bundle {self.bundle.root}: its input gate (ood.npz) reads the model's feature map "
                              f"(layout part), but its {self.backend} model gives none (single output); "
                              "use --no-ood or refit the gate without a layout (python -m train.ood --grid 0)")

    # -- one image's way through: decode + pixel gate (any thread), model pass, embedding gate -------------
    def _checked(self, source):
        """The decoded input (:class:`_Decoded`), or the :class:`RejectedResult` that ends it here (a refused
        DICOM, an adult patient by its DICOM tags, or the gate's pixel check). Raises :class:`PreprocessError`
        for an unreadable input."""
        try:
            loaded = load_with_info(source, self.spec.size, colour=self.gate is not None)
        except InputRejected as exc:
            return RejectedResult(str(source), one_line(exc.reason), float("inf"), self.model)
        warning = ""
        if loaded.patient_age is not None and loaded.patient_age[0] >= ADULT_YEARS:
            what = f"adult patient ({loaded.patient_age[1]}); {POPULATION}"
            if not self.allow_adults:
                return RejectedResult(str(source), what, float("inf"), self.model)
            warning = f"{what}: the label is less reliable"
        if self.gate is not None:
            verdict = self.gate.check_pixels(loaded.gray, loaded.colour)
            if not verdict.ok:
                return RejectedResult(str(source), verdict.reason, verdict.score, self.model)
        return _Decoded(loaded.gray, warning)

    def _prepare(self, source):
        """``_checked`` for the decode pool: an unreadable input becomes its :class:`ErrorResult` (only the
        input's own errors, :class:`PreprocessError`, are caught)."""
        try:
            return self._checked(source)
        except PreprocessError as exc:
            return ErrorResult(str(source), one_line(exc))

    def _infer(self, gray: np.ndarray, engine=None
               ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """(calibrated probs, the gate's embedding (``Gate.embedding_of`` the feature map) or None, heatmaps of the
        labels or None) for ``uint8[N, S, S]``."""
        if not (self.heatmaps or self._gate_needs_embedding):
            return self.predict(gray, engine), None, None
        probs, embedding, features = self.predict_full(gray, engine)
        if self._gate_needs_embedding and features is not None:  # the gate's own vector (global average, or
            embedding = self.gate.embedding_of(features)        # with the layout of the feature map)
        maps = None
        if self.heatmaps:
            if features is None:
                with self._legacy_lock:
                    features = self._legacy_features(to_input(gray, self.spec))
            maps = cam_maps(features, self._cam_weights, probs.argmax(axis=1))
        return probs, embedding, maps

    def _result(self, source, decoded: _Decoded, probs: np.ndarray, embedding: Optional[np.ndarray],
                heatmap: Optional[np.ndarray]):
        warning = decoded.warning
        if self.gate is not None:
            verdict = self.gate.check_after_model(embedding, decoded.gray, self.allow_adults)
            if not verdict.ok:
                return RejectedResult(str(source), verdict.reason, verdict.score, self.model)
            warning = warning or verdict.warning
        p = {name: float(v) for name, v in zip(CLASS_NAMES, probs)}
        return Result(str(source), CLASS_NAMES[int(np.argmax(probs))], MappingProxyType(p), self.model,
                      gated=self.gate is not None, heatmap=heatmap, warning=warning)

    def _results(self, items: list, probs, embeddings, maps, engine=None) -> list:
        out = [self._result(src, d, probs[i], None if embeddings is None else embeddings[i],
                            None if maps is None else maps[i]) for i, (src, d) in enumerate(items)]
        # a turned or inverted chest film: refused with its true reason (cxr_edge.reorient)
        if self._gate_needs_embedding and embeddings is not None:
            ask = [i for i, r in enumerate(out) if isinstance(r, RejectedResult) and reorient.worth_asking(r.reason)]
            ok = [i for i, r in enumerate(out) if isinstance(r, Result)]
            scores = self.gate.embedding_scores(embeddings)[0]  # the head's, per input
            try:
                why, turned = reorient.explain(
                    self.gate, [items[i][1].gray for i in ask], [items[i][1].gray for i in ok], [scores[i] for i in ok],
                    lambda g: self.gate.embedding_of(self.predict_full(g, engine)[2]))
            except EngineError:  # the results stand as the first pass gave them
                why, turned = [], []
            for i, what in [*zip(ask, why), *zip(ok, turned)]:
                if what:
                    out[i] = RejectedResult(out[i].path, what, float(scores[i]), self.model)
        return out

    def classify(self, path: PathLike) -> Union[Result, RejectedResult]:
        """Classify one file. Raises :class:`PreprocessError` when it is not a readable image; returns a
        :class:`RejectedResult` when the input gate refuses it."""
        decoded = self._checked(path)
        if not isinstance(decoded, _Decoded):
            return decoded
        return self._results([(path, decoded)], *self._infer(decoded.gray[None]))[0]

    def _finish(self, items: list, engine=None) -> list:
        """Results for ``(source, _Decoded or final result)`` pairs, in order; one model pass for the batch."""
        loaded = [(src, d) for src, d in items if isinstance(d, _Decoded)]
        out: list = []
        if loaded:
            try:
                out = self._results(loaded, *self._infer(np.stack([d.gray for _, d in loaded]), engine), engine)
            except EngineError:
                # The runtime failed on this batch: one by one, so that only the input it fails on fails.
                for src, d in loaded:
                    try:
                        out.append(self._results([(src, d)], *self._infer(d.gray[None], engine), engine)[0])
                    except EngineError as exc:
                        out.append(ErrorResult(str(src), f"inference failed: {one_line(exc)}"))
        done = iter(out)
        return [next(done) if isinstance(d, _Decoded) else d for _, d in items]

    def classify_many(self, paths: Iterable[PathLike]) -> Iterator[Union[Result, RejectedResult, ErrorResult]]:
        """Classify files in batches; yields a :class:`Result`, :class:`RejectedResult` (input gate) or
        :class:`ErrorResult` per path, in input order. Batches of ``batch_size`` paths go to ``decode_threads``
        lanes, each decoding its batch and running it through its own one-thread model copy, at most two
        batches per lane in flight (``decode_threads == 0``: in the calling thread, this classifier's engine)."""
        batches = self._batches(paths)
        if self.decode_threads == 0:
            for batch in batches:
                yield from self._finish([(source, self._prepare(source)) for source in batch])
            return
        pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="cxr-edge-decode")
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append(pool.submit(self._lane, batch))
                while len(pending) > 2 * self.decode_threads:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:  # a caller that stops early stops the lanes too
            pool.shutdown(wait=True, cancel_futures=True)

    def _batches(self, paths: Iterable[PathLike]) -> Iterator[list]:
        """``paths`` in lists of ``batch_size`` (the last one shorter), in order."""
        batch: list = []
        for source in paths:
            batch.append(source)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _lane(self, sources: list) -> list:
        """One lane's work on one batch: decode each path, then one pass of an idle model copy (opened on
        first use, one thread, kept for the next batch and the next call)."""
        items = [(source, self._prepare(source)) for source in sources]
        if not any(isinstance(d, _Decoded) for _, d in items):
            return self._finish(items)
        try:
            engine = self._lane_engines.get_nowait()
        except queue.Empty:
            engine = open_engine(self._model_path, self.backend, threads=1)
        try:
            return self._finish(items, engine)
        finally:
            self._lane_engines.put(engine)
