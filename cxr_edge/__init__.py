"""cxr-edge: chest X-ray classification (normal / bacterial / viral pneumonia) on a CPU with int8 TFLite or
ONNX models. ``from cxr_edge import Classifier``."""
__version__ = "0.1.0"

from cxr_edge.bundle import BundleError  # noqa: E402
from cxr_edge.classifier import Classifier, ErrorResult, RejectedResult, Result  # noqa: E402
from cxr_edge.engines import EngineError, open_engine  # noqa: E402
from cxr_edge.preprocess import PreprocessError  # noqa: E402

__all__ = ["Classifier", "Result", "RejectedResult", "ErrorResult", "BundleError", "EngineError", "PreprocessError",
           "open_engine", "__version__"]
