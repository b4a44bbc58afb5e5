"""Class-activation heatmaps from the classifying pass: the bundle's dual-output model reproduces the Keras
CAM, and the CLI writes one overlay per input path without overwriting anything."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_edge import Classifier
from cxr_edge.bundle import load_bundle
from cxr_edge.heatmap import cam_maps, heatmap_path
from cxr_edge.labels import CLASS_NAMES

MINI = Path(__file__).parent / "data" / "chest_xray"
SCAN = MINI / "test" / "PNEUMONIA" / "person100_bacteria_477.jpeg"
# int8 feature maps against the float Keras ones: a few quantization steps of a map scaled to 0..1
CAM_TOL = 0.1


def test_heatmap_comes_from_the_classifying_pass_and_matches_keras(tiny_export):
    import keras

    model, bundle = tiny_export.model, tiny_export.bundle
    feats = keras.Model(model.inputs, model.get_layer("features").output).predict(tiny_export.x, verbose=0)
    w = model.get_layer("probs").get_weights()[0]
    for backend in ("tflite", "onnx"):
        clf = Classifier(model=bundle, backend=backend, heatmaps=True, ood=False)
        assert clf.engine.has_features  # dual-output model: no second network
        results = list(clf.classify_many(tiny_export.files))
        assert all(r.ok and r.heatmap is not None for r in results)
        _, engine_feats = clf.engine.run_full(tiny_export.x)
        for i, r in enumerate(results):
            k = CLASS_NAMES.index(r.label)
            # the map is the one of this very pass: the model's own feature map and the dense head
            np.testing.assert_allclose(r.heatmap, cam_maps(engine_feats[i:i + 1], w, [k])[0], atol=1e-5)
            want = cam_maps(feats[i:i + 1], w, [k])[0]  # the Keras float model's CAM
            assert r.heatmap.shape == want.shape and 0 <= r.heatmap.min() and r.heatmap.max() <= 1
            assert np.abs(r.heatmap - want).mean() < CAM_TOL, (backend, i)


def test_cam_maps_by_hand():
    f = np.zeros((1, 2, 2, 2), np.float32)
    f[0, 0, 0] = [1.0, 0.0]
    f[0, 1, 1] = [0.0, 2.0]
    f[0, 0, 1] = [-1.0, 0.0]
    w = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], np.float32)
    np.testing.assert_allclose(cam_maps(f, w, [0])[0], [[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(cam_maps(f, w, [2])[0], [[1.0, 0.0], [0.0, 1.0]])  # 2 and 2, relu(-2) = 0
    np.testing.assert_allclose(cam_maps(f, w, [1])[0], [[0.0, 0.0], [0.0, 1.0]])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cxr_edge", "classify", *map(str, args)],
                          capture_output=True, text=True)


def test_cli_writes_one_overlay_per_input_path_and_never_overwrites(tiny_bundle, tmp_path):
    a, b = tmp_path / "a" / "x.jpeg", tmp_path / "b" / "x.jpeg"  # one name, two folders
    for dst, src in ((a, SCAN), (b, MINI / "test" / "NORMAL" / "NORMAL2-IM-0219-0001.jpeg")):
        dst.parent.mkdir()
        shutil.copy(src, dst)
    out = tmp_path / "heat"
    r = _cli("--json", "--model", tiny_bundle, "--heatmap", out, a, b)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    pngs = [Path(rec["heatmap"]) for rec in recs]
    assert len(set(pngs)) == 2 and all(p.is_file() for p in pngs)
    assert pngs == [heatmap_path(out, str(a)), heatmap_path(out, str(b))]
    assert all(p.parent == out and p.name.startswith("x-") and p.name.endswith(".heatmap.png") for p in pngs)
    assert heatmap_path(out, str(a)) == heatmap_path(out, str(tmp_path / "b" / ".." / "a" / "x.jpeg"))  # stable
    with Image.open(pngs[0]) as im, Image.open(SCAN) as scan:
        assert im.mode == "RGB" and abs(im.size[0] / im.size[1] - scan.size[0] / scan.size[1]) < 0.01
    before = pngs[0].read_bytes()
    again = _cli("--model", tiny_bundle, "--heatmap", out, a)
    assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in again.stderr
    assert pngs[0].read_bytes() == before
    assert _cli("--model", tiny_bundle, "--heatmap", out, "--overwrite", a).returncode == 0


def test_cam_file_is_checksummed_and_required(tiny_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    data = bytearray((bad / "cam.npz").read_bytes())
    data[-10] ^= 0xFF
    (bad / "cam.npz").write_bytes(bytes(data))
    r = _cli("--model", bad, "--heatmap", tmp_path / "h", SCAN)
    assert r.returncode == 2 and "sha256" in r.stderr and "Traceback" not in r.stderr
    none = tmp_path / "none"
    shutil.copytree(tiny_bundle, none)
    card = json.loads((none / "card.json").read_text())
    del card["cam"]
    (none / "card.json").write_text(json.dumps(card))
    r = _cli("--model", none, "--heatmap", tmp_path / "h", SCAN)
    assert r.returncode == 2 and "cam" in r.stderr.lower() and "Traceback" not in r.stderr
    assert _cli("--model", none, SCAN).returncode == 0  # without --heatmap it classifies as before


def test_shipped_model_gives_heatmaps():
    """The embedded default bundle (dual output, or an older one with features.tflite) gives a map per label."""
    clf = Classifier(heatmaps=True)
    r = clf.classify(SCAN)
    assert r.heatmap is not None and r.heatmap.ndim == 2 and r.heatmap.max() == pytest.approx(1.0)
    assert load_bundle(None).card["cam"]["weights"]["path"] == "cam.npz"
