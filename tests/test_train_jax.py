"""Training compiles each step function once (JAX), and the augmentation is a real, compiled warp.

The fit runs in a subprocess because Keras fixes its backend per process (the rest of the suite uses
TensorFlow). The counts come from JAX's own compile log (``train.batches.CompileCounter``)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MINI = Path(__file__).parent / "data" / "chest_xray"

pytest.importorskip("jax")

FIT = r"""
import json, sys
import numpy as np
from train import data
from train.fit import FitConfig, fit
recs = data.list_split(sys.argv[1], "train") + data.list_split(sys.argv[1], "test")
gray, y = data.load_images(recs, 32, workers=2), data.labels_of(recs)
# 9 images: 7 to train in batches of 3 (a partial last batch of 1 that must not recompile), 2 to validate
# (padded to a whole batch each epoch and at the end)
arrays = {"train": (gray[:7], y[:7]), "val": (gray[7:], y[7:])}
cfg = FitConfig(model="baseline", input_size=32, epochs=3, batch=3, optimizer="adam", lr=1e-3,
                augment=True, mixup=0.2, class_weight=True, patience=10, name="jaxonce")
run = fit(cfg, arrays=arrays)
print("RESULT", json.dumps(json.loads((run / "metrics.json").read_text())))
"""


def _fit_under(backend: str, tmp_path: Path) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "CXR_EDGE_RUNS": str(tmp_path / "runs"),
           "CXR_EDGE_JAX_CACHE": str(tmp_path / "jax-cache"), "PYTHONPATH": str(ROOT),
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", FIT, str(MINI)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_jax_fit_compiles_each_step_function_once(tmp_path):
    m = _fit_under("jax", tmp_path)
    assert m["machine"]["backend"] == "jax"
    assert m["epochs_run"] == 3
    # three epochs, a partial last training batch, validation padded every epoch, a final prediction:
    # still one compilation of the train step and one of the predict step
    assert m["compiles"].get("train_step") == 1, m["compiles"]
    assert m["compiles"].get("predict_step") == 1, m["compiles"]
    assert m["val"]["n"] == 2


def test_random_affine_warps_in_training_only():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from train.augment import RandomAffine

    rng = np.random.default_rng(0)
    x = rng.random((4, 32, 32, 1)).astype(np.float32)
    layer = RandomAffine(seed=1)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    y = np.asarray(layer(x, training=True))
    assert y.shape == x.shape
    assert np.abs(y - x).mean() > 0.05  # warped
    assert x.min() - 1e-6 <= y.min() and y.max() <= x.max() + 1e-6  # bilinear + edge fill: no new range


def test_random_affine_identity_transform_is_exact():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from train.augment import RandomAffine

    layer = RandomAffine(rotation_deg=0.0, zoom=0.0, shift=0.0, seed=0)
    x = np.random.default_rng(1).random((2, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(layer(x, training=True)), x, atol=1e-5)


def test_random_photometric_changes_exposure_in_training_only():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from train.augment import RandomPhotometric

    gray = np.random.default_rng(2).integers(0, 256, (8, 24, 24)).astype(np.float32)
    x = (gray * 0.0078125 - 0.9921875)[..., None]
    layer = RandomPhotometric(0.4, seed=3)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    y = np.asarray(layer(x, training=True))
    assert y.shape == x.shape
    assert -1.0 - 1e-6 <= y.min() and y.max() <= 1.0 + 1e-6  # stays in the model's input range
    per_image = np.abs(y - x).mean(axis=(1, 2, 3))
    assert (per_image > 1e-3).all()  # every image changed
    assert np.ptp(y.std(axis=(1, 2, 3))) > 0.01  # by different amounts (contrast differs per image)
    # a monotone change: brighter pixels stay brighter within an image (up to clipping ties)
    order = np.argsort(x[0].ravel())
    assert (np.diff(y[0].ravel()[order]) >= -1e-5).all()
    np.testing.assert_array_equal(np.asarray(RandomPhotometric(0.0)(x, training=True)), x)
