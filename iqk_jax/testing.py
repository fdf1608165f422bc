"""Helpers for tests and benchmarks: valid packed rows with random contents."""

from __future__ import annotations

import numpy as np

from iqk_jax import registry
from iqk_jax.qarray import QArray


def random_rows(name, rows: int, n: int, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    """uint8 ``[rows, row_bytes]`` of random packed bytes whose float scales are finite.

    Every field value is drawn uniformly; only ``d`` (super-block fp16 or row header) is set
    to a moderate value in ``[-scale, scale]``, because random fp16/fp32 bytes can be inf or
    NaN. Kernel speed does not depend on the values, and every decoder must agree on them.
    """
    desc = registry.descriptor(name)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, desc.row_bytes(n)), dtype=np.uint8)
    hb = desc.row_header_bytes
    if desc.super_d:
        blocks = raw.reshape(rows, n // 256, desc.block_bytes)
        d = rng.uniform(-scale, scale, (rows, n // 256)).astype(np.float16)
        blocks[..., :2] = d.view(np.uint8).reshape(rows, n // 256, 2)
    else:
        d = rng.uniform(-scale, scale, rows).astype(desc.header_dtype)
        raw[:, :hb] = d.view(np.uint8).reshape(rows, hb)
    return raw


def random_qarray(name, rows: int, n: int, seed: int = 0, scale: float = 0.1) -> QArray:
    """A :class:`QArray` (jax ``raw``) of :func:`random_rows`."""
    import jax.numpy as jnp
    return QArray(jnp.asarray(random_rows(name, rows, n, seed, scale)),
                  registry.descriptor(name).name, (rows, n))


def weighted_rmse(x, y, w) -> float:
    """ik_llama.cpp's quality metric (as in the conformance manifest).

    ``sqrt(sum_{rows, cols} w[col] * (x - y)**2 / (rows * sum(w)))`` in float64; with ``w`` all
    ones it is the plain RMSE.
    """
    x = np.asarray(x, np.float64)
    e = np.square(x - np.asarray(y, np.float64))
    w = np.asarray(w, np.float64)
    return float(np.sqrt((e * w).sum() / (w.sum() * x.shape[0])))
