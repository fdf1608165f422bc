"""iqk_jax.ops: jit-able dequantize/matmul over every type and every available target."""

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iqk_jax import testing
from iqk_jax import ops, registry, spec
from iqk_jax.qarray import QArray
from iqk_codegen import targets

TYPES = registry.types()
TARGETS = targets.available()
# Relative to the |x| @ |W|.T bound, per x dtype: accumulation order only (bf16 x is exact in
# float32; the pallas target multiplies bf16 x with bf16-rounded weights).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Targets whose matmul quantizes the activations (llvm: int8 per 256-block, like ik_llama.cpp's
# CPU path; its own tests check the exact bound, documented in iqk_jax.cpu.runtime).
TARGET_TOL = {"llvm": 3e-2}
# Interpret-mode Pallas is slow on CPU: here it runs a few types; tests/codegen/test_pallas.py
# covers every type. Other targets run every type.
SLOW_TYPES = {"pallas": ("iq4_kt",)} if jax.default_backend() == "cpu" else {}


def cases(types=TYPES):
    return [pytest.param(t, n, id=f"{t}-{n}") for t in TARGETS for n in types
            if n in SLOW_TYPES.get(t, types)]


def random_q(name, rows, n, seed=0):
    return testing.random_qarray(name, rows, n, seed)

def check_close(out, x, w, target):
    x64 = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    w64 = np.asarray(w, np.float64)
    ref, bound = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
    target = targets.resolve(target).name  # None: the default target
    tol = max(TOL[jnp.asarray(x).dtype.type], TARGET_TOL.get(target, 0.0))
    if jnp.asarray(out).dtype == jnp.bfloat16:
        tol = max(tol, 2 ** -7)  # the result itself is rounded to bf16
    err = np.abs(np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64) - ref)
    assert out.shape == ref.shape
    assert np.all(err <= tol * bound + 1e-30), (target, float((err / (bound + 1e-30)).max()))


@functools.partial(jax.jit, static_argnums=(0,))
def _ops(target, q, *xs):
    """One executable per case: dequantize plus a matmul per x."""
    return ops.dequantize(q, target=target), [ops.matmul(x, q, target=target) for x in xs]


def _check_case(target, name, xs, rows=7, n=512, seed=2):
    q = random_q(name, rows, n, seed=seed)
    y, outs = _ops(target, q, *xs)
    w = spec.dequantize(np.asarray(q.raw), name, n)
    assert y.shape == (rows, n) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), w.view(np.uint32))
    for x, out in zip(xs, outs):
        assert out.shape == x.shape[:-1] + (rows,) and out.dtype == x.dtype
        check_close(out.reshape(-1, rows), x.reshape(-1, n), w, target)


@pytest.mark.parametrize("name", TYPES)
def test_every_type_through_the_default_target(name):
    """What users get with no target named: bit-exact dequantize, matmul within tolerance."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 512)), jnp.float32)
    _check_case(None, name, (x,))


# One type per layout family: super-block d, 2-D grid with row d, Gray-coded words, trellis.
FAMILY_TYPES = ("iq4_k", "iq2_kl", "iq4_kss", "iq4_kt")


@pytest.mark.parametrize("target,name", cases(FAMILY_TYPES))
def test_targets_batches_and_dtypes(target, name):
    """x [..., n] with batch 1 (1-D x), 3 (bf16) and 2 x 32 = 64, odd row count."""
    rng = np.random.default_rng(3)
    xs = (jnp.asarray(rng.standard_normal((512,)), jnp.float32),
          jnp.asarray(rng.standard_normal((3, 512)), jnp.bfloat16),
          jnp.asarray(rng.standard_normal((2, 32, 512)), jnp.float32))
    _check_case(target, name, xs)


@pytest.mark.parametrize("target", TARGETS)
def test_grad_wrt_x_matches_dense(target):
    q = random_q("iq3_k", 6, 256, seed=4)
    w = jnp.asarray(spec.dequantize(np.asarray(q.raw), "iq3_k", 256))
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 256)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(6).standard_normal((4, 6)), jnp.float32)
    # A loss linear in the product makes the gradient c @ W exactly, whatever the forward error.
    g = jax.jit(jax.grad(lambda x: jnp.sum(c * ops.matmul(x, q, target=target))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(c, np.float64) @ np.asarray(w, np.float64),
                               rtol=1e-5, atol=1e-6)
    # And through a non-linear loss (the cotangent then depends on the forward result).
    if target not in TARGET_TOL:
        loss = lambda x, f: jnp.sum(jnp.tanh(f(x)))  # noqa: E731
        g1, g2 = jax.jit(lambda x: (
            jax.grad(loss)(x, lambda v: ops.matmul(v, q, target=target)),
            jax.grad(loss)(x, lambda v: jnp.dot(v, w.T, precision="highest"))))(x)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_vmap_over_x_and_over_stacked_weights(target):
    qs = [random_q("iq4_ks", 5, 256, seed=s) for s in range(3)]
    ws = [spec.dequantize(np.asarray(q.raw), "iq4_ks", 256) for q in qs]
    x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 2, 256)), jnp.float32)
    over_x = jax.vmap(lambda v: ops.matmul(v, qs[0], target=target))
    # The mapped axis is folded into x's rows: no loop in the program.
    assert "while" not in str(jax.make_jaxpr(over_x)(x))
    stacked = QArray(jnp.stack([q.raw for q in qs]), "iq4_ks", (5, 256), _validate=False)
    over_both = jax.vmap(lambda v, q: ops.matmul(v, q, target=target))
    out_x, out_both = jax.jit(lambda x, s: (over_x(x), over_both(x, s)))(x, stacked)
    assert out_x.shape == out_both.shape == (3, 2, 5)
    check_close(out_x.reshape(-1, 5), x.reshape(-1, 256), ws[0], target)
    for i in range(3):
        check_close(out_both[i], x[i], ws[i], target)


def test_bad_input_is_rejected_at_trace_time_with_names():
    q = random_q("iq4_k", 4, 256)
    with pytest.raises(ValueError, match=r"x has width 512.*n_per_row=256"):
        jax.eval_shape(lambda x: ops.matmul(x, q, target="xla"),
                       jax.ShapeDtypeStruct((2, 512), jnp.float32))
    with pytest.raises(TypeError, match="x must be float32 or bfloat16, got int32"):
        jax.eval_shape(lambda x: ops.matmul(x, q, target="xla"),
                       jax.ShapeDtypeStruct((2, 256), jnp.int32))
    bad = QArray(q.raw[:, :-1], "iq4_k", (4, 256), _validate=False)
    with pytest.raises(ValueError, match=r"q.raw has shape \(4, 143\).*needs \(4, 144\)"):
        jax.eval_shape(lambda q: ops.matmul(jnp.ones((1, 256)), q, target="xla"), bad)
    with pytest.raises(ValueError, match="q.raw has shape"):
        jax.eval_shape(lambda q: ops.dequantize(q, target="xla"), bad)
    wrong = QArray(q.raw.astype(jnp.int8), "iq4_k", (4, 256), _validate=False)
    with pytest.raises(TypeError, match="q.raw must be uint8"):
        jax.eval_shape(lambda q: ops.dequantize(q), wrong)
    with pytest.raises(TypeError, match="dtype must be one of"):
        ops.dequantize(q, jnp.int32, target="xla")
    with pytest.raises(TypeError, match="q must be a QArray"):
        ops.matmul(jnp.ones((1, 256)), q.raw)


def test_target_switch(monkeypatch):
    assert targets.resolve("xla").name == "xla"
    monkeypatch.setenv(targets.ENV_VAR, "pallas")
    assert targets.resolve().name == "pallas"
    monkeypatch.setenv(targets.ENV_VAR, "auto")
    assert targets.resolve().name == targets.default()
    expected_cpu = "llvm" if targets.get("llvm").available() else "xla"
    assert targets.default("cpu") == expected_cpu
    assert targets.default("gpu") == "pallas"
    monkeypatch.setenv(targets.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="IQK_JAX_TARGET='cuda'"):
        ops.dequantize(random_q("iq2_k", 1, 256))
    with pytest.raises(ValueError, match="target='nope'"):
        targets.resolve("nope")


def test_unavailable_target_is_reported(monkeypatch):
    missing = targets.Target("llvm", "iqk_codegen._no_such_module")
    monkeypatch.setitem(targets._TARGETS, "llvm", missing)
    assert not missing.available() and "llvm" not in targets.available()
    assert targets.default("cpu") == "xla"
    with pytest.raises(RuntimeError, match="not available"):
        ops.dequantize(random_q("iq2_k", 1, 256), target="llvm")


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from iqk_jax import ops, registry, spec
    from iqk_jax.qarray import QArray
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("rows",))
    for target in sys.argv[1:]:
        # Interpret-mode Pallas is slow on CPU: one type there.
        for name in ("iq4_k",) if target == "pallas" else ("iq4_k", "iq2_kt"):
            desc = registry.descriptor(name)
            rng = np.random.default_rng(0)
            raw = rng.integers(0, 256, (8, desc.row_bytes(512)), dtype=np.uint8)
            hb = desc.row_header_bytes
            if desc.super_d:
                b = raw.reshape(8, 2, desc.block_bytes)
                d = rng.uniform(-.1, .1, (8, 2)).astype(np.float16)
                b[..., :2] = d.view(np.uint8).reshape(8, 2, 2)
            else:
                d = rng.uniform(-.1, .1, 8).astype(desc.header_dtype)
                raw[:, :hb] = d.view(np.uint8).reshape(8, hb)
            sharded = jax.device_put(raw, NamedSharding(mesh, P("rows", None)))
            q = QArray(sharded, name, (8, 512))
            x = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)
            w = spec.dequantize(raw, name, 512).astype(np.float64)
            ref = np.asarray(x, np.float64) @ w.T
            bound = np.abs(np.asarray(x, np.float64)) @ np.abs(w).T
            tol = 3e-2 if target == "llvm" else 1e-5
            out = ops.matmul(x, q, target=target)
            # Decoded shard-locally: the result is sharded like the weight's rows.
            assert out.sharding.spec == P(None, "rows"), out.sharding
            assert np.all(np.abs(np.asarray(out) - ref) <= tol * bound), (target, name)
            out_jit = jax.jit(lambda x, q: ops.matmul(x, q, target=target))(x, q)
            assert np.all(np.abs(np.asarray(out_jit) - ref) <= tol * bound), (target, name, "jit")
            c = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
            gx = jax.grad(lambda x: jnp.sum(c * ops.matmul(x, q, target=target)))(x)
            gref = np.asarray(c, np.float64) @ w
            assert np.abs(np.asarray(gx) - gref).max() <= 1e-5 * np.abs(gref).max(), (target, name)
            y = ops.dequantize(q, target=target)
            assert np.array_equal(np.asarray(y), spec.dequantize(raw, name, 512)), (target, name)
    print("SHARDED_OK")
""")


def test_row_sharded_weights_on_a_4_device_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    env.pop(targets.ENV_VAR, None)
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, *TARGETS], env=env,
                       capture_output=True, text=True, timeout=300,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stdout + r.stderr
