"""Training data: labels and patients from real file names, patient-grouped split, report protocol."""
import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cxr_edge.labels import CLASS_NAMES
from cxr_edge.preprocess import load_gray
from train import data

MINI = Path(__file__).parent / "data" / "chest_xray"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_labels_and_patients_from_real_file_names():
    recs = data.list_split(MINI, "train")
    got = {Path(r.path).name: (CLASS_NAMES[r.label], r.patient) for r in recs}
    assert got["IM-0115-0001.jpeg"] == ("normal", "train/IM-0115")
    assert got["person1000_bacteria_2931.jpeg"] == ("bacterial", "train/person1000")
    assert got["person1000_virus_1681.jpeg"] == ("viral", "train/person1000")
    test = {Path(r.path).name: r.patient for r in data.list_split(MINI, "test")}
    assert test["NORMAL2-IM-0219-0001.jpeg"] == "test/NORMAL2-IM-0219"


def test_unparseable_pneumonia_name_is_an_error():
    with pytest.raises(ValueError, match="bacterial from viral"):
        data.parse_name("PNEUMONIA", "scan.jpeg")


@pytest.mark.skipif(not (SHARED / "MANIFEST.csv").exists(), reason="needs ../shared/data")
def test_parsing_matches_the_manifest_for_every_file():
    rows = list(csv.DictReader(open(SHARED / "MANIFEST.csv")))
    wanted = {"NORMAL": "normal", "BACTERIA": "bacterial", "VIRUS": "viral"}
    for r in rows:
        folder, name = Path(r["path"]).parts[-2:]
        label, patient = data.parse_name(folder, name)
        assert (CLASS_NAMES[label], patient) == (wanted[r["label3"]], r["patient_id"]), r["path"]


def _records(n_patients=300, seed=1):
    rng = np.random.default_rng(seed)
    recs = []
    for p in range(n_patients):
        label = int(rng.integers(0, 3))
        for k in range(int(rng.integers(1, 6))):  # several images per patient, as in the real set
            recs.append(data.Record(f"p{p}_{k}.jpeg", label, f"train/p{p}", "train"))
    return recs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_never_shares_a_patient_and_is_stratified(seed):
    recs = _records()
    train, val = data.grouped_split(recs, 0.15, seed)
    assert len(train) + len(val) == len(recs)
    assert not {r.patient for r in train} & {r.patient for r in val}
    assert 0.08 < len(val) / len(recs) < 0.25
    share = lambda rs: np.bincount([r.label for r in rs], minlength=3) / len(rs)
    assert np.abs(share(train) - share(val)).max() < 0.08
    again, _ = data.grouped_split(recs, 0.15, seed)
    assert [r.path for r in again] == [r.path for r in train]  # seeded


@pytest.mark.skipif(not (SHARED / "chest_xray" / "train").is_dir(), reason="needs ../shared/data")
def test_default_protocol_on_the_real_set_is_patient_grouped_and_never_reads_test():
    splits = data.protocol_splits(SHARED / "chest_xray", "grouped")
    assert set(splits) == {"train", "val"}
    assert not {r.patient for r in splits["train"]} & {r.patient for r in splits["val"]}
    assert all(r.split == "train" for rs in splits.values() for r in rs)
    assert len(splits["train"]) + len(splits["val"]) == 5216


def test_seed_protocol_is_the_reports_64_16_20_random_split(tmp_path):
    recs = _records(400)
    train, val, test = data.seed_split(recs, seed=0)
    n = len(recs)
    assert len(train) + len(val) + len(test) == n
    assert abs(len(test) / n - 0.20) < 0.01 and abs(len(val) / n - 0.16) < 0.01
    assert Counter(r.label for r in test).keys() == {0, 1, 2}
    # the leak the report had: patients on both sides
    assert {r.patient for r in train} & {r.patient for r in test}


def test_training_images_come_from_the_runtime_preprocessing():
    recs = data.list_split(MINI, "train") + data.list_split(MINI, "test")
    arr = data.load_images(recs, 96, workers=2)
    assert arr.shape == (len(recs), 96, 96) and arr.dtype == np.uint8
    for i, r in enumerate(recs):
        np.testing.assert_array_equal(arr[i], load_gray(r.path, 96))


def test_the_validation_split_does_not_follow_the_training_seed():
    """Runs with other training seeds (ensemble teachers) are validated on the same images as the rest, so
    none trains on a student's validation images; a run recorded before ``split_seed`` keeps its split."""
    from train.fit import FitConfig, load_arrays, train_names

    a, b = FitConfig(val_fraction=0.5, input_size=32), FitConfig(val_fraction=0.5, input_size=32, seed=1)
    assert train_names(a, MINI) == train_names(b, MINI)
    np.testing.assert_array_equal(load_arrays(a, MINI)["val"][1], load_arrays(b, MINI)["val"][1])
    moved = FitConfig(val_fraction=0.5, input_size=32, split_seed=1)
    assert train_names(moved, MINI) != train_names(a, MINI)  # the split seed does move it
    assert data.split_seed_of({"seed": 2}) == 2 and data.split_seed_of({"seed": 2, "split_seed": 0}) == 0
