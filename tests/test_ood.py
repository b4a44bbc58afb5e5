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
from cxr_edge.ood import EMBED_CLASSES, Gate, embedder
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
              "--density-components", "0"])  # a density of a handful of scans is noise: the head only
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
    scores, _ = gate.embedding_scores(fit.embed_images(embedder(b, threads=2), load_images(val, b.spec.size)))
    expected = choose_threshold(scores, card["ood"]["embedding"].get("max_val_reject", fit.DEFAULT_MAX_VAL_REJECT))
    assert card["ood"]["embedding"]["threshold"] == pytest.approx(expected, abs=1e-5)
    emb = card["ood"]["embedding"]
    if gate.has_density:  # the density threshold too: the same quantile of the validation scans' distances
        embed_val = fit.embed_images(embedder(b, threads=2), load_images(val, b.spec.size))
        q = np.quantile(gate.density(embed_val), 1 - emb["max_val_reject"])
        assert emb["density_threshold"] == pytest.approx(q, rel=1e-4)
    assert card["ood"]["embedding"]["val_images"] == len(val)


def test_choose_threshold_follows_validation():
    val = np.array([-5.0, -4.0, 1.0, 2.0])  # two validation scans would be refused at 0
    assert choose_threshold(val, 0.25) == pytest.approx(np.quantile(val, 0.75))
    assert choose_threshold(val - 3, 0.25) == 0.0  # at most 25% refused at 0 already: the head boundary
    assert choose_threshold(val, 0.0) == 2.0  # none may be refused


def test_fitted_gate_on_held_out_images(fitted, non_cxr):
    """The fitted gate (the shipped model's embedding) accepts the held-out adult frontal X-ray and the official
    test scans, and refuses the held-out other radiograph as another body part and a document page as not a
    radiograph."""
    bundle, _, _ = fitted
    b = load_bundle(bundle)
    gate = Gate.from_bundle(b.root, b.card)
    embed = embedder(b, threads=2)
    for f in [HELD_OUT["frontal_chest_other"], *image_files("test")]:
        v = gate.check_source(f, b.spec.size, embed)
        assert v.ok, (f.name, v)
    v = gate.check_source(HELD_OUT["non_chest_radiograph"], b.spec.size, embed)
    assert not v.ok and v.reason.startswith("another body part ("), v
    v = gate.check_source(non_cxr["document"], b.spec.size, embed)
    assert not v.ok and v.reason.startswith("not a radiograph ("), v


def test_shipped_default_gate_on_shipped_examples():
    """Once the default bundle ships an embedding gate: the shipped examples per category."""
    b = load_bundle(None)
    gate = Gate.from_bundle(b.root, b.card)
    if gate is None or not gate.has_embedding:
        pytest.skip("the default bundle's gate has no embedding head yet")
    embed = embedder(b, threads=2)
    for f in [*FRONTAL, *image_files("test")]:
        assert gate.check_source(f, b.spec.size, embed).ok, f
    for f in OTHER:
        v = gate.check_source(f, b.spec.size, embed)
        assert not v.ok and v.reason.startswith("another body part"), (f.name, v)


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
