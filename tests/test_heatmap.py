"""Class-activation heatmaps: the exported feature model reproduces the Keras CAM, and the CLI writes
overlays without overwriting anything."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_edge.bundle import load_bundle
from cxr_edge.labels import CLASS_NAMES

MINI = Path(__file__).parent / "data" / "chest_xray"
SCAN = MINI / "test" / "PNEUMONIA" / "person100_bacteria_477.jpeg"


@pytest.fixture(scope="module")
def cam_bundle(tiny_export, tmp_path_factory):
    """A tiny GAP + dense model with a ``features`` layer, exported with its CAM artifacts."""
    import keras
    from keras import layers

    from export.cam import add_cam
    from export.convert import make_bundle

    keras.utils.set_random_seed(1)
    spec = tiny_export.spec
    inp = layers.Input((spec.size, spec.size, 1))
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(inp)
    x = layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    f = layers.Activation("linear", name="features")(x)
    out = layers.Dense(3, activation="softmax", name="probs")(layers.GlobalAveragePooling2D()(f))
    model = keras.Model(inp, out)
    root = tmp_path_factory.mktemp("cam") / "bundle"
    make_bundle(model, spec, root, calibration=tiny_export.x, formats=("tflite-int8",), name="cam-test",
                version="0.0.1", card_extra={"training_run": "tests"})
    entry = add_cam(model, spec.size, root)
    assert entry and load_bundle(root).card["cam"]["path"] == "features.tflite"
    return model, spec, root


def test_cam_matches_the_keras_feature_map(cam_bundle, tiny_export):
    import keras

    from cxr_edge.heatmap import Heatmapper

    model, spec, root = cam_bundle
    feats = keras.Model(model.inputs, model.get_layer("features").output).predict(tiny_export.x, verbose=0)
    w = model.get_layer("probs").get_weights()[0]
    heat = Heatmapper(load_bundle(root))
    for i in range(3):
        for k in range(3):
            want = np.maximum(feats[i] @ w[:, k], 0)
            want = want / want.max() if want.max() > 0 else want
            got = heat.cam(tiny_export.x[i:i + 1], k)
            assert got.shape == want.shape and 0 <= got.min() and got.max() <= 1
            np.testing.assert_allclose(got, want, atol=0.02)  # float16 weights


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cxr_edge", "classify", *map(str, args)],
                          capture_output=True, text=True)


def test_cli_writes_overlays_and_never_overwrites(cam_bundle, tmp_path):
    _, _, root = cam_bundle
    out = tmp_path / "heat"
    r = _cli("--json", "--model", root, "--heatmap", out, SCAN)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    png = Path(rec["heatmap"])
    assert png == out / "person100_bacteria_477.heatmap.png" and rec["label"] in CLASS_NAMES
    with Image.open(png) as im, Image.open(SCAN) as scan:
        assert im.mode == "RGB" and abs(im.size[0] / im.size[1] - scan.size[0] / scan.size[1]) < 0.01
    before = png.read_bytes()
    again = _cli("--model", root, "--heatmap", out, SCAN)
    assert again.returncode == 1 and "exists" in again.stderr and "Traceback" not in again.stderr
    assert png.read_bytes() == before
    assert _cli("--model", root, "--heatmap", out, "--overwrite", SCAN).returncode == 0


def test_cam_files_are_checksummed_and_required(cam_bundle, tiny_bundle, tmp_path):
    _, _, root = cam_bundle
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    data = bytearray((bad / "cam.npz").read_bytes())
    data[-10] ^= 0xFF
    (bad / "cam.npz").write_bytes(bytes(data))
    r = _cli("--model", bad, "--heatmap", tmp_path / "h", SCAN)
    assert r.returncode == 2 and "sha256" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--model", tiny_bundle, "--heatmap", tmp_path / "h", SCAN)  # no CAM in that bundle
    assert r.returncode == 2 and "cam" in r.stderr.lower()
