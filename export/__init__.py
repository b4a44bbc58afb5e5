"""Export stage: a trained run (Keras weights) to the runtime's model bundles.

    python -m export.convert [--run ID] [--out DIR] [--calibration N] [--install-default]

Route (``export.convert.export_model``, shared by the command and ``make_bundle``, which the tests use):
Keras inference model with a second output, the ``features`` map (``export.cam``) -> TF SavedModel
(``export.savedmodel``) -> TFLite float32/float16/int8 (``export.tflite``) and ONNX float32/int8
(``export.onnx``); every artifact is then measured through the runtime's own engines against the Keras
float model (``export.parity``; int8 retried and gated on the validation split only), and written as a
bundle (``cxr_edge.bundle.write_bundle``) with its temperature (``export.calibrate``) and ``cam.npz``.
"""
