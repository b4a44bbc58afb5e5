"""The input gate's arithmetic (``cxr_edge.ood``), with no model and no bundle: pooling a feature map on a grid
and projecting its cells (the gate vector's layout part), the 16x16 thumbnails of the pixel and polarity
checks, and the scores of the embedding head, the density part and the older thumbnail model. Shared by the
runtime gate (``cxr_edge.ood.Gate``), its fit (``train.ood``) and the browser export."""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

DEFAULT_THUMB = 16


def grid_bins(n: int, g: int) -> list[tuple[int, int]]:
    """Adaptive-pooling bins of ``n`` positions into ``g`` cells (``[floor(i n / g), ceil((i + 1) n / g))``;
    7 -> 3: 0-3, 2-5, 4-7)."""
    return [(int(np.floor(i * n / g)), int(np.ceil((i + 1) * n / g))) for i in range(g)]


@functools.lru_cache(maxsize=16)
def pooling_matrix(h: int, w: int, g: int) -> np.ndarray:
    """``float32[1 + g*g, h*w]``: row 0 averages all ``h x w`` positions (the global average), row ``1 + i*g
    + j`` averages grid cell ``(i, j)`` (``grid_bins``). One matrix product pools a whole feature map."""
    rows, cols = grid_bins(h, g), grid_bins(w, g)
    m = np.zeros((1 + g * g, h, w), np.float64)
    m[0] = 1.0 / (h * w)
    for k, ((r0, r1), (c0, c1)) in enumerate((r, c) for r in rows for c in cols):
        m[1 + k, r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
    out = m.reshape(1 + g * g, h * w).astype(np.float32)
    out.flags.writeable = False  # shared by every call (cached)
    return out


def _pool(f: np.ndarray, g: int) -> np.ndarray:
    """``float32[N, 1 + g*g, C]``: global average and grid cells of feature maps ``[N, h, w, C]``."""
    n, h, w, c = f.shape
    return np.matmul(pooling_matrix(h, w, g), f.reshape(n, h * w, c))


def grid_cells(features: np.ndarray, g: int) -> np.ndarray:
    """Feature maps ``[N, h, w, C]`` average-pooled on a ``g x g`` grid: ``float32[N, g*g, C]`` (row-major)."""
    return _pool(np.asarray(features, np.float32), g)[:, 1:]


def pooled(features: np.ndarray, grid: int = 0) -> np.ndarray:
    """``[N, C]`` global averages of feature maps ``[N, h, w, C]``, followed (``grid`` > 0) by their
    ``grid x grid`` cells: ``float32[N, C + grid*grid*C]``. What a gate's fit needs before the layout
    projection (``layout_vector``). One matrix product (``pooling_matrix``) for all of them."""
    f = np.asarray(features, np.float32)
    if not grid:
        return f.mean(axis=(1, 2), dtype=np.float32)
    return _pool(f, grid).reshape(len(f), -1)


def layout_vector(pooled_x: np.ndarray, mean: np.ndarray, proj: np.ndarray, grid: int) -> np.ndarray:
    """Gate vectors ``[N, C + g*g*k]`` from ``pooled`` rows ``[N, C + g*g*C]``: the global average as it is,
    each cell projected, ``(cell - mean) @ proj`` (``proj[C, k]``)."""
    x = np.asarray(pooled_x, np.float32)
    c = proj.shape[0]
    cells = x[:, c:].reshape(len(x), grid * grid, c)
    z = np.matmul(cells - mean, proj).reshape(len(x), -1)
    return np.concatenate([x[:, :c], z], axis=1)


@functools.lru_cache(maxsize=8)
def _box_ones(s: int, side: int) -> np.ndarray:
    """``float32[side, s]``: row ``i`` is 1 on the ``s // side`` pixels of box ``i``, 0 elsewhere."""
    out = np.kron(np.eye(side, dtype=np.float32), np.ones((1, s // side), np.float32))
    out.flags.writeable = False
    return out


def thumbnail(gray: np.ndarray, side: int = DEFAULT_THUMB) -> np.ndarray:
    """``uint8[S, S]`` (or ``[N, S, S]``) to ``float32[.., side, side]`` box-filter averages."""
    arr = np.asarray(gray)
    if arr.ndim == 3:
        return np.stack([thumbnail(a, side) for a in arr])
    s = arr.shape[0]
    if arr.shape == (s, s) and s % side == 0:
        # box sums as two products with a 0/1 matrix (several times faster than a strided numpy mean, and the
        # same numbers: sums of whole gray levels are exact in float32), then one division
        ones = _box_ones(s, side)
        return (ones @ arr.astype(np.float32) @ ones.T) / np.float32((s // side) ** 2)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "L")
    return np.asarray(img.resize((side, side), Image.Resampling.BOX), dtype=np.float32)


def features(gray: np.ndarray, side: int = DEFAULT_THUMB) -> tuple[np.ndarray, np.ndarray]:
    """(standardized thumbnails ``float64[N, side*side]``, their standard deviations ``[N]`` in gray levels)."""
    t = thumbnail(gray if np.ndim(gray) == 3 else np.asarray(gray)[None], side).reshape(-1, side * side)
    t = t.astype(np.float64)
    mu = t.mean(axis=1, keepdims=True)
    sd = t.std(axis=1, keepdims=True)
    return (t - mu) / np.maximum(sd, 1e-6), sd[:, 0]


def ppca_score(x: np.ndarray, mean: np.ndarray, components: np.ndarray, eigvals: np.ndarray,
               resid_var: float) -> np.ndarray:
    """Squared Mahalanobis distance in the principal subspace + squared residual / ``resid_var``, per row."""
    c = x - mean
    z = c @ components.T
    resid = c - z @ components
    return (z * z / eigvals).sum(axis=1) + (resid * resid).sum(axis=1) / resid_var


def head_logits(embedding: np.ndarray, mean: np.ndarray, scale: np.ndarray, weights: np.ndarray,
                bias: np.ndarray) -> np.ndarray:
    """The embedding head's logits ``[N, 4]`` for embeddings ``[N, C]`` (or ``[C]`` -> ``[4]``)."""
    e = np.asarray(embedding, np.float64)
    return ((e - mean) / scale) @ weights + bias


def density_distance(embedding: np.ndarray, mean: np.ndarray, scale: np.ndarray, components: np.ndarray,
                     var: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance ``[N]`` of embeddings ``[N, C]`` in the principal subspace ``components
    [k, C]`` (variances ``var[k]``) of standardized frontal chest X-ray embeddings."""
    z = ((np.asarray(embedding, np.float64) - mean) / scale) @ components.T
    return (z * z / var).sum(axis=-1)


def logsumexp(x: np.ndarray) -> np.ndarray:
    """``log(sum(exp(x)))`` over the last axis, stable."""
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


def head_score(logits: np.ndarray) -> np.ndarray:
    """``logsumexp(logits[..., 1:]) - logits[..., 0]``: how much more likely anything but a frontal chest
    X-ray is (log odds; higher = less like one)."""
    return logsumexp(logits[..., 1:]) - logits[..., 0]


def linear_check(arrays: dict, keys: tuple[str, str], dim: int, threshold: float, error: str) -> tuple[np.ndarray, float]:
    """The weights ``[dim]`` and bias of one of the gate's linear checks (``keys``: their array names), as float64;
    ``ValueError(error)`` unless the shape is right and they and ``threshold`` are finite."""
    weights = np.asarray(arrays[keys[0]], np.float64)
    bias = float(np.asarray(arrays[keys[1]]))
    if (weights.shape != (dim,) or not np.all(np.isfinite(weights)) or not np.isfinite(bias)
            or not np.isfinite(threshold)):
        raise ValueError(error)
    return weights, bias
