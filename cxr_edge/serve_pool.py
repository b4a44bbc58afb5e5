"""The model side of ``cxr-edge serve`` (``cxr_edge/serve.py``): a pool of :class:`cxr_edge.Classifier`
instances, each lent to one request at a time (:class:`ModelPool`), and what a request does with one: the
records of its uploads, with their heatmap overlays as PNG (:func:`classify_uploads`). No web framework here."""
from __future__ import annotations

import base64
import io
import queue
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from cxr_edge.classifier import one_line

if TYPE_CHECKING:  # for the annotations only: no web framework imported here
    from cxr_edge.serve_uploads import Upload

HEATMAP_SIDE = 512  # overlays sent over HTTP are at most this many pixels a side


@dataclass
class Slot:
    """One model instance: a Classifier, with heatmaps from its classifying pass when the bundle has them
    (``heat``; ``heat_error`` says why not)."""

    clf: Any
    heat: bool = False
    heat_error: Optional[str] = None


class ModelPool:
    """``size`` model instances; :meth:`slot` lends one to one request at a time."""

    def __init__(self, slots: list[Slot]):
        self._free: "queue.Queue[Slot]" = queue.Queue()
        for s in slots:
            self._free.put(s)
        self.first = slots[0]
        self.size = len(slots)

    @classmethod
    def load(cls, model=None, backend=None, threads=None, workers: int = 1, ood: bool = True,
             allow_adults: bool = False) -> "ModelPool":
        from cxr_edge.bundle import BundleError
        from cxr_edge.engines import EngineError
        from cxr_edge.options import ClassifierOptions

        options = ClassifierOptions(model=model, backend=backend, threads=threads, ood=ood, allow_adults=allow_adults,
                                    heatmaps=True)
        slots = []
        for _ in range(max(1, int(workers))):
            try:
                slots.append(Slot(options.classifier(), True))
            except (BundleError, EngineError) as exc:  # a bundle without (usable) heatmap data still classifies;
                clf = options.replace(heatmaps=False).classifier()  # the reason shows in /healthz, heatmap_error
                slots.append(Slot(clf, False, one_line(exc)))
        return cls(slots)

    @contextmanager
    def slot(self):
        s = self._free.get()
        try:
            yield s
        finally:
            self._free.put(s)

    @property
    def model(self) -> dict:
        clf = self.first.clf
        heat = {"heatmaps": self.first.heat}
        if self.first.heat_error:
            heat["heatmap_error"] = self.first.heat_error
        return {**clf.model.to_dict(), "backend": clf.backend, **heat}

    @property
    def card(self) -> dict:
        return self.first.clf.card


def heatmap_png(slot: Slot, data: bytes, result) -> bytes:
    """The class-activation overlay (``cxr_edge.heatmap``) of one classified scan, as PNG bytes; the map
    itself came from the classifying pass (``Result.heatmap``)."""
    from cxr_edge.heatmap import overlay
    from cxr_edge.preprocess import _open

    cam = getattr(result, "heatmap", None)
    if not slot.heat or cam is None:
        raise RuntimeError(slot.heat_error or "this model has no heatmap data")
    with _open(data) as img:
        picture = overlay(img, cam)
    picture.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE))
    buf = io.BytesIO()
    picture.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def classify_uploads(pool: ModelPool, uploads: list[Upload], heatmap: bool) -> list[dict]:
    """The ``cxr-edge classify --json`` record of each upload, in order (runs in a worker thread)."""
    with pool.slot() as slot:
        records = []
        for up, result in zip(uploads, slot.clf.classify_many(uploads)):
            record = result.to_dict()
            if heatmap and result.status == "ok":
                try:
                    png = heatmap_png(slot, up, result)
                    record["heatmap"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                except Exception as exc:  # a heatmap failure never hides the label already given
                    record["heatmap_error"] = f"heatmap not made ({one_line(exc)})"
            records.append(record)
    return records
