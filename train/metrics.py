"""Classification metrics for the 3-class task and its normal-vs-pneumonia collapse, with bootstrap
confidence intervals."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (confusion_matrix, f1_score, log_loss, precision_score, recall_score,
                             roc_auc_score)

from cxr_edge.labels import CLASS_NAMES

K = len(CLASS_NAMES)


def _clip(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-7, 1.0)
    return p / p.sum(1, keepdims=True)


def _binary(y: np.ndarray, probs: np.ndarray) -> dict:
    yb = (y != 0).astype(int)  # pneumonia = bacterial or viral
    pb = probs[:, 1:].sum(1)
    pred = (probs.argmax(1) != 0).astype(int)
    tp = int(((pred == 1) & (yb == 1)).sum())
    tn = int(((pred == 0) & (yb == 0)).sum())
    return {
        "accuracy": float((pred == yb).mean()),
        "sensitivity": tp / max(1, int(yb.sum())),
        "specificity": tn / max(1, int((1 - yb).sum())),
        "auc": float(roc_auc_score(yb, pb)) if 0 < yb.sum() < len(yb) else None,
    }


def classification_metrics(y, probs) -> dict:
    y = np.asarray(y, int)
    probs = np.asarray(probs, np.float64)
    pred = probs.argmax(1)
    labels = list(range(K))
    recall = recall_score(y, pred, labels=labels, average=None, zero_division=0)
    present = sorted(set(y.tolist()))
    auc = {}
    for k in labels:
        if k in present and len(present) > 1:
            auc[CLASS_NAMES[k]] = float(roc_auc_score((y == k).astype(int), probs[:, k]))
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "macro_precision": float(precision_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "macro_recall": float(recall_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "recall": {CLASS_NAMES[k]: float(recall[k]) for k in labels},
        "auc_ovr": auc,
        "log_loss": float(log_loss(y, _clip(probs), labels=labels)),
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
        "binary": _binary(y, probs),
    }


def bootstrap_ci(y, probs, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """95% percentile intervals of accuracy, macro-F1, per-class recall and the binary collapse's
    accuracy/sensitivity/specificity/AUC, resampling images with replacement."""
    y = np.asarray(y, int)
    probs = np.asarray(probs, np.float64)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        yy, pp = y[idx], probs[idx]
        pred = pp.argmax(1)
        vals = {"accuracy": float((pred == yy).mean()),
                "macro_f1": float(f1_score(yy, pred, labels=list(range(K)), average="macro",
                                           zero_division=0))}
        for k in range(K):
            m = yy == k
            if m.any():
                vals[f"recall_{CLASS_NAMES[k]}"] = float((pred[m] == k).mean())
        b = _binary(yy, pp)
        vals.update({f"binary_{key}": v for key, v in b.items() if v is not None})
        for key, v in vals.items():
            samples.setdefault(key, []).append(v)
    return {key: [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))]
            for key, v in samples.items()}


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """softmax(log p / T), exactly as the runtime applies a card's temperature."""
    from cxr_edge.classifier import calibrate

    return calibrate(np.asarray(probs, np.float64), temperature).astype(np.float64)


def fit_temperature(y, probs) -> float:
    """The temperature that minimises negative log-likelihood on (validation) data."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, int)

    def nll(log_t):
        p = apply_temperature(probs, float(np.exp(log_t)))
        return -np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean()

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def calibration_bins(y, probs, bins: int = 10) -> dict:
    """Expected calibration error of the top-class confidence, and the reliability-diagram bins."""
    y = np.asarray(y, int)
    probs = np.asarray(probs, np.float64)
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            acc, c = float((pred[m] == y[m]).mean()), float(conf[m].mean())
            ece += m.mean() * abs(acc - c)
            rows.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()), "accuracy": acc, "confidence": c})
    return {"ece": float(ece), "bins": rows}
