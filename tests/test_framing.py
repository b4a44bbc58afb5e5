"""The framing shortcut (``train.framing``): normal training films show more of the child than pneumonia
films, so the augmentation must make how much of the frame the chest fills independent of the class."""
import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_edge.preprocess import InputSpec

from train import framing
from train.fit import FitConfig, fit

MINI = Path(__file__).parent / "data" / "chest_xray"
S = 64


def _films(fill: np.ndarray, size: int = S) -> np.ndarray:
    """A bright centred square chest filling ``fill`` of each side of a dark frame, ``uint8[N, size, size]``. The
    frame is textured (8 px squares of 0 and 20 gray levels, as the body around a chest is): a flat one would be
    trimmed by the preprocessing (``cxr_edge.pixels.flat_border_box``)."""
    x = np.zeros((len(fill), size, size), np.float32)
    c = np.arange(size) + 0.5
    texture = ((c[:, None] // 8 + c[None, :] // 8) % 2) * (20 / 255)
    for i, f in enumerate(fill):
        lo, hi = size * (1 - f) / 2, size * (1 + f) / 2
        edge = np.clip(np.minimum(c - lo, hi - c) + 0.5, 0, 1)
        mask = edge[:, None] * edge[None, :]
        x[i] = mask + (1 - mask) * texture
    return np.rint(x * 255).astype(np.uint8)


def _fill(x: np.ndarray) -> np.ndarray:
    """The side of the bright square as a fraction of the frame (from its area: the pixels brighter than half),
    ``x`` on 0..1 or 0..255."""
    x = np.asarray(x, np.float64).reshape(len(x), x.shape[1], x.shape[2])
    x = x / 255.0 if x.max() > 1.5 else x
    return np.sqrt((x > 0.5).sum(axis=(1, 2))) / x.shape[1]


def test_frame_to_crops_before_the_resize_and_checks_its_window():
    x = _films(np.array([0.5, 0.5, 0.5]), 96)
    out = framing.frame_to(x, np.array([1.0, 0.5, 0.8]), 0.5, 0.5, 48)
    assert out.shape == (3, 48, 48) and out.dtype == np.uint8
    assert _fill(out) == pytest.approx([0.5, 1.0, 0.625], abs=0.03)
    # the same as the runtime's resize of the uncropped image
    from cxr_edge.preprocess import load_gray
    assert np.array_equal(out[0], load_gray(Image.fromarray(x[0]), 48))
    # cut before the resize: a tight window keeps the full-resolution edge, as sharp as the uncropped one
    stripes = np.tile((np.arange(96) // 2 % 2 * 255).astype(np.uint8), (1, 96, 1))
    assert framing.frame_to(stripes, 0.5, 0.5, 0.5, 48).std() > 100
    # a window at the top-left corner shows the square's top-left part at the bottom-right of the frame
    corner = framing.frame_to(x[:1], 0.5, 0.0, 0.0, 48)
    assert corner[0, -8:, -8:].mean() > 240 and corner[0, :8, :8].mean() < 15
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match="keep"):
            framing.frame_to(x, bad, 0.5, 0.5, 48)
    with pytest.raises(ValueError, match="framing"):
        framing.RandomFraming(1.0, InputSpec(48))


def test_random_framing_makes_tight_normals_as_common_as_tight_pneumonia():
    """Normal films framed wide (the chest fills 55% of the side), pneumonia films tight (80%), as in
    Kermany's train/: after the transform a tightly framed normal chest is common, every image is seen at
    many framings, and the windows are drawn whatever the class."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    x = _films(np.where(labels == 0, 0.55, 0.8), 96)
    t = framing.RandomFraming(0.65, InputSpec(48))
    draws = np.stack([_fill(t(x, np.arange(len(x)), rng)) for _ in range(5)])
    assert t(x[:2], None, rng).shape == (2, 48, 48, 1)  # the model's input
    normal = draws[:, labels == 0]
    assert np.mean(normal >= 0.75) > 0.15  # as tight as an untouched pneumonia film, often
    assert np.std(draws[:, 0]) > 0.03
    k = np.stack([t.draw(400, rng)[0] for _ in range(20)])
    lab = np.repeat([0, 1], 200)
    assert abs(k[:, lab == 0].mean() - k[:, lab == 1].mean()) < 0.01
    assert k.min() >= 0.65 and k.max() <= 1.0
    assert np.mean(k == 1.0) == 0  # no whole frames unless asked


def test_random_framing_leaves_the_asked_share_of_images_whole():
    rng = np.random.default_rng(1)
    keep = framing.RandomFraming(0.7, InputSpec(48), full=0.5).draw(4000, rng)[0]
    assert abs(np.mean(keep == 1.0) - 0.5) < 0.03
    cut = keep[keep < 1.0]
    assert cut.min() >= 0.7 and abs(cut.mean() - 0.85) < 0.01  # the rest as before
    with pytest.raises(ValueError, match="framing_full"):
        framing.RandomFraming(0.7, InputSpec(48), full=1.0)


def test_chain_runs_the_transforms_in_turn():
    add = lambda x, idx, rng: x + 1  # noqa: E731
    double = lambda x, idx, rng: x * 2  # noqa: E731
    assert framing.chain(None, None) is None
    assert framing.chain(add, None) is add
    assert framing.chain(add, double)(np.array([1.0]), None, None)[0] == 4.0


def test_cropped_copies_catch_a_model_that_reads_the_framing():
    """Normal: a wide frame whose chest is bright; pneumonia: a tight frame, dimmer chest. One toy model
    calls normal whenever much dark border shows; the other reads the chest's brightness."""
    labels = np.repeat([0, 1], 40)
    g = _films(np.where(labels == 0, 0.55, 0.85)) / 255.0 * np.where(labels == 0, 250, 180)[:, None, None]
    images = np.rint(g).astype(np.uint8)

    def frame_reader(gray):
        border = (gray < 40).mean(axis=(1, 2))
        return np.eye(2)[(border < 0.4).astype(int)]

    def chest_reader(gray):
        return np.eye(2)[(gray.max(axis=(1, 2)) < 215).astype(int)]

    a = framing.framing_accuracy(frame_reader, images, labels, 32, keeps=(1.0, 0.7))
    b = framing.framing_accuracy(chest_reader, images, labels, 32, keeps=(1.0, 0.7))
    assert a["keep_1"]["accuracy"] == 1.0
    assert a["keep_0.7"]["recall"]["normal"] == 0.0
    assert b["keep_1"]["accuracy"] == 1.0 and b["keep_0.7"]["accuracy"] == 1.0


def test_a_fit_with_framing_crops_every_batch_and_validates_on_framed_copies(tmp_path, monkeypatch):
    monkeypatch.setattr("train.fit.RUNS_DIR", tmp_path / "runs")
    calls = []
    real = framing.RandomFraming.__call__
    monkeypatch.setattr(framing.RandomFraming, "__call__",
                        lambda self, x, idx, rng: calls.append(len(idx)) or real(self, x, idx, rng))
    cfg = FitConfig(model="baseline", input_size=32, epochs=2, batch=2, val_fraction=0.5, optimizer="adam",
                    augment=False, framing=0.7, monitor="val_neutral_loss", name="framing")
    run = fit(cfg, MINI)
    assert calls and set(calls) == {2}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_neutral"]["n"] == 2 * metrics["val"]["n"]
    history = list(csv.DictReader((run / "history.csv").open()))
    assert metrics["best_epoch"] == 1 + int(np.argmin([float(r["val_neutral_loss"]) for r in history]))
    with pytest.raises(ValueError, match="framing"):
        fit(dataclasses.replace(cfg, framing=1.5), MINI)
    with pytest.raises(ValueError, match="needs aspect resampling or framing"):
        fit(dataclasses.replace(cfg, framing=0.0), MINI)


def test_the_command_measures_a_bundle_at_each_crop(tmp_path, tiny_bundle, capsys, monkeypatch):
    run = json.loads((tiny_bundle / "card.json").read_text())["training_run"]
    (tmp_path / "runs" / run).mkdir(parents=True)
    (tmp_path / "runs" / run / "config.json").write_text(json.dumps({"val_fraction": 0.5}))
    monkeypatch.chdir(tmp_path)
    assert framing.main([str(tiny_bundle), "--data", str(MINI)]) == 0
    res = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")][0]
    assert res["engine"] in ("tflite", "onnx")
    assert [k for k in res if k.startswith("keep_")] == ["keep_1", "keep_0.9", "keep_0.8", "keep_0.7"]
    assert all(0 <= res[k]["accuracy"] <= 1 for k in res if k.startswith("keep_"))
