"""The llvm emitter: IR built from descriptors, deterministic, valid, and correct on a host
without x86 extensions (the generic path other CPUs take)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import iqk_jax
from iqk_jax import spec
from conftest import needs_conformance, vectors

em = pytest.importorskip("iqk_codegen.llvm")
if not em.available():
    pytest.skip("llvm target not available on this host", allow_module_level=True)

import llvmlite.binding as llvm  # noqa: E402

TYPES = iqk_jax.types()


def test_available_is_bool():
    assert em.available() is True


@pytest.mark.parametrize("kernel", em.KERNELS)
@pytest.mark.parametrize("name", TYPES)
def test_emit_is_valid_ir(name, kernel):
    text = em.emit(name, kernel)
    mod = llvm.parse_assembly(text)
    mod.verify()
    names = {f.name for f in mod.functions}
    assert {"iqk_kernel", "iqk_handler", "iqk_worker"} <= names
    # The dequant path must not contract d*scale*value into an FMA or use fast-math.
    if kernel == "dequant":
        assert "llvm.fma" not in text and "fmuladd" not in text
        assert " fast " not in text and "contract" not in text


@pytest.mark.parametrize("name", [t for t in TYPES
                                  if iqk_jax.descriptor(t).trellis is None])
def test_grid_lookup_uses_byte_shuffles_on_avx2(name):
    if not em.host().avx2:
        pytest.skip("host has no AVX2")
    assert "llvm.x86.avx2.pshuf.b" in em.emit(name, "gemv")


@pytest.mark.parametrize("name", ["iq4_k", "iq4_kss", "iq2_kt"])
def test_emit_is_deterministic(name):
    # Fresh builds (emit memoizes), same text.
    a = str(em.build_module(name, "gemv"))
    assert a == str(em.build_module(iqk_jax.descriptor(name), "gemv")) == em.emit(name, "gemv")


def test_emit_rejects_unknown_kernel_and_type():
    with pytest.raises(ValueError, match="unknown kernel"):
        em.emit("iq4_k", "conv")
    with pytest.raises(ValueError, match="unknown IQK type"):
        em.emit("q4_0", "dequant")


_GENERIC_ENGINES = []


def _generic_kernel(name, kernel):
    """JIT the kernel built for a featureless CPU of this triple (no pshufb/AVX2 paths)."""
    h = em.Host(triple=em.host().triple, cpu="generic", features="")
    text = str(em.build_module(name, kernel, h))
    assert "llvm.x86" not in text
    mod = llvm.parse_assembly(text)
    mod.verify()
    tm = llvm.Target.from_triple(h.triple).create_target_machine(cpu="generic", features="",
                                                                 opt=1)
    eng = llvm.create_mcjit_compiler(mod, tm)
    eng.finalize_object()
    _GENERIC_ENGINES.append(eng)  # keep the code alive
    sig = ctypes.CFUNCTYPE(ctypes.c_int32, *([ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5))
    return sig(eng.get_function_address("iqk_kernel"))


@needs_conformance
# One of each: super-block d + 16-blocks, fp16 row d + pair grid, Gray-coded words, float grid,
# trellis with signs.
@pytest.mark.parametrize("name", ["iq4_k", "iq2_kl", "iq4_kss", "iq6_k", "iq3_kt"])
def test_generic_path_dequant_bit_exact_and_gemv(name):
    v = vectors(name)
    q, n = v["edge.imatrix.q"][:6], v["edge.imatrix.deq"].shape[1]
    rows = q.shape[0]
    fn = _generic_kernel(name, "dequant")
    out = np.zeros((rows, n), np.float32)
    q = np.ascontiguousarray(q)
    assert fn(None, None, None, q.ctypes.data, out.ctypes.data, 1, rows, n, 0, rows) == 0
    want = spec.dequantize(q, name, n)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))

    # gemv/gemm with integer activations and dx = 1 compute sum xq * W exactly (integer grids).
    desc = iqk_jax.descriptor(name)
    g = desc.grid_values
    if not np.all(g == np.round(g)):
        return
    rng = np.random.default_rng(0)
    for kernel, m in (("gemv", 1), ("gemm", 6)):  # gemm: one register tile + 2 leftover rows
        fn = _generic_kernel(name, kernel)
        xq = rng.integers(-127, 128, (m, n), dtype=np.int8)
        xd = np.ones((m, n // 256), np.float32)
        xs = xq.astype(np.int16).reshape(m, -1, desc.block_size).sum(-1).astype(np.int16)
        y = np.zeros((m, rows), np.float32)
        status = fn(xq.ctypes.data, xd.ctypes.data, xs.ctypes.data, q.ctypes.data,
                    y.ctypes.data, m, rows, n, 0, rows)
        assert status == 0
        ref = xq.astype(np.float64) @ want.astype(np.float64).T
        tol = 1e-5 * (np.abs(xq).astype(np.float64) @ np.abs(want).astype(np.float64).T) + 1e-6
        assert np.all(np.abs(y - ref) <= tol), (kernel, np.abs(y - ref).max())
