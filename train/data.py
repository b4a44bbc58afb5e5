"""The Kermany chest X-ray set in its Kaggle layout: labels, patients, splits and pixel arrays.

Layout: ``DIR/{train,val,test}/{NORMAL,PNEUMONIA}/<file>``. Labels come from the folder and, for
pneumonia, from the file name (``person1_bacteria_1.jpeg`` / ``person1_virus_6.jpeg``). Patient ids are
parsed from the file name too; they are only unique within one official split.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_edge.labels import CLASS_NAMES
from cxr_edge.preprocess import load_gray

DATA_ENV = "CXR_EDGE_DATA"
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "chest_xray"
IMAGE_EXT = {".jpeg", ".jpg", ".png"}

_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


@dataclass(frozen=True)
class Record:
    path: str
    label: int  # index into CLASS_NAMES
    patient: str  # "<split>/<patient id>": ids are only unique within one official split
    split: str


def data_dir(arg: str | None = None) -> Path:
    """``--data`` if given, else ``$CXR_EDGE_DATA``, else ``../shared/data/chest_xray``."""
    path = Path(arg or os.environ.get(DATA_ENV) or DEFAULT_DATA)
    if not (path / "train").is_dir():
        raise FileNotFoundError(f"{path} has no train/ folder (Kaggle layout expected); pass --data")
    return path


def parse_name(folder: str, name: str) -> tuple[int, str]:
    """(label index, patient id) from the class folder and the file name."""
    if folder.upper() == "NORMAL":
        m = _NORMAL.match(name)
        return CLASS_NAMES.index("normal"), (m.group(1) if m else Path(name).stem)
    m = _PNEUMONIA.match(name)
    if not m:
        raise ValueError(f"cannot tell bacterial from viral: {folder}/{name}")
    kind = "bacterial" if m.group(2).lower() == "bacteria" else "viral"
    return CLASS_NAMES.index(kind), m.group(1)


def list_split(root: Path, split: str) -> list[Record]:
    out = []
    for folder in ("NORMAL", "PNEUMONIA"):
        d = Path(root) / split / folder
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_EXT:
                label, patient = parse_name(folder, f.name)
                out.append(Record(str(f), label, f"{split}/{patient}", split))
    return out


def _patient_labels(records: list[Record]) -> tuple[np.ndarray, np.ndarray]:
    groups = np.array([r.patient for r in records])
    labels = np.array([r.label for r in records])
    return groups, labels


def grouped_split(records: list[Record], val_fraction: float = 0.15, seed: int = 0
                  ) -> tuple[list[Record], list[Record]]:
    """Train/validation split grouped by patient (no patient on both sides), stratified by label."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups, labels = _patient_labels(records)
    n_splits = max(2, round(1.0 / val_fraction))
    skf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(skf.split(np.zeros(len(records)), labels, groups))
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


def seed_split(records: list[Record], seed: int = 0) -> tuple[list[Record], list[Record], list[Record]]:
    """The report's protocol: a random 64/16/20 split over images, stratified by label. Patients leak."""
    from sklearn.model_selection import train_test_split

    labels = [r.label for r in records]
    rest, test = train_test_split(records, test_size=0.20, stratify=labels, random_state=seed)
    rest_labels = [r.label for r in rest]
    train, val = train_test_split(rest, test_size=0.20, stratify=rest_labels, random_state=seed)
    return train, val, test


def split_seed_of(cfg: dict) -> int:
    """The validation split's seed of a recorded run config: ``split_seed``, or for runs recorded before that
    field existed, ``seed`` (which then set the split too)."""
    return int(cfg.get("split_seed", cfg.get("seed", 0)))


def run_splits(root: Path, cfg: dict) -> dict[str, list[Record]]:
    """``protocol_splits`` of a recorded run config (its ``config.json``): the split it was validated on."""
    return protocol_splits(root, cfg.get("protocol", "grouped"), cfg.get("val_fraction", 0.15), split_seed_of(cfg))


def protocol_splits(root: Path, protocol: str = "grouped", val_fraction: float = 0.15, seed: int = 0
                    ) -> dict[str, list[Record]]:
    """Splits for a protocol. ``grouped`` never lists the official test split; ``seed`` pools all."""
    if protocol == "grouped":
        train, val = grouped_split(list_split(root, "train"), val_fraction, seed)
        return {"train": train, "val": val}
    if protocol == "seed":
        pooled = list_split(root, "train") + list_split(root, "val") + list_split(root, "test")
        train, val, test = seed_split(pooled, seed)
        return {"train": train, "val": val, "test": test}
    raise ValueError(f"unknown protocol {protocol!r} (grouped or seed)")


def load_images(records: list[Record], size: int, workers: int | None = None) -> np.ndarray:
    """``uint8[N, size, size]`` through ``cxr_edge.preprocess.load_gray`` (the one definition)."""
    workers = workers or min(16, os.cpu_count() or 1)
    out = np.empty((len(records), size, size), np.uint8)

    def one(i: int) -> None:
        out[i] = load_gray(records[i].path, size)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(records))))
    return out


def labels_of(records: list[Record]) -> np.ndarray:
    return np.array([r.label for r in records], np.int32)


def original_aspects(records: list[Record], root: Path) -> np.ndarray:
    """Width / height of each image as it was taken, ``NaN`` where unknown.

    The squash to a square keeps this ratio as a horizontal compression of the anatomy, and in Kermany's
    ``train/`` it follows the class: normal films were taken narrower (median 1.21, 455 known) than
    pneumonia films (1.49-1.51, 1234 known), so a model can read the class off the squash (``train.aspect``).
    The ratio comes from ``MANIFEST.csv`` beside the data folder (``original_width``/``original_height``),
    else from the file itself when it is not square (a full-size download); a square file of unknown origin
    (an already squashed copy) stays unknown."""
    import csv

    from PIL import Image

    root = Path(root)
    known: dict[str, float] = {}
    manifest = root.parent / "MANIFEST.csv"
    if manifest.is_file():
        with open(manifest, newline="") as f:
            for row in csv.DictReader(f):
                w, h = row.get("original_width"), row.get("original_height")
                if w and h and float(h) > 0:
                    known[row["path"]] = float(w) / float(h)
    out = np.full(len(records), np.nan)
    for i, r in enumerate(records):
        key = f"{root.name}/{Path(r.path).relative_to(root).as_posix()}"
        if key in known:
            out[i] = known[key]
            continue
        try:
            with Image.open(r.path) as im:
                w, h = im.size
        except OSError:
            continue
        if w != h:
            out[i] = w / h
    return out
