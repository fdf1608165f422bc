"""``QArray``: packed IQK rows as a JAX pytree."""

from __future__ import annotations

import jax
import numpy as np

from iqk_jax import registry


@jax.tree_util.register_pytree_node_class
class QArray:
    """A quantized matrix ``[rows, n_per_row]`` stored as ik_llama.cpp's packed rows.

    Invariants (checked on construction): ``raw`` is uint8 ``[rows, row_bytes(type, n_per_row)]``
    with the row header included, ``shape == (rows, n_per_row)`` and ``n_per_row`` is a multiple
    of 256. Stacks of matrices (MoE experts, as GGUF stores 3-D tensors) keep extra leading dims
    on both: ``raw [..., rows, row_bytes]``, ``shape (..., rows, n_per_row)``; the ops take 2-D
    QArrays and ``vmap`` over stacks. ``type`` and ``shape``
    are static (pytree aux data), ``raw`` is the only leaf, so a QArray can be passed through
    ``jax.jit``, sharded by rows, and ``vmap``-ed over stacked weights.

    Attributes:
      raw: uint8 ``[rows, row_bytes]`` (numpy or jax array).
      type: the IQK type name.
      shape: ``(rows, n_per_row)``, the logical (dequantized) shape.
    """

    __slots__ = ("raw", "type", "shape")

    def __init__(self, raw, type, shape, *, _validate: bool = True):
        desc = registry.descriptor(type)
        shape = tuple(int(s) for s in shape)
        self.raw = raw
        self.type = desc.name
        self.shape = shape
        if _validate:
            self._validate(desc)

    def _validate(self, desc):
        if len(self.shape) < 2:
            raise ValueError(f"QArray({self.type}): shape must be (rows, n_per_row), got {self.shape}")
        n = self.shape[-1]
        if any(s < 0 for s in self.shape):
            raise ValueError(f"QArray({self.type}): negative dimension in shape {self.shape}")
        rb = desc.row_bytes(n)  # raises for n not a multiple of 256
        raw_shape = getattr(self.raw, "shape", None)
        dtype = getattr(self.raw, "dtype", None)
        if raw_shape is None or dtype is None:
            raise TypeError(f"QArray({self.type}): raw must be an array, got {type(self.raw).__name__}")
        if np.dtype(dtype) != np.uint8:
            raise TypeError(f"QArray({self.type}): raw must be uint8, got {dtype}")
        expect = (*self.shape[:-1], rb)
        if tuple(raw_shape) != expect:
            raise ValueError(
                f"QArray({self.type}): raw has shape {tuple(raw_shape)} but shape {self.shape} "
                f"needs {expect} ({rb} bytes per row of {n} weights)")

    @property
    def descriptor(self):
        return registry.descriptor(self.type)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.raw.shape))

    @property
    def bpw(self) -> float:
        """Bits per weight, row headers included."""
        return 8.0 * self.nbytes / max(1, int(np.prod(self.shape)))

    def tree_flatten(self):
        return (self.raw,), (self.type, self.shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # Transformations (vmap, shard_map) may hand in placeholders or batched leaves, so
        # validation is left to the ops, which check shapes at trace time.
        obj = object.__new__(cls)
        obj.raw = children[0]
        obj.type, obj.shape = aux
        return obj

    def __repr__(self):
        return f"QArray(type={self.type}, shape={self.shape}, raw={getattr(self.raw, 'shape', None)})"

    def dequantize_np(self) -> np.ndarray:
        """float32 numpy dequantization through the spec (host, bit-exact)."""
        from iqk_jax import spec
        raw = np.asarray(self.raw).reshape(-1, self.raw.shape[-1])
        return spec.dequantize(raw, self.type, self.shape[-1]).reshape(self.shape)
