"""Model bundles: integrity checks the runtime must enforce before it runs a model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from _runtime_fixtures import bundle_dir  # noqa: F401  (fixture)
from cxr_edge import BundleError, Classifier
from cxr_edge import bundle as bundle_mod
from cxr_edge.bundle import load_bundle
from cxr_edge.cli import cli


@pytest.fixture
def copy(bundle_dir, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def _edit_card(root: Path, **changes) -> None:
    card = json.loads((root / "card.json").read_text())
    card.update(changes)
    (root / "card.json").write_text(json.dumps(card))


def test_card_path_or_folder(copy):
    assert load_bundle(copy).card == load_bundle(copy / "card.json").card
    assert set(load_bundle(copy).backends()) == {"tflite", "onnx"}


@pytest.mark.parametrize("backend", ["tflite", "onnx"])
def test_hash_mismatch_is_refused(copy, backend):
    model = copy / load_bundle(copy).card["files"][backend]["path"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Classifier(model=copy, backend=backend)
    other = "onnx" if backend == "tflite" else "tflite"
    assert Classifier(model=copy, backend=other).backend == other  # the untouched file still loads
    result = CliRunner().invoke(cli, ["info", "--model", str(copy)])
    assert result.exit_code == 0 and "SHA256 MISMATCH" in result.stdout


def test_hash_mismatch_through_cli(copy):
    (copy / "model.tflite").write_bytes(b"replaced")
    f = str(Path(__file__).parent / "data" / "chest_xray" / "test" / "NORMAL" / "NORMAL2-IM-0219-0001.jpeg")
    result = CliRunner().invoke(cli, ["classify", f, "--model", str(copy), "--backend", "tflite"])
    assert result.exit_code == 2
    assert "sha256" in result.stderr and "Traceback" not in result.output


def test_missing_card(copy):
    (copy / "card.json").unlink()
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(copy)


def test_unreadable_card(copy):
    (copy / "card.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        load_bundle(copy)


def test_card_lacking_fields(copy):
    card = json.loads((copy / "card.json").read_text())
    del card["input"]
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="lacks input"):
        load_bundle(copy)


@pytest.mark.parametrize("classes", [["normal", "viral", "bacterial"], ["normal", "pneumonia"]])
def test_wrong_classes(copy, classes):
    _edit_card(copy, classes=classes)
    with pytest.raises(BundleError, match="classes"):
        load_bundle(copy)


def test_missing_model_file(copy):
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Classifier(model=copy, backend="onnx")


def test_backend_not_in_bundle(copy):
    card = json.loads((copy / "card.json").read_text())
    del card["files"]["tflite"]
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="no tflite model"):
        Classifier(model=copy, backend="tflite")
    assert Classifier(model=copy).backend == "onnx"  # the default falls back to what the bundle has


@pytest.mark.parametrize("temperature", [0, -1.0, "nan"])
def test_bad_temperature(copy, temperature):
    _edit_card(copy, temperature=float(temperature) if temperature == "nan" else temperature)
    with pytest.raises(BundleError, match="temperature"):
        Classifier(model=copy)


def test_missing_default_bundle_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(bundle_mod, "DEFAULT_BUNDLE", tmp_path / "models" / "default")
    with pytest.raises(BundleError, match="no default model is installed"):
        Classifier()
    for args in (["info"], ["classify", str(tmp_path)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "no default model is installed" in result.stderr and "--model" in result.stderr
