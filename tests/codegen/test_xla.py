"""The xla target: bit-exact dequantization and matmul, for every registered type."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iqk_jax import testing
from iqk_jax import registry, spec
from iqk_codegen import xla
from conftest import needs_conformance, vectors

TYPES = registry.types()
# Relative to the |x| @ |W|.T bound; float32 differs only by accumulation order, bf16 inputs
# are exact in float32 so they get the same bound (kept separate: the table is per dtype).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-5}


def random_rows(desc, rows, n, seed=0):
    return testing.random_rows(desc, rows, n, seed)

@functools.partial(jax.jit, static_argnums=(1, 2))
def _deq(raw, name, shape):
    return xla.dequantize(raw, name, shape)


def _bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@needs_conformance
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_bit_exact_with_ik_llama(name):
    z = vectors(name)
    # Every case with 1024-wide rows (gaussian, heavy, edge; plain and imatrix) in one call,
    # so the type compiles once.
    keys = sorted(k[:-2] for k in z
                  if k.endswith(".q") and z[k[:-2] + ".deq"].shape[1] == 1024)
    assert len(keys) >= 4, f"{name}.npz lacks the 1024-wide cases"
    q = np.concatenate([z[k + ".q"] for k in keys])
    deq = np.concatenate([z[k + ".deq"] for k in keys])
    y = _deq(q, name, deq.shape)
    np.testing.assert_array_equal(_bits(y), _bits(deq))


@functools.partial(jax.jit, static_argnums=(0,))
def _kernels(name, raw_a, raw_b, x1, x3, x64):
    """Everything the shape test needs in one executable: one compile per type."""
    rows_b = raw_b.shape[0]
    return (xla.dequantize(raw_a, name, (raw_a.shape[0], 256)),
            [xla.matmul(x, raw_b, name, (rows_b, 512)) for x in (x1, x3, x64)])


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_and_matmul_shapes(name):
    """n = 256 and 512, odd row counts, batch 1, 3 (bf16) and 64, against the spec."""
    desc = registry.descriptor(name)
    raw_a = random_rows(desc, 5, 256, seed=5)
    raw_b = random_rows(desc, 7, 512, seed=7)
    rng = np.random.default_rng(1)
    xs = [jnp.asarray(rng.standard_normal((m, 512)), dt)
          for m, dt in ((1, jnp.float32), (3, jnp.bfloat16), (64, jnp.float32))]
    y, outs = _kernels(name, raw_a, raw_b, *xs)
    assert y.shape == (5, 256) and y.dtype == jnp.float32
    np.testing.assert_array_equal(_bits(y), _bits(spec.dequantize(raw_a, name, 256)))
    w = spec.dequantize(raw_b, name, 512).astype(np.float64)
    for x, out in zip(xs, outs):
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        ref, bound = x64 @ w.T, np.abs(x64) @ np.abs(w).T
        assert out.shape == (x.shape[0], 7) and out.dtype == jnp.float32
        assert np.all(np.abs(np.asarray(out) - ref) <= TOL[x.dtype.type] * bound + 1e-30), \
            (name, x.shape, x.dtype)


def test_dequantize_other_dtypes_round_once():
    desc = registry.descriptor("iq4_k")
    raw = random_rows(desc, 2, 256)
    y = jax.jit(lambda r: xla.dequantize(r, desc, (2, 256), jnp.bfloat16))(raw)
    assert y.dtype == jnp.bfloat16
    ref = spec.dequantize(raw, desc, 256)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.asarray(ref).astype(jnp.bfloat16)))


@pytest.mark.parametrize("name", TYPES)
def test_plan_invariants(name):
    desc = registry.descriptor(name)
    p = xla.plan(desc)
    assert p is xla.plan(name)  # cached
    P = p.table.shape[0]
    assert p.table.shape[1] == 256 and P & (P - 1) == 0
    for pr in p.pieces:
        for k in (pr.byte_row, pr.lo_row, pr.hi_row):
            if k is not None:
                assert 0 <= p.table[k].min() and p.table[k].max() < desc.block_bytes


@pytest.mark.parametrize("name", TYPES)
def test_slice_runs_rebuild_every_fetched_row(name):
    """The static-slice plan of every byte row the decoder fetches rebuilds that row exactly."""
    p = xla.plan(name)
    for pr in p.pieces:
        for k in (pr.byte_row, pr.lo_row, pr.hi_row):
            if k is None:
                continue
            row = tuple(int(v) for v in p.table[k])
            runs = xla._runs(row)
            assert runs is not None, (name, k)
            rebuilt = tuple(b + i * s for b, c, s, r in runs for i in range(c) for _ in range(r))
            assert rebuilt == row


def test_runs_cover_arbitrary_rows():
    rng = np.random.default_rng(0)
    for _ in range(50):
        row = tuple(int(v) for v in rng.integers(0, 40, 256))
        runs = xla._runs(row)
        if runs is None:
            continue
        rebuilt = [b + i * s for b, c, s, r in runs for i in range(c) for _ in range(r)]
        assert tuple(rebuilt) == row


def test_bad_raw_is_rejected_at_trace_time():
    desc = registry.descriptor("iq4_k")
    with pytest.raises(ValueError, match="raw has shape"):
        jax.eval_shape(lambda r: xla.dequantize(r, desc, (4, 256)),
                       jax.ShapeDtypeStruct((4, 143), jnp.uint8))
    with pytest.raises(TypeError, match="uint8"):
        jax.eval_shape(lambda r: xla.dequantize(r, desc, (4, 256)),
                       jax.ShapeDtypeStruct((4, 144), jnp.int8))
    with pytest.raises(ValueError, match="x must be"):
        jax.eval_shape(lambda x, r: xla.matmul(x, r, desc, (4, 256)),
                       jax.ShapeDtypeStruct((2, 512), jnp.float32),
                       jax.ShapeDtypeStruct((4, 144), jnp.uint8))


@pytest.mark.parametrize("kernel", sorted(xla.KERNELS))
def test_emit_is_deterministic_stablehlo(kernel):
    a = xla.emit("iq2_kl", kernel)
    b = xla.emit(registry.descriptor("iq2_kl"), kernel)
    assert a == b
    assert "stablehlo" in a and "func.func public @main" in a
    assert ("dot_general" in a) == (kernel != "dequant")
    with pytest.raises(ValueError, match="unknown kernel"):
        xla.emit("iq2_kl", "conv")
