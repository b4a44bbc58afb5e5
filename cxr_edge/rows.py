"""One result record (``Result.to_dict()``, ``cxr-edge classify --json``) flattened into one row: the columns
``cxr-edge classify --csv`` writes and the first columns of a ``cxr-edge batch`` Parquet row (cxr_edge/batch_store.py
adds ``size`` and ``mtime``). Absent fields are ``None`` (an empty CSV cell, a Parquet null)."""
from __future__ import annotations

from cxr_edge.labels import CLASS_NAMES

ROW_COLUMNS = ["path", "status", "label", *CLASS_NAMES, "reason", "error", "warning", "model_name", "model_version",
               "model_sha256"]
# the CSV's own column order (kept as it was when the CSV came first)
CSV_COLUMNS = ["path", "label", *CLASS_NAMES, "model_name", "model_version", "model_sha256", "error", "status",
               "reason", "warning"]


def flat_row(record: dict, status: str) -> dict:
    """The ``ROW_COLUMNS`` of ``record`` (a ``to_dict()``; its probabilities are rounded to 6 decimals), whose
    result has ``status`` (ok / rejected / error)."""
    probs = record.get("probabilities") or {}
    model = record.get("model") or {}
    return {"path": record["path"], "status": status, "label": record.get("label"),
            **{c: probs.get(c) for c in CLASS_NAMES}, "reason": record.get("reason"), "error": record.get("error"),
            "warning": record.get("warning"), "model_name": model.get("name"), "model_version": model.get("version"),
            "model_sha256": model.get("sha256")}


def csv_row(record: dict, status: str) -> dict:
    """:func:`flat_row` for ``csv.DictWriter(fieldnames=CSV_COLUMNS)``: probabilities with 6 decimals."""
    row = flat_row(record, status)
    for c in CLASS_NAMES:
        if row[c] is not None:
            row[c] = f"{row[c]:.6f}"
    return row
