"""The input gate (``cxr_edge/ood.py``, ``train/ood.py``, ``benchmarks/ood.py``): what is not a frontal chest
X-ray gets no label, and says what it is.

- The embedding head is checked with hand-made weights (every reason, the threshold, broken input) and, end to
  end, fitted here by ``python -m train.ood`` (``main``) on the shipped default bundle's embeddings, a tiny
  Kaggle-layout folder made of the shipped Kermany scans and a tiny gate_dev made of the shipped other
  radiographs (``tests/data/gate``); one frontal and one other radiograph are held out of the fit and judged.
- The official-test hygiene: the fit reads only the train/ folder (its test/ folder here is garbage) and its
  threshold is the one the validation split gives.
- The runtime's pixel checks and the CLI/``Classifier`` record schema use the tiny test bundle with a
  pixel-only gate. Needs no ``../shared/data``.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from _runtime_fixtures import bundle_dir, image_files  # noqa: F401  (fixture)
from cxr_edge.bundle import DEFAULT_BUNDLE, BundleError, load_bundle, sha256_file
from cxr_edge.classifier import Classifier, RejectedResult, Result
from cxr_edge.cli import cli
from cxr_edge.labels import CLASS_NAMES
from cxr_edge.ood import EMBED_CLASSES, Gate, embedder, feature_maps, grid_bins, pooled, thumbnail
from cxr_edge.preprocess import load_gray, load_gray_colour
from train import ood as fit
from train.ood import _document, _photo_like, _screenshot, choose_threshold, write_gate

GATE_DATA = Path(__file__).resolve().parent / "data" / "gate"
FRONTAL = sorted((GATE_DATA / "frontal_chest_other").glob("*.jpg"))
OTHER = sorted((GATE_DATA / "non_chest_radiograph").glob("*.jpg"))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- the embedding head, with hand-made weights --------------------------------------------------------------
def _head_arrays(dim: int = 6) -> dict:
    """logits = e[:4] (identity weights on the first four dimensions)."""
    w = np.zeros((dim, 4))
    w[np.arange(4), np.arange(4)] = 1.0
    return {"emb_mean": np.zeros(dim), "emb_scale": np.ones(dim), "emb_weights": w, "emb_bias": np.zeros(4)}


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


def test_old_thumbnail_gate_still_loads():
    """The current default bundle's gate (if it is the older thumbnail model) loads; it has no embedding part,
    so check_embedding accepts anything, while its pixel checks still run."""
    bundle = load_bundle(None)
    gate = Gate.from_bundle(bundle.root, bundle.card)
    if gate is None or gate.has_embedding:
        pytest.skip("the default bundle's gate is not the older thumbnail model")
    assert gate.has_appearance and gate.check_embedding(np.zeros(1280)).ok
    gray, colour = load_gray_colour(image_files("test")[0], bundle.spec.size)
    assert gate.check_pixels(gray, colour).ok


# -- pixel checks and the record schema (tiny bundle, pixel-only gate) ---------------------------------------
@pytest.fixture(scope="module")
def gated_bundle(bundle_dir, tmp_path_factory) -> Path:
    """A copy of the runtime test bundle with a pixel-only gate (colour photo, blank image)."""
    root = tmp_path_factory.mktemp("gated") / "bundle"
    shutil.copytree(bundle_dir, root)
    write_gate(root, {}, {"max_colour_fraction": 0.02, "min_std": 2.0, "features": "pixel checks only"})
    return root


@pytest.fixture(scope="module")
def non_cxr(tmp_path_factory) -> dict[str, Path]:
    """A document page (gray PNG), a screenshot (JPEG), a colour photo-like image (JPEG), a blank page."""
    folder = tmp_path_factory.mktemp("non_cxr")
    rng = np.random.default_rng(0)
    out = {"document": folder / "document.png", "screenshot": folder / "screenshot.jpg",
           "photo": folder / "photo.jpg", "blank": folder / "blank.png"}
    _document(rng).save(out["document"])
    _screenshot(rng, dark=True, colourful=False).save(out["screenshot"], quality=90)
    _photo_like(rng, colour=True).save(out["photo"], quality=90)
    Image.new("L", (300, 300), 240).save(out["blank"])
    return out


def test_load_gray_colour_gives_load_gray_pixels(tmp_path):
    rgb = image_files("train")[0]  # any scan; also saved here as an RGB JPEG and an RGB PNG
    with Image.open(rgb) as im:
        im.convert("RGB").save(tmp_path / "rgb.jpg", quality=92)
        im.convert("RGB").save(tmp_path / "rgb.png")
    for f in [*image_files("train"), *image_files("test"), tmp_path / "rgb.jpg", tmp_path / "rgb.png"]:
        gray, colour = load_gray_colour(f, 224)
        assert np.array_equal(gray, load_gray(f, 224)), f
        assert colour < 0.005, (f, colour)  # gray content in an RGB file is not colour


def test_pixel_checks(gated_bundle, non_cxr):
    bundle = load_bundle(gated_bundle)
    gate = Gate.from_bundle(bundle.root, bundle.card)
    assert not gate.has_embedding and not gate.has_appearance
    for f in [*image_files("test"), *FRONTAL, *OTHER, non_cxr["document"]]:  # gray, with contrast: for later
        assert gate.check_source(f, 224).ok, f
    photo = gate.check_source(non_cxr["photo"], 224)
    assert not photo.ok and photo.reason.startswith("colour photo (")
    blank = gate.check_source(non_cxr["blank"], 224)
    assert not blank.ok and blank.reason.startswith("blank image (")


def test_classifier_api(gated_bundle, non_cxr):
    clf = Classifier(model=gated_bundle, backend="onnx")
    scan = image_files("test")[0]
    files = [scan, non_cxr["blank"], non_cxr["photo"], image_files("test")[1]]
    results = list(clf.classify_many(files))
    assert [type(r) for r in results] == [Result, RejectedResult, RejectedResult, Result]
    assert [r.path for r in results] == [str(f) for f in files]
    assert results[0].to_dict()["status"] == "ok"
    one = clf.classify(non_cxr["photo"])
    assert isinstance(one, RejectedResult) and not one.ok and one.label is None
    assert one.error.startswith("rejected: colour photo")
    bypass = Classifier(model=gated_bundle, backend="onnx", ood=False)
    assert bypass.gate is None and isinstance(bypass.classify(non_cxr["photo"]), Result)
    assert "status" not in bypass.classify(scan).to_dict()


def test_cli_json_table_and_csv(gated_bundle, non_cxr, tmp_path):
    card = json.loads((gated_bundle / "card.json").read_text())
    scans = image_files("test")
    refused = [non_cxr["photo"], non_cxr["blank"]]
    result = run("classify", *scans, *refused, "--json", "--model", gated_bundle)
    assert result.exit_code == 0, result.output  # rejections are answers, not failures
    rows = jsonl(result.stdout)
    assert len(rows) == len(scans) + len(refused)
    for row in rows[:len(scans)]:
        assert row["status"] == "ok" and row["label"] in CLASS_NAMES and set(row["probabilities"]) == set(CLASS_NAMES)
    for row in rows[len(scans):]:
        assert set(row) == {"path", "status", "reason", "model"}
        assert row["status"] == "rejected" and row["reason"]
        assert row["model"] == {"name": card["name"], "version": card["version"],
                                "sha256": card["files"]["tflite"]["sha256"]}
    assert "2 rejected" in result.stderr and "error" not in result.stderr

    out = tmp_path / "out.csv"
    assert run("classify", scans[0], non_cxr["photo"], "--csv", out, "--model", gated_bundle).exit_code == 0
    csv_rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in csv_rows] == ["ok", "rejected"]
    assert csv_rows[1]["label"] == "" and csv_rows[1]["reason"].startswith("colour photo")


def test_cli_no_ood_bypasses(gated_bundle, non_cxr):
    result = run("classify", *non_cxr.values(), "--json", "--no-ood", "--model", gated_bundle)
    assert result.exit_code == 0, result.output
    rows = jsonl(result.stdout)
    assert len(rows) == len(non_cxr) and all(r["label"] in CLASS_NAMES and "status" not in r for r in rows)
    assert result.stderr == ""


def test_gate_sha256_mismatch_is_refused(gated_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(gated_bundle, bad)
    np.savez(bad / "ood.npz", **_head_arrays())  # a replaced gate: valid npz, other numbers
    with pytest.raises(BundleError, match="sha256"):
        Classifier(model=bad, backend="onnx")
    result = run("classify", image_files("test")[0], "--model", bad)
    assert result.exit_code == 2 and "sha256" in result.stderr and "ood.npz" in result.stderr
    info = run("info", "--model", bad)
    assert info.exit_code == 0 and "SHA256 MISMATCH" in info.stdout
    # --no-ood does not read the gate at all
    assert run("classify", image_files("test")[0], "--no-ood", "--model", bad).exit_code == 0
    (bad / "ood.npz").unlink()
    missing = run("classify", image_files("test")[0], "--model", bad)
    assert missing.exit_code == 2 and "missing" in missing.stderr


def test_bad_files_are_errors_not_rejections(gated_bundle, tmp_path):
    good = image_files("test")[0].read_bytes()
    (tmp_path / "truncated.jpeg").write_bytes(good[: len(good) // 4])
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(2000))
    rgb = tmp_path / "rgb_truncated.jpg"
    Image.new("RGB", (300, 300), (200, 30, 30)).save(rgb, quality=90)
    rgb.write_bytes(rgb.read_bytes()[:200])
    clf = Classifier(model=gated_bundle, backend="onnx")
    results = list(clf.classify_many(sorted(tmp_path.iterdir())))
    assert [r.status for r in results] == ["error"] * 3 and all(r.error for r in results)


# -- python -m train.ood end to end, on the shipped default bundle's embeddings -------------------------------
def _kaggle_folder(root: Path) -> Path:
    """train/ from the shipped Kermany scans (each scan four times: as it is, mirrored, cropped, brighter; named as
    other patients: the grouped split needs 7 per class), and a test/ folder of garbage named like scans: the
    fit must never read it."""
    n = {"NORMAL": 0, "bacteria": 0, "virus": 0}
    for f in image_files("train"):
        kind = "NORMAL" if "NORMAL" in f.parts else "bacteria" if "bacteria" in f.name else "virus"
        folder = root / "train" / ("NORMAL" if kind == "NORMAL" else "PNEUMONIA")
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            img = im.convert("L")
        w, h = img.size
        for copy in (img, ImageOps.mirror(img), img.crop((w // 10, h // 10, w - w // 10, h - h // 10)),
                     img.point(lambda v: min(255, int(v * 1.15)))):
            n[kind] += 1
            name = f"IM-{n[kind]:04d}-0001.jpeg" if kind == "NORMAL" else f"person{n[kind]}_{kind}_1.jpeg"
            copy.save(folder / name, quality=95)
    for folder in ("NORMAL", "PNEUMONIA"):
        (root / "test" / folder).mkdir(parents=True)
        (root / "test" / folder / ("IM-9999-0001.jpeg" if folder == "NORMAL" else "person999_virus_1.jpeg")
         ).write_bytes(b"not an image: the official test split is never read by the fit")
    return root


HELD_OUT = {"frontal_chest_other": FRONTAL[-1], "non_chest_radiograph": OTHER[0]}


def _gate_dev(root: Path) -> Path:
    """A gate_dev folder (with MANIFEST.csv) of the shipped other radiographs, minus ``HELD_OUT``."""
    rows = []
    for category, files in (("frontal_chest_other", FRONTAL), ("non_chest_radiograph", OTHER)):
        (root / category).mkdir(parents=True)
        for f in files:
            if f != HELD_OUT[category]:
                shutil.copy(f, root / category / f.name)
                rows.append({"category": category, "file": f"{category}/{f.name}"})
    with (root / "MANIFEST.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["category", "file"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    if not (DEFAULT_BUNDLE / "card.json").is_file():
        pytest.skip("no default bundle installed")
    tmp = tmp_path_factory.mktemp("fit")
    bundle = tmp / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    before = json.loads((bundle / "card.json").read_text())
    data = _kaggle_folder(tmp / "chest_xray")
    fit.main([str(bundle), "--data", str(data), "--gate-dev", str(_gate_dev(tmp / "gate_dev")),
              "--variants", "3", "--n-synth", "4", "--folds", "2", "--threads", "2",
              "--density-components", "0",  # a density of a handful of scans is noise: the head only
              "--grid-components", "8",  # the layout part, small for a handful of scans
              "--stretched", "0",  # long films of a handful of train scans (copies of six) are noise too
              "--clinical-variants", "1", "--adult-variants", "1",  # few variants: a test's time
              "--adult-dev", str(tmp / "no-adult-dev")])  # the shipped adult frontals stand for adult_dev
    return bundle, before, data


def test_fit_writes_a_gate_and_keeps_the_card(fitted):
    bundle, before, _ = fitted
    card = json.loads((bundle / "card.json").read_text())
    assert {k: v for k, v in card.items() if k != "ood"} == {k: v for k, v in before.items() if k != "ood"}
    ood = card["ood"]
    emb = ood["embedding"]
    assert ood["path"] == "ood.npz" and emb["classes"] == list(EMBED_CLASSES) and emb["dim"] > 0
    assert (bundle / "ood.npz").stat().st_size == ood["bytes"]
    assert set(ood["fitted_on"]["gate_dev_cv"]["by_category"]) == {"frontal_chest_other", "non_chest_radiograph"}
    gate = Gate.from_bundle(bundle, card)  # sha256-checked
    assert gate.has_embedding and not gate.has_appearance and gate.emb_dim == emb["dim"]
    assert gate.has_layout and emb["layout"]["grid"] == fit.DEFAULT_GRID  # the default fit reads the layout
    assert gate.emb_dim == gate.feature_channels + fit.DEFAULT_GRID ** 2 * emb["layout"]["components"]
    assert ood["fitted_on"]["stretched_per_gate_dev"] == fit.DEFAULT_STRETCHED_DEV  # "--stretched 0" above


def test_fit_threshold_comes_from_validation_only(fitted):
    """Issue 14: the threshold is what the grouped validation split's scores give (the test/ folder is garbage,
    so reading it would have failed the fit)."""
    from train.data import load_images, protocol_splits

    bundle, _, data = fitted
    card = json.loads((bundle / "card.json").read_text())
    gate = Gate.from_bundle(bundle, card)
    b = load_bundle(bundle)
    val = protocol_splits(data, "grouped")["val"]
    assert val and all("/train/" in r.path for r in val)
    embed = embedder(b, threads=2, gate=gate)  # the gate's own vectors (layout part included)
    scores, _ = gate.embedding_scores(fit.embed_images(embed, load_images(val, b.spec.size)))
    expected = choose_threshold(scores, card["ood"]["embedding"].get("max_val_reject", fit.DEFAULT_MAX_VAL_REJECT))
    assert card["ood"]["embedding"]["threshold"] == pytest.approx(expected, abs=1e-5)
    emb = card["ood"]["embedding"]
    if gate.has_density:  # the density threshold too: the same quantile of the validation scans' distances
        embed_val = fit.embed_images(embedder(b, threads=2, gate=gate), load_images(val, b.spec.size))
        q = np.quantile(gate.density(embed_val), 1 - emb["max_val_reject"])
        assert emb["density_threshold"] == pytest.approx(q, rel=1e-4)
    assert card["ood"]["embedding"]["val_images"] == len(val)


def test_fit_gate_with_and_without_layout():
    """``fit_gate`` on pooled rows: ``grid=0`` gives the older global-average gate (no lay_* arrays, D = C);
    a grid gives the layout arrays, fitted on frontal rows only, and a gate whose vectors come from them."""
    rng = np.random.default_rng(0)
    c, g = 6, 2
    n = 160
    y = np.repeat(np.arange(4), n // 4)
    gap = rng.normal(size=(n, c)) + y[:, None]
    cells = rng.normal(size=(n, g * g, c))
    cells[y == 2, 0, :] += 4.0  # "another body part": something in the top-left cell
    val = np.concatenate([gap[y == 0][:20], cells[y == 0][:20].reshape(20, -1)], 1)
    rows = np.concatenate([gap, cells.reshape(n, -1)], 1)
    arrays0, params0 = fit.fit_gate(fit.GateData(gap, y, np.full(n, -1)), gap[y == 0][:20], 1.0, 0.05, 0, 0)
    assert "lay_proj" not in arrays0 and "layout" not in params0 and params0["dim"] == c
    arrays, params = fit.fit_gate(fit.GateData(rows, y, np.full(n, -1)), val, 1.0, 0.05, 0, 0, grid=g,
                                  grid_components=3, channels=c)
    assert arrays["lay_proj"].shape == (c, 3) and params["layout"]["grid"] == g and params["dim"] == c + g * g * 3
    np.testing.assert_allclose(arrays["lay_mean"], cells[y == 0].reshape(-1, c).mean(axis=0), rtol=1e-4, atol=1e-5)
    gate = Gate(arrays, {"embedding": params})
    vec = fit.gate_vectors(arrays, rows, g)
    assert vec.shape == (n, params["dim"])
    maps = np.zeros((1, 4, 4, c), np.float32)  # a 4x4 map whose 2x2 cells are the rows' cells
    for k, (r, q) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        maps[0, r:r + 2, q:q + 2] = cells[0, k]
    np.testing.assert_allclose(gate.embedding_of(maps)[0, c:], vec[0, c:], rtol=1e-4, atol=1e-5)



def test_choose_threshold_follows_validation():
    val = np.array([-5.0, -4.0, 1.0, 2.0])  # two validation scans would be refused at 0
    assert choose_threshold(val, 0.25) == pytest.approx(np.quantile(val, 0.75))
    assert choose_threshold(val - 3, 0.25) == 0.0  # at most 25% refused at 0 already: the head boundary
    assert choose_threshold(val, 0.0) == 2.0  # none may be refused


def test_fitted_gate_on_held_out_images(fitted, non_cxr):
    """The fitted gate (the shipped model's embedding) accepts the held-out adult frontal X-ray and the official
    test scans, refuses the other radiographs it was fitted on as another body part, and a held-out document
    page as not a radiograph.

    Not asserted any more: that this fit, from three other radiographs (knee, pelvis, wrist) and their
    variants, refuses a held-out fourth (a hand PA). With the 224 px model's 7x7 map it did (and so for each of
    the four held out in turn); with the shipped 144 px model's finer map it does not (1 of 4 held out in turn
    refused, measured 2026-11-27). How the shipped gate, fitted on all of gate_dev, treats body parts it has not
    seen is measured by gate_dev's cross-validation grouped by body part (``python -m benchmarks``,
    ``train.ood``'s card entry), not by a fit on three images."""
    bundle, _, _ = fitted
    b = load_bundle(bundle)
    gate = Gate.from_bundle(b.root, b.card)
    embed = embedder(b, threads=2, gate=gate)
    for f in [HELD_OUT["frontal_chest_other"], *image_files("test")]:  # an adult's film: a chest film all the same
        v = gate.check_source(f, b.spec.size, embed, allow_adults=True)
        assert v.ok, (f.name, v)
    for f in OTHER:
        if f != HELD_OUT["non_chest_radiograph"]:
            v = gate.check_source(f, b.spec.size, embed)
            assert not v.ok and v.reason.startswith("another body part ("), (f.name, v)
    v = gate.check_source(non_cxr["document"], b.spec.size, embed)
    assert not v.ok and v.reason.startswith("not a radiograph ("), v


def test_shipped_default_gate_on_shipped_examples():
    """Once the default bundle ships an embedding gate: the shipped examples per category."""
    b = load_bundle(None)
    gate = Gate.from_bundle(b.root, b.card)
    if gate is None or not gate.has_embedding:
        pytest.skip("the default bundle's gate has no embedding head yet")
    embed = embedder(b, threads=2, gate=gate)
    for f in image_files("test"):
        assert gate.check_source(f, b.spec.size, embed).ok, f
    for f in FRONTAL:  # adults' frontal films: refused as adult, classified with a warning under allow_adults
        v = gate.check_source(f, b.spec.size, embed)
        assert not v.ok and v.reason.startswith("adult chest X-ray"), (f.name, v)
        v = gate.check_source(f, b.spec.size, embed, allow_adults=True)
        assert v.ok and v.warning.startswith("adult chest X-ray"), (f.name, v)
    for f in OTHER:
        v = gate.check_source(f, b.spec.size, embed)
        assert not v.ok and v.reason.startswith("another body part"), (f.name, v)
    # the same through the runtime (Classifier: one pass, the gate's vector from the feature map)
    results = list(Classifier(threads=2, allow_adults=True).classify_many([*FRONTAL, *OTHER]))
    assert [r.status for r in results] == ["ok"] * len(FRONTAL) + ["rejected"] * len(OTHER), results
    assert all(r.reason.startswith("another body part") for r in results[len(FRONTAL):])


def test_shipped_default_gate_refuses_a_long_film():
    """A whole-spine-like long film made from a shipped adult frontal chest X-ray (its central strip, 3.5x
    narrower than tall, squashed back to the square input) is refused; the scan itself is not."""
    from cxr_edge.preprocess import load_gray as lg

    b = load_bundle(None)
    gate = Gate.from_bundle(b.root, b.card)
    if gate is None or not gate.has_layout:
        pytest.skip("the default bundle's gate has no layout part")
    embed = embedder(b, threads=2, gate=gate)
    with Image.open(FRONTAL[0]) as im:
        img = im.convert("L")
    w, h = img.size
    strip = img.crop((w // 2 - int(w / 7), 0, w // 2 + int(w / 7), h))
    gray = np.stack([lg(img, b.spec.size), lg(strip, b.spec.size)])
    verdicts = gate.embedding_verdicts(embed(gray), allow_adults=True)  # the scan: an adult's, a chest film
    assert verdicts[0].ok and not verdicts[1].ok, verdicts


def _portable_film(path) -> Image.Image:
    """A scan as a portable AP film reaches a clinic's gate (like gate_dev's CheXpert miss, drawn here by hand, not
    with ``train.ood.clinical``): a landscape film whose collimated field is brighter than the darkened body around
    it, edge-enhanced, with "AP PORT SEMI-ERECT" burned in and a boxed lead "L" marker."""
    from PIL import ImageDraw, ImageFilter, ImageFont

    with Image.open(path) as im:
        img = im.convert("L")
    w, h = img.size
    a = np.asarray(img.resize((int(w * 0.8), int(h * 0.8))), np.float32)
    hh, ww = a.shape
    pad, top = int(ww * 0.15), int(hh * 0.1)
    canvas = np.pad(a, ((top, 0), (pad, pad)), mode="reflect") * 0.35
    canvas[top + int(0.03 * hh):, pad:pad + ww] = np.clip(a[int(0.03 * hh):] * 1.1 + 20, 0, 255)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "L").filter(ImageFilter.UnsharpMask(3, 250, 0))
    d = ImageDraw.Draw(img)
    big = img.size[1]
    d.text((pad + 4, int(0.16 * big)), "AP PORT SEMI-ERECT", fill=255, font=ImageFont.load_default(size=max(8, big // 22)))
    d.rectangle([pad + ww - 30, int(0.14 * big), pad + ww - 8, int(0.14 * big) + 22], fill=230)
    d.text((pad + ww - 24, int(0.14 * big) + 2), "L", fill=40, font=ImageFont.load_default(size=18))
    return img


def test_shipped_default_gate_accepts_portable_films_with_frames_and_text():
    """Collimation, landscape framing, edge enhancement and burned-in text do not make a frontal chest X-ray
    something else: the shipped train-like scans and adult frontal examples as portable films are accepted, the
    train-like ones with a clear margin (head score below the 0.99 quantile of the validation scans' scores, in
    the card: -4.9 for the 224 px model's gate, which gave -2.9 for one of them when fitted without
    ``train.ood.clinical`` variants; -4.0 for the first 144 px model's, -4.7 for the squash-blind one's, whose
    gate, fitted with one clinical variant per scan instead of two, gave -1.6 for one and refused a shipped adult
    frontal film), while the shipped other radiographs dressed up the same way are still refused."""
    b = load_bundle(None)
    gate = Gate.from_bundle(b.root, b.card)
    if gate is None or not gate.has_layout:
        pytest.skip("the default bundle's gate has no layout part")
    embed = embedder(b, threads=2, gate=gate)
    train = image_files("train")
    for f in [*train, *FRONTAL]:  # the adults' films with allow_adults: the frame must not make them anything else
        v = gate.check_source(_portable_film(f), b.spec.size, embed, allow_adults=True)
        assert v.ok and (f in FRONTAL or not v.warning), (f.name, v)
        assert f not in train or v.score < gate.params["embedding"]["val_score_quantiles"]["0.99"], (f.name, v)
    for f in OTHER:
        v = gate.check_source(_portable_film(f), b.spec.size, embed)
        assert not v.ok and v.reason.startswith("another body part"), (f.name, v)


def test_clinical_variants_are_seeded_frontal_films():
    """``train.ood.clinical``: one seeded variant per scan, same shape and dtype, every scan changed; and a fit
    keeps such rows out of the layout basis and the density model (``GateData.basis``)."""
    gray = np.stack([load_gray(f, 224) for f in image_files("train")])
    a, b2 = fit.clinical(gray, 3), fit.clinical(gray, 3)
    assert a.shape == gray.shape and a.dtype == np.uint8 and np.array_equal(a, b2)
    assert not np.array_equal(a, fit.clinical(gray, 4))
    assert all((x != g).any() for x, g in zip(a, gray))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 2 + 9 * 2)).astype(np.float32)
    y = np.repeat([0, 2], 20)
    plain = fit.fit_gate(fit.GateData(x[:30], y[:30], np.full(30, -1)), x[:5], 1.0, grid=3, channels=2,
                         grid_components=2, density_components=2)[0]
    x2 = np.concatenate([x[:30], 50 + x[:10]])
    y2 = np.concatenate([y[:30], np.zeros(10, int)])
    basis = np.concatenate([np.ones(30, bool), np.zeros(10, bool)])
    mixed = fit.fit_gate(fit.GateData(x2, y2, np.full(40, -1), basis), x[:5], 1.0, grid=3, channels=2,
                         grid_components=2, density_components=2)[0]
    for k in ("lay_mean", "lay_proj", "den_mean", "den_var"):  # the far-off rows changed neither
        np.testing.assert_allclose(mixed[k], plain[k], rtol=1e-6, atol=1e-6)


# -- the benchmark's non-radiograph set ---------------------------------------------------------------------
def test_benchmark_fails_loudly_without_scikit_image(tmp_path, monkeypatch):
    """Issue 14: without scikit-image the non-CXR set must not silently shrink."""
    from benchmarks import ood as bench

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(RuntimeError, match=r"scikit-image.*cxr-edge\[bench\]"):
        bench.make_non_cxr(tmp_path / "x")


def test_benchmark_non_cxr_set_is_complete(tmp_path):
    pytest.importorskip("skimage")
    from benchmarks import ood as bench

    items = bench.make_non_cxr(tmp_path / "x")
    kinds = [k for _, k in items]
    assert kinds.count("skimage") == len(bench.SKIMAGE_FILES)
    assert {"document", "screenshot", "photo_like", "solid", "texture"} <= set(kinds)
    assert all(p.is_file() for p, _ in items)


GATE_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "gate_dev"


@pytest.mark.skipif(not (GATE_DEV / "lateral_chest").is_dir(), reason="../shared/data/gate_dev is absent")
def test_shipped_gate_on_the_gate_dev_views():
    """The shipped gate as a user runs it, on the development images no license lets us ship (CheXpert
    laterals): every lateral view is refused as a lateral view and every adult frontal film accepted. These
    images were in the gate's fit, so this checks the shipped artifact end to end, not generalisation (the
    benchmark's cross-validation measures that)."""
    clf = Classifier(allow_adults=True)  # adults' frontal films: classified, with a warning
    laterals = sorted((GATE_DEV / "lateral_chest").iterdir())
    frontals = sorted((GATE_DEV / "frontal_chest_other").iterdir())
    results = list(clf.classify_many(laterals + frontals))
    for path, r in zip(laterals, results[:len(laterals)]):
        assert isinstance(r, RejectedResult) and r.reason.startswith("lateral view"), (path.name, r)
    for path, r in zip(frontals, results[len(laterals):]):
        assert isinstance(r, Result) and r.label in CLASS_NAMES, (path.name, r)


def test_shipped_gate_refuses_negatives_as_inverted_images():
    """A scan's negative (a MONOCHROME1 image exported without its inversion) is refused by the polarity
    check, which the head alone let through; the scans themselves are accepted. The check is asked only after
    the head, so what the head refuses keeps its reason."""
    clf = Classifier()
    assert clf.gate.has_polarity
    scans = image_files("train") + image_files("test")
    negatives = []
    for f in scans:
        with Image.open(f) as im:
            buf = io.BytesIO()
            ImageOps.invert(im.convert("L")).save(buf, "PNG")
            negatives.append(buf.getvalue())
    assert all(isinstance(r, Result) for r in clf.classify_many(scans))
    refused = [clf.classify(b) for b in negatives]
    assert all(isinstance(r, RejectedResult) for r in refused), refused
    # Most with that reason; the head refuses a few first, with its own. Measured on 150 validation scans'
    # negatives (2026-11-27): 142 as inverted with the 144 px model's gate, 143 with the 224 px one's; here
    # 7 of these 9 with the former, at least 8 with the latter.
    assert sum(r.reason.startswith("inverted image (") for r in refused) >= len(refused) - 2, refused
    gray = np.stack([load_gray(f, clf.spec.size) for f in scans])
    assert np.all(clf.gate.polarity_scores(gray) <= clf.gate.pol_threshold)
    assert np.all(clf.gate.polarity_scores(255 - gray) > clf.gate.pol_threshold)


def test_shipped_polarity_check_passes_clinic_style_films():
    """Collimation frames, letterboxing, edge enhancement and burned-in text (``train.ood.clinical``, seeds the
    fit did not use) do not make a film a negative to the polarity check, and the negatives of such films are
    still refused. (Fitted without clinical variants, it refused 22 of 300 validation scans dressed so.)"""
    clf = Classifier()
    gate = clf.gate
    assert gate.has_polarity
    gray = np.stack([load_gray(f, clf.spec.size) for f in image_files("train") + image_files("test") + FRONTAL])
    dressed = np.concatenate([fit.clinical(gray, seed) for seed in (500, 501, 502)])
    scores = gate.polarity_scores(dressed)
    assert np.all(scores <= gate.pol_threshold), np.flatnonzero(scores > gate.pol_threshold)
    assert np.all(gate.polarity_scores(255 - dressed) > gate.pol_threshold)
