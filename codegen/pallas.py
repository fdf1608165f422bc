"""The ``pallas`` target: fused dequant + matmul kernels that read packed rows directly.

Three kernels, all generated from the type's :class:`~iqk_codegen.xla.DecodePlan` (nothing
here is per type):

* ``dequant``: one program per (row tile, 64-weight chunk), writes float32 weights (bit-exact
  with the spec; used by ``dequantize`` on GPU and by the tests).
* ``gemv`` (decode, batch 1..16): one program per (row tile, slice of the row); it loops over
  its 64-weight chunks, decodes a ``[TR, 64]`` weight tile in registers and accumulates
  ``w_tile @ x_tile.T``; the wrapper adds the per-slice partials (split-K keeps the GPU busy
  when there are few row tiles). The dense weight never reaches HBM.
* ``gemm`` (prefill, batch > 16): one program per (batch tile, row tile), same inner loop with
  a ``[TM, 64] x [64, TN]`` product.

Decoding 64 weights per step (``K_CHUNK``, a divisor of the 256-weight super-block) bounds the
decode state each program keeps live.

Written for the Triton lowering of Pallas: every array that is loaded, stored or computed
has a power-of-two size; the packed bytes are read with pointer loads whose offsets are
``row * row_bytes + base + table[k]`` (the plan's per-weight byte rows, passed in as an int32
input because kernels may not capture constants); grid and scale look-ups are compare/select
chains over at most 128 constants, and the trellis generator is computed inline with uint32
arithmetic, so no value-dependent gather appears anywhere. Row tiles past the last row read a
clamped (valid) row and their results are dropped by the wrapper.

The Triton lowering itself runs without a GPU (``jax.export`` for the ``cuda`` platform), which
the tests use to check every kernel of every type lowers. On CPU the kernels run with
``interpret=True`` (the default there), which is how CI checks their logic; :func:`reference`
and :func:`reference_dequantize` are the numpy oracles they are compared with. TPU (Mosaic) is
not supported: see :func:`available`.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton's compiler params pick the Triton lowering on GPU (not Mosaic GPU)
    from jax.experimental.pallas import triton as _pl_triton
except ImportError:  # pragma: no cover - a jax without the Triton backend
    _pl_triton = None

from iqk_jax import registry, spec
from iqk_jax.registry import QK_K, TypeDescriptor
from iqk_codegen import xla

NAME = "pallas"
KERNELS = frozenset({"dequant", "gemv", "gemm"})
GEMV_MAX_BATCH = 16   # Triton's dot wants every dimension >= 16: smaller batches are padded
ROW_TILE = 32         # rows per program (gemv / dequant)
K_CHUNK = 64          # weights decoded per step: bounds the live decode state per program
GEMV_PROGRAMS = 1024  # split the gemv over super-blocks until about this many programs run
GEMM_TILE_M = 64
GEMM_TILE_N = 64


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def interpret_default() -> bool:
    """Interpret mode unless a GPU backend is present (``IQK_PALLAS_INTERPRET=0/1`` overrides)."""
    env = os.environ.get("IQK_PALLAS_INTERPRET")
    if env is not None:
        return env not in ("0", "false", "False", "")
    return jax.default_backend() not in ("gpu", "cuda", "rocm")


def available() -> bool:
    """Compiled on GPU (Triton), interpreted on CPU (slow, for tests and CI).

    Not on TPU: the kernels address packed bytes with pointer-style integer-array loads, which
    Mosaic TPU does not lower, so TPU users get the xla target by default instead.
    """
    return jax.default_backend() != "tpu"


# ----------------------------------------------------------------------------------------------
# In-kernel look-ups (no gathers)
# ----------------------------------------------------------------------------------------------

def _affine_segments(lut: tuple[int, ...]):
    """Splits an integer LUT into maximal affine runs ``(lo, hi, a, b)``, ``lut[u] = a*u + b``."""
    segs = []
    u = 0
    n = len(lut)
    while u < n:
        if u + 1 == n:
            segs.append((u, n, 0, lut[u]))
            break
        a = lut[u + 1] - lut[u]
        v = u + 1
        while v + 1 < n and lut[v + 1] - lut[v] == a:
            v += 1
        segs.append((u, v + 1, a, lut[u] - a * u))
        u = v + 1
    return segs


def select_lookup(lut: tuple[int, ...], u: jax.Array) -> jax.Array:
    """int32 ``lut[u]``: a few affine pieces where the LUT has them, else a select chain."""
    segs = _affine_segments(lut)
    if len(segs) <= 4:
        out = segs[0][2] * u + segs[0][3]
        for lo, _, a, b in segs[1:]:
            out = jnp.where(u >= lo, a * u + b, out)
        return out.astype(jnp.int32)
    out = jnp.full(u.shape, lut[0], jnp.int32)
    for k in range(1, len(lut)):
        out = jnp.where(u == k, jnp.int32(lut[k]), out)
    return out


def select_grid(grid: np.ndarray, idx: jax.Array, wmod: jax.Array | None) -> jax.Array:
    """float32 ``grid[idx, wmod]`` as one compare/select chain over the grid's entries."""
    gs = grid.shape[1]

    def entry(k):
        if gs == 1:
            return jnp.float32(grid[k, 0])
        v = jnp.full(wmod.shape, grid[k, 0], jnp.float32)
        for j in range(1, gs):
            v = jnp.where(wmod == j, jnp.float32(grid[k, j]), v)
        return v

    out = jnp.broadcast_to(entry(0), idx.shape).astype(jnp.float32)
    for k in range(1, grid.shape[0]):
        out = jnp.where(idx == k, entry(k), out)
    return out


# ----------------------------------------------------------------------------------------------
# Shared in-kernel decode of a [TR, K_CHUNK] tile
# ----------------------------------------------------------------------------------------------

def _load_rows(p: xla.DecodePlan, tab_ref, c, kc: int) -> dict[int, jax.Array]:
    """Columns ``c*kc ... (c+1)*kc - 1`` of the plan's table rows that the decode reads."""
    used = set()
    for pr in p.pieces:
        used.update(k for k in (pr.byte_row, pr.shift_row, pr.lo_row, pr.hi_row, pr.hi_shift_row)
                    if k is not None)
    used.update(k for k in (p.wmod_row, p.mult_row) if k is not None)
    return {k: tab_ref[k, pl.ds(c * kc, kc)][None, :] for k in sorted(used)}


def _row_header_d(desc: TypeDescriptor, raw_ref, ridx):
    if desc.super_d:
        return None
    b = [raw_ref[ridx, jnp.full_like(ridx, j)].astype(jnp.int32)
         for j in range(desc.row_header_bytes)]
    d = xla.fp16_bits_to_f32(*b) if desc.row_header_bytes == 2 else xla.fp32_bits_to_f32(*b)
    return d[:, None]


def _decode_chunk(p: xla.DecodePlan, desc: TypeDescriptor, tab_ref, raw_ref, ridx, row_d, j,
                  kc: int):
    """float32 [TR, kc]: weights ``j*kc ... (j+1)*kc - 1`` of rows ``ridx`` (int32 [TR]).

    Decoding ``kc`` (< 256) weights at a time bounds the live decode state per program (Triton
    keeps it in registers); ``kc`` divides 256, so a chunk never straddles super-blocks.
    """
    cps = QK_K // kc  # chunks per super-block, a power of two: shift and mask, no div/rem
    s, c = j >> (cps.bit_length() - 1), j & (cps - 1)
    rows_tab = _load_rows(p, tab_ref, c, kc)
    base = desc.row_header_bytes + s * desc.block_bytes
    fetch = lambda k: raw_ref[ridx[:, None], base + rows_tab[k]].astype(jnp.int32)  # noqa: E731
    if desc.super_d:
        lo = raw_ref[ridx, jnp.full_like(ridx, 0) + base].astype(jnp.int32)
        hi = raw_ref[ridx, jnp.full_like(ridx, 1) + base].astype(jnp.int32)
        d = xla.fp16_bits_to_f32(lo, hi)[:, None]
    else:
        d = row_d
    return xla.decode_superblock(p, row=lambda k: rows_tab[k], fetch=fetch,
                                 scale_lookup=select_lookup, grid_lookup=select_grid, d=d)


def _row_index(i, tile: int, rows: int):
    return jnp.minimum(i * tile + lax.iota(jnp.int32, tile), rows - 1)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

def dequant_kernel(tab_ref, raw_ref, o_ref, *, p, desc, rows, tile, kc):
    """Program (i, j): rows ``i*tile ...``, weights ``j*kc ...`` -> ``o_ref`` [tile, kc]."""
    i, j = pl.program_id(0), pl.program_id(1)
    ridx = _row_index(i, tile, rows)
    y = _decode_chunk(p, desc, tab_ref, raw_ref, ridx, _row_header_d(desc, raw_ref, ridx), j, kc)
    o_ref[...] = y.astype(o_ref.dtype)


def _dot_nt(a, b, low_precision: bool):
    """a [M, K] . b [N, K]^T in float32 (bf16 operands when ``low_precision``)."""
    if low_precision:
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        prec = None
    else:
        prec = lax.Precision.HIGHEST
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=prec,
                           preferred_element_type=jnp.float32)


def gemv_kernel(tab_ref, raw_ref, x_ref, o_ref, *, p, desc, rows, tile, chunks_per, kc,
                low_precision):
    """Program (i, k): partial ``o_ref [1, tile, B] = w[rows i*tile...] @ x.T`` over weight
    chunks ``k*chunks_per ... (k+1)*chunks_per - 1`` (split-K: enough programs to fill the GPU
    even for few rows; the wrapper sums the partials)."""
    i, k = pl.program_id(0), pl.program_id(1)
    ridx = _row_index(i, tile, rows)
    row_d = _row_header_d(desc, raw_ref, ridx)

    def body(jj, acc):
        j = k * chunks_per + jj
        w = _decode_chunk(p, desc, tab_ref, raw_ref, ridx, row_d, j, kc)     # [tile, kc]
        xs = x_ref[:, pl.ds(j * kc, kc)]                                      # [B, kc]
        return acc + _dot_nt(w, xs, low_precision)

    acc = lax.fori_loop(0, chunks_per, body, jnp.zeros(o_ref.shape[1:], jnp.float32))
    o_ref[...] = acc[None]


def gemm_kernel(tab_ref, raw_ref, x_ref, o_ref, *, p, desc, rows, tile_m, tile_n, chunks, kc,
                low_precision):
    """Program (mi, ni): ``o_ref [tile_m, tile_n] = x[mi tile] @ w[ni tile].T``."""
    mi, ni = pl.program_id(0), pl.program_id(1)
    ridx = _row_index(ni, tile_n, rows)
    row_d = _row_header_d(desc, raw_ref, ridx)

    def body(j, acc):
        w = _decode_chunk(p, desc, tab_ref, raw_ref, ridx, row_d, j, kc)     # [tile_n, kc]
        xs = x_ref[pl.ds(mi * tile_m, tile_m), pl.ds(j * kc, kc)]             # [tile_m, kc]
        return acc + _dot_nt(xs, w, low_precision)

    acc = lax.fori_loop(0, chunks, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc


# ----------------------------------------------------------------------------------------------
# Jitted wrappers
# ----------------------------------------------------------------------------------------------

def _k_splits(chunks: int, row_tiles: int) -> int:
    """Split-K factor of the gemv: a divisor of ``chunks`` giving about GEMV_PROGRAMS programs."""
    want = max(1, -(-GEMV_PROGRAMS // row_tiles))
    return max(d for d in range(1, chunks + 1) if chunks % d == 0 and d <= want)


def _gpu_params(num_warps: int = 4):
    if _pl_triton is None:
        return None
    return _pl_triton.CompilerParams(num_warps=num_warps, num_stages=2)


def _full(shape):
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


@functools.partial(jax.jit, static_argnames=("name", "shape", "dtype", "interpret"))
def _dequant_call(raw, *, name, shape, dtype, interpret):
    desc = registry.descriptor(name)
    p = xla.plan(desc)
    rows, n = shape
    tile = min(ROW_TILE, _pow2(rows))
    rows_p = -(-rows // tile) * tile
    tab = jnp.asarray(p.table)
    out = pl.pallas_call(
        functools.partial(dequant_kernel, p=p, desc=desc, rows=rows, tile=tile, kc=K_CHUNK),
        out_shape=jax.ShapeDtypeStruct((rows_p, n), dtype),
        grid=(rows_p // tile, n // K_CHUNK),
        in_specs=[_full(tab.shape), _full(raw.shape)],
        out_specs=pl.BlockSpec((tile, K_CHUNK), lambda i, j: (i, j)),
        interpret=interpret, name=f"iqk_dequant_{name}", compiler_params=_gpu_params(),
    )(tab, raw)
    return out[:rows]


@functools.partial(jax.jit, static_argnames=("name", "shape", "interpret"))
def _matmul_call(x2d, raw, *, name, shape, interpret):
    desc = registry.descriptor(name)
    p = xla.plan(desc)
    rows, n = shape
    m = x2d.shape[0]
    chunks = n // K_CHUNK
    low = x2d.dtype == jnp.bfloat16
    x2d = x2d if low else x2d.astype(jnp.float32)
    tab = jnp.asarray(p.table)
    if m <= GEMV_MAX_BATCH:
        tile = min(ROW_TILE, max(16, _pow2(rows)))
        rows_p = -(-rows // tile) * tile
        xp = jnp.zeros((GEMV_MAX_BATCH, n), x2d.dtype).at[:m].set(x2d)
        splits = _k_splits(chunks, rows_p // tile)
        out = pl.pallas_call(
            functools.partial(gemv_kernel, p=p, desc=desc, rows=rows, tile=tile,
                              chunks_per=chunks // splits, kc=K_CHUNK, low_precision=low),
            out_shape=jax.ShapeDtypeStruct((splits, rows_p, GEMV_MAX_BATCH), jnp.float32),
            grid=(rows_p // tile, splits),
            in_specs=[_full(tab.shape), _full(raw.shape), _full(xp.shape)],
            out_specs=pl.BlockSpec((1, tile, GEMV_MAX_BATCH), lambda i, k: (k, i, 0)),
            interpret=interpret, name=f"iqk_gemv_{name}", compiler_params=_gpu_params(),
        )(tab, raw, xp)
        return out.sum(axis=0)[:rows, :m].T
    tile_m = min(GEMM_TILE_M, _pow2(m))
    tile_n = min(GEMM_TILE_N, max(16, _pow2(rows)))
    m_p = -(-m // tile_m) * tile_m
    rows_p = -(-rows // tile_n) * tile_n
    xp = jnp.zeros((m_p, n), x2d.dtype).at[:m].set(x2d) if m_p != m else x2d
    out = pl.pallas_call(
        functools.partial(gemm_kernel, p=p, desc=desc, rows=rows, tile_m=tile_m, tile_n=tile_n,
                          chunks=chunks, kc=K_CHUNK, low_precision=low),
        out_shape=jax.ShapeDtypeStruct((m_p, rows_p), jnp.float32),
        grid=(m_p // tile_m, rows_p // tile_n),
        in_specs=[_full(tab.shape), _full(raw.shape), _full(xp.shape)],
        out_specs=pl.BlockSpec((tile_m, tile_n), lambda mi, ni: (mi, ni)),
        interpret=interpret, name=f"iqk_gemm_{name}", compiler_params=_gpu_params(),
    )(tab, raw, xp)
    return out[:m, :rows]


def dequantize(raw, desc, shape, dtype=jnp.float32, *, interpret: bool | None = None) -> jax.Array:
    """Dequantizes with the Pallas ``dequant`` kernel; float32 is bit-exact with the spec."""
    desc = registry.descriptor(desc)
    rows, n = xla.check_raw(raw, desc, shape)
    if rows == 0:
        return jnp.zeros((0, n), dtype)
    interpret = interpret_default() if interpret is None else interpret
    return _dequant_call(jnp.asarray(raw), name=desc.name, shape=(rows, n),
                         dtype=jnp.dtype(dtype), interpret=interpret)


def matmul(x2d, raw, desc, shape, *, interpret: bool | None = None) -> jax.Array:
    """``float32 [m, rows] = x2d [m, n] @ dequantize(raw).T`` without a dense weight in HBM.

    ``m <= 16`` uses the GEMV kernel, larger batches the tiled GEMM kernel. float32 ``x`` is
    multiplied at full float32 precision; bfloat16 ``x`` multiplies bf16-rounded weights with
    float32 accumulation.
    """
    desc = registry.descriptor(desc)
    rows, n = xla.check_raw(raw, desc, shape)
    if x2d.ndim != 2 or x2d.shape[1] != n:
        raise ValueError(f"{desc.name}: x must be [m, {n}], got {tuple(x2d.shape)}")
    if x2d.shape[0] == 0 or rows == 0:
        return jnp.zeros((x2d.shape[0], rows), jnp.float32)
    interpret = interpret_default() if interpret is None else interpret
    return _matmul_call(x2d, jnp.asarray(raw), name=desc.name, shape=(rows, n),
                        interpret=interpret)


def reference(x2d, raw, desc, shape) -> np.ndarray:
    """What ``matmul`` computes, in numpy float64 from the spec (the kernels' test oracle)."""
    desc = registry.descriptor(desc)
    w = spec.dequantize(np.asarray(raw), desc, shape[1]).astype(np.float64)
    return np.asarray(x2d, dtype=np.float64) @ w.T


def reference_dequantize(raw, desc, shape) -> np.ndarray:
    """What the ``dequant`` kernel computes: the numpy spec."""
    return spec.dequantize(np.asarray(raw), registry.descriptor(desc), shape[1])


def emit(desc, kernel: str) -> str:
    """The jaxpr of the ``pallas_call`` for a representative shape (64 rows x 512).

    A jaxpr rather than lowered text because Triton/Mosaic lowering needs the accelerator;
    the jaxpr holds the complete kernel body and is backend independent and deterministic.
    """
    desc = registry.descriptor(desc)
    if kernel not in KERNELS:
        raise ValueError(f"pallas: unknown kernel {kernel!r}; expected one of {sorted(KERNELS)}")
    rows, n = 64, 2 * QK_K
    raw = jax.ShapeDtypeStruct((rows, desc.row_bytes(n)), jnp.uint8)
    if kernel == "dequant":
        fn = lambda r: _dequant_call(r, name=desc.name, shape=(rows, n),  # noqa: E731
                                     dtype=jnp.dtype(jnp.float32), interpret=False)
        jaxpr = jax.make_jaxpr(fn)(raw)
    else:
        m = 1 if kernel == "gemv" else 64
        x = jax.ShapeDtypeStruct((m, n), jnp.float32)
        fn = lambda a, r: _matmul_call(a, r, name=desc.name, shape=(rows, n),  # noqa: E731
                                       interpret=False)
        jaxpr = jax.make_jaxpr(fn)(x, raw)
    return str(jaxpr)
