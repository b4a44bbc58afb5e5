"""What the input gate's tests (``tests/test_ood_*.py``) share: the shipped other radiographs (``tests/data/gate``),
the CLI runner, hand-made embedding-head arrays and the ``non_cxr`` images (a document page, a screenshot, a
colour photo-like image, a blank page)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr_edge.cli import cli
from train.ood import _document, _photo_like, _screenshot

GATE_DATA = Path(__file__).resolve().parent / "data" / "gate"
FRONTAL = sorted((GATE_DATA / "frontal_chest_other").glob("*.jpg"))
OTHER = sorted((GATE_DATA / "non_chest_radiograph").glob("*.jpg"))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _head_arrays(dim: int = 6) -> dict:
    """logits = e[:4] (identity weights on the first four dimensions)."""
    w = np.zeros((dim, 4))
    w[np.arange(4), np.arange(4)] = 1.0
    return {"emb_mean": np.zeros(dim), "emb_scale": np.ones(dim), "emb_weights": w, "emb_bias": np.zeros(4)}


@pytest.fixture(scope="module")
def non_cxr(tmp_path_factory) -> dict[str, Path]:
    """A document page (gray PNG), a screenshot (JPEG), a colour photo-like image (JPEG), a blank page."""
    folder = tmp_path_factory.mktemp("non_cxr")
    rng = np.random.default_rng(0)
    out = {"document": folder / "document.png", "screenshot": folder / "screenshot.jpg",
           "photo": folder / "photo.jpg", "blank": folder / "blank.png"}
    _document(rng).save(out["document"])
    _screenshot(rng, dark=True, colourful=False).save(out["screenshot"], quality=90)
    _photo_like(rng, colour=True).save(out["photo"], quality=90)
    Image.new("L", (300, 300), 240).save(out["blank"])
    return out
