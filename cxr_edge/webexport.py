"""``cxr-edge export-web DIR``: a static folder that classifies scans in the browser, the scan never leaving
the machine (docs/runtimes.md).

The folder holds the page (``index.html``, ``page.js``, ``page.css``), the runtime's arithmetic in
JavaScript (``cxr.js``: the reduction and Lanczos squash of ``cxr_edge.preprocess``, the input gate of
``cxr_edge.ood``, the heatmap of ``cxr_edge.heatmap``), onnxruntime-web's WASM build (``vendor/``, taken from
its npm package by ``scripts/vendor-onnxruntime-web.sh`` and shipped in this package: no CDN), the bundle's
ONNX model and card, and ``params.json`` + ``params.bin``: the input spec, the temperature, the CAM weights
and the gate's parameters (its head's class names, reasons, thresholds and arrays as little-endian float32),
read by ``cxr.js`` so that a gate refitted with other classes needs no change to the JavaScript. Any static
web server can host the folder; it makes no request outside its own origin.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from cxr_edge.bundle import Bundle, BundleError, load_bundle

APP = Path(__file__).resolve().parent / "webapp"
PAGE_FILES = ("index.html", "page.js", "page.css", "cxr.js")
VENDOR_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm", "LICENSE",
                "VERSION")


class WebExportError(RuntimeError):
    """The folder cannot be written (a bundle without an ONNX feature output, a non-empty folder, ...)."""


def _prefix(question: str) -> str:
    """A thumbnail question's name in the page's parameters: its arrays' prefix ("polarity": "pol", so
    ``pol_weights``, ``pol_bias``, ``pol_threshold``)."""
    from cxr_edge import ood

    return ood.THUMB_QUESTIONS[question][0].removesuffix("_weights")


def _gate_params(bundle: Bundle, add) -> Optional[dict]:
    from cxr_edge import ood

    gate = ood.Gate.from_bundle(bundle.root, bundle.card)
    if gate is None:
        return None
    if gate.has_appearance:
        raise WebExportError(f"bundle {bundle.root}: its gate is an older thumbnail model; the browser runs "
                             "only gates with an embedding head (python -m train.ood BUNDLE)")
    out = {"max_colour_fraction": gate.max_colour_fraction, "min_std": gate.min_std, "thumb": gate.thumb,
           "reasons": dict(ood.REASONS), "adult_class": getattr(ood, "ADULT", None),
           "population": getattr(ood, "POPULATION", ""), "grid": 0}
    if gate.has_embedding:
        out.update(classes=list(gate.emb_classes), threshold=gate.emb_threshold)
        for name in ood.EMBED_ARRAYS:
            add(f"gate.{name}", getattr(gate, name))
    if gate.has_layout:
        out["grid"] = gate.grid
        add("gate.lay_mean", gate.lay_mean)
        add("gate.lay_proj", gate.lay_proj)
    if getattr(gate, "has_adult", False):
        out["adult_threshold"] = gate.adult_threshold
        add("gate.adult_weights", gate.adult_weights)
        add("gate.adult_bias", np.atleast_1d(gate.adult_bias))
        if gate.has_adult_other:
            add("gate.adult_other_weights", gate.adult_other_weights)
            add("gate.adult_other_bias", np.atleast_1d(gate.adult_other_bias))
    for key, (weights, bias, threshold) in gate.questions.items():  # polarity, upside down, on its side
        out[f"{_prefix(key)}_threshold"] = threshold
        add(f"gate.{_prefix(key)}_weights", weights)
        add(f"gate.{_prefix(key)}_bias", np.atleast_1d(bias))
    if gate.has_density:
        out["density_threshold"] = gate.den_threshold
        for name in ood.DENSITY_ARRAYS:
            add(f"gate.{name}", getattr(gate, name))
    return out


def web_params(bundle: Bundle) -> tuple[dict, bytes]:
    """(``params.json``'s content, ``params.bin``): what ``cxr.js`` needs besides the model."""
    from cxr_edge.heatmap import load_cam_weights
    from cxr_edge.labels import CLASS_NAMES
    from cxr_edge import preprocess as pre

    blobs, arrays = [], {}

    def add(name: str, a) -> None:
        a = np.ascontiguousarray(a, dtype="<f4")
        arrays[name] = {"offset": sum(len(b) for b in blobs), "length": int(a.size), "shape": list(a.shape)}
        blobs.append(a.tobytes())

    spec = bundle.spec
    if spec.intensity != "none":  # cxr.js scales the gray image only: it would feed this model the wrong input
        raise WebExportError(f"{bundle.name}: the web page does not implement input intensity {spec.intensity!r}")
    params = {"format": 1, "model": {"name": bundle.name, "version": bundle.version},
              "classes": list(CLASS_NAMES), "temperature": float(bundle.card.get("temperature") or 1.0),
              "input": {"size": spec.size, "scale": spec.scale, "offset": spec.offset, "keep": pre.KEEP,
                        "min_side": pre.MIN_SIDE},
              # bins: chroma apart from the image's own tint per luminance bin (0: plain max - min)
              "colour": {"side": pre.COLOUR_SIDE, "level": pre.CHROMA_LEVEL, "saturated": pre.SATURATED_LEVEL,
                         "bins": getattr(pre, "TINT_BINS", 0) if hasattr(pre, "off_tint_chroma") else 0}}
    if isinstance(bundle.card.get("cam"), dict):
        add("cam_weights", load_cam_weights(bundle))
    params["gate"] = _gate_params(bundle, add)
    if params["gate"] and params["gate"].get("classes"):  # the true reasons of turned and inverted chest films
        from cxr_edge import reorient

        params["reorient"] = {"views": [[k, what, _prefix(key)] for k, what, key in reorient.VIEWS],
                              "upside_down": reorient.UPSIDE_DOWN}
    params["arrays"] = arrays
    return params, b"".join(blobs)


def _outputs(path: Path) -> Optional[dict]:
    """The ONNX model's outputs and their ranks, read with onnx or onnxruntime (``None`` when neither is
    installed: a LiteRT-only runtime can still write the folder; the browser reads the file itself)."""
    try:
        import onnx

        return {o.name: len(o.type.tensor_type.shape.dim) for o in onnx.load(str(path)).graph.output}
    except ImportError:
        pass
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return {o.name: len(o.shape) for o in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()}


def _check_model(path: Path) -> None:
    outs = _outputs(path)
    if outs is not None and (outs.get("probs") != 2 or outs.get("features") != 4):
        raise WebExportError(f"{path}: the page needs an ONNX model with outputs 'probs' [N, 3] and 'features' "
                             f"[N, h, w, C] (one pass for label, gate and heatmap); it has {outs}")


def export_web(dest, model=None, overwrite: bool = False) -> Path:
    """Write the static folder into ``dest`` (created; a non-empty one only with ``overwrite``, which replaces
    the files it writes and leaves others). ``model``: a bundle folder (default: the shipped one)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise WebExportError(f"{dest}: exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise WebExportError(f"{dest}: folder is not empty (--overwrite replaces the files export-web writes)")
    missing = [f for f in PAGE_FILES if not (APP / f).is_file()] + [
        f"vendor/{f}" for f in VENDOR_FILES if not (APP / "vendor" / f).is_file()]
    if missing:
        raise WebExportError(f"this installation lacks {', '.join(missing)} (run scripts/vendor-onnxruntime-web.sh)")
    try:
        bundle = load_bundle(model)
        onnx_path, _ = bundle.model_file("onnx")
    except (BundleError, KeyError) as exc:
        raise WebExportError(f"cannot read the bundle's ONNX model: {exc}") from None
    _check_model(onnx_path)
    params, blob = web_params(bundle)
    (dest / "vendor").mkdir(parents=True, exist_ok=True)
    for f in PAGE_FILES:
        shutil.copyfile(APP / f, dest / f)
    for f in VENDOR_FILES:
        shutil.copyfile(APP / "vendor" / f, dest / "vendor" / f)
    shutil.copyfile(onnx_path, dest / "model.onnx")
    card = {**bundle.card, "files": {"onnx": bundle.card["files"]["onnx"]}}
    (dest / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (dest / "params.json").write_text(json.dumps(params, indent=1) + "\n")
    (dest / "params.bin").write_bytes(blob)
    return dest
