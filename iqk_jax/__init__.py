"""iqk-jax: ik_llama.cpp's IQK quantization family in JAX, bit-compatible with its GGUF files.

Public API:
  types(), descriptor(name), row_bytes(name, n): the type registry.
  spec.dequantize(raw, name, n): the numpy reference, bit-exact with ik_llama.cpp.
  QArray(raw, type, shape): packed rows as a JAX pytree.
  quantize(x, name, imatrix=None) -> QArray.
  load_gguf(path), save_gguf(path, tensors, metadata).
  dequantize(q, dtype), matmul(x, q): jit-able ops (grad w.r.t. x, vmap, row-sharded weights),
    on the best kernel target for the backend (``target=`` or ``$IQK_JAX_TARGET`` to pick).
"""

from iqk_jax import registry, spec
from iqk_jax.gguf_io import GGUFError, load_gguf, save_gguf
from iqk_jax.ops import dequantize, matmul
from iqk_jax.qarray import QArray
from iqk_jax.quantize import quantize
from iqk_jax.registry import descriptor, row_bytes, types

__all__ = [
    "GGUFError", "QArray", "dequantize", "descriptor", "load_gguf", "matmul", "quantize",
    "registry", "row_bytes",
    "save_gguf", "spec", "types",
]
