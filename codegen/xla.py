"""The ``xla`` target: descriptor-driven dequantization in plain ``jax.numpy``.

This is the portable path (every backend, and the fallback everywhere) and it also holds the
pieces the other jnp-based emitters share:

* :class:`DecodePlan`, computed once per type from its :class:`~iqk_jax.registry.TypeDescriptor`:
  every packed field is re-indexed *per weight* of the 256-weight super-block, so decoding is
  a fixed set of byte fetches ``bytes[..., byte_row]`` followed by elementwise integer math.
  The rows live in one int32 table (``plan.table``, ``[P, 256]``), which the Pallas kernels
  receive as an input (kernels may not capture array constants).
* :func:`decode_superblock`, the one decoding routine. It is written against four small
  callbacks (fetch bytes, read a table row, look up the scale LUT, look up the grid) so that the
  XLA target can use static slices and tiny-table gathers while the Pallas kernels use pointer
  loads and compare/select chains, with the arithmetic itself shared and identical.

Bit-exactness with :func:`iqk_jax.spec.dequantize`: each weight is
``float32(d * float32(scale)) * value`` in float32, in that order, exactly like the spec. No
addition takes part, so no backend can contract it into an FMA.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from iqk_jax import registry
from iqk_jax.registry import QK_K, TypeDescriptor

NAME = "xla"
KERNELS = frozenset({"dequant", "gemv", "gemm"})


# ----------------------------------------------------------------------------------------------
# The decode plan
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PieceRows:
    """Where one :class:`~iqk_jax.registry.Piece` is described in ``DecodePlan.table``.

    ``byte_row`` (raw pieces) or ``lo_row``/``hi_row``/``hi_shift_row`` (xor16 pieces: the two
    bytes of the little-endian word and ``8 * (byte & 1)``) index table rows. ``shift`` is the
    bit offset when it is the same for every weight (the common case, a scalar shift), else
    ``None`` and ``shift_row`` holds it per weight.
    """

    field: str
    nbits: int
    dst: int
    source: str
    byte_row: int
    shift: int | None
    shift_row: int | None
    lo_row: int | None = None
    hi_row: int | None = None
    hi_shift_row: int | None = None

    @property
    def mask(self) -> int:
        return (1 << self.nbits) - 1


@dataclasses.dataclass(frozen=True, eq=False)
class DecodePlan:
    """Per-weight index tables for one type (see the module docstring).

    Invariants: ``table`` is int32 ``[P, 256]`` with ``P`` a power of two (Triton loads want
    power-of-two shapes), read-only; every byte index in it is ``< desc.block_bytes``; row
    ``wmod_row`` (if any) is ``w % group_size``; row ``mult_row`` (trellis types) is the
    generator multiplier raised to ``w % group_size + 1`` (mod 2**32, stored as int32 bits), so
    the ``j``-th value of a group is ``(seed * M**(j+1)) mod 2**32`` with no loop.
    """

    name: str
    table: np.ndarray
    pieces: tuple[PieceRows, ...]
    wmod_row: int | None
    mult_row: int | None
    scale_lut: tuple[int, ...]
    grid: np.ndarray | None        # float32 [n_selectors * 2**bits, group_size] (grid types)
    bits: int
    group_size: int
    offsets: tuple[int, ...]       # trellis seed offset per selector
    abs_values: bool
    has_sel: bool
    has_sign: bool


def _per_weight(values: tuple[int, ...]) -> np.ndarray:
    """Re-indexes a per-element tuple (n elements, n | 256) per weight of the super-block."""
    n = len(values)
    return np.repeat(np.asarray(values, dtype=np.int32), QK_K // n)


def _build_plan(desc: TypeDescriptor) -> DecodePlan:
    rows: list[np.ndarray] = []

    def add(row) -> int:
        rows.append(np.asarray(row, dtype=np.int64).astype(np.uint32).view(np.int32))
        return len(rows) - 1

    pieces = []
    for p in desc.pieces:
        byte = _per_weight(p.byte)
        shift = _per_weight(p.shift)
        uniform = bool(np.all(shift == shift[0]))
        pr = dict(field=p.field, nbits=p.nbits, dst=p.dst, source=p.source,
                  byte_row=add(byte), shift=int(shift[0]) if uniform else None,
                  shift_row=None if uniform else add(shift))
        if p.source == "xor16":
            pr.update(lo_row=add(byte & ~1), hi_row=add(byte | 1), hi_shift_row=add(8 * (byte & 1)))
        pieces.append(PieceRows(**pr))
    w = np.arange(QK_K)
    gs = desc.group_size
    wmod_row = add(w % gs) if gs > 1 and desc.grids is not None else None
    mult_row = None
    offsets: tuple[int, ...] = ()
    abs_values = False
    grid = None
    if desc.trellis is not None:
        t = desc.trellis
        powers = [pow(t.multiplier, j + 1, 1 << 32) for j in range(gs)]
        mult_row = add(np.asarray(powers, dtype=np.uint64)[w % gs])
        offsets, abs_values = t.offsets, t.abs_values
    else:
        gv = desc.grid_values
        grid = np.ascontiguousarray(gv.reshape(-1, gs))
        grid.setflags(write=False)
    n_rows = 1 << max(0, (len(rows) - 1).bit_length())
    table = np.zeros((n_rows, QK_K), dtype=np.int32)
    table[:len(rows)] = np.stack(rows)
    table.setflags(write=False)
    return DecodePlan(
        name=desc.name, table=table, pieces=tuple(pieces), wmod_row=wmod_row, mult_row=mult_row,
        scale_lut=tuple(int(v) for v in desc.scale_lut), grid=grid, bits=desc.bits,
        group_size=gs, offsets=offsets, abs_values=abs_values,
        has_sel=bool(desc.pieces_of("sel")), has_sign=bool(desc.pieces_of("sign")))


@functools.lru_cache(maxsize=None)
def _plan_cached(name: str) -> DecodePlan:
    return _build_plan(registry.descriptor(name))


def plan(desc) -> DecodePlan:
    """The (cached) :class:`DecodePlan` of a type name or descriptor."""
    desc = registry.descriptor(desc)
    if registry._REGISTRY.get(desc.name) is desc:
        return _plan_cached(desc.name)
    return _build_plan(desc)  # a descriptor built outside the registry (tests): no cache


# ----------------------------------------------------------------------------------------------
# The shared decoding routine
# ----------------------------------------------------------------------------------------------

def decode_superblock(p: DecodePlan, *, row: Callable[[int], jax.Array],
                      fetch: Callable[[int], jax.Array],
                      scale_lookup: Callable[[tuple[int, ...], jax.Array], jax.Array],
                      grid_lookup: Callable[[np.ndarray, jax.Array, jax.Array | None], jax.Array],
                      d: jax.Array) -> jax.Array:
    """Decodes super-blocks to float32 weights ``[..., 256]``.

    Args:
      p: the type's plan.
      row: ``row(k)`` is table row ``k`` as an int32 array broadcastable to ``[..., 256]``.
      fetch: ``fetch(k)`` is int32 ``[..., 256]``: the packed byte at offset ``table[k, w]`` of
        each super-block, for every weight ``w``.
      scale_lookup: ``scale_lookup(lut, u)`` is int32 ``lut[u]`` elementwise.
      grid_lookup: ``grid_lookup(grid, i, wmod)`` is float32 ``grid[i, wmod]`` elementwise
        (``wmod`` is ``None`` for scalar grids).
      d: float32, broadcastable to ``[..., 256]``: the super-block or row scale.

    Returns:
      float32 ``[..., 256]``, bit-identical to the spec's ``float32(d * scale) * value``.
    """
    fields: dict[str, jax.Array] = {}
    for pr in p.pieces:
        if pr.source == "raw":
            b = fetch(pr.byte_row)
        else:
            # Gray-decode the 16-bit word holding this byte, then keep this byte of it.
            word = (fetch(pr.lo_row) | (fetch(pr.hi_row) << 8)) & 0xFFFE
            word = word ^ (word >> 1)
            b = (word >> row(pr.hi_shift_row)) & 0xFF
        sh = pr.shift if pr.shift is not None else row(pr.shift_row)
        v = b if (isinstance(sh, int) and sh == 0) else b >> sh
        v = v & pr.mask
        if pr.dst:
            v = v << pr.dst
        fields[pr.field] = fields[pr.field] | v if pr.field in fields else v
    q = fields["q"]
    sel = fields.get("sel")
    scale = scale_lookup(p.scale_lut, fields["scale"]).astype(jnp.float32)
    if p.grid is not None:
        idx = q if sel is None else q + (sel << p.bits)
        wmod = row(p.wmod_row) if p.wmod_row is not None else None
        value = grid_lookup(p.grid, idx, wmod)
    else:
        seed = q
        if len(p.offsets) == 1 or sel is None:
            seed = seed + p.offsets[0]
        else:
            off = jnp.int32(p.offsets[0])
            for k, o in enumerate(p.offsets[1:], start=1):
                off = jnp.where(sel == k, jnp.int32(o), off)
            seed = seed + off
        # Value j of a group is the byte sum of (seed * M**(j+1)) & 0x3f3f3f3f, minus 126.
        x = seed.astype(jnp.uint32) * row(p.mult_row).astype(jnp.uint32)
        x = x & jnp.uint32(0x3F3F3F3F)
        s = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
        value = s.astype(jnp.int32) - 126
        if p.abs_values:
            value = jnp.abs(value)
        value = value.astype(jnp.float32)
    # Two separate float32 products, in the spec's order (never d * (scale * value)).
    dl = d * scale
    y = dl * value
    if p.has_sign:
        y = jnp.where(fields["sign"] != 0, -y, y)
    return y


def fp16_bits_to_f32(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """float32 of the little-endian fp16 whose bytes (as int32) are ``lo``, ``hi``."""
    bits = (lo | (hi << 8)).astype(jnp.uint16)
    return lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def fp32_bits_to_f32(b0, b1, b2, b3) -> jax.Array:
    """float32 of the little-endian fp32 whose bytes (as int32) are ``b0..b3``."""
    bits = (b0.astype(jnp.uint32) | (b1.astype(jnp.uint32) << 8) | (b2.astype(jnp.uint32) << 16)
            | (b3.astype(jnp.uint32) << 24))
    return lax.bitcast_convert_type(bits, jnp.float32)


# ----------------------------------------------------------------------------------------------
# XLA fetches: static slices instead of gathers
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _runs(row: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...] | None:
    """Splits a per-weight byte-index row into strided runs ``(start, count, stride, repeat)``.

    Run ``(b, c, s, r)`` stands for bytes ``b, b+s, ..., b+(c-1)*s``, each repeated ``r`` times,
    i.e. one static strided slice and a broadcast. Returns ``None`` when the row fragments into
    too many runs for slicing to beat a gather.
    """
    segs: list[list[int]] = []  # [value, repeat]
    for v in row:
        if segs and segs[-1][0] == v:
            segs[-1][1] += 1
        else:
            segs.append([v, 1])
    runs: list[list[int]] = []  # [start, count, stride, repeat]
    for v, r in segs:
        if runs:
            b, c, s, rr = runs[-1]
            if rr == r and ((c == 1 and v > b) or (c > 1 and v == b + c * s)):
                if c == 1:
                    runs[-1][2] = v - b
                runs[-1][1] += 1
                continue
        runs.append([v, 1, 1, r])
    if len(runs) > 64:
        return None
    return tuple(tuple(r) for r in runs)


def _fetch_slices(blocks: jax.Array, row: np.ndarray) -> jax.Array:
    """``blocks[..., row]`` as a concatenation of static (strided) slices and broadcasts."""
    runs = _runs(tuple(int(v) for v in row))
    if runs is None:
        return jnp.take(blocks, jnp.asarray(row), axis=-1)
    parts = []
    lead = blocks.shape[:-1]
    for b, c, s, r in runs:
        part = lax.slice_in_dim(blocks, b, b + (c - 1) * s + 1, stride=s, axis=-1)
        if r > 1:
            part = jnp.broadcast_to(part[..., None], lead + (c, r)).reshape(lead + (c * r,))
        parts.append(part)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _take_lookup(lut: tuple[int, ...], u: jax.Array) -> jax.Array:
    return jnp.take(jnp.asarray(np.asarray(lut, dtype=np.int32)), u, axis=0, mode="clip")


def _take_grid(grid: np.ndarray, idx: jax.Array, wmod: jax.Array | None) -> jax.Array:
    flat = jnp.asarray(grid.reshape(-1))
    gs = grid.shape[1]
    i = idx if gs == 1 else idx * gs + wmod
    return jnp.take(flat, i, axis=0, mode="clip")


def _split(raw: jax.Array, desc: TypeDescriptor, shape) -> tuple[jax.Array, jax.Array]:
    """(d float32 [rows, nsb, 1], blocks int32 [rows, nsb, block_bytes]) of validated raw rows."""
    rows, n = shape
    nsb = n // QK_K
    hb = desc.row_header_bytes
    raw = raw.astype(jnp.int32)
    blocks = raw[:, hb:].reshape(rows, nsb, desc.block_bytes)
    if desc.super_d:
        d = fp16_bits_to_f32(blocks[..., 0], blocks[..., 1])[..., None]
    elif hb == 2:
        d = jnp.broadcast_to(fp16_bits_to_f32(raw[:, 0], raw[:, 1])[:, None, None], (rows, nsb, 1))
    else:
        d = fp32_bits_to_f32(raw[:, 0], raw[:, 1], raw[:, 2], raw[:, 3])
        d = jnp.broadcast_to(d[:, None, None], (rows, nsb, 1))
    return d, blocks


def check_raw(raw, desc: TypeDescriptor, shape) -> tuple[int, int]:
    """Validates packed rows against a logical shape; returns ``(rows, n_per_row)``.

    Raises:
      ValueError / TypeError naming the mismatch (shape, dtype, byte count).
    """
    if len(shape) != 2:
        raise ValueError(f"{desc.name}: shape must be (rows, n_per_row), got {tuple(shape)}")
    rows, n = (int(s) for s in shape)
    rb = desc.row_bytes(n)
    if np.dtype(raw.dtype) != np.uint8:
        raise TypeError(f"{desc.name}: raw must be uint8, got {raw.dtype}")
    if tuple(raw.shape) != (rows, rb):
        raise ValueError(f"{desc.name}: raw has shape {tuple(raw.shape)}, but shape {(rows, n)} "
                         f"needs ({rows}, {rb}) ({rb} bytes per row of {n} weights)")
    return rows, n


def dequantize(raw, desc, shape, dtype=jnp.float32) -> jax.Array:
    """Dequantizes packed rows ``uint8 [rows, row_bytes]`` to ``dtype [rows, n_per_row]``.

    Bit-identical to :func:`iqk_jax.spec.dequantize` for float32 (other dtypes are the float32
    result rounded once). Jit-able; ``desc``/``shape``/``dtype`` are static.
    """
    desc = registry.descriptor(desc)
    rows, n = check_raw(raw, desc, shape)
    p = plan(desc)
    d, blocks = _split(jnp.asarray(raw), desc, (rows, n))
    y = decode_superblock(
        p, row=lambda k: jnp.asarray(p.table[k]), fetch=lambda k: _fetch_slices(blocks, p.table[k]),
        scale_lookup=_take_lookup, grid_lookup=_take_grid, d=d)
    return y.reshape(rows, n).astype(dtype)


def matmul(x2d, raw, desc, shape) -> jax.Array:
    """``float32 [m, rows] = x2d [m, n] @ dequantize(raw).T``, accumulated in float32.

    The weight is materialized (this is the portable fallback); ``x2d`` may be float32 or
    bfloat16 (upcast exactly to float32 first).
    """
    desc = registry.descriptor(desc)
    rows, n = check_raw(raw, desc, shape)
    if x2d.ndim != 2 or x2d.shape[1] != n:
        raise ValueError(f"{desc.name}: x must be [m, {n}], got {tuple(x2d.shape)}")
    w = dequantize(raw, desc, shape, jnp.float32)
    return lax.dot_general(x2d.astype(jnp.float32), w, (((1,), (1,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def available() -> bool:
    """The XLA target runs on every backend."""
    return True


def _representative(desc: TypeDescriptor, kernel: str):
    rows, n = 64, 2 * QK_K
    raw = jax.ShapeDtypeStruct((rows, desc.row_bytes(n)), jnp.uint8)
    m = {"dequant": 0, "gemv": 1, "gemm": 64}[kernel]
    x = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return rows, n, raw, x


def emit(desc, kernel: str) -> str:
    """StableHLO text of the jitted ``kernel`` for a representative shape (64 x 512).

    Deterministic: no debug locations, same text for the same type and kernel.
    """
    desc = registry.descriptor(desc)
    if kernel not in KERNELS:
        raise ValueError(f"xla: unknown kernel {kernel!r}; expected one of {sorted(KERNELS)}")
    rows, n, raw, x = _representative(desc, kernel)
    if kernel == "dequant":
        lowered = jax.jit(lambda r: dequantize(r, desc, (rows, n))).lower(raw)
    else:
        lowered = jax.jit(lambda a, r: matmul(a, r, desc, (rows, n))).lower(x, raw)
    return lowered.as_text(debug_info=False)
