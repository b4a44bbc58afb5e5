"""Fitting the input gate (``train.ood``) from embedded rows (``train.gate_data.GateData``): the layout
projection (``fit_layout``), the head (``fit_head``), the adult check (``fit_adult``), the density check
(``fit_density``), the thresholds on validation scans (``choose_threshold``), all of them together
(``fit_gate``) and the polarity check (``fit_polarity``); the gate_dev cross-validation is in
``train.gate_cv``. Importable from ``train.ood`` too."""
from __future__ import annotations

import numpy as np

from cxr_edge.ood import (DEFAULT_THUMB, EMBED_CLASSES, THUMB_QUESTIONS, Gate, density_distance, features,
                          head_logits, head_score, layout_vector)
from train.gate_data import ADULT_LABEL, GateData
from train.gate_synth import clinical, variants

DEFAULT_MAX_VAL_REJECT = 0.002
# The shipped gate's settings are the defaults: `python -m train.ood BUNDLE` rebuilds it
DEFAULT_C = 10.0
ADULT_VAL_SHARE = 0.5  # the adult check may refuse half the validation share the head may: together within 0.5%
DEFAULT_DENSITY_COMPONENTS = 0
DEFAULT_GRID_COMPONENTS = 64  # principal components per grid cell


def _f32(arrays: dict) -> dict:
    """Stored as float32 (half the bytes); thresholds are computed from these very numbers."""
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


HALF_ARRAYS = ("lay_proj", "den_components")  # the large projection matrices: stored as float16


def _f16(arrays: dict) -> dict:
    """float32 arrays holding float16 values (``HALF_ARRAYS``): ``ood.npz`` stores them in half the bytes again
    (the bundle must stay within 8 MiB) and the thresholds are computed from these very numbers."""
    return {k: (np.asarray(v, np.float16).astype(np.float32) if k in HALF_ARRAYS else v) for k, v in arrays.items()}


ABSENT_LOGIT = -30.0  # the bias of a class without training images: never the most likely


def fit_head(x: np.ndarray, y: np.ndarray, c: float = DEFAULT_C, seed: int = 0) -> dict:
    """Arrays for ``ood.npz`` (``emb_mean``, ``emb_scale``, ``emb_weights[C, K]``, ``emb_bias[K]``): a
    multinomial logistic regression with balanced class weights on standardized embeddings ``x[N, C]``,
    labels ``y`` (indices into ``EMBED_CLASSES``). ``frontal_chest`` and at least one other class must occur; a
    class without images gets zero weights and bias ``ABSENT_LOGIT``."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    present = [k for k in range(len(EMBED_CLASSES)) if np.any(y == k)]
    if 0 not in present or len(present) < 2:
        raise ValueError("the gate needs frontal chest X-rays and images of at least one other class, got "
                         f"{[EMBED_CLASSES[k] for k in present]}")
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    clf.fit((x - mean) / scale, y)
    coef, icpt = clf.coef_, clf.intercept_
    if len(present) == 2:  # scikit-learn's binary form: one row for the second class, against the first
        coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], icpt])
    weights = np.zeros((x.shape[1], len(EMBED_CLASSES)))
    bias = np.full(len(EMBED_CLASSES), ABSENT_LOGIT)
    for row, k in enumerate(clf.classes_):
        weights[:, int(k)], bias[int(k)] = coef[row], icpt[row]
    return _f32({"emb_mean": mean, "emb_scale": scale, "emb_weights": weights, "emb_bias": bias})


def fit_density(x_frontal: np.ndarray, k: int = 64) -> dict:
    """Arrays ``den_mean``, ``den_scale``, ``den_components[k, C]``, ``den_var[k]``: the first ``k`` principal
    components of standardized frontal chest X-ray embeddings (``k`` at most a tenth of their number)."""
    x = np.asarray(x_frontal, np.float64)
    k = int(min(k, max(1, len(x) // 10), x.shape[1]))
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    var, comps = _principal((x - mean) / scale, k)
    return _f16(_f32({"den_mean": mean, "den_scale": scale, "den_components": comps,
                      "den_var": np.maximum(var, 1e-9)}))


def _principal(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(variances ``[k]``, components ``[k, D]``) of centred rows ``z[N, D]``: the eigenvectors of the ``D x D``
    covariance with the ``k`` largest eigenvalues (the SVD's answer, much faster for ``N >> D``)."""
    w, v = np.linalg.eigh(z.T @ z / max(1, len(z) - 1))
    order = np.argsort(w)[::-1][:k]
    return w[order], v[:, order].T


def fit_layout(pooled_frontal: np.ndarray, channels: int, grid: int, k: int = DEFAULT_GRID_COMPONENTS) -> dict:
    """Arrays ``lay_mean[C]``, ``lay_proj[C, k]``: the mean and the first ``k`` principal components of the grid
    cells (``C``-vectors, all cells pooled) of frontal chest X-rays' ``pooled`` rows ``[N, C + g*g*C]``."""
    x = np.asarray(pooled_frontal, np.float64)
    cells = x[:, channels:].reshape(-1, channels)
    if cells.shape[0] != len(x) * grid * grid:
        raise ValueError(f"pooled rows of {x.shape[1]} numbers are not {channels} + {grid}x{grid}x{channels}")
    k = int(min(k, channels, max(1, len(cells) - 1)))
    mean = cells.mean(axis=0)
    _, comps = _principal(cells - mean, k)
    return _f16(_f32({"lay_mean": mean, "lay_proj": comps.T}))


ADULT_CHECK = ("a logistic regression (balanced class weights) on the head's standardized vector: adult frontal films "
               "(and their variants) against the training scans' frontal rows (children, and their variants); "
               "asked for what the head accepts as a frontal chest X-ray; refused as an adult chest X-ray when "
               "its score > threshold (the validation scans' quantile)")


CHEST_CHECK = ("what the adult score flags is asked a second question, a logistic regression (balanced class weights) "
               "on the same vector: adult frontal chest films (and their variants) against lateral views and other "
               "body parts (gate_dev's, their variants and long films); a chest score <= 0 is refused as the head's "
               "most likely other class, not as an adult chest X-ray")


def fit_adult(x: np.ndarray, y: np.ndarray, dev: np.ndarray, arrays: dict, val_x: np.ndarray, c: float = DEFAULT_C,
              max_val_reject: float = DEFAULT_MAX_VAL_REJECT, seed: int = 0,
              floor: float | None = 0.0) -> tuple[dict, dict, np.ndarray]:
    """The intended-population check (``Gate.adult_scores``): arrays ``adult_weights[D]``, ``adult_bias`` on the
    head's standardization (``emb_mean``, ``emb_scale``), fitted on the adult rows (``ADULT_LABEL``) against the
    children's frontal rows (training scans and their variants: ``dev == -1``); its threshold from the
    validation scans (``choose_threshold``; ``floor`` None: the validation quantile whatever its sign). Returns
    (arrays, card parameters, validation scores)."""
    from sklearn.linear_model import LogisticRegression

    def standardized(rows: np.ndarray) -> np.ndarray:  # the head's standardization, which the gate applies
        return (np.asarray(rows, np.float64) - arrays["emb_mean"]) / arrays["emb_scale"]

    adult = y == ADULT_LABEL

    def adult_against(rows: np.ndarray, name: str) -> dict:
        """Arrays ``{name}_weights``, ``{name}_bias``: the adult rows against ``rows`` (balanced weights)."""
        keep = adult | rows
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=3000, random_state=seed)
        model.fit(standardized(np.asarray(x)[keep]), adult[keep].astype(int))
        return _f32({f"{name}_weights": model.coef_[0], f"{name}_bias": np.float64(model.intercept_[0])})

    children = (y == EMBED_CLASSES.index("frontal_chest")) & (dev == -1)
    out = adult_against(children, "adult")
    others = np.isin(y, [EMBED_CLASSES.index("lateral_chest"), EMBED_CLASSES.index("other_body_part")])
    if others.any():  # what is not a child's film may be another radiograph: adult chest films against those
        out.update(adult_against(others, "adult_other"))
    val = standardized(val_x) @ out["adult_weights"] + float(out["adult_bias"])
    threshold = choose_threshold(val, max_val_reject, floor)
    quantile = f"{1 - max_val_reject:.4f} quantile of the validation scans' scores"
    params = {"threshold": round(threshold, 6), "model": ADULT_CHECK,
              "threshold_rule": quantile if floor is None else f"max({floor:g}, {quantile})",
              "train_rows": {"adult": int(adult.sum()), "child": int(children.sum())},
              "val_rejected": int((val > threshold).sum())}
    if others.any():
        params["chest"] = CHEST_CHECK
        params["train_rows"]["other_radiograph"] = int(others.sum())
    return out, params, val


def scores_of(arrays: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(head scores, most likely non-frontal class index) of embeddings ``x[N, C]`` under ``arrays``."""
    logits = head_logits(x, arrays["emb_mean"], arrays["emb_scale"], arrays["emb_weights"], arrays["emb_bias"])
    return head_score(logits), 1 + logits[:, 1:].argmax(axis=1)


def choose_threshold(val_scores: np.ndarray, max_reject: float = DEFAULT_MAX_VAL_REJECT,
                     floor: float | None = 0.0) -> float:
    """The threshold from **validation** scans' scores: the head's own decision boundary (``floor`` 0: frontal
    more likely than anything else), raised to the ``1 - max_reject`` quantile of the validation scores when more
    than ``max_reject`` of them would be refused at 0; ``floor`` None: that quantile alone."""
    v = np.asarray(val_scores, np.float64)
    if v.size == 0:
        raise ValueError("no validation scores")
    q = float(np.quantile(v, 1.0 - max_reject))
    return q if floor is None else max(float(floor), q)



def gate_vectors(arrays: dict, x: np.ndarray, grid: int) -> np.ndarray:
    """The vectors the gate's head reads, from ``pooled`` rows ``x`` (the rows themselves without a layout)."""
    if not grid:
        return np.asarray(x, np.float32)
    return layout_vector(x, arrays["lay_mean"], arrays["lay_proj"], grid)


def fit_gate(data: GateData, val_x: np.ndarray, c: float = DEFAULT_C,
             max_val_reject: float = DEFAULT_MAX_VAL_REJECT, seed: int = 0,
             density_components: int = DEFAULT_DENSITY_COMPONENTS, grid: int = 0,
             grid_components: int = DEFAULT_GRID_COMPONENTS, channels: int | None = None,
             adult_c: float | None = None, adult_floor: float | None = 0.0) -> tuple[dict, dict]:
    """(arrays, ``embedding`` card parameters) from training rows and validation scans' rows (``pooled``: the
    global average, then with ``grid`` > 0 the ``grid x grid`` cells of ``channels`` each). With a grid, the
    layout projection (``fit_layout``) comes from the frontal training rows first. Both thresholds (head score;
    density distance when ``density_components`` > 0) come from the validation scans. ``adult_c``: the adult
    check's C (``None``: the head's ``c``); ``adult_floor``: its threshold's floor (``fit_adult``)."""
    arrays: dict = {}
    layout = None
    if grid:
        channels = int(channels or data.x.shape[1] // (1 + grid * grid))
        basis = (data.y == EMBED_CLASSES.index("frontal_chest")) & data.basis
        arrays.update(fit_layout(data.x[basis], channels, grid, grid_components))
        layout = {"grid": int(grid), "components": int(arrays["lay_proj"].shape[1]), "channels": channels,
                  "rule": f"the model's feature map average-pooled on a {grid}x{grid} grid of adaptive (overlapping) "
                          "cells, each cell's vector minus lay_mean projected onto lay_proj (the first principal "
                          "components of frontal training scans' cells), after the global average"}
    x = gate_vectors(arrays, data.x, grid)
    val_x = gate_vectors(arrays, val_x, grid)
    head_y = np.where(data.y == ADULT_LABEL, EMBED_CLASSES.index("frontal_chest"), data.y)  # a frontal film
    in_head = data.head
    arrays.update(fit_head(x[in_head], head_y[in_head], c, seed))
    head_y = head_y[in_head]
    val_scores, _ = scores_of(arrays, val_x)
    threshold = choose_threshold(val_scores, max_val_reject)
    params = {"classes": list(EMBED_CLASSES), "threshold": round(threshold, 6), "dim": int(x.shape[1]),
              "score": "logsumexp(logits[1:]) - logits[0], logits = ((e - emb_mean) / emb_scale) @ emb_weights "
                       "+ emb_bias; refused when score > threshold",
              "threshold_rule": f"max(0, {1 - max_val_reject:.4f} quantile of the validation scans' scores)",
              "max_val_reject": max_val_reject, "val_images": int(len(val_x)),
              "val_score_quantiles": {q: round(float(np.quantile(val_scores, float(q))), 4)
                                      for q in ("0.5", "0.99", "0.998")},
              "train_rows": {**{EMBED_CLASSES[k]: int((head_y == k).sum()) for k in range(len(EMBED_CLASSES))},
                             "of which adult_chest": int((data.y == ADULT_LABEL).sum())},
              "classes_without_images": [EMBED_CLASSES[k] for k in range(len(EMBED_CLASSES))
                                         if not np.any(head_y == k)],
              "C": c}
    if layout:
        params["layout"] = layout
    rejected = val_scores > threshold
    if np.any(data.y == ADULT_LABEL):
        adult_arrays, adult_params, val_adult = fit_adult(x, data.y, data.dev, arrays, val_x,
                                                          c if adult_c is None else adult_c,
                                                          max_val_reject * ADULT_VAL_SHARE, seed, adult_floor)
        if adult_c is not None:
            adult_params["C"] = adult_c
        if adult_floor != 0.0:
            adult_params["floor"] = adult_floor
        arrays.update(adult_arrays)
        params["adult"] = adult_params
        rejected |= val_adult > adult_params["threshold"]
    if density_components > 0:
        arrays.update(fit_density(x[(data.y == EMBED_CLASSES.index("frontal_chest")) & data.basis],
                                  density_components))
        val_dist = density_distance(val_x, arrays["den_mean"], arrays["den_scale"], arrays["den_components"],
                                    arrays["den_var"])
        den_threshold = float(np.quantile(val_dist, 1.0 - max_val_reject))
        rejected |= val_dist > den_threshold
        params.update({"density_threshold": round(den_threshold, 4),
                       "density_components": int(len(arrays["den_var"])),
                       "density": "squared Mahalanobis distance in the first density_components principal "
                                  "components of the standardized frontal training vectors; refused when > "
                                  f"density_threshold (the {1 - max_val_reject:.4f} quantile of the validation "
                                  "scans' distances)"})
    params["val_rejected"] = int(rejected.sum())
    return arrays, params


POLARITY = ("a logistic regression (scikit-learn defaults, C 1) on the standardized 16x16 thumbnail: train "
            "scans and one train.ood.variants variant each, against the same images inverted (255 - x); "
            "threshold from the validation scans")
UPDOWN = ("a logistic regression (scikit-learn defaults, C 1) on the standardized 16x16 thumbnail: train scans, "
          "one train.ood.variants variant and the clinic-style variants each, as they are and mirrored left to right, "
          "against the same images turned a half turn and flipped top to bottom; threshold from the validation scans")
SIDEWAYS = UPDOWN.replace("turned a half turn and flipped top to bottom", "turned a quarter turn either way")


def _thumb_question(train_gray: np.ndarray, val_gray: np.ndarray, upright, turned, key: str, about: str, seed: int,
                    max_val_reject: float, thumb: int, n_clinical: int):
    """A linear function of the standardized thumbnail that tells ``upright(imgs)`` from ``turned(imgs)`` (each a
    list of image stacks), from train scans, one ``variants`` copy and ``n_clinical`` ``clinical`` copies each;
    its threshold: ``choose_threshold`` on the validation scans. ``key``: its card key (``THUMB_QUESTIONS``);
    ``about``: the card's description of it. Returns (its arrays, the runtime's scoring of it as a function of
    ``uint8[N, S, S]``, card parameters)."""
    from sklearn.linear_model import LogisticRegression

    g = np.asarray(train_gray, np.uint8)
    imgs = np.concatenate([g, variants(g, 1, seed + 41)] + [clinical(g, seed + 43 + k) for k in range(n_clinical)])
    up, down = np.concatenate(upright(imgs)), np.concatenate(turned(imgs))
    x = np.concatenate([features(up, thumb)[0], features(down, thumb)[0]])
    y = np.r_[np.zeros(len(up)), np.ones(len(down))]
    model = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
    w, b = model.coef_[0].astype(np.float64), float(model.intercept_[0])
    names = THUMB_QUESTIONS[key]
    arrays = {names[0]: w, names[1]: np.float64(b)}
    gate = Gate(arrays, {"thumb": thumb, key: {"threshold": 0.0}})
    score = lambda gray: gate.question_scores(key, gray)  # noqa: E731
    val_scores = score(np.asarray(val_gray, np.uint8))
    threshold = choose_threshold(val_scores, max_val_reject)
    params = {"threshold": round(threshold, 6), "model": about,
              "threshold_rule": f"max(0, {1 - max_val_reject:.4f} quantile of the validation scans' scores)",
              "train_images": int(len(imgs)), "clinical_variants": int(n_clinical), "val_images": int(len(val_scores)),
              "val_rejected": int((val_scores > threshold).sum())}
    return arrays, score, params


def fit_polarity(train_gray: np.ndarray, val_gray: np.ndarray, seed: int = 0,
                 max_val_reject: float = DEFAULT_MAX_VAL_REJECT, thumb: int = DEFAULT_THUMB,
                 n_clinical: int = 0) -> tuple[dict, dict]:
    """The polarity check (``Gate.check_polarity``): a linear function of the standardized thumbnail that tells
    a radiograph from its negative (``POLARITY``), from train scans only (no gate_dev: its frontal films are a
    held-out check, ``benchmarks.ood``), each with one ``variants`` copy and ``n_clinical`` ``clinical`` ones
    (collimation frames, letterboxing and burned-in text change a thumbnail's dark and bright areas: without
    them such films were refused as negatives), every one against its negative. Threshold:
    ``choose_threshold`` on the validation scans. Returns (arrays ``pol_weights``, ``pol_bias``; card
    parameters)."""
    val = np.asarray(val_gray, np.uint8)
    arrays, score, params = _thumb_question(train_gray, val, lambda i: [i], lambda i: [255 - i], "polarity", POLARITY,
                                            seed, max_val_reject, thumb, n_clinical)
    val_scores, inverted_scores = score(val), score(255 - val)
    params = {**params, "val_inverted_refused": int((inverted_scores > params["threshold"]).sum()),
              "val_margin": round(float(inverted_scores.min() - val_scores.max()), 3)}
    return arrays, params


def fit_updown(train_gray: np.ndarray, val_gray: np.ndarray, seed: int = 0,
               max_val_reject: float = DEFAULT_MAX_VAL_REJECT, thumb: int = DEFAULT_THUMB,
               n_clinical: int = 0) -> tuple[dict, dict]:
    """The upside-down question (``Gate.question_scores("updown", ...)``, asked by ``cxr_edge.reorient``):
    ``UPDOWN``, from train scans only, as ``fit_polarity``. Returns (arrays ``ud_weights``, ``ud_bias``; card
    parameters, with how many validation scans turned a half turn it flags)."""
    return _turn_question(train_gray, val_gray, "updown", UPDOWN, lambda i: [i[:, ::-1, ::-1], i[:, ::-1, :]],
                          lambda v: [v[:, ::-1, ::-1]], seed, max_val_reject, thumb, n_clinical)


def fit_sideways(train_gray: np.ndarray, val_gray: np.ndarray, seed: int = 0,
                 max_val_reject: float = DEFAULT_MAX_VAL_REJECT, thumb: int = DEFAULT_THUMB,
                 n_clinical: int = 0) -> tuple[dict, dict]:
    """The on-its-side question (``Gate.question_scores("sideways", ...)``, asked by ``cxr_edge.reorient``):
    ``SIDEWAYS``, as ``fit_updown``, against the scans turned a quarter turn either way. Returns (arrays
    ``side_weights``, ``side_bias``; card parameters, with how many validation scans so turned it flags)."""
    turns = lambda i: [np.rot90(i, 1, axes=(1, 2)), np.rot90(i, 3, axes=(1, 2))]  # noqa: E731
    return _turn_question(train_gray, val_gray, "sideways", SIDEWAYS, turns, turns, seed, max_val_reject, thumb,
                          n_clinical)


def _turn_question(train_gray, val_gray, key: str, about: str, turned, val_turned, seed: int, max_val_reject: float,
                   thumb: int, n_clinical: int) -> tuple[dict, dict]:
    """A question that tells upright films (as they are and mirrored) from ``turned(imgs)``; its card parameters
    say how many of the validation scans turned by ``val_turned`` it flags."""
    val = np.asarray(val_gray, np.uint8)
    arrays, score, params = _thumb_question(train_gray, val, lambda i: [i, i[:, :, ::-1]], turned, key, about, seed,
                                            max_val_reject, thumb, n_clinical)
    turned_val = val_turned(val)
    flagged = sum(int((score(np.ascontiguousarray(v)) > params["threshold"]).sum()) for v in turned_val)
    params = {**params, "val_turned": int(sum(len(v) for v in turned_val)), "val_turned_flagged": flagged}
    return arrays, params
