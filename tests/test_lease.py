"""The GPU lease's transport: int8 weights within half a step, and a budgeted round trip of runs."""
import json

import numpy as np

from train import lease, lite
from train.models import load_named, save_named


def test_int8_transport_is_within_half_a_step_per_channel():
    rng = np.random.default_rng(0)
    w = {"k": rng.normal(size=(3, 3, 8, 16)).astype(np.float32) * np.linspace(0.01, 3, 16),
         "bn/moving_variance": rng.random(16).astype(np.float32)}
    back = lite.dequantize(lite.quantize(w))
    step = np.abs(w["k"]).max(axis=(0, 1, 2)) / 127.0
    assert np.all(np.abs(back["k"] - w["k"]) <= step / 2 + 1e-7)
    np.testing.assert_array_equal(back["bn/moving_variance"], w["bn/moving_variance"])  # 1-D kept exact
    assert set(back) == set(w)


def _run(root, name, model, val, teachers=(), size=200_000, protocol="grouped"):
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    save_named({"dense/kernel": rng.normal(size=(size // 4, 1)).astype(np.float32),
                "dense/bias": np.ones(1, np.float32)}, d / "weights.npz")
    (d / "config.json").write_text(json.dumps({"model": model, "teachers": list(teachers), "protocol": protocol}))
    (d / "metrics.json").write_text(json.dumps({"model": model, "protocol": protocol,
                                                "val": {"accuracy": val}}))
    (d / "history.csv").write_text("epoch,loss\n0,1.0\n")


def test_pack_returns_students_first_within_budget_and_every_record(tmp_path):
    runs = tmp_path / "there" / "runs"
    _run(runs, "a-lite0", "efficientnet_lite0", 0.80)
    _run(runs, "b-lite1", "efficientnet_lite1", 0.85)
    _run(runs, "c-student", "efficientnet_lite0", 0.84, teachers=["a-lite0", "b-lite1"])
    _run(runs, "d-dn", "densenet201", 0.70, size=8_000_000)  # 2 MB as int8: over the 1.5 MiB budget
    _run(runs, "e-seed", "efficientnet_lite0", 0.99, protocol="seed")
    assert lease.teachers(5, runs) == ["b-lite1", "a-lite0"]  # Lite, grouped, not students, best first
    lease.pack(tmp_path / "out", runs, budget_mib=1.5)
    here = tmp_path / "here" / "runs"
    lease.unpack(tmp_path / "out", here)
    returned = json.loads((here / "returned.json").read_text())["returned_weights"]
    assert returned["c-student"] == "float16" and list(returned)[0] == "c-student"
    assert "d-dn" not in returned and (here / "d-dn" / "metrics.json").exists()  # records always travel
    for name, fmt in returned.items():
        got, want = load_named(here / name / "weights.npz"), load_named(runs / name / "weights.npz")
        tol = 1e-3 if fmt == "float16" else np.abs(want["dense/kernel"]).max() / 254 + 1e-6
        assert np.abs(got["dense/kernel"] - want["dense/kernel"]).max() <= tol * (
            np.abs(want["dense/kernel"]).max() if fmt == "float16" else 1)
        assert json.loads((here / name / "metrics.json").read_text())["returned_weights"] == fmt


def test_pack_returns_lite_teachers_in_float16_when_the_budget_allows(tmp_path):
    runs = tmp_path / "there" / "runs"
    _run(runs, "a-lite0", "efficientnet_lite0", 0.80)
    _run(runs, "b-lite2", "efficientnet_lite2", 0.85)
    _run(runs, "c-student", "efficientnet_lite0", 0.84, teachers=["a-lite0", "b-lite2"])
    lease.pack(tmp_path / "roomy", runs, budget_mib=2)  # 3 x 100 kB in float16: room for all
    lease.unpack(tmp_path / "roomy", tmp_path / "r1" / "runs")
    assert set(json.loads((tmp_path / "r1" / "runs" / "returned.json").read_text())["returned_weights"].values()) \
        == {"float16"}
    # weights: student 100 kB (float16); each teacher 100 kB in float16, 50 kB in int8
    for budget, want in ((0.27, {"b-lite2": "float16", "a-lite0": "int8"}),  # the better one in float16
                         (0.22, {"b-lite2": "int8", "a-lite0": "int8"})):  # both, rather than one in float16
        out, here = tmp_path / f"out{budget}", tmp_path / f"here{budget}" / "runs"
        lease.pack(out, runs, budget_mib=budget)
        lease.unpack(out, here)
        returned = json.loads((here / "returned.json").read_text())["returned_weights"]
        assert returned == {"c-student": "float16", **want}
