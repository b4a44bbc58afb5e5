"""The squash shortcut (``train.aspect``): the film ratio survives the squash to a square as a horizontal
compression, and the augmentation must make the ratio a model sees independent of the class."""
import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import aspect, data
from train.fit import FitConfig, fit

MINI = Path(__file__).parent / "data" / "chest_xray"
S = 64


def _films(ratios: np.ndarray) -> np.ndarray:
    """Squashed films: a centred bright chest whose width is ``40 / ratio`` pixels (a wider film squashed
    to the same square leaves a narrower chest), ``float32[N, S, S, 1]``."""
    x = np.zeros((len(ratios), S, S, 1), np.float32)
    for i, r in enumerate(ratios):
        w = 40.0 / r
        lo, hi = (S - w) / 2, (S + w) / 2
        cols = np.arange(S) + 0.5
        x[i, 8:56, :, 0] = np.clip(np.minimum(cols - lo, hi - cols) + 0.5, 0, 1)
    return x


def _width(x: np.ndarray) -> np.ndarray:
    return x[:, S // 2, :, 0].sum(axis=1)


def test_hscale_squeezes_and_widens_about_the_centre():
    x = _films(np.array([1.0, 1.0, 1.0]))
    out = aspect.hscale(x, np.array([1.0, 1.25, 0.8]))
    assert np.allclose(out[0], x[0])
    assert _width(out)[1] == pytest.approx(40 / 1.25, abs=0.6)
    assert _width(out)[2] == pytest.approx(40 * 1.25, abs=0.6)
    # symmetric about the centre, and an 8-bit batch stays 8-bit
    assert np.allclose(out[1, :, :, 0], out[1, :, ::-1, 0], atol=1e-5)
    u = (x[:1] * 255).astype(np.uint8)
    assert aspect.hscale(u, np.array([1.25])).dtype == np.uint8


def test_resampled_ratio_no_longer_tells_the_class():
    """Normal films narrower than pneumonia films (as in Kermany's train/): before the resample the chest
    width gives the class away; after it, both classes show the same widths, including the images whose
    own ratio is unknown (drawn from their class)."""
    rng = np.random.default_rng(0)
    n = 400
    labels = np.repeat([0, 1], n)
    own = np.concatenate([rng.normal(1.2, 0.08, n), rng.normal(1.5, 0.12, n)])
    recorded = own.copy()
    recorded[rng.random(2 * n) < 0.5] = np.nan  # half of them were only ever seen squashed
    x = _films(own)
    before = _width(x)
    gap_before = before[labels == 1].mean() - before[labels == 0].mean()
    assert gap_before < -5  # pneumonia chests look narrower

    resample = aspect.AspectResample(recorded, labels)
    widths = [_width(resample(x, np.arange(2 * n), rng)) for _ in range(6)]
    after = np.concatenate(widths)
    lab = np.tile(labels, 6)
    assert abs(after[lab == 1].mean() - after[lab == 0].mean()) < 0.15 * abs(gap_before)
    # and it does vary: every image is seen at many ratios
    assert np.std(np.stack(widths)[:, 0]) > 1


def test_resampling_needs_some_known_ratios():
    with pytest.raises(ValueError, match="original size"):
        aspect.AspectResample(np.full(4, np.nan), np.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="viral"):
        aspect.AspectResample(np.array([1.2, 1.5, np.nan]), np.array([0, 1, 2]))


def test_swapped_ratios_catch_a_model_that_reads_the_squash():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 50)
    x = _films(np.where(labels == 0, 1.2, 1.5))
    x[labels == 1] *= 0.8  # the disease, in this toy: a dimmer chest
    squash_reader = lambda g: np.eye(2)[((g[:, S // 2, :, 0] > 0.4).sum(1) < 30).astype(int)]  # noqa: E731
    anatomy_reader = lambda g: np.eye(2)[(g.max(axis=(1, 2, 3)) < 0.9).astype(int)]  # noqa: E731
    x += rng.normal(0, 0.01, x.shape).astype(np.float32)
    a = aspect.swapped_accuracy(squash_reader, x, labels, 1.5 / 1.2)
    b = aspect.swapped_accuracy(anatomy_reader, x, labels, 1.5 / 1.2)
    assert a["as_is"]["accuracy"] == 1.0 and a["swapped"]["accuracy"] < 0.1
    assert b["as_is"]["accuracy"] == 1.0 and b["swapped"]["accuracy"] == 1.0


def _data_with_manifest(tmp_path: Path, ratios: dict) -> Path:
    root = tmp_path / "chest_xray"
    shutil.copytree(MINI, root)
    with open(tmp_path / "MANIFEST.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "original_width", "original_height"])
        for name, (ow, oh) in ratios.items():
            w.writerow([f"chest_xray/{name}", name.split("/")[0], ow, oh])
    return root


def _sizes_by_class() -> dict:
    """Original sizes for every shipped training scan: normal films 1.2:1, pneumonia films 1.5:1."""
    return {f"train/{Path(r.path).parent.name}/{Path(r.path).name}": (1200 if r.label == 0 else 1500, 1000)
            for r in data.list_split(MINI, "train")}


def test_original_aspects_from_the_manifest_then_the_file(tmp_path):
    root = _data_with_manifest(tmp_path, {"train/NORMAL/IM-0115-0001.jpeg": (1200, 1000)})
    Image.new("L", (300, 200), 128).save(root / "train" / "NORMAL" / "IM-0999-0001.jpeg")
    records = data.list_split(root, "train")
    got = dict(zip([Path(r.path).name for r in records], data.original_aspects(records, root)))
    assert got["IM-0115-0001.jpeg"] == pytest.approx(1.2)
    assert got["IM-0999-0001.jpeg"] == pytest.approx(1.5)  # a full-size file tells its own
    assert np.isnan(got["IM-0187-0001.jpeg"])  # already square, not in the manifest


def test_a_fit_with_aspect_resampling_resamples_every_training_batch(tmp_path, monkeypatch):
    monkeypatch.setattr("train.fit.RUNS_DIR", tmp_path / "runs")
    root = _data_with_manifest(tmp_path, _sizes_by_class())
    calls = []
    real = aspect.AspectResample.__call__
    monkeypatch.setattr(aspect.AspectResample, "__call__",
                        lambda self, x, idx, rng: calls.append(len(idx)) or real(self, x, idx, rng))
    cfg = FitConfig(model="baseline", input_size=32, epochs=2, batch=2, val_fraction=0.5, optimizer="adam",
                    augment=False, aspect=True, monitor="val_neutral_loss", name="aspect")
    run = fit(cfg, root)
    assert (run / "weights.npz").exists()
    assert calls and set(calls) == {2}
    # the epochs are judged on neutral validation copies (two per validation scan), recorded beside the plain
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_neutral"]["n"] == 2 * metrics["val"]["n"]
    history = list(csv.DictReader((run / "history.csv").open()))
    losses = [float(r["val_neutral_loss"]) for r in history]
    assert metrics["best_epoch"] == 1 + int(np.argmin(losses))
    with pytest.raises(ValueError, match="needs aspect"):
        fit(dataclasses.replace(cfg, aspect=False), root)
    # without any known ratio the run refuses to start rather than train without the resample
    (tmp_path / "MANIFEST.csv").unlink()
    with pytest.raises(ValueError, match="original size"):
        fit(cfg, root)


def test_the_command_measures_a_bundle_as_it_is_swapped_and_neutral(tmp_path, tiny_bundle, capsys, monkeypatch):
    """``python -m train.aspect BUNDLE`` validates on the split of the bundle's training run (its
    ``runs/<id>/config.json``: half of this tiny set)."""
    root = _data_with_manifest(tmp_path, _sizes_by_class())
    run = json.loads((tiny_bundle / "card.json").read_text())["training_run"]
    (tmp_path / "runs" / run).mkdir(parents=True)
    (tmp_path / "runs" / run / "config.json").write_text(json.dumps({"val_fraction": 0.5}))
    monkeypatch.chdir(tmp_path)
    assert aspect.main([str(tiny_bundle), "--data", str(root)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert lines[0]["train_ratios"]["factor"] == pytest.approx(1.25)
    res = lines[1]
    assert res["engine"] in ("tflite", "onnx")
    assert {"as_is", "swapped", "neutral"} <= set(res)
    assert all(0 <= res[k]["accuracy"] <= 1 for k in ("as_is", "swapped", "neutral"))
