"""The input gate benchmark's non-radiograph set (``benchmarks/ood.py``, ``benchmarks/ood_inputs.py``): complete, and
never silently smaller without scikit-image."""
from __future__ import annotations

import sys
from pathlib import Path

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


def _row(name, adults, others, val_adult, val_all, adult_c=10.0, n_train=1200, adult_variants=6):
    return {"name": name, "adult_c": adult_c, "n_train": n_train, "adult_variants": adult_variants,
            "adults_as_adult": adults, "adults": 76,
            "by_category": {"adult_dev": {"correct": adults - 10, "n": 60, "wrong": []},
                            "frontal_chest_other": {"correct": 10, "n": 16, "wrong": []},
                            "non_chest_radiograph": {"correct": others, "n": 22, "wrong": []}},
            "val_refused_by_adult_check": val_adult, "val_refused": val_all}


def test_adult_candidates_rule_is_the_plans():
    """benchmarks.adult_c.decide applies each plan's written rule: 2 more adults, no other category worse, the
    adult check's validation refusals, and (adult2.json) no more validation refusals in all than the shipped row;
    ties to the C nearest the shipped one or to the smaller n_train."""
    import json

    from benchmarks import adult_c

    def chosen(rule, *rows):
        return adult_c.decide({"rule": {**adult_c.RULE, **rule}, "rows": [_row("ref", 72, 20, 1, 3), *rows]})

    assert chosen({}, _row("one-more", 73, 20, 0, 2))["chosen"] == "ref"
    assert chosen({}, _row("other-worse", 75, 19, 0, 2))["chosen"] == "ref"
    assert chosen({}, _row("val-adult", 75, 20, 2, 3))["chosen"] == "ref"
    assert chosen({}, _row("more-val", 74, 20, 1, 5))["chosen"] == "more-val"  # adult.json has no such clause
    plan2 = json.loads((adult_c.PROJECT / "train" / "plans" / "adult2.json").read_text())["rule"]
    assert chosen(plan2, _row("more-val", 74, 20, 1, 5))["chosen"] == "ref"
    out = chosen(plan2, _row("big", 74, 20, 1, 3, n_train=4471), _row("mid", 74, 21, 0, 2, n_train=2400))
    assert out["chosen"] == "mid" and [r["passes"] for r in out["rows"][1:]] == [True, True]
    out = chosen({}, _row("c1", 74, 20, 0, 2, adult_c=1.0), _row("c100", 74, 20, 0, 2, adult_c=100.0),
                 _row("c30", 74, 20, 0, 2, adult_c=30.0))
    assert out["chosen"] == "c30"
    plan3 = json.loads((adult_c.PROJECT / "train" / "plans" / "adult3.json").read_text())["rule"]
    out = chosen(plan3, _row("v16", 74, 20, 1, 3, adult_variants=16), _row("v2", 74, 20, 1, 3, adult_variants=2))
    assert out["chosen"] == "v2"
    assert adult_c.result_name(adult_c.PLAN) == "adult_c" and adult_c.result_name(Path("x/adult2.json")) == "adult2"
