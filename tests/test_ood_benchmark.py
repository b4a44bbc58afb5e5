"""The input gate benchmark's non-radiograph set (``benchmarks/ood.py``, ``benchmarks/ood_inputs.py``): complete, and
never silently smaller without scikit-image."""
from __future__ import annotations

import sys

import pytest



# -- the benchmark's non-radiograph set ---------------------------------------------------------------------
def test_benchmark_fails_loudly_without_scikit_image(tmp_path, monkeypatch):
    """Issue 14: without scikit-image the non-CXR set must not silently shrink."""
    from benchmarks import ood as bench

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(RuntimeError, match=r"scikit-image.*cxr-edge\[bench\]"):
        bench.make_non_cxr(tmp_path / "x")


def test_benchmark_non_cxr_set_is_complete(tmp_path):
    pytest.importorskip("skimage")
    from benchmarks import ood as bench

    items = bench.make_non_cxr(tmp_path / "x")
    kinds = [k for _, k in items]
    assert kinds.count("skimage") == len(bench.SKIMAGE_FILES)
    assert {"document", "screenshot", "photo_like", "solid", "texture"} <= set(kinds)
    assert all(p.is_file() for p, _ in items)
