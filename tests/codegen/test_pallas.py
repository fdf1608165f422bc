"""The pallas target's kernels, for every registered type.

Each kernel test has two twins: ``interpret=True`` (runs everywhere, CI on CPU checks the kernel
logic) and ``interpret=False`` (compiled for the accelerator; skipped without a GPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iqk_jax import testing
from iqk_jax import registry, spec
from iqk_codegen import pallas

TYPES = registry.types()
GRID_TYPES = tuple(t for t in TYPES if registry.descriptor(t).grids is not None)
ON_GPU = jax.default_backend() in ("gpu", "cuda", "rocm")
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="compiled",
                      marks=pytest.mark.skipif(not ON_GPU, reason="compiled Pallas needs a GPU"))]
# Relative to the |x| @ |W|.T bound: float32 x multiplies full-precision weights (accumulation
# order only); bf16 x multiplies bf16-rounded weights (2**-8 relative per product).
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def random_rows(desc, rows, n, seed=0):
    return testing.random_rows(desc, rows, n, seed)

def _check_matmul(out, x, raw, name, n):
    w = spec.dequantize(raw, name, n).astype(np.float64)
    x64 = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    ref, bound = x64 @ w.T, np.abs(x64) @ np.abs(w).T
    np.testing.assert_allclose(ref, pallas.reference(x64, raw, name, (raw.shape[0], n)))
    out = np.asarray(out)
    assert out.shape == ref.shape and out.dtype == np.float32
    err = np.abs(out - ref) / np.maximum(bound, 1e-30)
    assert err.max() <= TOL[jnp.asarray(x).dtype.type], (name, x.shape, err.max())


@pytest.mark.parametrize("name", TYPES)
def test_select_lookup_equals_scale_lut(name):
    lut = tuple(int(v) for v in registry.descriptor(name).scale_lut)
    u = jnp.arange(len(lut), dtype=jnp.int32)
    got = jax.jit(lambda v: pallas.select_lookup(lut, v))(u)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(lut))


def test_affine_segments_rebuild_luts():
    for lut in [(3,), (1, 3, 5, 7), (5, 3, 1, 0, 9, 9, 9), tuple(np.random.default_rng(0)
                                                               .integers(-9, 9, 20).tolist())]:
        segs = pallas._affine_segments(lut)
        rebuilt = [a * u + b for lo, hi, a, b in segs for u in range(lo, hi)]
        assert rebuilt == list(lut)


@pytest.mark.parametrize("name", GRID_TYPES)
def test_select_grid_equals_grid(name):
    p = pallas.xla.plan(name)
    e, gs = p.grid.shape
    idx = jnp.repeat(jnp.arange(e, dtype=jnp.int32), gs)
    wmod = jnp.tile(jnp.arange(gs, dtype=jnp.int32), e) if gs > 1 else None
    got = np.asarray(jax.jit(lambda i, w: pallas.select_grid(p.grid, i, w))(idx, wmod))
    np.testing.assert_array_equal(got, p.grid.reshape(-1))


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("name", TYPES)
def test_dequant_kernel_bit_exact(name, interpret):
    desc = registry.descriptor(name)
    raw = random_rows(desc, 5, 512, seed=11)
    y = pallas.dequantize(raw, desc, (5, 512), interpret=interpret)
    assert y.shape == (5, 512) and y.dtype == jnp.float32
    ref = pallas.reference_dequantize(raw, name, (5, 512))
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), ref.view(np.uint32))


# The gemv and gemm kernels decode with the same routine as the dequant kernel above (checked
# for every type); here one type per layout family (super-block d, Gray-coded words with a row
# d, 2-D grid, trellis with two offsets) keeps interpret mode fast while covering the decode
# paths inside the matmul kernels too.
MATMUL_TYPES = ("iq4_k", "iq4_kss", "iq2_kl", "iq4_kt")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("name", MATMUL_TYPES)
def test_gemv_and_gemm_kernels(name, interpret):
    """gemv (batch 3, 512 wide, 2 super-blocks) and gemm (batch 64, odd rows) in one call."""
    desc = registry.descriptor(name)
    raw = random_rows(desc, 7, 512, seed=3)
    rng = np.random.default_rng(0)
    x3 = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)
    x64 = jnp.asarray(rng.standard_normal((64, 512)), jnp.float32)
    both = jax.jit(lambda a, b, r: (pallas.matmul(a, r, desc, (7, 512), interpret=interpret),
                                    pallas.matmul(b, r, desc, (7, 512), interpret=interpret)))
    o3, o64 = both(x3, x64, raw)
    _check_matmul(o3, x3, raw, name, 512)
    _check_matmul(o64, x64, raw, name, 512)


def test_bf16_gemv_gemm_and_batch_one(monkeypatch):
    # Two split-K slices of two chunks each: the gemv loop and the partial sums both run.
    monkeypatch.setattr(pallas, "GEMV_PROGRAMS", 2)
    desc = registry.descriptor("iq5_ks")
    raw = random_rows(desc, 3, 256, seed=9)
    for m, dt in ((1, jnp.bfloat16), (20, jnp.bfloat16)):  # gemv and gemm with bf16 operands
        x = jnp.asarray(np.random.default_rng(m).standard_normal((m, 256)), dt)
        _check_matmul(pallas.matmul(x, raw, "iq5_ks", (3, 256), interpret=True), x, raw,
                      "iq5_ks", 256)


def test_kernels_run_under_jit_and_reject_bad_input():
    desc = registry.descriptor("iq2_ks")
    raw = random_rows(desc, 4, 256)
    x = jnp.ones((2, 256), jnp.float32)
    out = jax.jit(lambda a, r: pallas.matmul(a, r, desc, (4, 256), interpret=True))(x, raw)
    _check_matmul(out, x, raw, "iq2_ks", 256)
    with pytest.raises(ValueError, match="raw has shape"):
        pallas.dequantize(raw[:, :-1], desc, (4, 256), interpret=True)
    with pytest.raises(ValueError, match="x must be"):
        pallas.matmul(jnp.ones((2, 512)), raw, desc, (4, 256), interpret=True)


@pytest.mark.parametrize("kernel", sorted(pallas.KERNELS))
def test_emit_is_deterministic_and_holds_the_kernel(kernel):
    a = pallas.emit("iq4_kss", kernel)
    assert a == pallas.emit("iq4_kss", kernel)
    assert "pallas_call" in a and f"iqk_{kernel}_iq4_kss" in a
    assert ("dot_general" in a) == (kernel != "dequant")
    assert "gather" not in a  # the kernels decode with pointer loads and selects only


def _lower_for_triton(fn, *args):
    """Lowers ``fn`` for CUDA without a GPU: runs Pallas' Triton lowering (the step that rejects
    non-power-of-two shapes, unsupported primitives and gathers) and returns the module text."""
    from jax import export
    exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    return exp.mlir_module()


@pytest.mark.parametrize("name", TYPES)
def test_kernels_lower_to_triton_without_a_gpu(name):
    desc = registry.descriptor(name)
    rows, n = 4099, 4096  # abstract shapes only: big enough for multi-chunk loops everywhere
    raw = jax.ShapeDtypeStruct((rows, desc.row_bytes(n)), jnp.uint8)
    # gemv with float32 x, gemm with bf16 x and a batch that is not a tile multiple.
    xs = [jax.ShapeDtypeStruct((m, n), dt) for m, dt in ((3, jnp.float32), (100, jnp.bfloat16))]

    def all_kernels(r, *xs):
        return (pallas.dequantize(r, desc, (rows, n), interpret=False),
                *[pallas.matmul(x, r, desc, (rows, n), interpret=False) for x in xs])

    text = _lower_for_triton(all_kernels, raw, *xs)
    assert text.count("xla.gpu.triton") == 1 + len(xs)
