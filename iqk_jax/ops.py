"""Jit-able IQK ops: ``dequantize`` and ``matmul`` on :class:`~iqk_jax.qarray.QArray` weights.

Both dispatch to a code generation target (:mod:`iqk_codegen.targets`): the ``target=``
argument, else ``$IQK_JAX_TARGET`` (``xla``, ``pallas``, ``llvm`` or ``auto``), else the
default for the backend (``llvm`` on CPU when it is available, otherwise ``xla``; ``pallas`` on
GPU, falling back to ``xla``). Every target returns the same numbers: bit-identical float32
dequantization, and matmuls that differ only by accumulation order.

* ``matmul`` has a custom VJP: the gradient with respect to ``x`` is ``g @ W`` (the weight is
  constant; its uint8 bytes get no cotangent), so ``jax.grad`` works through it.
* ``vmap`` over ``x`` folds the mapped axis into x's rows (one larger kernel call); ``vmap``
  over stacked weights (a QArray with a leading layer axis on ``raw``) maps one call per weight.
* Weights whose ``raw`` is sharded by rows over a mesh axis (``NamedSharding`` with spec
  ``P(axis, None)``) are multiplied shard-locally with ``shard_map``: each device decodes only
  its rows and the result comes back sharded along its last axis. Under ``jit`` the sharding is
  left to the compiler.

All shape/dtype checks run at trace time and name the offending argument.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from iqk_jax import registry
from iqk_jax.qarray import QArray

X_DTYPES = (jnp.float32, jnp.bfloat16)
OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _targets():
    # Imported lazily: iqk_codegen imports iqk_jax, not the other way round at import time.
    from iqk_codegen import targets
    return targets


def _check_q(q, who: str):
    """Validates a QArray at trace time; returns (descriptor, rows, n_per_row)."""
    if not isinstance(q, QArray):
        raise TypeError(f"{who}: q must be a QArray, got {type(q).__name__}")
    desc = registry.descriptor(q.type)
    if len(q.shape) != 2:
        raise ValueError(f"{who}: q.shape must be (rows, n_per_row), got {q.shape}")
    rows, n = q.shape
    rb = desc.row_bytes(n)
    raw = q.raw
    if not hasattr(raw, "shape") or not hasattr(raw, "dtype"):
        raise TypeError(f"{who}: q.raw must be an array, got {type(raw).__name__}")
    if np.dtype(raw.dtype) != np.uint8:
        raise TypeError(f"{who}: q.raw must be uint8, got {raw.dtype}")
    if tuple(raw.shape) != (rows, rb):
        raise ValueError(f"{who}: q.raw has shape {tuple(raw.shape)} ({int(np.prod(raw.shape))} "
                         f"bytes) but a {q.type} QArray of shape {q.shape} needs ({rows}, {rb})")
    return desc, rows, n


def _row_axis(raw, rows: int):
    """(mesh, axis) when concrete ``raw`` is sharded by rows only (evenly), else None."""
    if isinstance(raw, jax.core.Tracer) or not isinstance(raw, jax.Array):
        return None
    sh = getattr(raw, "sharding", None)
    if not isinstance(sh, NamedSharding) or len(sh.mesh.devices.flat) < 2:
        return None
    spec = tuple(sh.spec) + (None,) * (2 - len(sh.spec))
    if spec[0] is None or spec[1] is not None:
        return None
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    size = int(np.prod([sh.mesh.shape[a] for a in axes]))
    if rows % size:
        return None
    return sh.mesh, spec[0]


def _shard_map(f, mesh, in_specs, out_specs):
    # jit: outside a trace, shard_map would otherwise run its body one primitive at a time.
    try:
        g = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    except TypeError:  # older spelling of the replication-check switch
        g = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return jax.jit(g)


def dequantize(q: QArray, dtype=jnp.float32, *, target: str | None = None) -> jax.Array:
    """Dequantizes a QArray to a dense ``dtype [rows, n_per_row]`` array.

    Args:
      q: the quantized weight.
      dtype: float32 (bit-identical to ik_llama.cpp), bfloat16 or float16 (float32 rounded once).
      target: ``xla`` | ``pallas`` | ``llvm`` | ``auto``; default ``$IQK_JAX_TARGET`` or auto.

    Raises:
      TypeError / ValueError at trace time: q is not a well-formed QArray, or dtype unsupported.
    """
    desc, rows, n = _check_q(q, "dequantize")
    dtype = jnp.dtype(dtype)
    if dtype not in [jnp.dtype(d) for d in OUT_DTYPES]:
        raise TypeError(f"dequantize: dtype must be one of float32, bfloat16, float16; got {dtype}")
    t = _targets().resolve(target)
    shape = (rows, n)
    sharded = _row_axis(q.raw, rows)
    if sharded is not None:
        return _sharded_dequantize(t.name, desc.name, n, dtype, *sharded)(q.raw)
    return t.dequantize(q.raw, desc, shape, dtype)


@functools.lru_cache(maxsize=256)
def _sharded_dequantize(target, name, n, dtype, mesh, axis):
    t, desc = _targets().get(target), registry.descriptor(name)
    local = lambda r: t.dequantize(r, desc, (r.shape[0], n), dtype)  # noqa: E731
    return _shard_map(local, mesh, (P(axis, None),), P(axis, None))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _matmul2d(x2d, raw, name, shape, target, mesh_axis):
    return _matmul2d_impl(x2d, raw, name, shape, target, mesh_axis)


def _matmul2d_impl(x2d, raw, name, shape, target, mesh_axis):
    if mesh_axis is None:
        return _batchable_matmul(target, name, shape)(x2d, raw)
    return _sharded_matmul(target, name, shape[1], *mesh_axis)(x2d, raw)


@functools.lru_cache(maxsize=256)
def _batchable_matmul(target, name, shape):
    """The target's matmul with a vmap rule that keeps kernels large.

    vmap over x alone folds the batch into x's rows: one ``[B*m, n]`` product (a GEMM) instead
    of B small ones; vmap over the weights (stacked layers) maps one product per weight.
    """
    t, desc = _targets().get(target), registry.descriptor(name)

    @jax.custom_batching.custom_vmap
    def f(x2d, raw):
        return t.matmul(x2d, raw, desc, shape)

    @f.def_vmap
    def _rule(axis_size, in_batched, x2d, raw):
        x_batched, raw_batched = in_batched
        if not raw_batched:
            b, m, n = x2d.shape
            return f(x2d.reshape(b * m, n), raw).reshape(b, m, -1), True
        if not x_batched:
            x2d = jnp.broadcast_to(x2d, (axis_size,) + x2d.shape)
        return lax.map(lambda a: f(*a), (x2d, raw)), True

    return f


@functools.lru_cache(maxsize=256)
def _sharded_matmul(target, name, n, mesh, axis):
    t, desc = _targets().get(target), registry.descriptor(name)
    local = lambda a, r: t.matmul(a, r, desc, (r.shape[0], n))  # noqa: E731
    return _shard_map(local, mesh, (P(), P(axis, None)), P(None, axis))


def _matmul2d_fwd(x2d, raw, name, shape, target, mesh_axis):
    # The empty array only carries x's dtype to the backward pass.
    out = _matmul2d_impl(x2d, raw, name, shape, target, mesh_axis)
    return out, (raw, jnp.zeros((0,), x2d.dtype))


def _grad_x(g, raw, target, name, n):
    """``g [m, rows] @ W [rows, n]`` in float32 (the weight decoded once, bit-exact)."""
    w = _targets().get(target).dequantize(raw, registry.descriptor(name), (raw.shape[0], n),
                                          jnp.float32)
    return lax.dot_general(g.astype(jnp.float32), w, (((1,), (0,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


@functools.lru_cache(maxsize=256)
def _sharded_grad_x(target, name, n, mesh, axis):
    # Each device holds rows of W and the matching columns of g: partial products, then a sum.
    local = lambda g, r: lax.psum(_grad_x(g, r, target, name, n), axis)  # noqa: E731
    return _shard_map(local, mesh, (P(None, axis), P(axis, None)), P())


def _matmul2d_bwd(name, shape, target, mesh_axis, res, g):
    raw, xproto = res
    if mesh_axis is None:
        gx = _grad_x(g, raw, target, name, shape[1])
    else:
        gx = _sharded_grad_x(target, name, shape[1], *mesh_axis)(g, raw)
    # The packed bytes are integers: they have no cotangent.
    return gx.astype(xproto.dtype), None


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd)


def matmul(x, q: QArray, *, target: str | None = None) -> jax.Array:
    """``x @ dequantize(q).T`` without materializing the weight where the target can avoid it.

    Args:
      x: float32 or bfloat16 ``[..., n_per_row]``.
      q: the quantized weight ``[rows, n_per_row]``.
      target: ``xla`` | ``pallas`` | ``llvm`` | ``auto``; default ``$IQK_JAX_TARGET`` or auto.

    Returns:
      ``[..., rows]`` in ``x.dtype``, accumulated in float32.

    Raises:
      TypeError / ValueError at trace time naming the problem: x's dtype or width, or a
      malformed QArray (raw dtype or byte count not matching its shape).
    """
    desc, rows, n = _check_q(q, "matmul")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in X_DTYPES]:
        raise TypeError(f"matmul: x must be float32 or bfloat16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != n:
        raise ValueError(f"matmul: x has width {x.shape[-1] if x.ndim else None} (shape "
                         f"{tuple(x.shape)}) but the {q.type} weight of shape {q.shape} needs "
                         f"width n_per_row={n}")
    t = _targets().resolve(target)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, n)
    out = _matmul2d(x2d, q.raw, desc.name, (rows, n), t.name, _row_axis(q.raw, rows))
    return out.reshape(lead + (rows,)).astype(x.dtype)
