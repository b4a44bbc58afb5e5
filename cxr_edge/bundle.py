"""Model bundles: a folder with one or more model files (``model.tflite``, ``model.onnx``) and a JSON model
card, ``card.json``, that describes them:

    {
      "name": "cxr-edge-lite0", "version": "1.0.0",
      "classes": ["normal", "bacterial", "viral"],
      "input": {"size": 224, "scale": 0.0078125, "offset": -0.9921875, ...},   # cxr_edge.preprocess.InputSpec
      "files": {"tflite": {"path": "model.tflite", "sha256": "...", "bytes": 1234, "precision": "int8"},
                "onnx":   {"path": "model.onnx",   "sha256": "...", "bytes": 1234, "precision": "int8"}},
      "training_run": "<run id>", "date": "YYYY-MM-DD",
      "metrics": {"official_test": {...}, "validation": {...}},   # measured by export, never typed in
      "temperature": 1.0,                                          # optional: softmax(log p / T)
      ...
    }

The runtime verifies each model file's sha256 before loading it and refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cxr_edge.intensity import check
from cxr_edge.labels import CLASS_NAMES
from cxr_edge.preprocess import InputSpec

CARD_NAME = "card.json"
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "models" / "default"
BACKENDS = ("tflite", "onnx")


class BundleError(RuntimeError):
    """A bundle is missing, malformed, or its model file does not match its card."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    root: Path
    card: dict

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_card(self.card["input"])

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def version(self) -> str:
        return self.card["version"]

    def backends(self) -> list[str]:
        return [b for b in BACKENDS if b in self.card.get("files", {})]

    def model_file(self, backend: str, verify: bool = True) -> tuple[Path, str]:
        """Path and sha256 of the model file for ``backend``, checked against the card."""
        files = self.card.get("files", {})
        if backend not in files:
            have = ", ".join(files) or "none"
            raise BundleError(f"bundle {self.root} has no {backend} model (has: {have})")
        entry = files[backend]
        return verified_file(self.root, entry, "model file", verify), entry["sha256"]


def verified_file(root: Path, entry: dict, what: str, verify: bool = True) -> Path:
    """The file a card entry (``{"path", "sha256", ...}``) names inside bundle ``root``, refused with a
    :class:`BundleError` when it is missing or its sha256 differs from the card's."""
    path = Path(root) / entry["path"]
    if not path.is_file():
        raise BundleError(f"bundle {root}: {what} {entry['path']} is missing")
    if verify:
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise BundleError(f"bundle {root}: {entry['path']} sha256 {actual[:12]}... does not "
                              f"match the card's {str(entry['sha256'])[:12]}... (corrupt or replaced file)")
    return path


def load_bundle(path: str | Path | None = None) -> Bundle:
    """A bundle folder, or the path of its ``card.json``; ``None`` for the embedded default model."""
    root = Path(path) if path is not None else DEFAULT_BUNDLE
    if root.is_file() and root.suffix == ".json":
        root = root.parent
    card_path = root / CARD_NAME
    if path is None and not card_path.is_file():
        raise BundleError(f"no default model is installed (expected a bundle in {root}); "
                          "pass a bundle folder with --model PATH (or Classifier(model=PATH))")
    if not card_path.is_file():
        raise BundleError(f"{root} is not a model bundle (no {CARD_NAME})")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{card_path}: unreadable model card ({exc})") from None
    missing = [k for k in ("name", "version", "classes", "input", "files") if k not in card]
    if missing:
        raise BundleError(f"{card_path}: model card lacks {', '.join(missing)}")
    if tuple(card["classes"]) != CLASS_NAMES:
        raise BundleError(f"{card_path}: classes {card['classes']} are not {list(CLASS_NAMES)}")
    try:  # a newer model's input this runtime cannot make: refuse, never guess
        check(card["input"].get("intensity", "none"))
    except (AttributeError, ValueError) as exc:
        raise BundleError(f"{card_path}: {exc}; upgrade cxr-edge") from None
    return Bundle(root, card)


def write_bundle(root: str | Path, card: dict, files: dict[str, Path]) -> Bundle:
    """Write ``card.json`` for model files already inside ``root`` (``{backend: path}``), filling in
    each file's sha256 and size. Used by export; the card's other fields come from the caller."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    card = dict(card)
    card["classes"] = list(CLASS_NAMES)
    entries = dict(card.get("files", {}))
    for backend, f in files.items():
        f = Path(f)
        if f.parent.resolve() != root.resolve():
            raise ValueError(f"{f} must be inside the bundle folder {root}")
        entries[backend] = {**entries.get(backend, {}), "path": f.name, "sha256": sha256_file(f),
                            "bytes": f.stat().st_size}
    card["files"] = entries
    (root / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return load_bundle(root)
