"""No train/serve skew: training, export calibration and the runtime feed the model the same arrays."""
from pathlib import Path

import numpy as np

from cxr_edge import Classifier
from cxr_edge.engines import open_engine
from cxr_edge.preprocess import to_input
from train import data

MINI = Path(__file__).parent / "data" / "chest_xray"


def test_runtime_probabilities_equal_the_training_pipeline_through_the_same_model(tiny_bundle):
    clf = Classifier(model=tiny_bundle, backend="onnx")
    recs = data.list_split(MINI, "train") + data.list_split(MINI, "test")
    # what training and export calibration compute (train.data.load_images -> to_input)
    x_train_side = to_input(data.load_images(recs, clf.spec.size, workers=2), clf.spec)
    engine = open_engine(clf.bundle.model_file("onnx")[0], "onnx")
    expected = engine.run(x_train_side)
    # what a user gets, one file at a time and in a batch
    one = np.array([[clf.classify(r.path).probabilities[c] for c in ("normal", "bacterial", "viral")]
                    for r in recs])
    many = np.array([[res.probabilities[c] for c in ("normal", "bacterial", "viral")]
                     for res in clf.classify_many([r.path for r in recs])])
    np.testing.assert_allclose(one, expected, atol=1e-6)
    np.testing.assert_allclose(many, expected, atol=1e-6)
