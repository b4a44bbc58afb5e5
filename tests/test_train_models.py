"""Model builders train a step on real images; a tiny run is recorded and found by the registry."""
import json
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import pytest

from cxr_edge.preprocess import to_input
from train import data, models
from train.fit import FitConfig, fit
from train.registry import best_run, list_runs

MINI = Path(__file__).parent / "data" / "chest_xray"


def _batch(size):
    recs = data.list_split(MINI, "train")
    return data.load_images(recs, size, workers=2), data.labels_of(recs)


def test_baseline_is_the_reports_cnn():
    assert models.build("baseline", input_size=128).model.count_params() == 1_848_547


@pytest.mark.parametrize("name,size", [("baseline", 64), ("efficientnet_lite0", 64),
                                       ("efficientnet_lite2", 64), ("densenet201", 32)])
def test_each_builder_trains_one_step(name, size):
    import keras

    built = models.build(name, input_size=size)
    gray, y = _batch(size)
    x = to_input(gray, built.spec)
    m = built.model
    m.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in m.get_weights()]
    loss = m.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, m.get_weights()))
    probs = m.predict(x, verbose=0)
    assert probs.shape == (len(x), 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_named_weights_round_trip_through_split_files(tmp_path):
    m = models.build("baseline", input_size=64).model
    w = models.named_weights(m)
    files = models.save_named(w, tmp_path / "weights.npz", max_bytes=200_000)
    assert len(files) > 1  # one array larger than max_bytes still travels whole, in its own part
    m2 = models.build("baseline", input_size=64).model
    assert models.assign(m2, models.load_named(tmp_path / "weights.npz")) == len(m2.weights)
    for a, b in zip(m.get_weights(), m2.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_compact_weights_keep_1d_arrays_exact(tmp_path):
    w = {"a/kernel": np.random.rand(3, 3).astype(np.float32), "a/moving_variance": np.array([1e-7, 3.3])}
    models.save_named(w, tmp_path / "w.npz", compact=True)
    back = models.load_named(tmp_path / "w.npz")
    np.testing.assert_array_equal(back["a/moving_variance"], w["a/moving_variance"].astype(np.float32))
    np.testing.assert_allclose(back["a/kernel"], w["a/kernel"], rtol=1e-3)


def test_assign_refuses_mismatched_shapes():
    m = models.build("baseline", input_size=64).model
    bad = {v.path: np.zeros((1,)) for v in m.weights[:1]}
    with pytest.raises(ValueError, match="shape"):
        models.assign(m, bad, strict=False)


def test_tiny_fit_records_a_run_that_the_registry_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr("train.fit.RUNS_DIR", tmp_path)
    cfg = FitConfig(model="baseline", input_size=32, epochs=2, batch=4, val_fraction=0.5, optimizer="adam",
                    augment=True, name="tiny")
    run = fit(cfg, MINI)
    for f in ("config.json", "history.csv", "metrics.json", "weights.npz", "curve.png"):
        assert (run / f).exists(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["protocol"] == "grouped" and metrics["pretrained"] == "none"
    assert 1 <= metrics["best_epoch"] <= 2 and metrics["val"]["n"] > 0
    assert list_runs(tmp_path)[0]["run_id"] == run.name == best_run(runs_dir=tmp_path)["run_id"]
    # the recorded weights rebuild the same inference model
    m = models.build("baseline", input_size=32).model
    models.assign(m, models.load_named(run / "weights.npz"))


def test_a_student_learns_from_a_bundle_at_the_bundles_own_input_size(tiny_bundle):
    """Distilling the shipped model into a smaller-input student: the teacher (a bundle, 64 px) sees the
    same training images at its own size, and its engine's probabilities become the soft targets."""
    import dataclasses

    from cxr_edge import Classifier
    from train.fit import _targets, load_arrays

    cfg = FitConfig(model="baseline", input_size=32, val_fraction=0.5, teachers=[str(tiny_bundle)],
                    distill_alpha=0.3)
    arrays = load_arrays(cfg, MINI)
    y = arrays["train"][1]
    targets, weights = _targets(cfg, y, arrays, MINI)
    teacher = Classifier(model=tiny_bundle, ood=False)
    at_64 = load_arrays(dataclasses.replace(cfg, input_size=64), MINI, splits=("train",))["train"][0]
    soft = teacher.engine.run(to_input(at_64, teacher.spec))
    np.testing.assert_allclose(targets, 0.3 * np.eye(3)[y] + 0.7 * soft, atol=1e-5)
    assert not np.allclose(soft, np.eye(3)[y])  # the soft part is the teacher's, not the labels again
    np.testing.assert_array_equal(weights, np.ones(len(y), np.float32))


def test_teachers_at_one_input_size_share_one_decode(tiny_bundle, monkeypatch):
    """Three 224 px teachers of a 128 px student (the lease's phase 2) decode the training images at 224 px
    once, not once per teacher."""
    from train import fit as fit_mod

    cfg = FitConfig(model="baseline", input_size=32, val_fraction=0.5, teachers=[str(tiny_bundle)] * 3)
    arrays = fit_mod.load_arrays(cfg, MINI)
    loads = []
    real = fit_mod.load_arrays
    monkeypatch.setattr(fit_mod, "load_arrays", lambda c, *a, **k: loads.append(c.input_size) or real(c, *a, **k))
    one, _ = fit_mod._targets(FitConfig(**{**cfg.__dict__, "teachers": [str(tiny_bundle)]}), arrays["train"][1],
                              arrays, MINI)
    loads.clear()
    three, _ = fit_mod._targets(cfg, arrays["train"][1], arrays, MINI)
    assert loads == [64]
    np.testing.assert_allclose(three, one, atol=1e-6)  # the mean of one teacher three times is that teacher


def test_a_soft_target_file_teaches_as_its_teachers_do(tiny_bundle, tmp_path):
    """A lease student can learn from teachers that do not travel: their mean probabilities on the training
    images, saved here with the images' names, give the same targets as the teachers themselves, count
    as many teachers as they average when mixed with another, and are refused for other images."""
    import dataclasses

    import pytest

    from train import fit as fit_mod

    cfg = FitConfig(model="baseline", input_size=32, val_fraction=0.5, teachers=[str(tiny_bundle)] * 2,
                    distill_alpha=0.3)
    arrays = fit_mod.load_arrays(cfg, MINI)
    y = arrays["train"][1]
    direct, _ = fit_mod._targets(cfg, y, arrays, MINI)
    path = fit_mod.save_soft_targets(cfg, tmp_path / "t.npz", MINI)
    via_file, _ = fit_mod._targets(dataclasses.replace(cfg, teachers=[str(path)]), y, arrays, MINI)
    np.testing.assert_allclose(via_file, direct, atol=1e-6)
    assert not np.allclose(via_file, np.eye(3)[y])
    # mixed with a third teacher (the same bundle): the file weighs two, so the mean is still the bundle's
    mixed, _ = fit_mod._targets(dataclasses.replace(cfg, teachers=[str(path), str(tiny_bundle)]), y, arrays, MINI)
    np.testing.assert_allclose(mixed, direct, atol=1e-6)
    # another split's training images (another split seed): refused, naming the file
    other = dataclasses.replace(cfg, split_seed=3, teachers=[str(path)])
    other_arrays = fit_mod.load_arrays(other, MINI)
    assert fit_mod.train_names(other, MINI) != fit_mod.train_names(cfg, MINI)
    with pytest.raises(ValueError, match="t.npz"):
        fit_mod._targets(other, other_arrays["train"][1], other_arrays, MINI)
    names = fit_mod.train_names(cfg, MINI)
    with pytest.raises(ValueError, match="other training images"):
        fit_mod.load_soft_targets(path, names[::-1], y[::-1])


def test_ema_weights_are_the_ones_validated_and_kept(tmp_path, monkeypatch):
    """With ``ema`` the run validates, keeps and returns the optimizer's moving average of the weights: the
    saved weights give the validation loss recorded for their epoch and differ from the same run's without
    ``ema``, while training itself goes on from the raw weights (the same training losses)."""
    import csv

    from train.batches import predict_fixed
    from train.fit import load_arrays

    monkeypatch.setattr("train.fit.RUNS_DIR", tmp_path)
    runs = {}
    for ema in (0.0, 0.8):
        cfg = FitConfig(model="baseline", input_size=32, epochs=3, batch=1, val_fraction=0.5,
                        optimizer="adam", lr=3e-3, augment=False, ema=ema, patience=100, monitor="val_loss",
                        name=f"ema{ema}")
        run = fit(cfg, MINI)
        rows = list(csv.DictReader((run / "history.csv").open()))
        runs[ema] = (run, rows, json.loads((run / "metrics.json").read_text()))
    run, rows, metrics = runs[0.8]
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss"]) for r in runs[0.0][1]],
                                                               rel=1e-5)
    x, y = load_arrays(cfg, MINI)["val"]
    kept = {}
    for ema, (r, _, _) in runs.items():
        built = models.build("baseline", input_size=32)
        kept[ema] = models.load_named(r / "weights.npz")
        models.assign(built.model, kept[ema])
        probs = predict_fixed(built.model, to_input(x, built.spec), 1)
        val_loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1)).mean())
        best = runs[ema][1][runs[ema][2]["best_epoch"] - 1]
        assert val_loss == pytest.approx(float(best["val_loss"]), rel=1e-4)
    assert metrics["best_epoch"] == runs[0.0][2]["best_epoch"] == 3  # the same epoch, the last, in both runs
    assert any(not np.allclose(kept[0.8][k], kept[0.0][k]) for k in kept[0.0])
