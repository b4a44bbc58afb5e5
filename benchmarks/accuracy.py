"""Accuracy on the official test set (624 images) for every artifact, with bootstrap intervals."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr_edge.bundle import load_bundle
from cxr_edge.engines import open_engine
from cxr_edge.preprocess import InputSpec, to_input
from train import data as data_mod
from train.metrics import bootstrap_ci, classification_metrics


@dataclass
class Artifact:
    name: str  # e.g. "efficientnet_lite0 / TFLite int8"
    model: str  # architecture
    fmt: str  # keras, tflite, onnx
    precision: str  # float32, float16, int8
    spec: InputSpec
    path: Path  # bundle folder, or run folder for keras
    run_id: str = ""
    pretrained: str = ""
    extra: dict = field(default_factory=dict)

    def predictor(self, threads: int | None = 2):
        """A function float32[N,S,S,1] -> probabilities[N,3]."""
        if self.fmt == "keras":
            from train.registry import load_run

            model, _, _ = load_run(self.path)
            return lambda x: model.predict(x, batch_size=32, verbose=0)
        bundle = load_bundle(self.path)
        model_path, _ = bundle.model_file(self.fmt)
        engine = open_engine(model_path, self.fmt, threads)
        return lambda x: np.concatenate([engine.run(x[i:i + 32]) for i in range(0, len(x), 32)])

    def file_bytes(self) -> int | None:
        if self.fmt == "keras":
            return sum(f.stat().st_size for f in Path(self.path).glob("weights*.npz"))
        return load_bundle(self.path).card["files"][self.fmt]["bytes"]


def bundle_artifacts(bundle_dir: Path, label: str = "") -> list[Artifact]:
    b = load_bundle(bundle_dir)
    out = []
    for fmt in b.backends():
        precision = b.card["files"][fmt].get("precision") or b.card.get("precision", "?")
        model = b.card.get("model", b.name)
        name = f"{model} / {'TFLite' if fmt == 'tflite' else 'ONNX'} {precision}{label}"
        out.append(Artifact(name, model, fmt, precision, b.spec, Path(bundle_dir),
                            b.card.get("training_run", ""), b.card.get("pretrained", "")))
    return out


def run_artifact(run_dir: Path) -> Artifact:
    cfg = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    spec = InputSpec.from_card(metrics["input"])
    return Artifact(f"{cfg['model']} / Keras float32 ({cfg.get('name') or run_dir.name})", cfg["model"],
                    "keras", "float32", spec, run_dir, run_dir.name, metrics.get("pretrained", ""),
                    {"protocol": cfg["protocol"], "val": metrics["val"]})


class TestSet:
    """The official test images, decoded once per input size through cxr_edge.preprocess."""

    def __init__(self, root: Path, limit: int = 0):
        self.records = data_mod.list_split(root, "test")
        if limit:
            rng = np.random.default_rng(0)
            idx = sorted(rng.choice(len(self.records), min(limit, len(self.records)), replace=False))
            self.records = [self.records[i] for i in idx]
        self.y = data_mod.labels_of(self.records)
        self._gray: dict[int, np.ndarray] = {}

    def inputs(self, spec: InputSpec) -> np.ndarray:
        if spec.size not in self._gray:
            self._gray[spec.size] = data_mod.load_images(self.records, spec.size)
        return to_input(self._gray[spec.size], spec)


def evaluate(artifact: Artifact, test: TestSet, bootstrap: int = 1000) -> dict:
    probs = artifact.predictor()(test.inputs(artifact.spec))
    return {"artifact": artifact.name, "model": artifact.model, "format": artifact.fmt,
            "precision": artifact.precision, "run_id": artifact.run_id, "pretrained": artifact.pretrained,
            "file_bytes": artifact.file_bytes(), "metrics": classification_metrics(test.y, probs),
            "ci95": bootstrap_ci(test.y, probs, n=bootstrap), "probs": np.asarray(probs).tolist(),
            **artifact.extra}
