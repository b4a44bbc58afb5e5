"""Inference engines: one small interface over LiteRT (TFLite) and ONNX Runtime.

    engine = open_engine("model.tflite", "tflite", threads=2)
    probs = engine.run(x)          # x: float32[N, S, S, 1] scaled per the card -> float32[N, 3]

The model contract: one float32 NHWC input with one channel, already scaled as the model card says, and an
output of softmax probabilities ``[N, 3]``. Models with int8/uint8 input or output tensors are handled by
(de)quantizing with the tensor's scale and zero point:

* TFLite keeps them on the tensor (``quantization``).
* ONNX has no per-tensor quantization on graph inputs/outputs, so a model with integer I/O must carry them in
  its metadata: ``cxr_edge.input_quantization`` / ``cxr_edge.output_quantization`` = ``"<scale>,<zero_point>"``.
  (Models whose QDQ nodes sit inside the graph, with float I/O, need nothing.)

If a model has more than one output (for example a feature map for heatmaps), the probabilities are the
output whose last dimension is 3. Batches of any size N >= 1 are accepted: a TFLite input tensor is resized
to the batch; a model with a fixed batch dimension is run in a loop of its own batch size.

Nothing here imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional, Protocol

import numpy as np

NUM_CLASSES = 3
BACKENDS = ("tflite", "onnx")


class EngineError(RuntimeError):
    """The model file cannot be opened or run, or does not fit the model contract."""


class Engine(Protocol):
    backend: str
    path: Path

    def run(self, x: np.ndarray) -> np.ndarray:  # float32[N,S,S,1] -> float32[N,3]
        ...


def _tflite_interpreter_class():
    """LiteRT's Interpreter, or tflite_runtime's; ``None`` when neither is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter
    except ImportError:
        return None


def _onnxruntime():
    try:
        import onnxruntime
        return onnxruntime
    except ImportError:
        return None


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


def _run_in_chunks(x: np.ndarray, chunk: int, fn) -> np.ndarray:
    return np.concatenate([fn(x[i:i + chunk]) for i in range(0, len(x), chunk)], axis=0)


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
        self._fixed_batch = False
        self.input_shape = tuple(int(d) for d in self._input["shape"][1:])
        self._output_index = self._pick_output()

    def _pick_output(self) -> int:
        outs = self._interp.get_output_details()
        for i, d in enumerate(outs):
            if len(d["shape"]) == 2 and int(d["shape"][-1]) == NUM_CLASSES:
                return i
        raise EngineError(f"{self.path}: no output of shape [N, {NUM_CLASSES}] "
                          f"(outputs: {[list(d['shape']) for d in outs]})")

    def _resize(self, n: int) -> None:
        if n == self._batch:
            return
        self._batch = -1  # unknown until the resize below succeeds
        self._interp.resize_tensor_input(self._input["index"], [n, *self.input_shape])
        self._interp.allocate_tensors()
        self._input = self._interp.get_input_details()[0]
        self._batch = n

    def _run_batch(self, x: np.ndarray) -> np.ndarray:
        d = self._input
        dtype = np.dtype(d["dtype"])
        if np.issubdtype(dtype, np.integer):
            scale, zp = d["quantization"]
            feed = _quantize(x, dtype, scale, zp)
        else:
            feed = x.astype(dtype, copy=False)
        try:
            self._interp.set_tensor(d["index"], feed)
            self._interp.invoke()
            out = self._interp.get_output_details()[self._output_index]
            y = self._interp.get_tensor(out["index"])
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"{self.path}: inference failed ({' '.join(str(exc).split())})") from None
        return _dequantize(np.array(y), *out["quantization"])

    def run(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)
        if x.shape[1:] != self.input_shape:
            raise EngineError(f"model wants input [N, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        n = len(x)
        if n != self._batch and not self._fixed_batch:
            try:
                self._resize(n)
                y = self._run_batch(x)
                if y.shape == (n, NUM_CLASSES):
                    return y
            except (ValueError, RuntimeError, EngineError):
                pass
            # The graph has its batch size baked in: from now on run it in its own batch size.
            self._fixed_batch = True
            try:
                self._resize(self._model_batch)
            except (ValueError, RuntimeError) as exc:
                raise EngineError(f"{self.path}: cannot restore the input shape ({exc})") from None
        if n != self._batch:
            b = self._batch
            pad = (-n) % b
            padded = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
            return _run_in_chunks(padded, b, self._run_batch)[:n]
        return self._run_batch(x)


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
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
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
        picked = [o for o in outs if len(o.shape) == 2 and o.shape[-1] == NUM_CLASSES]
        if not picked:
            raise EngineError(f"{path}: no output of shape [N, {NUM_CLASSES}] "
                              f"(outputs: {[list(o.shape) for o in outs]})")
        self._output = picked[0].name
        meta = self._sess.get_modelmeta().custom_metadata_map or {}
        self._in_q = _parse_quant(meta, "cxr_edge.input_quantization")
        self._out_q = _parse_quant(meta, "cxr_edge.output_quantization")
        if np.issubdtype(self._in_dtype, np.integer) and self._in_q is None:
            raise EngineError(f"{path}: {self._input.type} input without cxr_edge.input_quantization metadata")
        out_type = picked[0].type
        if out_type in ("tensor(int8)", "tensor(uint8)") and self._out_q is None:
            raise EngineError(f"{path}: {out_type} output without cxr_edge.output_quantization metadata")

    def _run_batch(self, x: np.ndarray) -> np.ndarray:
        if np.issubdtype(self._in_dtype, np.integer):
            feed = _quantize(x, self._in_dtype, *self._in_q)
        else:
            feed = x.astype(self._in_dtype, copy=False)
        try:
            (y,) = self._sess.run([self._output], {self._input.name: feed})
        except Exception as exc:
            raise EngineError(f"{self.path}: inference failed ({str(exc).splitlines()[0]})") from None
        return _dequantize(np.asarray(y), *(self._out_q or (1.0, 0)))

    def run(self, x: np.ndarray) -> np.ndarray:
        x = _check_input(x)
        want = self.input_shape
        if any(w is not None and w != g for w, g in zip(want, x.shape[1:])):
            shown = ", ".join("?" if w is None else str(w) for w in want)
            raise EngineError(f"model wants input [N, {shown}], got {list(x.shape)}")
        if self._batch is not None and len(x) != self._batch:
            if self._batch != 1:
                pad = (-len(x)) % self._batch
                padded = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)]) if pad else x
                return _run_in_chunks(padded, self._batch, self._run_batch)[:len(x)]
            return _run_in_chunks(x, 1, self._run_batch)
        return self._run_batch(x)


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
