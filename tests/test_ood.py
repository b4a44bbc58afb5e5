"""The out-of-distribution gate (``cxr_edge/ood.py``, ``train/ood.py``): non-CXR inputs get no label.

The gate is fitted here, in the test, on the six training scans in ``tests/data/chest_xray/train`` plus
seeded geometric/photometric variants of them (a few dozen), with the threshold set on other variants of the
same scans; the three test scans are never used for fitting. Needs no ``../shared/data``."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance

from _runtime_fixtures import bundle_dir, image_files  # noqa: F401  (fixture)
from benchmarks.ood import _document, _photo_like, _screenshot
from cxr_edge.bundle import BundleError, load_bundle
from cxr_edge.classifier import Classifier, RejectedResult, Result
from cxr_edge.cli import cli
from cxr_edge.labels import CLASS_NAMES
from cxr_edge.ood import Gate
from cxr_edge.preprocess import load_gray, load_gray_colour
from train.ood import augment, fit_gate, write_gate


def _variants(gray: np.ndarray, seed: int, n: int) -> np.ndarray:
    """``n`` rounds of seeded variants: geometric (``train.ood.augment``) then brightness/contrast."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n):
        for g in augment(gray, seed * 100 + r):
            img = Image.fromarray(g)
            img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.85, 1.15)))
            out.append(np.asarray(ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.85, 1.15)))))
    return np.stack(out)


@pytest.fixture(scope="module")
def gated_bundle(bundle_dir, tmp_path_factory) -> Path:
    """A copy of the runtime test bundle with a gate fitted on the training scans (+ variants)."""
    root = tmp_path_factory.mktemp("gated") / "bundle"
    shutil.copytree(bundle_dir, root)
    size = load_bundle(root).spec.size
    base = np.stack([load_gray(f, size) for f in image_files("train")])
    train = np.concatenate([base, _variants(base, 1, 6)])
    val = _variants(base, 2, 4)
    arrays, params = fit_gate(train, val, quantile=1.0)
    write_gate(root, arrays, params)
    return root


@pytest.fixture(scope="module")
def non_cxr(tmp_path_factory) -> dict[str, Path]:
    """A document page (gray PNG), a screenshot (JPEG), a colour photo-like image (JPEG), a solid colour."""
    folder = tmp_path_factory.mktemp("non_cxr")
    rng = np.random.default_rng(0)
    out = {"document": folder / "document.png", "screenshot": folder / "screenshot.jpg",
           "photo": folder / "photo.jpg", "blank": folder / "blank.png"}
    _document(rng).save(out["document"])
    _screenshot(rng, dark=True, colourful=False).save(out["screenshot"], quality=90)
    _photo_like(rng, colour=True).save(out["photo"], quality=90)
    Image.new("L", (300, 300), 240).save(out["blank"])
    return out


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_card_entry_and_other_fields_kept(bundle_dir, gated_bundle):
    before = json.loads((bundle_dir / "card.json").read_text())
    card = json.loads((gated_bundle / "card.json").read_text())
    assert {k: v for k, v in card.items() if k != "ood"} == before
    ood = card["ood"]
    assert ood["path"] == "ood.npz" and len(ood["sha256"]) == 64 and ood["threshold"] > 0
    assert (gated_bundle / "ood.npz").stat().st_size == ood["bytes"] < 100_000
    assert "thumbnail" in ood["features"]


def test_load_gray_colour_gives_load_gray_pixels(tmp_path):
    rgb = image_files("train")[0]  # any scan; also saved here as an RGB JPEG and an RGB PNG
    with Image.open(rgb) as im:
        im.convert("RGB").save(tmp_path / "rgb.jpg", quality=92)
        im.convert("RGB").save(tmp_path / "rgb.png")
    for f in [*image_files("train"), *image_files("test"), tmp_path / "rgb.jpg", tmp_path / "rgb.png"]:
        gray, colour = load_gray_colour(f, 224)
        assert np.array_equal(gray, load_gray(f, 224)), f
        assert colour < 0.005, (f, colour)  # gray content in an RGB file is not colour


def test_gate_accepts_scans_and_rejects_non_cxr(gated_bundle, non_cxr):
    bundle = load_bundle(gated_bundle)
    gate = Gate.from_bundle(bundle.root, bundle.card)
    size = bundle.spec.size
    for f in image_files("test"):  # never seen by the fit
        ok, reason, score = gate.check_source(f, size)
        assert ok and reason == "" and score <= gate.threshold, (f, reason)
    expect = {"document": "does not look like a chest X-ray", "screenshot": "does not look like a chest X-ray",
              "photo": "colour image", "blank": "uniform image"}
    for kind, path in non_cxr.items():
        ok, reason, _ = gate.check_source(path, size)
        assert not ok and reason.startswith(expect[kind]), (kind, reason)


def test_classifier_api(gated_bundle, non_cxr):
    clf = Classifier(model=gated_bundle, backend="onnx")
    scan = image_files("test")[0]
    files = [scan, non_cxr["document"], non_cxr["photo"], image_files("test")[1]]
    results = list(clf.classify_many(files))
    assert [type(r) for r in results] == [Result, RejectedResult, RejectedResult, Result]
    assert [r.path for r in results] == [str(f) for f in files]
    assert results[0].to_dict()["status"] == "ok"
    one = clf.classify(non_cxr["screenshot"])
    assert isinstance(one, RejectedResult) and not one.ok and one.label is None
    assert one.error.startswith("rejected: ")
    bypass = Classifier(model=gated_bundle, backend="onnx", ood=False)
    assert bypass.gate is None and isinstance(bypass.classify(non_cxr["screenshot"]), Result)
    assert "status" not in bypass.classify(scan).to_dict()


def test_cli_json_table_and_csv(gated_bundle, non_cxr, tmp_path):
    card = json.loads((gated_bundle / "card.json").read_text())
    scans = image_files("test")
    result = run("classify", *scans, *non_cxr.values(), "--json", "--model", gated_bundle)
    assert result.exit_code == 0, result.output  # rejections are answers, not failures
    rows = jsonl(result.stdout)
    assert len(rows) == len(scans) + len(non_cxr)
    for row in rows[:len(scans)]:
        assert row["status"] == "ok" and row["label"] in CLASS_NAMES and set(row["probabilities"]) == set(CLASS_NAMES)
    for row in rows[len(scans):]:
        assert set(row) == {"path", "status", "reason", "model"}
        assert row["status"] == "rejected" and row["reason"]
        assert row["model"] == {"name": card["name"], "version": card["version"],
                                "sha256": card["files"]["tflite"]["sha256"]}
    assert "4 rejected" in result.stderr and "error" not in result.stderr

    table = run("classify", scans[0], non_cxr["document"], "--model", gated_bundle)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[1].split()[1] in CLASS_NAMES
    assert lines[2].split()[:2] == [str(non_cxr["document"]), "REJECTED"]
    assert "does not look like a chest X-ray" in lines[2]

    out = tmp_path / "out.csv"
    assert run("classify", scans[0], non_cxr["photo"], "--csv", out, "--model", gated_bundle).exit_code == 0
    csv_rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in csv_rows] == ["ok", "rejected"]
    assert csv_rows[1]["label"] == "" and csv_rows[1]["reason"].startswith("colour image")


def test_cli_no_ood_bypasses(gated_bundle, non_cxr):
    result = run("classify", *non_cxr.values(), "--json", "--no-ood", "--model", gated_bundle)
    assert result.exit_code == 0, result.output
    rows = jsonl(result.stdout)
    assert len(rows) == len(non_cxr) and all(r["label"] in CLASS_NAMES and "status" not in r for r in rows)
    assert result.stderr == ""


def test_gate_sha256_mismatch_is_refused(gated_bundle, tmp_path, non_cxr):
    bad = tmp_path / "bad"
    shutil.copytree(gated_bundle, bad)
    with np.load(bad / "ood.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["mean"] = arrays["mean"] + 1.0  # a replaced gate: valid npz, other numbers
    np.savez(bad / "ood.npz", **arrays)
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


def test_info_shows_gate(gated_bundle):
    result = run("info", "--model", gated_bundle)
    assert result.exit_code == 0 and "ood gate" in result.stdout and "checksum matches" in result.stdout


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
