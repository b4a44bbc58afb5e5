"""Input gate: refuse inputs that are not frontal chest radiographs before they get a pneumonia label.

Three layers, each saying what it saw:

1. **DICOM metadata** (``cxr_edge/dicomtags.py``, before any pixel is decoded): Modality, BodyPartExamined and
   ViewPosition refuse a CT/MR/US/... object, another body part or a lateral view
   (:class:`cxr_edge.preprocess.InputRejected`).
2. **Pixels** (:meth:`Gate.check_pixels`, before the model), on what ``load_gray_colour`` produces:

   - *colour photo*: X-rays are gray. The share of pixels of a thumbnail of the original image whose chroma
     ``max(R,G,B) - min(R,G,B)`` exceeds ``CHROMA_LEVEL`` gray levels; above ``max_colour_fraction`` (card)
     the image is refused. RGB files with three equal channels pass.
   - *blank image*: a thumbnail with (almost) no contrast (a solid colour, an empty page).
   - *appearance* (older gates only, ``ood.npz`` with ``mean``/``components``): a 16x16 standardized
     thumbnail scored under a probabilistic PCA model of training scans.

3. **Embedding** (:meth:`Gate.check_embedding`, after the model's single pass): a vector ``e`` made from the
   classifier's own last feature map ``F`` (``float32[h, w, C]``, contract 3) by :meth:`Gate.embedding_of`.
   Older gates: the global average ``F.mean(axis=(0, 1))`` (``float32[C]``). Gates with a *layout* part
   (arrays ``lay_mean[C]``, ``lay_proj[C, k]``, card ``embedding.layout.grid`` ``g``): the global average
   followed by the layout, ``F`` average-pooled on a ``g x g`` grid of (overlapping, adaptive) cells, each
   cell's ``C``-vector projected onto the first ``k`` principal components of frontal chest X-ray cells,
   ``(cell - lay_mean) @ lay_proj`` (``C + g*g*k`` numbers: where in the frame the lungs, shoulders, bones
   are; one ``[g*g, C] x [C, k]`` product: about 0.2 ms with the pooling). ``e`` goes through a linear softmax head
   over four classes, ``frontal_chest``, ``lateral_chest``,
   ``other_body_part`` and ``not_radiograph``: ``logits = ((e - emb_mean) / emb_scale) @ emb_weights +
   emb_bias`` (one ``D x 4`` product: microseconds, no second network). The score is
   ``logsumexp(logits[1:]) - logits[0]`` (higher = less like a frontal chest X-ray); above the card's
   ``embedding.threshold`` (chosen on the patient-grouped validation split, never the official test) the
   image is refused, with the most likely other class as the reason: "lateral view", "another body part"
   or "not a radiograph". A second score, optional (``den_*`` arrays), catches what none of the head's
   classes describes: the squared Mahalanobis distance of the standardized embedding in the first ``k``
   principal components of the frontal chest X-rays the gate was fitted on; above ``embedding.
   density_threshold`` (also from validation) the image is refused too, with the head's most likely other
   class as the reason. Fitted by ``python -m train.ood BUNDLE``.

The arithmetic (pooling, thumbnails, scores) is in ``cxr_edge/gate_math.py``, the model's feature maps for
fitting and measuring a gate (:func:`feature_maps`, :func:`embedder`) in ``cxr_edge/gate_features.py``; their
names are importable from here as well.

Bundle: ``ood.npz`` beside the model files (arrays ``emb_mean[D]``, ``emb_scale[D]``, ``emb_weights[D, 4]``,
``emb_bias[4]``, optionally ``den_mean[D]``, ``den_scale[D]``, ``den_components[k, D]``, ``den_var[k]``, and
``lay_mean[C]``, ``lay_proj[C, k]`` for a layout part (``D = C + g*g*k``; without it ``D = C``); older
gates: ``mean[D]``, ``components[k, D]``, ``eigvals[k]``, ``resid_var[]``; neither: the pixel checks only), and
in ``card.json``::

    "ood": {"path": "ood.npz", "sha256": "...", "bytes": 1234, "max_colour_fraction": 0.02, "min_std": 2.0,
            "embedding": {"classes": [...], "threshold": 0.0, "dim": 1280, ...,   # new gates
                          "layout": {"grid": 3, "components": 64}},             # (optional)
            "threshold": 87.5, "thumb": 16,                                        # older gates
            "features": "...", "fitted_on": {...}}
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cxr_edge.bundle import BundleError, verified_file
# the gate's arithmetic and its feature-map tools, importable from here as before
from cxr_edge.gate_features import embedder, feature_maps  # noqa: F401
from cxr_edge.gate_math import (DEFAULT_THUMB, _box_ones, _pool, density_distance, features,  # noqa: F401
                                grid_bins, grid_cells, head_logits, head_score, layout_vector, logsumexp,
                                pooled, pooling_matrix, ppca_score, thumbnail)
from cxr_edge.gate_math import linear_check as _linear
from cxr_edge.preprocess import CHROMA_LEVEL, Source, load_gray_colour

DEFAULT_MAX_COLOUR_FRACTION = 0.10  # share of off-tint coloured pixels (annotations stay under it; photos above)
DEFAULT_MIN_STD = 2.0  # gray levels (0..255) of the thumbnail

EMBED_CLASSES = ("frontal_chest", "lateral_chest", "other_body_part", "not_radiograph")
ADULT = "adult_chest"  # a frontal chest X-ray of an adult: outside the population the model learnt from
POPULATION = "the model was trained on children aged 1 to 5"
REASONS = {"lateral_chest": "lateral view", "other_body_part": "another body part", ADULT: "adult chest X-ray",
           "not_radiograph": "not a radiograph", "colour": "colour photo", "blank": "blank image",
           "inverted": "inverted image", "turned": "turned film"}  # turned: cxr_edge.reorient
EMBED_ARRAYS = ("emb_mean", "emb_scale", "emb_weights", "emb_bias")
DENSITY_ARRAYS = ("den_mean", "den_scale", "den_components", "den_var")
THUMB_ARRAYS = ("mean", "components", "eigvals", "resid_var")
LAYOUT_ARRAYS = ("lay_mean", "lay_proj")
POLARITY_ARRAYS = ("pol_weights", "pol_bias")
ADULT_ARRAYS = ("adult_weights", "adult_bias")
ADULT_OTHER_ARRAYS = ("adult_other_weights", "adult_other_bias")  # the adult check's chest-or-not question
UPDOWN_ARRAYS = ("ud_weights", "ud_bias")  # the upside-down question (cxr_edge.reorient)
SIDEWAYS_ARRAYS = ("side_weights", "side_bias")  # the on-its-side question (cxr_edge.reorient)
# linear questions on the standardized thumbnail, by their card key (higher = a negative, upside down, on its side)
THUMB_QUESTIONS = {"polarity": POLARITY_ARRAYS, "updown": UPDOWN_ARRAYS, "sideways": SIDEWAYS_ARRAYS}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    score: float
    warning: str = ""  # an accepted input outside the intended population (``allow_adults``)

    def __iter__(self):  # ok, reason, score = gate.check(...)
        return iter((self.ok, self.reason, self.score))


OK = Verdict(True, "", 0.0)


class Gate:
    """A fitted input gate. ``Gate.from_bundle(root, card)`` loads and verifies ``ood.npz``;
    ``check_pixels(gray, colour_fraction)`` before the model, ``check_embedding(embedding)`` after it;
    ``check(gray, colour_fraction, embedding=None)`` does both."""

    def __init__(self, arrays: dict, params: dict):
        self.params = dict(params)
        self.max_colour_fraction = float(params.get("max_colour_fraction", DEFAULT_MAX_COLOUR_FRACTION))
        self.min_std = float(params.get("min_std", DEFAULT_MIN_STD))
        self.thumb = int(params.get("thumb", DEFAULT_THUMB))
        self.has_appearance = all(k in arrays for k in THUMB_ARRAYS)
        self.has_embedding = all(k in arrays for k in EMBED_ARRAYS)
        self.threshold = float("nan")
        if self.has_appearance:
            self.mean = np.asarray(arrays["mean"], np.float64)
            self.components = np.asarray(arrays["components"], np.float64)
            self.eigvals = np.asarray(arrays["eigvals"], np.float64)
            self.resid_var = float(np.asarray(arrays["resid_var"]))
            self.threshold = float(params["threshold"])
            d = self.thumb * self.thumb
            if (self.mean.shape != (d,) or self.components.ndim != 2 or self.components.shape[1] != d
                    or self.eigvals.shape != (self.components.shape[0],) or not np.all(self.eigvals > 0)
                    or not self.resid_var > 0 or not np.isfinite(self.threshold)):
                raise ValueError("inconsistent OOD gate arrays/parameters (thumbnail model)")
        if self.has_embedding:
            emb = params.get("embedding") or {}
            self.emb_mean = np.asarray(arrays["emb_mean"], np.float64)
            self.emb_scale = np.asarray(arrays["emb_scale"], np.float64)
            self.emb_weights = np.asarray(arrays["emb_weights"], np.float64)
            self.emb_bias = np.asarray(arrays["emb_bias"], np.float64)
            self.emb_classes = tuple(emb.get("classes", EMBED_CLASSES))
            self.emb_threshold = float(emb.get("threshold", float("nan")))
            c = self.emb_mean.shape[0] if self.emb_mean.ndim == 1 else -1
            k = len(self.emb_classes)
            if (c < 1 or self.emb_scale.shape != (c,) or not np.all(self.emb_scale > 0)
                    or self.emb_weights.shape != (c, k) or self.emb_bias.shape != (k,)
                    or self.emb_classes[0] != "frontal_chest" or not np.isfinite(self.emb_threshold)
                    or not all(np.all(np.isfinite(a)) for a in (self.emb_mean, self.emb_weights, self.emb_bias))):
                raise ValueError("inconsistent OOD gate arrays/parameters (embedding head)")
            self.emb_dim = c
        self.has_layout = self.has_embedding and all(k in arrays for k in LAYOUT_ARRAYS)
        self.grid = 0
        if self.has_layout:
            self.lay_mean = np.asarray(arrays["lay_mean"], np.float32)
            self.lay_proj = np.asarray(arrays["lay_proj"], np.float32)
            self.grid = int((emb.get("layout") or {}).get("grid", 0))
            fc = self.lay_mean.shape[0] if self.lay_mean.ndim == 1 else -1
            kl = self.lay_proj.shape[1] if self.lay_proj.ndim == 2 else -1
            if (fc < 1 or self.grid < 1 or self.lay_proj.shape != (fc, kl) or c != fc + self.grid ** 2 * kl
                    or not np.all(np.isfinite(self.lay_proj)) or not np.all(np.isfinite(self.lay_mean))):
                raise ValueError("inconsistent OOD gate arrays/parameters (layout: lay_mean[C], lay_proj[C, k] and "
                                 "embedding.layout.grid g must give the head's C + g*g*k inputs)")
            self.feature_channels = fc
        self.has_adult = self.has_embedding and all(k in arrays for k in ADULT_ARRAYS)
        if self.has_adult:
            self.adult_threshold = float((emb.get("adult") or {}).get("threshold", float("nan")))
            self.adult_weights, self.adult_bias = _linear(
                arrays, ADULT_ARRAYS, self.emb_dim, self.adult_threshold,
                "inconsistent OOD gate arrays/parameters (adult check: adult_weights[D], adult_bias and "
                "embedding.adult.threshold)")
        self.has_adult_other = self.has_adult and all(k in arrays for k in ADULT_OTHER_ARRAYS)
        if self.has_adult_other:  # its threshold is 0 (the two classes' boundary)
            self.adult_other_weights, self.adult_other_bias = _linear(
                arrays, ADULT_OTHER_ARRAYS, self.emb_dim, 0.0,
                "inconsistent OOD gate arrays (adult check: adult_other_weights[D], adult_other_bias)")
        self.questions = {}  # card key -> (weights, bias, threshold)
        for key, names in THUMB_QUESTIONS.items():
            if all(k in arrays for k in names):
                t = float((params.get(key) or {}).get("threshold", float("nan")))
                self.questions[key] = (*_linear(arrays, names, self.thumb * self.thumb, t, "inconsistent OOD gate arrays/"
                                                f"parameters ({key}: {names[0]}[thumb*thumb], {names[1]} and {key}.threshold)"), t)
        self.has_polarity = "polarity" in self.questions
        if self.has_polarity:
            self.pol_weights, self.pol_bias, self.pol_threshold = self.questions["polarity"]
        self.has_density = self.has_embedding and all(k in arrays for k in DENSITY_ARRAYS)
        if self.has_density:
            self.den_mean = np.asarray(arrays["den_mean"], np.float64)
            self.den_scale = np.asarray(arrays["den_scale"], np.float64)
            self.den_components = np.asarray(arrays["den_components"], np.float64)
            self.den_var = np.asarray(arrays["den_var"], np.float64)
            self.den_threshold = float(emb.get("density_threshold", float("nan")))
            k = self.den_var.shape[0] if self.den_var.ndim == 1 else -1
            if (k < 1 or self.den_mean.shape != (c,) or self.den_scale.shape != (c,) or not np.all(self.den_scale > 0)
                    or self.den_components.shape != (k, c) or not np.all(self.den_var > 0)
                    or not np.isfinite(self.den_threshold)):
                raise ValueError("inconsistent OOD gate arrays/parameters (embedding density)")

    @classmethod
    def from_bundle(cls, root: Path, card: dict, verify: bool = True) -> Optional["Gate"]:
        """The bundle's gate, or ``None`` when its card has no ``"ood"``. Raises :class:`BundleError` for a
        missing, corrupt (sha256 mismatch) or malformed gate."""
        params = card.get("ood")
        if params is None:
            return None
        root = Path(root)
        try:
            path = verified_file(root, params, "OOD gate file", verify)
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            return cls(arrays, params)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"bundle {root}: unusable OOD gate ({type(exc).__name__}: {exc})") from None

    # -- pixels, before the model ------------------------------------------------------------------------
    def scores(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(appearance scores, or NaN without a thumbnail model; thumbnail standard deviations) for
        ``uint8[N, S, S]``."""
        x, sd = features(gray, self.thumb)
        if not self.has_appearance:
            return np.full(len(x), np.nan), sd
        return ppca_score(x, self.mean, self.components, self.eigvals, self.resid_var), sd

    def check_pixels(self, gray: np.ndarray, colour_fraction: float = 0.0) -> Verdict:
        """Verdict for one ``uint8[S, S]`` image (from ``load_gray_colour``) and its chroma fraction, before
        the model: colour photo, blank image (and, for older gates, the thumbnail appearance model)."""
        if colour_fraction > self.max_colour_fraction:
            return Verdict(False, f"{REASONS['colour']} ({colour_fraction:.0%} of pixels in colour; X-rays are "
                                  "gray)", float("inf"))
        score, sd = self.scores(np.asarray(gray)[None])
        score, sd = float(score[0]), float(sd[0])
        if sd < self.min_std:
            return Verdict(False, f"{REASONS['blank']} (no contrast; not an X-ray)", float("inf"))
        if self.has_appearance and not score <= self.threshold:
            return Verdict(False, f"does not look like a chest X-ray (OOD score {score:.1f} > "
                                  f"threshold {self.threshold:.1f})", score)
        return Verdict(True, "", 0.0 if np.isnan(score) else score)

    def question_scores(self, key: str, gray: np.ndarray) -> np.ndarray:
        """Scores ``[N]`` of ``uint8[N, S, S]`` on one of the thumbnail questions (``THUMB_QUESTIONS``; NaN without
        it): a linear function of the standardized thumbnail, above its threshold when the image is a negative
        ("polarity"), upside down ("updown") or on its side ("sideways")."""
        x, _ = features(gray, self.thumb)
        w, b, _ = self.questions.get(key, (np.full(x.shape[1], np.nan), np.nan, None))
        return x @ w + b

    def flags(self, gray: np.ndarray) -> set:
        """The thumbnail questions (card keys) that flag one ``uint8[S, S]`` image, from one thumbnail."""
        return {key for x in features(np.asarray(gray)[None], self.thumb)[0]
                for key, (w, b, t) in self.questions.items() if x @ w + b > t}

    def polarity_scores(self, gray: np.ndarray) -> np.ndarray:
        """Polarity scores ``[N]`` (higher = more like a negative image): ``question_scores("polarity", gray)``."""
        return self.question_scores("polarity", gray)

    def check_polarity(self, gray: np.ndarray) -> Verdict:
        """Verdict for one ``uint8[S, S]`` image on its polarity: a negative (bones dark, air bright, as a
        MONOCHROME1 image exported without its inversion reads) is refused. Asked after the head, so that
        what the head already refuses keeps the head's reason."""
        if not self.has_polarity:
            return OK
        score = float(self.polarity_scores(np.asarray(gray)[None])[0])
        if not score <= self.pol_threshold:
            return Verdict(False, f"{REASONS['inverted']} (a negative: bones dark, air bright; polarity score "
                                  f"{score:.1f} > {self.pol_threshold:.1f})", score)
        return Verdict(True, "", score)

    # -- embedding, after the model ----------------------------------------------------------------------
    def embedding_scores(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(head scores ``[N]``, most likely non-frontal class index ``[N]``, 1..3) for embeddings ``[N, C]``."""
        logits = head_logits(np.asarray(embeddings).reshape(-1, self.emb_dim), self.emb_mean, self.emb_scale,
                             self.emb_weights, self.emb_bias)
        return head_score(logits), 1 + logits[:, 1:].argmax(axis=1)

    def density(self, embeddings: np.ndarray) -> np.ndarray:
        """Density distances ``[N]`` (zeros when this gate has no density part)."""
        e = np.asarray(embeddings).reshape(-1, self.emb_dim)
        if not self.has_density:
            return np.zeros(len(e))
        return density_distance(e, self.den_mean, self.den_scale, self.den_components, self.den_var)

    @property
    def knows_adults(self) -> bool:
        """True when this gate has the intended-population check (an adult-vs-child score on the head's vector)."""
        return self.has_adult

    def adult_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Adult scores ``[N]`` (log odds of an adult's film against a child's; NaN without the check):
        ``((e - emb_mean) / emb_scale) @ adult_weights + adult_bias``."""
        e = np.asarray(embeddings, np.float64).reshape(-1, self.emb_dim)
        if not self.has_adult:
            return np.full(len(e), np.nan)
        return ((e - self.emb_mean) / self.emb_scale) @ self.adult_weights + self.adult_bias

    def chest_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """The adult check's second question, for what it would call adult: log odds of an adult's chest film
        against another radiograph (a lateral view, another body part) ``[N]``; +inf without that part (older
        gates: everything the adult score flags is called adult)."""
        e = np.asarray(embeddings, np.float64).reshape(-1, self.emb_dim)
        if not self.has_adult_other:
            return np.full(len(e), np.inf)
        return ((e - self.emb_mean) / self.emb_scale) @ self.adult_other_weights + self.adult_other_bias

    def embedding_verdicts(self, embeddings: np.ndarray, allow_adults: bool = False) -> list[Verdict]:
        """:meth:`check_embedding` for embeddings ``[N, C]``."""
        e = np.asarray(embeddings, np.float64).reshape(-1, self.emb_dim)
        scores, cls = self.embedding_scores(e)
        dist = self.density(e)
        adult = self.adult_scores(e)
        chest = self.chest_scores(e)
        out = []
        for score, k, d, a, ch in zip(scores.tolist(), cls.tolist(), dist.tolist(), adult.tolist(), chest.tolist()):
            what = REASONS[self.emb_classes[int(k)]]
            if not score <= self.emb_threshold:  # NaN (a broken embedding) is refused too
                out.append(Verdict(False, f"{what} (gate score {score:.2f} > {self.emb_threshold:.2f}; "
                                          "expects a frontal chest X-ray)", score))
            elif self.has_density and not d <= self.den_threshold:
                out.append(Verdict(False, f"{what} (unlike the frontal chest X-rays the gate knows: distance "
                                          f"{d:.0f} > {self.den_threshold:.0f})", score))
            elif self.has_adult and not a <= self.adult_threshold and not ch > 0:  # not a child's film, nor a chest
                out.append(Verdict(False, f"{what} (gate score {score:.2f}; not a child's chest film: adult score "
                                          f"{a:.2f} > {self.adult_threshold:.2f}, chest score {ch:.2f} <= 0; "
                                          "expects a frontal chest X-ray)", score))
            elif self.has_adult and not a <= self.adult_threshold:  # a frontal chest film, an adult's
                what = f"{REASONS[ADULT]} (adult score {a:.2f} > {self.adult_threshold:.2f}); {POPULATION}"
                out.append(Verdict(True, "", score, f"{what}: the label is less reliable") if allow_adults
                           else Verdict(False, what, score))
            else:
                out.append(Verdict(True, "", score))
        return out

    @property
    def needs_feature_map(self) -> bool:
        """True when this gate's embedding is more than the global average (a layout part): it must be computed
        from the model's feature map (``embedding_of``)."""
        return self.has_layout

    def embedding_of(self, features: np.ndarray) -> np.ndarray:
        """The vectors ``float32[N, D]`` :meth:`check_embedding` expects, from the model's feature maps
        ``[N, h, w, C]`` (one ``[h, w, C]`` map gives ``[D]``): the global average, and for a layout gate its
        projected grid cells (``layout_vector``)."""
        f = np.asarray(features, np.float32)
        one = f.ndim == 3
        f = f[None] if one else f
        if f.ndim != 4:
            raise ValueError(f"expected feature maps [N, h, w, C], got shape {np.shape(features)}")
        if not self.has_layout:
            out = f.mean(axis=(1, 2), dtype=np.float32)
        else:
            if f.shape[-1] != self.feature_channels:
                raise ValueError(f"gate expects feature maps with {self.feature_channels} channels, got shape "
                                 f"{np.shape(features)}")
            out = layout_vector(pooled(f, self.grid), self.lay_mean, self.lay_proj, self.grid)
        return out[0] if one else out

    def check_embedding(self, embedding: Optional[np.ndarray], allow_adults: bool = False) -> Verdict:
        """Verdict for one gate vector ``float32[D]`` (``embedding_of``; for gates without a layout part the
        penultimate global average ``float32[C]``) or one feature map ``[h, w, C]``; ok when this gate has no
        embedding head (older gates) or the model gives no embedding (``None``)."""
        if not self.has_embedding or embedding is None:
            return OK
        if np.ndim(embedding) == 3:
            embedding = self.embedding_of(embedding)
        e = np.asarray(embedding, np.float64).reshape(-1)
        if e.shape != (self.emb_dim,):
            hint = (f" (this gate has a layout part: pass the model's feature map or Gate.embedding_of(features), "
                    f"not the {self.feature_channels}-d global average)" if self.has_layout else "")
            raise ValueError(f"gate expects a {self.emb_dim}-d embedding, got shape {np.shape(embedding)}{hint}")
        return self.embedding_verdicts(e[None], allow_adults)[0]

    # -- both ----------------------------------------------------------------------------------------------
    def check(self, gray: np.ndarray, colour_fraction: float = 0.0,
              embedding: Optional[np.ndarray] = None, allow_adults: bool = False) -> Verdict:
        """``check_pixels``, then ``check_embedding`` when an embedding is given, then ``check_polarity``."""
        v = self.check_pixels(gray, colour_fraction)
        return v if not v.ok else self.check_after_model(embedding, gray, allow_adults)

    def check_after_model(self, embedding: Optional[np.ndarray], gray: np.ndarray,
                          allow_adults: bool = False) -> Verdict:
        """The checks after the model's pass: ``check_embedding``, then, for what the head accepts (so that its
        refusals keep their reasons), ``check_polarity`` on the image; an accepted verdict keeps the head's
        score (and its population warning under ``allow_adults``)."""
        v = self.check_embedding(embedding, allow_adults)
        if not v.ok:
            return v
        p = self.check_polarity(gray)
        return v if p.ok else p

    def check_source(self, source: Source, size: int = 224,
                     embed: Optional[Callable[[np.ndarray], np.ndarray]] = None, allow_adults: bool = False) -> Verdict:
        """Decode ``source`` (``cxr_edge.preprocess.load_gray_colour``) and check it; ``embed`` (see
        :func:`embedder`, with ``gate=`` this gate) supplies the gate vector for the head."""
        gray, colour = load_gray_colour(source, size)
        v = self.check_pixels(gray, colour)
        if not v.ok:
            return v
        return self.check_after_model(embed(gray[None])[0] if embed is not None and self.has_embedding else None,
                                      gray, allow_adults)



__all__ = ["Gate", "Verdict", "EMBED_CLASSES", "REASONS", "ADULT", "POPULATION", "embedder", "feature_maps", "pooled", "grid_cells",
           "grid_bins", "layout_vector", "features", "thumbnail", "ppca_score",
           "head_logits", "head_score", "density_distance", "CHROMA_LEVEL"]
