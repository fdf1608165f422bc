"""The llvm CPU target end to end: JIT-compiled kernels called by XLA through FFI.

Checks, for every registered type: dequantization bit-exact with the numpy spec on
ik_llama.cpp's conformance bytes; GEMV/GEMM within the stated activation-quantization bound
(module docstring of iqk_jax.cpu.runtime) and equal to an exact emulation of the int8
arithmetic; determinism across calls and thread counts; and that bad operands raise Python
exceptions (trace-time checks and the handler's own checks) instead of crashing.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import iqk_jax
from iqk_jax import spec
from iqk_jax.registry import QK_K
from conftest import SETS, needs_conformance, vectors

llvm_target = pytest.importorskip("iqk_codegen.llvm")
if not llvm_target.available():
    pytest.skip("llvm target not available on this host", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from iqk_jax.cpu import runtime  # noqa: E402

TYPES = iqk_jax.types()


def _rows(name, case="real.plain", rows=None):
    v = vectors(name)
    q, deq = v[f"{case}.q"], v[f"{case}.deq"]
    if rows is not None:
        q, deq = q[:rows], deq[:rows]
    return q, deq.shape[1]


def _dequant(name, q, n):
    f = jax.jit(lambda raw: runtime.dequantize(raw, name, (q.shape[0], n)))
    return np.asarray(f(jnp.asarray(q)))


@needs_conformance
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_bit_exact(name):
    for s in SETS:
        for variant in ("plain", "imatrix"):
            q, n = _rows(name, f"{s}.{variant}")
            got = _dequant(name, q, n)
            want = spec.dequantize(q, name, n)
            assert got.dtype == np.float32 and got.shape == want.shape
            # Bit patterns, so -0.0 vs 0.0 and NaN payloads count too.
            bad = np.nonzero(got.view(np.uint32) != want.view(np.uint32))
            assert bad[0].size == 0, (f"{name} {s}.{variant}: {bad[0].size} weights differ, "
                                      f"first at {bad[0][0]},{bad[1][0]}")


@needs_conformance
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dequantize_dtype(dtype):
    q, n = _rows("iq4_k", rows=4)
    got = runtime.dequantize(jnp.asarray(q), "iq4_k", (4, n), dtype)
    assert got.dtype == dtype
    want = spec.dequantize(q, "iq4_k", n).astype(dtype)
    np.testing.assert_array_equal(np.asarray(got), want)


def _emulate(x, q, name, n):
    """Exact float64 value of the kernels' int8 arithmetic.

    The weights are the spec's, with the grid rounded to integers as the matmul kernels use
    it (a no-op for every grid but iq6_k's).
    """
    xq, dx, _ = (np.asarray(a) for a in runtime.quantize_activations(jnp.asarray(x)))
    desc = iqk_jax.descriptor(name)
    if desc.grids is not None:
        desc = dataclasses.replace(desc, grids=tuple(np.round(np.asarray(g)).tolist()
                                                     for g in desc.grids))
    w = spec.dequantize(q, desc, n).astype(np.float64)
    m = x.shape[0]
    prod = (xq.astype(np.float64).reshape(m, 1, -1, QK_K)
            * w.reshape(1, w.shape[0], -1, QK_K)).sum(-1)        # [m, rows, nsb]
    return (prod * dx.astype(np.float64)[:, None, :]).sum(-1), dx


def _bound(x, w, dx, name, q, n):
    """The documented error bound of runtime.matmul against x @ W.T (float64)."""
    m = x.shape[0]
    wabs = np.abs(w).reshape(w.shape[0], -1, QK_K).sum(-1)      # [rows, nsb]
    bound = 0.5 * dx.astype(np.float64) @ wabs.T
    bound += 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T) + 1e-30
    desc = iqk_jax.descriptor(name)
    g = desc.grid_values
    if not np.all(g == np.round(g)):
        # Rounded grid values: |W_used - W| <= 0.5 * |dl| per weight, |dl| = |W / v|.
        f = spec.unpack(spec.split_rows(q, desc, n)[1], desc)
        row_d, blocks = spec.split_rows(q, desc, n)
        d = spec.super_d(blocks) if desc.super_d else row_d[:, None]
        dl = np.abs(d[..., None] * desc.scale_lut[f["scale"]]).astype(np.float64)
        dlw = np.repeat(dl, desc.block_size, axis=-1).reshape(w.shape)
        bound += 0.5 * np.abs(x).astype(np.float64) @ dlw.T
    return bound


@needs_conformance
@pytest.mark.parametrize("name", TYPES)
def test_matmul_within_bound(name):
    q, n = _rows(name, "real.plain")
    w = spec.dequantize(q, name, n).astype(np.float64)
    rng = np.random.default_rng(iqk_jax.descriptor(name).ggml_type)
    f = jax.jit(lambda x, raw: runtime.matmul(x, raw, name, (q.shape[0], n)))
    # gemv; gemm over two activation-row cache tiles, the second one a register tile and
    # two leftover rows.
    for m in (1, llvm_target.GEMM_MB + llvm_target.GEMM_TILE + 2):
        x = rng.standard_normal((m, n)).astype(np.float32)
        x[-1, :QK_K] = 0.0  # an all-zero activation block (dx = 0)
        y = np.asarray(f(jnp.asarray(x), jnp.asarray(q)))
        assert y.shape == (m, q.shape[0]) and y.dtype == np.float32
        ref = x.astype(np.float64) @ w.T
        emu, dx = _emulate(x, q, name, n)
        bound = _bound(x, w, dx, name, q, n)
        err = np.abs(y - ref)
        assert np.all(err <= bound), f"{name} m={m}: error {err.max()} above bound"
        # The integer arithmetic is exact; only float32 scaling and accumulation differ.
        tol = 1e-5 * (np.abs(x) @ np.abs(w).T) + 1e-6
        assert np.all(np.abs(y - emu) <= tol), f"{name} m={m}: {np.abs(y - emu).max()}"


def _extreme_rows(desc, rows, n):
    """Packed rows whose every weight is as large as the type allows (d = 1).

    Each group takes the grid entry (selector, index) with the largest sum of |rounded value|
    and each block the packed scale with the largest |scale_lut| entry: the inputs that bring
    the int8 kernels' 16-bit pair sums closest to saturation.
    """
    g = np.abs(np.round(desc.grid_values)).sum(-1)               # [n_selectors, 2**bits]
    sel, q = np.unravel_index(int(np.argmax(g)), g.shape)
    lead = (rows, n // QK_K)
    fields = {"q": np.full(lead + (desc.n_groups,), q, np.int32),
              "scale": np.full(lead + (desc.n_blocks,),
                               int(np.argmax(np.abs(desc.scale_lut))), np.int32)}
    if desc.pieces_of("sel"):
        fields["sel"] = np.full(lead + (desc.n_blocks,), sel, np.int32)
    blocks = spec.pack(fields, desc, lead)
    if desc.super_d:
        blocks[..., :2] = np.full((1,), 1.0, np.float16).view(np.uint8)
    row_d = np.ones(rows, np.float32) if desc.row_header_bytes else None
    return spec.assemble_rows(row_d, blocks, desc)


# Table grids only: trellis values are not chosen per group, and their kernels never use the
# unsigned-activation form whose bound this probes hardest.
@pytest.mark.parametrize("name", [t for t in TYPES if iqk_jax.descriptor(t).trellis is None])
def test_gemm_extreme_inputs_do_not_saturate(name):
    desc = iqk_jax.descriptor(name)
    rows, n = 3, 2 * QK_K  # odd: a weight-row pair plus a single row
    q = _extreme_rows(desc, rows, n)
    w = spec.dequantize(q, desc, n)
    assert np.abs(np.round(w)).max() > 0
    f = jax.jit(lambda x, raw: runtime.matmul(x, raw, name, (rows, n)))
    m = llvm_target.GEMM_TILE + 1  # gemm: a register tile and a leftover row
    # |x| = 1 quantizes to +-127 exactly: all +127 (the largest x + 128) and the signs of the
    # weights (every product positive and maximal).
    sgn = np.where(w[0] < 0, -1.0, 1.0).astype(np.float32)
    for x in (np.ones((m, n), np.float32), np.tile(sgn, (m, 1)), -np.ones((m, n), np.float32)):
        y = np.asarray(f(jnp.asarray(x), jnp.asarray(q)))
        emu, _ = _emulate(x, q, name, n)
        tol = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T) + 1e-6
        assert np.all(np.abs(y - emu) <= tol), (name, np.abs(y - emu).max())


@needs_conformance
def test_matmul_bf16_input_and_determinism():
    q, n = _rows("iq4_ks", "gaussian.plain")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, n)), jnp.bfloat16)
    y1 = np.asarray(runtime.matmul(x, jnp.asarray(q), "iq4_ks", (q.shape[0], n)))
    y2 = np.asarray(runtime.matmul(x.astype(jnp.float32), jnp.asarray(q), "iq4_ks",
                                   (q.shape[0], n)))
    np.testing.assert_array_equal(y1, y2)  # bf16 -> f32 is exact, same kernel input


@needs_conformance
@pytest.mark.parametrize("m", [1, 9])
def test_thread_count_does_not_change_results(m):
    q, n = _rows("iq3_k", "real.plain")
    # Enough rows that the handler really splits them (small calls stay on one thread), into
    # several chunks per thread, the last one ragged (not a multiple of the decode block).
    q = np.tile(q, (4, 1))
    q = q[:q.shape[0] - 3]
    assert q.shape[0] * n >= 1 << 16
    assert q.shape[0] % llvm_target.GEMM_RB and q.shape[0] > 2 * 5 * llvm_target.GEMM_RB
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    outs = []
    try:
        for t in (1, 2, 5):
            runtime.set_threads(t)
            outs.append(np.asarray(runtime.matmul(x, jnp.asarray(q), "iq3_k", (q.shape[0], n))))
            outs.append(np.asarray(runtime.dequantize(jnp.asarray(q), "iq3_k", (q.shape[0], n))))
    finally:
        runtime.set_threads(None)
    for a, b in zip(outs[2:], outs[:-2]):
        np.testing.assert_array_equal(a, b)
    # Every row was computed (by whichever worker claimed it) and is right.
    emu, _ = _emulate(np.asarray(x), q, "iq3_k", n)
    w = spec.dequantize(q, "iq3_k", n).astype(np.float64)
    tol = 1e-5 * (np.abs(np.asarray(x)) @ np.abs(w).T) + 1e-6
    assert np.all(np.abs(outs[-2] - emu) <= tol)


def test_trace_time_validation():
    desc = iqk_jax.descriptor("iq4_k")
    rb = desc.row_bytes(256)
    raw = jnp.zeros((4, rb), jnp.uint8)
    with pytest.raises(TypeError, match="uint8"):
        runtime.dequantize(raw.astype(jnp.int32), "iq4_k", (4, 256))
    with pytest.raises(ValueError, match="bytes per row"):
        runtime.dequantize(raw[:, :-1], "iq4_k", (4, 256))
    with pytest.raises(ValueError, match="multiple of 256"):
        runtime.dequantize(raw, "iq4_k", (4, 300))
    with pytest.raises(ValueError, match="columns"):
        runtime.matmul(jnp.zeros((1, 512)), raw, "iq4_k", (4, 256))
    with pytest.raises(TypeError, match="float32, bfloat16"):
        runtime.matmul(jnp.zeros((1, 256), jnp.int32), raw, "iq4_k", (4, 256))
    with pytest.raises(ValueError, match="2-D"):
        runtime.matmul(jnp.zeros((256,)), raw, "iq4_k", (4, 256))
    assert runtime.matmul(jnp.zeros((0, 256)), raw, "iq4_k", (4, 256)).shape == (0, 4)


_BAD_CALLS = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    import iqk_jax
    from iqk_jax.cpu import runtime
    for name in {names!r}:
      desc = iqk_jax.descriptor(name)
      rb = desc.row_bytes(512)
      deq = runtime.target_name(desc, "dequant")
      mm = runtime.target_name(desc, "gemv")
      f32 = jnp.float32
      def call(target, out, *args):
          return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out, f32))(*args)
      raw = jnp.zeros((3, rb), jnp.uint8)
      xq = jnp.zeros((1, 512), jnp.int8); xd = jnp.zeros((1, 2), f32)
      xs = jnp.zeros((1, 512 // desc.block_size), jnp.int16)
      cases = {{
          "truncated raw": lambda: call(deq, (3, 512), raw[:, :-3]),
          "raw dtype": lambda: call(deq, (3, 512), raw.astype(jnp.int8)),
          "raw rank": lambda: call(deq, (3, 512), raw.reshape(-1)),
          "n not multiple of 256": lambda: call(deq, (3, 300), raw),
          "out rows": lambda: call(deq, (4, 512), raw),
          "operand count": lambda: call(deq, (3, 512), raw, raw),
          "x width": lambda: call(mm, (1, 3), xq[:, :256], xd, xs, raw),
          "x dtype": lambda: call(mm, (1, 3), xq.astype(f32), xd, xs, raw),
          "xd shape": lambda: call(mm, (1, 3), xq, xd[:, :1], xs, raw),
          "xs shape": lambda: call(mm, (1, 3), xq, xd, xs[:, :1], raw),
          "out shape": lambda: call(mm, (2, 3), xq, xd, xs, raw),
          "gemv truncated raw": lambda: call(mm, (1, 3), xq, xd, xs, raw[:, 1:]),
      }}
      for label, fn in cases.items():
          try:
              jax.block_until_ready(fn())
          except Exception as e:
              msg = str(e)
              assert "iqk_jax llvm" in msg, (label, msg)
              print("raised", label)
          else:
              raise SystemExit("no error for " + label)
    print("ALL OK")
''')


def test_handler_rejects_bad_buffers_without_crashing():
    # A crash (segfault, abort) would kill the interpreter: run in a subprocess. Types cover
    # a super-block scale, an fp16 and an fp32 row header.
    names = ["iq4_k", "iq2_ks", "iq1_kt"]
    r = subprocess.run([sys.executable, "-c", _BAD_CALLS.format(names=names)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "ALL OK" in r.stdout and r.stdout.count("raised") == 12 * len(names), r.stdout


def test_available_false_without_llvmlite():
    code = textwrap.dedent('''
        import sys
        sys.modules["llvmlite"] = None
        sys.modules["llvmlite.binding"] = None
        sys.modules["llvmlite.ir"] = None
        from iqk_codegen import llvm
        assert llvm.available() is False
        print("OK")
    ''')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_object_cache_roundtrip_and_corruption(tmp_path):
    h = llvm_target.host()
    text = llvm_target.emit("iq2_ks", "dequant")
    obj = runtime._object_code(text, h, tmp_path)
    files = list(tmp_path.glob("*.o"))
    assert len(files) == 1 and obj
    assert runtime._object_code(text, h, tmp_path) == obj  # served from the file
    # A damaged file is detected by its checksum and replaced, never loaded.
    files[0].write_bytes(files[0].read_bytes()[:-100])
    assert runtime._object_code(text, h, tmp_path) == obj
    blob = files[0].read_bytes()
    assert blob[32:] == obj
    # Another host (CPU name) is another key.
    other = llvm_target.Host(h.triple, "generic", "")
    runtime._object_code(str(llvm_target.build_module("iq2_ks", "dequant", other)), other, tmp_path)
    assert len(list(tmp_path.glob("*.o"))) == 2
