"""iqk-jax: ik_llama.cpp's IQK quantization family in JAX, bit-compatible with its GGUF files."""

from iqk_jax import registry, spec
from iqk_jax.registry import descriptor, row_bytes, types

__all__ = ["descriptor", "row_bytes", "types", "registry", "spec"]
