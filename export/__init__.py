"""Export stage: a trained run (Keras weights) to the runtime's model bundles.

    python -m export.convert [--run ID] [--out DIR] [--calibration N] [--install-default]

Route: Keras inference model -> TF SavedModel (``export.savedmodel``) -> TFLite float32/float16/int8
(``export.tflite``) and ONNX float32/int8 (``export.onnx``); every artifact is then measured through the
runtime's own engines against the Keras float model (``export.parity``) and written as a bundle
(``cxr_edge.bundle.write_bundle``). ``export.convert.make_bundle`` does the same for any Keras model.
"""
