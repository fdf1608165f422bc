"""``quantize``: float weights -> packed IQK rows (a :class:`QArray`)."""

from __future__ import annotations

import numpy as np

from iqk_jax import quant, registry
from iqk_jax.qarray import QArray
from iqk_jax.registry import QK_K


def validate_input(x, name, imatrix=None):
    """Checks and normalises quantizer input; returns (descriptor, x f32 2-D, imatrix or None)."""
    desc = registry.descriptor(name)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize({desc.name}): x must be 2-D [rows, n_per_row], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"quantize({desc.name}): x must be floating point, got {x.dtype}")
    if x.shape[1] == 0 or x.shape[1] % QK_K:
        raise ValueError(f"quantize({desc.name}): row length {x.shape[1]} is not a multiple of {QK_K}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"quantize({desc.name}): x contains NaN or Inf (first at row {bad[0]}, "
                         f"column {bad[1]})")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32)).reshape(-1)
        if imatrix.shape[0] != x.shape[1]:
            raise ValueError(f"quantize({desc.name}): imatrix has {imatrix.shape[0]} entries, "
                             f"expected one per column ({x.shape[1]})")
        if not np.isfinite(imatrix).all():
            raise ValueError(f"quantize({desc.name}): imatrix contains NaN or Inf")
        if (imatrix < 0).any():
            raise ValueError(f"quantize({desc.name}): imatrix has negative entries "
                             f"(first at column {int(np.argmax(imatrix < 0))})")
    return desc, x, imatrix


def quantize(x, name, imatrix=None) -> QArray:
    """Quantizes ``x`` ``[rows, n]`` to IQK type ``name``.

    Args:
      x: float ``[rows, n_per_row]``, ``n_per_row`` a multiple of 256, finite.
      name: IQK type name.
      imatrix: optional non-negative importance per column (mean squared activation, as
        llama-imatrix writes it).

    Returns:
      a :class:`QArray` whose rows decode with :func:`iqk_jax.spec.dequantize`. The same input
      gives the same bytes on every run.
    """
    desc, x, imatrix = validate_input(x, name, imatrix)
    search = quant.search_for(desc.name)
    raw = np.asarray(search(x, imatrix))
    return QArray(raw, desc.name, x.shape)
