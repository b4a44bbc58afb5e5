"""The input gate's pixel checks and the record schema (CLI, ``Classifier``) on the tiny test bundle with a pixel-only
gate: colour photos and blank pages refused with their reason, broken files errors, a replaced gate refused by its
sha256. Needs no ``../shared/data``."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _ood_common import FRONTAL, OTHER, _head_arrays, jsonl, non_cxr, run  # noqa: F401  (fixture)
from _runtime_fixtures import bundle_dir, image_files  # noqa: F401  (fixture)
from cxr_edge.bundle import BundleError, load_bundle
from cxr_edge.classifier import Classifier, RejectedResult, Result
from cxr_edge.labels import CLASS_NAMES
from cxr_edge.ood import Gate
from cxr_edge.preprocess import load_gray, load_gray_colour
from train.ood import write_gate


# -- pixel checks and the record schema (tiny bundle, pixel-only gate) ---------------------------------------
@pytest.fixture(scope="module")
def gated_bundle(bundle_dir, tmp_path_factory) -> Path:
    """A copy of the runtime test bundle with a pixel-only gate (colour photo, blank image)."""
    root = tmp_path_factory.mktemp("gated") / "bundle"
    shutil.copytree(bundle_dir, root)
    write_gate(root, {}, {"max_colour_fraction": 0.02, "min_std": 2.0, "features": "pixel checks only"})
    return root



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


