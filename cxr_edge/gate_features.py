"""The model's feature maps for the input gate (``cxr_edge.ood``): :func:`feature_maps` runs a bundle's model
(or a :class:`cxr_edge.Classifier`'s) on gray images and returns its last feature maps, :func:`embedder` the
gate vectors made from them. For fitting and measuring a gate (``train.ood``, ``benchmarks.ood``); the
classifier computes its own in its single pass."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from cxr_edge.bundle import Bundle, BundleError, load_bundle
from cxr_edge.gate_math import pooled
from cxr_edge.model import ModelPass
from cxr_edge.preprocess import to_input


def feature_maps(model, threads: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``uint8[N, S, S]`` (from ``load_gray``) -> the model's last feature maps ``float32[N, h, w, C]``.

    ``model``: a :class:`cxr_edge.Classifier` (or :class:`cxr_edge.model.ModelPass`), a
    :class:`cxr_edge.bundle.Bundle` or a bundle folder. When the classifier's model gives its feature map
    (``Classifier.predict_full``, dual-output bundles, contract 3), that is used: the very numbers the runtime
    gate sees. Otherwise (single-output bundles) the bundle's
    ``features.tflite`` (card entry ``"cam"``: image -> last feature map)."""
    clf = model if isinstance(model, ModelPass) else None  # a Classifier (or a bare ModelPass)
    bundle = clf.bundle if clf else model if isinstance(model, Bundle) else load_bundle(model)
    if clf is None:  # the model as Classifier(model=bundle.root, threads=threads, ood=False) would open it
        clf = ModelPass(model=bundle.root, threads=threads)
    if getattr(clf.engine, "has_features", False):
        return lambda gray: np.asarray(clf.predict_full(np.asarray(gray, np.uint8))[2], np.float32)
    if not isinstance(bundle.card.get("cam"), dict):
        raise BundleError(f"bundle {bundle.root}: its model gives no feature map and it has no features.tflite "
                          "(card entry 'cam'); cannot compute embeddings")
    from cxr_edge.heatmap import LegacyFeatures

    legacy, spec = LegacyFeatures(bundle, threads), bundle.spec
    return lambda gray: np.asarray(legacy(to_input(np.asarray(gray, np.uint8), spec)), np.float32)


def embedder(model, threads: Optional[int] = None, gate=None,
             grid: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``uint8[N, S, S]`` (from ``load_gray``) -> vectors from the model's feature maps
    (:func:`feature_maps`): with ``gate`` (a :class:`cxr_edge.ood.Gate`), what its :meth:`Gate.check_embedding`
    expects (``Gate.embedding_of``); without, the penultimate global averages ``float32[N, C]``, followed (``grid`` > 0) by the ``grid x grid``
    cells (:func:`pooled`, what a layout gate is fitted on)."""
    maps = feature_maps(model, threads)
    if gate is not None and gate.has_embedding:
        return lambda gray: gate.embedding_of(maps(gray))
    return lambda gray: pooled(maps(gray), grid)

