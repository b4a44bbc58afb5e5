"""The gate's cross-validation (train.gate_cv.cross_validate) on small synthetic embeddings: held-out adult
films' variants are judged by the fold that held the film out, by kind, with their reasons."""
from __future__ import annotations

import numpy as np

from cxr_edge.ood import EMBED_CLASSES
from train.gate_data import ADULT_LABEL, DevItem, GateData
from train.gate_cv import ADULT_VARIANT_KINDS, cross_validate

D = 6
FRONTAL, LATERAL, OTHER, NOT_RAD = (EMBED_CLASSES.index(c) for c in
                                    ("frontal_chest", "lateral_chest", "other_body_part", "not_radiograph"))


def _cluster(rng, centre: int | None, n: int) -> np.ndarray:
    x = rng.normal(0.0, 0.3, (n, D))
    if centre is not None:
        x[:, centre] += 6.0
    return x


def _data(child_like_variants: str):
    """Children at the origin; lateral views, other radiographs, non-radiographs and adults each along their
    own axis. Each gate_dev item: its original row, 3 head variants and (adults) 2 rows of the adult check's
    variants; the latter of ``child_like_variants`` sit among the children (a dressing the check misses)."""
    rng = np.random.default_rng(0)
    xs, ys, devs, heads, items = [], [], [], [], []

    def add(x, y, dev, head=True):
        xs.append(x)
        ys.append(np.full(len(x), y))
        devs.append(np.full(len(x), dev))
        heads.append(np.full(len(x), head))

    add(_cluster(rng, None, 400), FRONTAL, -1)
    add(_cluster(rng, 2, 40), NOT_RAD, -1)
    for category, cls, label, axis, n in (("adult_dev", "adult_chest", ADULT_LABEL, 3, 10),
                                          ("lateral_chest", "lateral_chest", LATERAL, 0, 6),
                                          ("non_chest_radiograph", "other_body_part", OTHER, 1, 6)):
        for k in range(n):
            i = len(items)
            items.append(DevItem(f"/dev/{category}_{k}.png", category, cls, f"{category}/{k}"))
            add(_cluster(rng, axis, 4), label, i)  # the original, then the head's variants
            if cls == "adult_chest":
                name = f"{category}_{k}.png"
                add(_cluster(rng, None if name == child_like_variants else axis, 2), label, i, head=False)
    data = GateData(np.concatenate(xs), np.concatenate(ys), np.concatenate(devs), head=np.concatenate(heads))
    return data, _cluster(rng, None, 200), items


def test_held_out_adult_variants_are_judged_by_kind_with_reasons():
    data, val_x, items = _data(child_like_variants="adult_dev_3.png")
    out = cross_validate(data, val_x, items, folds=5, c=1.0, max_val_reject=0.01)
    assert out["by_category"]["adult_dev"]["correct"] == 10  # the originals, as before
    v = out["adult_variants"]
    head_kind, check_kind = ADULT_VARIANT_KINDS[True], ADULT_VARIANT_KINDS[False]
    assert v[head_kind]["n"] == 10 * 3 and v[check_kind]["n"] == 10 * 2  # adults' variants only, never an original
    assert v[head_kind]["correct"] == 30 and v[head_kind]["reasons"] == {"adult chest X-ray": 30}
    # the one film whose dressed variants look like a child's: both accepted, and named
    assert v[check_kind]["correct"] == 18 and v[check_kind]["accepted"] == 2
    assert v[check_kind]["wrong_by_film"] == {"adult_dev_3.png": 2} and v[head_kind]["wrong_by_film"] == {}


def test_no_adult_variants_no_summary():
    data, val_x, items = _data(child_like_variants="")
    _, first = np.unique(data.dev, return_index=True)  # each item's first row: its original
    keep = (data.y != ADULT_LABEL) | np.isin(np.arange(len(data.y)), first)  # the adults' originals, no variant
    out = cross_validate(data.subset(keep), val_x, items, folds=5, c=1.0, max_val_reject=0.01)
    assert "adult_variants" not in out and out["by_category"]["adult_dev"]["n"] == 10
