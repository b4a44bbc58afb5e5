"""Inference engines: one small interface over LiteRT (TFLite) and ONNX Runtime.

    engine = open_engine("model.tflite", "tflite", threads=2)
    probs = engine.run(x)                  # x: float32[N, S, S, 1] scaled per the card -> float32[N, 3]
    probs, features = engine.run_full(x)   # + the last feature map float32[N, h, w, C] (None if the model
                                           #   has no such output), from the same pass

The model contract: one float32 NHWC input with one channel, already scaled as the model card says, and an
output of softmax probabilities ``[N, 3]``. Models with int8/uint8 input or output tensors are handled by
(de)quantizing with the tensor's scale and zero point:

* TFLite keeps them on the tensor (``quantization``).
* ONNX has no per-tensor quantization on graph inputs/outputs, so a model with integer I/O must carry them in
  its metadata: ``cxr_edge.input_quantization`` / ``cxr_edge.output_quantization`` = ``"<scale>,<zero_point>"``.
  (Models whose QDQ nodes sit inside the graph, with float I/O, need nothing.)

On x86 CPUs without VNNI the ONNX engine runs int8 QDQ graphs unfused (``cxr_edge.cpu.onnx_int8_fused``).

Outputs are told apart by shape: the probabilities are the rank-2 output whose last dimension is 3, the
feature map (for heatmaps and the non-CXR gate's embedding) the rank-4 output, if there is one. Batches of
any size N >= 1 are accepted: a TFLite input tensor is resized to the batch; a model whose graph has its
batch size baked in (resizing fails, or gives outputs of the wrong batch) is run in a loop of its own batch
size.

Nothing here imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

from cxr_edge.cpu import onnx_int8_fused, onnx_session_options

NUM_CLASSES = 3
BACKENDS = ("tflite", "onnx")


class EngineError(RuntimeError):
    """The model file cannot be opened or run, or does not fit the model contract."""


class Engine(Protocol):
    backend: str
    path: Path

    def run(self, x: np.ndarray) -> np.ndarray:  # float32[N,S,S,1] -> float32[N,3]
        ...

    def run_full(self, x: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:  # + float32[N,h,w,C] | None
        ...


def _reraise_interrupt(exc: ImportError) -> None:
    """Raise the Ctrl-C hidden in an ImportError: ONNX Runtime and LiteRT are pybind11 modules, and pybind11 turns
    any exception raised while its module initialises (a KeyboardInterrupt included) into
    ``ImportError("initialization failed")`` from it. Read as "runtime not installed", the Ctrl-C was lost (and
    the backend could change): ``cxr-edge batch`` went on to finish the job."""
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def _tflite_interpreter_class():
    """LiteRT's Interpreter, or tflite_runtime's; ``None`` when neither is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter
    except ImportError as exc:
        _reraise_interrupt(exc)
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter
    except ImportError as exc:
        _reraise_interrupt(exc)
        return None


def _onnxruntime():
    try:
        import onnxruntime
        return onnxruntime
    except ImportError as exc:
        _reraise_interrupt(exc)
        return None


def _ort_errors() -> tuple:
    """The exceptions ONNX Runtime raises for a model it cannot load or run: its own classes (Fail,
    InvalidArgument, InvalidGraph, ...; they derive from Exception only) and RuntimeError/ValueError."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError as exc:
        _reraise_interrupt(exc)
        return (RuntimeError, ValueError)
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError, ValueError)


def available_backends() -> list[str]:
    """Backends whose runtime is importable here, in order of preference."""
    have = []
    if _tflite_interpreter_class() is not None:
        have.append("tflite")
    if _onnxruntime() is not None:
        have.append("onnx")
    return have


def _check_input(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 1 or x.shape[0] < 1:
        raise EngineError(f"expected input float32[N, S, S, 1] with N >= 1, got shape {x.shape}")
    return x


def _quantize(x: np.ndarray, dtype, scale: float, zero_point: int) -> np.ndarray:
    info = np.iinfo(dtype)
    if not scale:
        raise EngineError(f"{np.dtype(dtype).name} model input has no quantization scale")
    q = np.rint(x / np.float32(scale) + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if np.issubdtype(y.dtype, np.integer):
        if not scale:
            raise EngineError(f"{y.dtype.name} model output has no quantization scale")
        return ((y.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)
    return y.astype(np.float32, copy=False)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence what native code writes to file descriptor 2 (LiteRT's "INFO: Created TensorFlow Lite XNNPACK
    delegate for CPU." on the first allocation), so that a CLI's stderr carries only its own messages.
    Errors still arrive as Python exceptions."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _run_in_chunks(x: np.ndarray, chunk: int, fn, n: int):
    """``fn`` over ``x`` in chunks of ``chunk``; its ``(probs, features | None)`` joined and cut to ``n`` rows."""
    parts = [fn(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    probs = np.concatenate([p for p, _ in parts], axis=0)[:n]
    feats = None if parts[0][1] is None else np.concatenate([f for _, f in parts], axis=0)[:n]
    return probs, feats


def _pick_outputs(path: Path, shapes: list) -> tuple[int, Optional[int]]:
    """Indices of the probabilities output (rank 2, last dimension 3) and of the feature map (rank 4; None
    when the model has none)."""
    probs = [i for i, s in enumerate(shapes) if len(s) == 2 and s[-1] == NUM_CLASSES]
    feats = [i for i, s in enumerate(shapes) if len(s) == 4]
    if not probs:
        raise EngineError(f"{path}: no output of shape [N, {NUM_CLASSES}] (outputs: {[list(s) for s in shapes]})")
    if len(probs) > 1 or len(feats) > 1:
        raise EngineError(f"{path}: cannot tell the outputs apart (outputs: {[list(s) for s in shapes]})")
    return probs[0], (feats[0] if feats else None)


def load_tflite_interpreter(path: Path, threads: Optional[int] = None):
    """A LiteRT (or tflite_runtime) interpreter with its tensors allocated; :class:`EngineError` when no
    TFLite runtime is installed or the file is not a loadable model."""
    Interpreter = _tflite_interpreter_class()
    if Interpreter is None:
        raise EngineError("no TFLite runtime: pip install ai-edge-litert (or tflite-runtime)")
    try:
        interp = Interpreter(model_path=str(path), num_threads=threads)
        with _quiet_native_stderr():
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise EngineError(f"{path}: cannot load TFLite model ({exc})") from None
    return interp


class TFLiteEngine:
    backend = "tflite"

    def __init__(self, path: Path, threads: Optional[int] = None):
        self.path = path
        self._interp = load_tflite_interpreter(path, threads)
        inputs = self._interp.get_input_details()
        if len(inputs) != 1:
            raise EngineError(f"{path}: expected one input, model has {len(inputs)}")
        self._input = inputs[0]
        self._batch = self._model_batch = int(self._input["shape"][0])
        self._fixed_batch = False  # set when the graph cannot run another batch size (see run_full)
        signature = self._input.get("shape_signature")
        self._dynamic_batch = signature is not None and len(signature) > 0 and int(signature[0]) == -1
        self.input_shape = tuple(int(d) for d in self._input["shape"][1:])
        outs = self._interp.get_output_details()
        self._probs_index, self._feats_index = _pick_outputs(path, [tuple(d["shape"]) for d in outs])
        self.has_features = self._feats_index is not None

    def _resize(self, n: int) -> None:
        if n == self._batch:
            return
        self._batch = -1  # unknown until the resize below succeeds
        self._interp.resize_tensor_input(self._input["index"], [n, *self.input_shape])
        self._interp.allocate_tensors()
        self._input = self._interp.get_input_details()[0]
        self._batch = n

    def _invoke(self, x: np.ndarray, full: bool):
        d = self._input
        dtype = np.dtype(d["dtype"])
        if np.issubdtype(dtype, np.integer):
            scale, zp = d["quantization"]
            feed = _quantize(x, dtype, scale, zp)
        else:
            feed = x.astype(dtype, copy=False)
        self._interp.set_tensor(d["index"], feed)
        self._interp.invoke()
        outs = self._interp.get_output_details()
        wanted = [self._probs_index] + ([self._feats_index] if full and self.has_features else [])
        got = [_dequantize(np.array(self._interp.get_tensor(outs[i]["index"])), *outs[i]["quantization"])
               for i in wanted]
        return got[0], (got[1] if len(got) > 1 else None)

    def _run_batch(self, x: np.ndarray, full: bool = True):
        try:
            return self._invoke(x, full)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"{self.path}: inference failed ({' '.join(str(exc).split())})") from None

    def _try_batch(self, x: np.ndarray, full: bool):
        """Resize the input to ``len(x)`` and run; ``None`` when this graph cannot run that batch size (the
        resize or the run fails inside the runtime, or the outputs do not have ``len(x)`` rows). Only for
        graphs with a static batch dimension: a dynamic one is resized and any failure is an error."""
        n = len(x)
        if self._dynamic_batch:
            try:
                self._resize(n)
            except (ValueError, RuntimeError) as exc:
                raise EngineError(f"{self.path}: cannot resize the input to {n} ({exc})") from None
            return self._run_batch(x, full)
        try:
            self._resize(n)
            probs, feats = self._invoke(x, full)
        except (ValueError, RuntimeError):  # what LiteRT raises for a shape it cannot allocate or run
            return None
        if probs.shape != (n, NUM_CLASSES) or (feats is not None and len(feats) != n):
            return None
        return probs, feats

    def run_full(self, x: np.ndarray, full: bool = True):
        """``(probs float32[N, 3], features float32[N, h, w, C] or None)`` from one pass."""
        x = _check_input(x)
        if x.shape[1:] != self.input_shape:
            raise EngineError(f"model wants input [N, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        n = len(x)
        if n != self._batch and not self._fixed_batch:
            out = self._try_batch(x, full)
            if out is not None:
                return out
            # The graph has its batch size baked in: it runs in chunks of its own batch size from now on.
            self._fixed_batch = True
            try:
                self._resize(self._model_batch)
            except (ValueError, RuntimeError) as exc:
                raise EngineError(f"{self.path}: cannot restore the input shape ({exc})") from None
        if n != self._batch:
            b = self._batch
            pad = (-n) % b
            padded = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
            return _run_in_chunks(padded, b, lambda c: self._run_batch(c, full), n)
        return self._run_batch(x, full)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_full(x, full=False)[0]


def _parse_quant(meta: dict, key: str):
    value = meta.get(key)
    if value is None:
        return None
    try:
        scale, zp = value.split(",")
        return float(scale), int(zp)
    except ValueError:
        raise EngineError(f"model metadata {key}={value!r} is not '<scale>,<zero_point>'") from None


_ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
                "tensor(float16)": np.float16}


class OnnxEngine:
    backend = "onnx"

    def __init__(self, path: Path, threads: Optional[int] = None):
        ort = _onnxruntime()
        if ort is None:
            raise EngineError("no ONNX runtime: pip install onnxruntime")
        self.path = path
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.int8_fused = onnx_int8_fused()  # False: QDQ computed in float (the saturating kernels, cxr_edge.cpu)
        onnx_session_options(ort, opts)
        self._errors = _ort_errors()
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except self._errors as exc:
            raise EngineError(f"{path}: cannot load ONNX model ({str(exc).splitlines()[0]})") from None
        inputs = self._sess.get_inputs()
        if len(inputs) != 1:
            raise EngineError(f"{path}: expected one input, model has {len(inputs)}")
        self._input = inputs[0]
        if self._input.type not in _ONNX_DTYPES:
            raise EngineError(f"{path}: unsupported input type {self._input.type}")
        self._in_dtype = np.dtype(_ONNX_DTYPES[self._input.type])
        shape = self._input.shape
        self._batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.input_shape = tuple(d if isinstance(d, int) and d > 0 else None for d in shape[1:])
        outs = self._sess.get_outputs()
        pi, fi = _pick_outputs(path, [tuple(o.shape) for o in outs])
        self._output = outs[pi].name
        self._features = None if fi is None else outs[fi].name
        self.has_features = fi is not None
        if fi is not None and outs[fi].type not in ("tensor(float)", "tensor(float16)"):
            raise EngineError(f"{path}: feature map output is {outs[fi].type}, not float")
        meta = self._sess.get_modelmeta().custom_metadata_map or {}
        self._in_q = _parse_quant(meta, "cxr_edge.input_quantization")
        self._out_q = _parse_quant(meta, "cxr_edge.output_quantization")
        if np.issubdtype(self._in_dtype, np.integer) and self._in_q is None:
            raise EngineError(f"{path}: {self._input.type} input without cxr_edge.input_quantization metadata")
        out_type = outs[pi].type
        if out_type in ("tensor(int8)", "tensor(uint8)") and self._out_q is None:
            raise EngineError(f"{path}: {out_type} output without cxr_edge.output_quantization metadata")

    def _run_batch(self, x: np.ndarray, full: bool = True):
        if np.issubdtype(self._in_dtype, np.integer):
            feed = _quantize(x, self._in_dtype, *self._in_q)
        else:
            feed = x.astype(self._in_dtype, copy=False)
        names = [self._output] + ([self._features] if full and self._features else [])
        try:
            got = self._sess.run(names, {self._input.name: feed})
        except self._errors as exc:
            raise EngineError(f"{self.path}: inference failed ({str(exc).splitlines()[0]})") from None
        probs = _dequantize(np.asarray(got[0]), *(self._out_q or (1.0, 0)))
        return probs, (np.asarray(got[1], dtype=np.float32) if len(got) > 1 else None)

    def run_full(self, x: np.ndarray, full: bool = True):
        """``(probs float32[N, 3], features float32[N, h, w, C] or None)`` from one pass."""
        x = _check_input(x)
        want = self.input_shape
        if any(w is not None and w != g for w, g in zip(want, x.shape[1:])):
            shown = ", ".join("?" if w is None else str(w) for w in want)
            raise EngineError(f"model wants input [N, {shown}], got {list(x.shape)}")
        n = len(x)
        if self._batch is not None and n != self._batch:
            pad = (-n) % self._batch
            padded = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)]) if pad else x
            return _run_in_chunks(padded, self._batch, lambda c: self._run_batch(c, full), n)
        return self._run_batch(x, full)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.run_full(x, full=False)[0]


def open_engine(path: str | os.PathLike, backend: Optional[str] = None, threads: Optional[int] = None) -> Engine:
    """Open a model file for inference. ``backend`` is ``"tflite"`` or ``"onnx"`` (``None``: from the file's
    suffix). ``threads``: intra-op CPU threads (``None``: the runtime's default)."""
    path = Path(path)
    if backend is None:
        backend = {".tflite": "tflite", ".onnx": "onnx"}.get(path.suffix.lower())
        if backend is None:
            raise EngineError(f"{path}: cannot tell the backend from the suffix; pass backend='tflite' or 'onnx'")
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if threads is not None and int(threads) < 1:
        raise EngineError(f"threads must be >= 1, got {threads}")
    if not path.is_file():
        raise EngineError(f"{path}: no such model file")
    return TFLiteEngine(path, threads) if backend == "tflite" else OnnxEngine(path, threads)
