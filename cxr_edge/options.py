"""How to load a :class:`cxr_edge.Classifier`: one options type for ``cxr-edge classify`` (cxr_edge/cli_classify.py),
``cxr-edge batch`` (cxr_edge/batch.py, its local worker processes and Ray actors) and ``cxr-edge serve``'s model
pool (cxr_edge/serve_pool.py)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class ClassifierOptions:
    """The :class:`cxr_edge.Classifier` arguments (``None``: the Classifier's default). Frozen and picklable: a
    batch job sends them to its workers. ``worker``: the classifier is loaded in a worker process of a batch
    job, which uses one core, so that process runs BLAS on one thread too (``single_threaded_blas``)."""

    model: Optional[str] = None
    backend: Optional[str] = None
    threads: Optional[int] = None
    ood: bool = True
    allow_adults: bool = False
    heatmaps: bool = False
    decode_threads: Optional[int] = None
    worker: bool = False

    def replace(self, **changes) -> "ClassifierOptions":
        return replace(self, **changes)

    def classifier(self):
        """A new :class:`cxr_edge.Classifier`; raises what it raises (``BundleError``, ``EngineError``)."""
        from cxr_edge.classifier import Classifier, single_threaded_blas

        if self.worker:
            single_threaded_blas()
        return Classifier(model=self.model, backend=self.backend, threads=self.threads, ood=self.ood,
                          heatmaps=self.heatmaps, decode_threads=self.decode_threads, allow_adults=self.allow_adults)
