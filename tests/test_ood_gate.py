"""The input gate's runtime (``cxr_edge/ood.py``) with hand-made gates: the embedding head's reasons and threshold,
the density part, the layout vector from the feature map, the thumbnail, what the Classifier feeds the gate, and
inconsistent or older (thumbnail appearance model) gates. Needs no ``../shared/data``."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from _ood_common import _head_arrays
from _runtime_fixtures import bundle_dir, image_files  # noqa: F401  (fixture)
from cxr_edge.bundle import BundleError, load_bundle, sha256_file
from cxr_edge.classifier import Classifier, RejectedResult, Result
from cxr_edge.ood import EMBED_CLASSES, Gate, grid_bins, pooled, thumbnail
from cxr_edge.preprocess import load_gray, load_gray_colour
from train.ood import write_gate


# -- the embedding head, with hand-made weights --------------------------------------------------------------
def _head_gate(threshold: float = 0.0, dim: int = 6) -> Gate:
    return Gate(_head_arrays(dim), {"embedding": {"classes": list(EMBED_CLASSES), "threshold": threshold}})


def test_embedding_head_reasons_and_threshold():
    gate = _head_gate()
    e = np.zeros(6, np.float32)
    ok = gate.check_embedding(np.array([5, 0, 0, 0, 9, 9], np.float32))
    assert ok.ok and ok.score == pytest.approx(np.log(3) - 5)
    for k, reason in [(1, "lateral view"), (2, "another body part"), (3, "not a radiograph")]:
        x = e.copy()
        x[k] = 5
        v = gate.check_embedding(x)
        assert not v.ok and v.reason.startswith(reason + " (") and v.score == pytest.approx(np.log(np.exp(5) + 2))
        assert _head_gate(threshold=5.02).check_embedding(x).ok  # a threshold above the score accepts
    assert not gate.check_embedding(np.full(6, np.nan)).ok  # a broken embedding is not waved through
    assert gate.check_embedding(None).ok  # a model without features: nothing to check
    with pytest.raises(ValueError, match="6-d embedding"):
        gate.check_embedding(np.zeros(5))
    # pixels-first wrapper: a colour photo never reaches the head
    assert gate.check(np.zeros((64, 64), np.uint8) + np.arange(64, dtype=np.uint8), 0.5, e).reason.startswith(
        "colour photo")


def test_density_part_refuses_what_no_class_describes():
    arrays = _head_arrays()
    components = np.zeros((2, 6))
    components[0, 4] = components[1, 5] = 1.0  # the two dimensions the head ignores
    arrays.update({"den_mean": np.zeros(6), "den_scale": np.ones(6), "den_components": components,
                   "den_var": np.array([1.0, 4.0])})
    gate = Gate(arrays, {"embedding": {"threshold": 0.0, "density_threshold": 9.0}})
    assert gate.has_density
    near = np.array([5, 0, 0, 0, 2, 2], np.float32)  # distance 4 + 1 = 5
    far = np.array([5, 0, 1, 0, 3, 2], np.float32)  # distance 9 + 1 = 10; head: frontal, then other body part
    assert gate.density(np.stack([near, far])) == pytest.approx([5.0, 10.0])
    assert gate.check_embedding(near).ok
    v = gate.check_embedding(far)
    assert not v.ok and v.reason.startswith("another body part (unlike the frontal chest X-rays"), v


# -- the layout part: the gate's vector from the feature map ------------------------------------------------
def _layout_gate(channels: int, grid: int = 3, k: int = 2, bias=(0.0, 0.0, 0.0, 0.0), threshold: float = 0.0,
                 weights=None) -> Gate:
    """A layout gate with hand-made arrays: lay_mean 0, lay_proj = the first k channels; head weights given
    (default zero: the bias decides)."""
    dim = channels + grid * grid * k
    proj = np.zeros((channels, k), np.float32)
    proj[np.arange(k), np.arange(k)] = 1.0
    arrays = {"lay_mean": np.zeros(channels, np.float32), "lay_proj": proj, "emb_mean": np.zeros(dim),
              "emb_scale": np.ones(dim), "emb_weights": np.zeros((dim, 4)) if weights is None else weights,
              "emb_bias": np.asarray(bias, np.float64)}
    return Gate(arrays, {"embedding": {"classes": list(EMBED_CLASSES), "threshold": threshold,
                                       "layout": {"grid": grid, "components": k}}})


def test_thumbnail_is_the_box_mean():
    """The gate's thumbnail (box sums by matrix products) is the plain box mean, to the last bit, at the
    model sizes; one image or a batch; a side that does not divide falls back to Pillow's box resize."""
    rng = np.random.default_rng(3)
    for s in (224, 128, 160):
        g = rng.integers(0, 256, (2, s, s), dtype=np.uint8)
        f = s // 16
        want = g.reshape(2, 16, f, 16, f).astype(np.float32).mean(axis=(2, 4))
        assert np.array_equal(thumbnail(g, 16), want)
        assert np.array_equal(thumbnail(g[1], 16), want[1])
    odd = rng.integers(0, 256, (100, 100), dtype=np.uint8)
    t = thumbnail(odd, 16)
    assert t.shape == (16, 16) and abs(float(t.mean()) - float(odd.mean())) < 2


def test_layout_vector_by_hand():
    """Global average, then each cell of the 3x3 adaptive grid (7 -> bins 0-3, 2-5, 4-7) projected."""
    assert grid_bins(7, 3) == [(0, 3), (2, 5), (4, 7)] and grid_bins(7, 2) == [(0, 4), (3, 7)]
    rng = np.random.default_rng(0)
    f = rng.normal(size=(2, 7, 7, 5)).astype(np.float32)
    gate = _layout_gate(5)
    assert gate.has_layout and gate.needs_feature_map and gate.emb_dim == 5 + 9 * 2
    v = gate.embedding_of(f)
    assert v.shape == (2, 23)
    np.testing.assert_allclose(v[:, :5], f.mean(axis=(1, 2)), rtol=1e-6)
    cell_centre = f[:, 2:5, 2:5, :2].mean(axis=(1, 2))  # cell 4 (row 1, col 1), channels 0 and 1
    np.testing.assert_allclose(v[:, 5 + 4 * 2: 5 + 5 * 2], cell_centre, rtol=1e-5)
    cell_bottom_left = f[:, 4:7, 0:3, :2].mean(axis=(1, 2))  # cell 6 (row 2, col 0)
    np.testing.assert_allclose(v[:, 5 + 6 * 2: 5 + 7 * 2], cell_bottom_left, rtol=1e-5)
    assert np.array_equal(gate.embedding_of(f[0]), v[0])  # one map -> one vector
    np.testing.assert_allclose(pooled(f, 3)[:, :5], v[:, :5])
    # check_embedding takes the vector or the map itself; the bare global average is a clear error
    assert gate.check_embedding(v[0]) == gate.check_embedding(f[0])
    with pytest.raises(ValueError, match="layout part"):
        gate.check_embedding(f[0].mean(axis=(0, 1)))
    with pytest.raises(ValueError, match="channels"):
        gate.embedding_of(np.zeros((1, 7, 7, 6)))
    # where things are decides: a head that reads the centre cell's first component
    w = np.zeros((23, 4))
    w[5 + 4 * 2, 2] = 1.0  # other_body_part logit = centre cell, channel 0
    reader = _layout_gate(5, weights=w, bias=(3.0, 0.0, 0.0, 0.0))
    bright_centre = np.zeros((7, 7, 5), np.float32)
    bright_centre[2:5, 2:5, 0] = 5.0
    v = reader.check_embedding(bright_centre)
    assert not v.ok and v.reason.startswith("another body part ("), v
    corner = np.zeros((7, 7, 5), np.float32)
    corner[0, 0, 0] = 5.0 * 9  # the same global average, elsewhere in the frame
    assert reader.check_embedding(corner).ok


def test_inconsistent_layout_is_refused():
    good = _layout_gate(5)
    arrays = {"lay_mean": good.lay_mean, "lay_proj": good.lay_proj, "emb_mean": good.emb_mean,
              "emb_scale": good.emb_scale, "emb_weights": good.emb_weights, "emb_bias": good.emb_bias}
    with pytest.raises(ValueError, match="layout"):  # grid 2 gives 5 + 4*2 inputs, the head has 23
        Gate(arrays, {"embedding": {"threshold": 0.0, "layout": {"grid": 2}}})
    with pytest.raises(ValueError, match="layout"):  # no grid at all
        Gate(arrays, {"embedding": {"threshold": 0.0}})


def _tiny_channels(bundle_dir) -> int:
    clf = Classifier(model=bundle_dir, backend="onnx", ood=False)
    return int(clf.predict_full(np.zeros((1, clf.spec.size, clf.spec.size), np.uint8))[2].shape[-1])


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_classifier_feeds_the_gate_its_feature_map(bundle_dir, tmp_path, backend):
    """The runtime's call sites: one model pass; a layout gate gets ``embedding_of(feature map)``, an older
    global-average gate (the ood.npz format before layouts) the global average; both decide."""
    c = _tiny_channels(bundle_dir)
    scans = image_files("test")
    for name, make, width in [("layout", _layout_gate, c + 9 * 2), ("gap", None, c)]:
        for bias, expect in [((5.0, 0.0, 0.0, 0.0), Result), ((0.0, 0.0, 5.0, 0.0), RejectedResult)]:
            root = tmp_path / f"{name}_{backend}_{bias[0]:g}"
            shutil.copytree(bundle_dir, root)
            if make is not None:
                g = make(c, bias=bias)
                arrays = {k: getattr(g, k) for k in ("lay_mean", "lay_proj", "emb_mean", "emb_scale", "emb_weights",
                                                     "emb_bias")}
                params = {"embedding": {"classes": list(EMBED_CLASSES), "threshold": 0.0,
                                        "layout": {"grid": 3, "components": 2}}}
            else:
                arrays = {"emb_mean": np.zeros(c), "emb_scale": np.ones(c), "emb_weights": np.zeros((c, 4)),
                          "emb_bias": np.asarray(bias)}
                params = {"embedding": {"classes": list(EMBED_CLASSES), "threshold": 0.0}}
            write_gate(root, arrays, params)
            clf = Classifier(model=root, backend=backend)
            assert clf.gate.emb_dim == width and clf.gate.has_layout == (make is not None)
            results = list(clf.classify_many(scans))
            assert [type(r) for r in results] == [expect] * len(scans), (name, bias, results)
            if expect is RejectedResult:
                assert all(r.reason.startswith("another body part (") for r in results)
            gray = np.stack([load_gray(f, clf.spec.size) for f in scans])
            _, emb, _ = clf._infer(gray)
            np.testing.assert_allclose(emb, clf.gate.embedding_of(clf.predict_full(gray)[2]), rtol=1e-6)


def test_inconsistent_head_is_refused(bundle_dir, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(bundle_dir, root)
    card_before = (root / "card.json").read_text()
    bad = _head_arrays()
    bad["emb_weights"] = bad["emb_weights"][:, :3]  # 3 columns for 4 classes
    params = {"embedding": {"classes": list(EMBED_CLASSES), "threshold": 0.0}}
    with pytest.raises(ValueError, match="embedding head"):
        write_gate(root, bad, params)
    assert (root / "card.json").read_text() == card_before and not (root / "ood.npz").exists()
    np.savez(root / "ood.npz", **bad)  # written by hand: the runtime refuses to load it
    card = json.loads(card_before)
    card["ood"] = {"path": "ood.npz", "sha256": sha256_file(root / "ood.npz"), **params}
    (root / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="unusable OOD gate"):
        Classifier(model=root, backend="onnx")




def test_old_thumbnail_gate_still_loads(bundle_dir, tmp_path):
    """An older gate, built here in a copy of the test bundle: ``ood.npz`` with the thumbnail appearance model only
    (``mean``, ``components``, ``eigvals``, ``resid_var``: a probabilistic PCA of standardized 16x16 thumbnails,
    fitted on the shipped scans; no embedding head). It loads from the bundle; its embedding check accepts anything,
    while its pixel checks still run, the appearance model included: a scan within its threshold is accepted, and
    the same gate with a threshold below the scan's score refuses it, in the runtime too."""
    from cxr_edge.ood import features, ppca_score

    size = load_bundle(bundle_dir).spec.size
    scans = image_files("train") + image_files("test")
    x, _ = features(np.stack([load_gray(f, size) for f in scans]))
    mean = x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    components, eigvals = vt[:3], sv[:3] ** 2 / (len(x) - 1)
    resid = (x - mean) - (x - mean) @ components.T @ components
    arrays = {"mean": mean, "components": components, "eigvals": eigvals, "resid_var": np.float64((resid ** 2).mean())}
    scores = ppca_score(x, mean, components, eigvals, float(arrays["resid_var"]))
    scan = image_files("test")[0]
    score = float(scores[scans.index(scan)])
    for name, threshold, accepted in [("loose", float(scores.max()) + 1.0, True), ("strict", score - 1.0, False)]:
        root = tmp_path / name
        shutil.copytree(bundle_dir, root)
        write_gate(root, arrays, {"threshold": threshold, "features": "16x16 thumbnail, probabilistic PCA"})
        bundle = load_bundle(root)
        gate = Gate.from_bundle(bundle.root, bundle.card)
        assert gate.has_appearance and not gate.has_embedding and gate.threshold == threshold
        assert gate.check_embedding(np.zeros(1280)).ok
        gray, colour = load_gray_colour(scan, size)
        v = gate.check_pixels(gray, colour)
        assert v.score == pytest.approx(score, rel=1e-6, abs=1e-6)
        if accepted:
            assert v.ok, v
        else:
            assert not v.ok and v.reason.startswith("does not look like a chest X-ray (OOD score"), v
        r = Classifier(model=root, backend="onnx").classify(scan)
        assert isinstance(r, Result if accepted else RejectedResult), (name, r)
