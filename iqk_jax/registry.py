"""Type descriptors for the IQK family: the single source of truth for every format.

Every IQK type decodes one 256-weight super-block the same way::

    y[w] = float32(d * scale[block(w)]) * value[sel[block(w)]][q[group(w)]][w % group_size] * sign[w]

where

* ``d`` is a float scale, either per super-block (fp16 at the start of the block) or per row
  (fp16 or fp32 row header),
* ``scale`` is a small integer per block of 16 or 32 weights, decoded through ``scale_lut``,
* ``sel`` is a per-block bit that picks one grid of the pair (or a trellis offset),
* ``q`` is the grid index of a group of ``group_size`` weights (1 for scalar grids, 2 for the
  2-D grid of iq2_kl, 4 or 8 for the trellis types whose "grid" is a pseudo-random generator),
* ``sign`` is an explicit sign bit per weight (iq3_kt only, whose grid is ``abs``-folded).

Where each of these integers lives in the packed bytes is described declaratively by
:class:`Piece` objects: a piece says "for element ``e``, take ``nbits`` bits of byte
``byte[e]`` starting at bit ``shift[e]`` and put them at bit ``dst`` of the field". The numpy
spec, the jnp path and the kernel emitters all read the same pieces, so a new type is a new
descriptor and nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import numpy as np

from iqk_jax import tables

QK_K = 256  # weights per super-block, fixed for the whole family
FIELDS = ("q", "scale", "sel", "sign")
HEADER_DTYPES = {0: None, 2: np.float16, 4: np.float32}


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of bits of one packed field, for every element of that field.

    Attributes:
      field: which integer this piece builds: ``q`` (per group), ``scale``/``sel`` (per block)
        or ``sign`` (per weight).
      byte: per element, byte offset inside the super-block.
      shift: per element, bit offset inside that byte; ``shift + nbits <= 8``.
      nbits: bits taken (1..8).
      dst: where they land in the field's integer.
      source: ``raw`` bytes, or ``xor16``: the 16-bit words after ``w ^= w >> 1`` on ``w & ~1``
        (iq4_kss keeps its block scale in bit 0 of each word and Gray-codes the rest).
    """

    field: str
    byte: tuple[int, ...]
    shift: tuple[int, ...]
    nbits: int
    dst: int = 0
    source: str = "raw"

    def __post_init__(self):
        if self.field not in FIELDS:
            raise ValueError(f"Piece.field must be one of {FIELDS}, got {self.field!r}")
        if not 1 <= self.nbits <= 8:
            raise ValueError(f"Piece.nbits must be in 1..8, got {self.nbits}")
        if len(self.byte) != len(self.shift):
            raise ValueError(
                f"Piece.byte and Piece.shift must have one entry per element "
                f"({len(self.byte)} != {len(self.shift)})")
        if any(s < 0 or s + self.nbits > 8 for s in self.shift):
            raise ValueError(f"Piece.shift must keep shift + nbits <= 8 (nbits={self.nbits})")
        if self.dst < 0:
            raise ValueError(f"Piece.dst must be >= 0, got {self.dst}")
        if self.source not in ("raw", "xor16"):
            raise ValueError(f"Piece.source must be 'raw' or 'xor16', got {self.source!r}")

    @property
    def mask(self) -> int:
        return (1 << self.nbits) - 1


def piece(field: str, n: int, byte: Callable[[np.ndarray], np.ndarray],
          shift: Callable[[np.ndarray], np.ndarray] | int, nbits: int, dst: int = 0,
          source: str = "raw") -> Piece:
    """Builds a :class:`Piece` from index formulas over ``e = arange(n)``."""
    e = np.arange(n)
    b = np.broadcast_to(np.asarray(byte(e)), (n,))
    s = np.broadcast_to(np.asarray(shift(e) if callable(shift) else shift), (n,))
    return Piece(field, tuple(int(v) for v in b), tuple(int(v) for v in s), nbits, dst, source)


@dataclasses.dataclass(frozen=True)
class Trellis:
    """The integer trellis generator of the _kt types.

    A group index ``q`` seeds ``x = q + offset[sel]``; each of the ``group_size`` values is
    ``x = x * multiplier (mod 2**32)`` followed by the sum of the four bytes of
    ``x & 0x3f3f3f3f`` minus 126, so every value is an integer in [-126, 126].
    """

    multiplier: int = 0xCBAC1FED
    offsets: tuple[int, ...] = (4096,)
    abs_values: bool = False

    def __post_init__(self):
        if not 0 < self.multiplier < 2**32:
            raise ValueError(f"Trellis.multiplier must be a 32-bit odd integer, got {self.multiplier}")
        if not self.offsets or any(o < 0 for o in self.offsets):
            raise ValueError(f"Trellis.offsets must be non-empty and >= 0, got {self.offsets}")


@dataclasses.dataclass(frozen=True)
class TypeDescriptor:
    """Everything a generator or the spec needs to know about one IQK type.

    Invariants (checked in ``__post_init__``): the super-block holds ``QK_K`` weights, blocks
    of ``block_size`` weights (16 or 32) and groups of ``group_size`` weights tile it exactly;
    every piece addresses bytes inside ``block_bytes``; the pieces of one field never overlap
    in the packed bytes nor in the field's integer; ``q`` has ``bits`` bits per group and the
    scale ``scale_bits`` bits per block.

    Attributes:
      name: ik_llama.cpp's lower-case name (``iq4_k``).
      ggml_type: ggml type id in GGUF files.
      bits: bits of one grid index ``q`` (one index per group).
      group_size: weights decoded by one index (1 scalar grid, 2 iq2_kl, 4/8 trellis).
      block_size: weights sharing one scale and one grid selector (16 or 32).
      block_bytes: bytes per 256-weight super-block, row header excluded.
      row_header_bytes: 0 (no header), 2 (fp16 row scale) or 4 (fp32 row scale).
      super_d: whether each super-block starts with its own fp16 scale ``d``.
      scale_bits: bits of the packed block scale.
      scale_kind: how the packed scale decodes: ``offset`` (scale_mul*u - scale_offset), ``odd_signed``
        ((2*low+1) * -1**sign, sign at bit 4), ``int8`` (two's complement), ``lut4``
        (the first 4-bit grid of iq4_k, trellis types), ``raw`` (u).
      scale_offset: the subtracted constant of ``offset`` scales.
      grids: the grid pair (value tuples, one entry per index; tuple entries for groups > 1),
        ``None`` for trellis types.
      trellis: the generator of the _kt types, ``None`` otherwise.
      pieces: the bit layout, see :class:`Piece`.
      scale_mul: multiplier of ``offset`` scales (2 for the *_ks types, whose scale byte keeps
        the grid selector in bit 0 and decodes as ``(s & 254) - 127``).
    """

    name: str
    ggml_type: int
    bits: int
    group_size: int
    block_size: int
    block_bytes: int
    row_header_bytes: int
    super_d: bool
    scale_bits: int
    scale_kind: str
    scale_offset: int
    grids: tuple | None
    trellis: Trellis | None
    pieces: tuple[Piece, ...]
    scale_mul: int = 1

    def __post_init__(self):
        if not self.name or self.name != self.name.lower():
            raise ValueError(f"TypeDescriptor.name must be a lower-case name, got {self.name!r}")
        if not 0 < self.ggml_type < 2**32:
            raise ValueError(f"{self.name}: ggml_type must be a positive uint32, got {self.ggml_type}")
        if self.block_size not in (16, 32):
            raise ValueError(f"{self.name}: block_size must be 16 or 32, got {self.block_size}")
        if self.group_size not in (1, 2, 4, 8):
            raise ValueError(f"{self.name}: group_size must be 1, 2, 4 or 8, got {self.group_size}")
        if self.block_size % self.group_size:
            raise ValueError(f"{self.name}: group_size {self.group_size} must divide block_size")
        if not 1 <= self.bits <= 16:
            raise ValueError(f"{self.name}: bits must be in 1..16, got {self.bits}")
        if self.row_header_bytes not in HEADER_DTYPES:
            raise ValueError(f"{self.name}: row_header_bytes must be 0, 2 or 4, got {self.row_header_bytes}")
        if self.super_d == (self.row_header_bytes != 0):
            raise ValueError(f"{self.name}: exactly one of super_d and row_header_bytes must give d")
        if self.scale_kind not in ("offset", "odd_signed", "int8", "lut4", "raw"):
            raise ValueError(f"{self.name}: unknown scale_kind {self.scale_kind!r}")
        if self.scale_mul < 1 or (self.scale_mul != 1 and self.scale_kind != "offset"):
            raise ValueError(f"{self.name}: scale_mul must be >= 1 and only differs from 1 for "
                             f"'offset' scales, got {self.scale_mul}")
        if (self.grids is None) == (self.trellis is None):
            raise ValueError(f"{self.name}: exactly one of grids and trellis must be set")
        if self.grids is not None:
            if len(self.grids) not in (1, 2):
                raise ValueError(f"{self.name}: grids must be a pair (or a single grid)")
            for g in self.grids:
                if len(g) != 1 << self.bits:
                    raise ValueError(f"{self.name}: each grid needs 2**bits = {1 << self.bits} "
                                     f"entries, got {len(g)}")
        counts = {"q": QK_K // self.group_size, "scale": self.n_blocks,
                  "sel": self.n_blocks, "sign": QK_K}
        widths = {"q": self.bits, "scale": self.scale_bits,
                  "sel": (self.n_selectors - 1).bit_length(), "sign": 1}
        used = np.zeros(self.block_bytes * 8, dtype=np.int32)
        for f in FIELDS:
            ps = [p for p in self.pieces if p.field == f]
            if not ps:
                if f in ("q", "scale"):
                    raise ValueError(f"{self.name}: pieces must describe field {f!r}")
                continue
            covered = 0
            for p in ps:
                if len(p.byte) != counts[f]:
                    raise ValueError(f"{self.name}: piece of {f!r} must have {counts[f]} elements, "
                                     f"got {len(p.byte)}")
                if max(p.byte) >= self.block_bytes or min(p.byte) < 0:
                    raise ValueError(f"{self.name}: piece of {f!r} addresses byte outside "
                                     f"block_bytes={self.block_bytes}")
                bits = ((1 << p.nbits) - 1) << p.dst
                if covered & bits:
                    raise ValueError(f"{self.name}: pieces of {f!r} overlap at field bits {bits:#x}")
                covered |= bits
                if p.source == "raw":
                    for b, s in zip(p.byte, p.shift):
                        used[8 * b + s: 8 * b + s + p.nbits] += 1
            if covered != (1 << widths[f]) - 1:
                raise ValueError(f"{self.name}: pieces of {f!r} must cover {widths[f]} bits exactly, "
                                 f"cover mask {covered:#x}")
        if self.super_d:
            used[:16] += 1
        if used.max() > 1:
            raise ValueError(f"{self.name}: packed bits are used twice (first at bit "
                             f"{int(np.argmax(used > 1))} of the super-block)")

    # ----- derived sizes -------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return QK_K // self.block_size

    @property
    def n_groups(self) -> int:
        return QK_K // self.group_size

    @property
    def n_selectors(self) -> int:
        return len(self.grids) if self.grids is not None else len(self.trellis.offsets)

    @property
    def bpw(self) -> float:
        """Bits per weight of the super-blocks (row header excluded, as ik_llama.cpp quotes it)."""
        return self.block_bytes * 8 / QK_K

    @property
    def header_dtype(self):
        return HEADER_DTYPES[self.row_header_bytes]

    def row_bytes(self, n_per_row: int) -> int:
        """Bytes of one row of ``n_per_row`` weights, row header included."""
        if n_per_row <= 0 or n_per_row % QK_K:
            raise ValueError(f"{self.name}: row length {n_per_row} is not a positive multiple of {QK_K}")
        return self.row_header_bytes + (n_per_row // QK_K) * self.block_bytes

    def pieces_of(self, field: str) -> tuple[Piece, ...]:
        return tuple(p for p in self.pieces if p.field == field)

    @property
    def scale_lut(self) -> np.ndarray:
        """int32 [2**scale_bits]: the integer block scale for each packed value."""
        return _scale_lut(self.scale_kind, self.scale_bits, self.scale_offset, self.scale_mul)

    @property
    def grid_values(self) -> np.ndarray:
        """float32 [n_selectors, 2**bits, group_size]: the value of every index.

        For trellis types this is the generator evaluated at every seed (int-valued, |v| <= 126).
        """
        return _grid_values(self)


def _scale_lut(kind: str, nbits: int, offset: int, mul: int = 1) -> np.ndarray:
    u = np.arange(1 << nbits, dtype=np.int32)
    if kind == "offset":
        return mul * u - offset
    if kind == "odd_signed":
        return (2 * (u & 15) + 1) * np.where(u & 16, -1, 1)
    if kind == "int8":
        return np.where(u >= 128, u - 256, u)
    if kind == "lut4":
        return np.asarray(tables.IQ4K[0], dtype=np.int32)[u & 15]
    return u


def trellis_values(seeds: np.ndarray, group_size: int, multiplier: int) -> np.ndarray:
    """int8 [len(seeds), group_size]: the trellis generator run from each uint32 seed."""
    x = np.asarray(seeds, dtype=np.uint64) & 0xFFFFFFFF
    out = np.empty((x.size, group_size), dtype=np.int8)
    for k in range(group_size):
        x = (x * np.uint64(multiplier)) & np.uint64(0xFFFFFFFF)
        s = x & np.uint64(0x3F3F3F3F)
        tot = (s & 0xFF) + ((s >> 8) & 0xFF) + ((s >> 16) & 0xFF) + (s >> 24)
        out[:, k] = tot.astype(np.int64) - 126
    return out


def _compute_grid_values(d: TypeDescriptor) -> np.ndarray:
    if d.grids is not None:
        v = np.asarray(d.grids, dtype=np.float32).reshape(len(d.grids), 1 << d.bits, d.group_size)
    else:
        idx = np.arange(1 << d.bits, dtype=np.uint64)
        v = np.stack([trellis_values(idx + off, d.group_size, d.trellis.multiplier)
                      for off in d.trellis.offsets]).astype(np.float32)
        if d.trellis.abs_values:
            v = np.abs(v)
    v.setflags(write=False)
    return v


@functools.lru_cache(maxsize=None)
def _grid_values_cached(name: str) -> np.ndarray:
    return _compute_grid_values(_REGISTRY[name])


def _grid_values(d: TypeDescriptor) -> np.ndarray:
    # Registered descriptors are immutable and shared: cache their (up to 4 MB trellis) tables.
    # Descriptors made outside the registry (tests build variants) are computed each time.
    if _REGISTRY.get(d.name) is d:
        return _grid_values_cached(d.name)
    return _compute_grid_values(d)


# ---------------------------------------------------------------------------------------------
# The layouts. Each builder states, in index arithmetic, where ik_llama.cpp's structs keep the
# bits of every element. ``w`` is a weight index, ``g`` a group index, ``b`` a block index, all
# within one super-block.
# ---------------------------------------------------------------------------------------------

def _iq2_k():
    # d f16 | extra u16 | scales[8] (4-bit, two per byte) | qs[64] (2-bit, four per byte)
    qs = 12
    q = piece("q", 256, lambda w: qs + 32 * (w // 128) + w % 32, lambda w: 2 * ((w // 32) % 4), 2)
    sc = piece("scale", 16, lambda b: 4 + b // 2, lambda b: 4 * (b % 2), 4)
    sel = piece("sel", 16, lambda b: 2 + b // 8, lambda b: b % 8, 1)
    return dict(bits=2, group_size=1, block_size=16, block_bytes=76, row_header_bytes=0,
                super_d=True, scale_bits=4, scale_kind="offset", scale_offset=8,
                grids=tables.IQ2NL, pieces=(q, sc, sel))


def _iq2_ks():
    # [row f16 d] extra u16 (sel bits 0..7, scale high bits 8..15) | scales[4] | qs[64]
    q = piece("q", 256, lambda w: 6 + 32 * (w // 128) + w % 32,
              lambda w: 4 * ((w // 64) % 2) + 2 * ((w // 32) % 2), 2)
    sc = piece("scale", 8, lambda b: 2 + b // 2, lambda b: 4 * (b % 2), 4)
    sch = piece("scale", 8, lambda b: 1, lambda b: b, 1, dst=4)
    sel = piece("sel", 8, lambda b: 0, lambda b: b, 1)
    return dict(bits=2, group_size=1, block_size=32, block_bytes=70, row_header_bytes=2,
                super_d=False, scale_bits=5, scale_kind="offset", scale_offset=16,
                grids=tables.IQ2NL, pieces=(q, sc, sch, sel))


def _iq2_kl():
    # [row f16 d] scales_h u16 (2 bits/block) | scales_l[4] | qs[64] (4-bit) | qh[16] (1 bit)
    # One 5-bit index per pair of weights; groups g: ib64 = g // 32, half = (g // 16) % 2.
    ql = piece("q", 128, lambda g: 6 + 16 * (g // 32) + g % 16, lambda g: 4 * ((g // 16) % 2), 4)
    qh = piece("q", 128, lambda g: 70 + g % 16, lambda g: 2 * (g // 32) + (g // 16) % 2, 1, dst=4)
    sl = piece("scale", 8, lambda b: 2 + b % 4, lambda b: 4 * (b // 4), 4)
    sh = piece("scale", 8, lambda b: b // 4, lambda b: (2 * b) % 8, 2, dst=4)
    return dict(bits=5, group_size=2, block_size=32, block_bytes=86, row_header_bytes=2,
                super_d=False, scale_bits=6, scale_kind="offset", scale_offset=32,
                grids=tables.IQ2KL, pieces=(ql, qh, sl, sh))


def _iq3_k():
    # d f16 | extra u16 | scales_h u16 (signs) | scales_l[8] | qs[64] (2-bit) | qh[32] (1 bit)
    ql = piece("q", 256, lambda w: 14 + 32 * (w // 128) + w % 32, lambda w: 2 * ((w // 32) % 4), 2)
    qh = piece("q", 256, lambda w: 78 + w % 32, lambda w: w // 32, 1, dst=2)
    sl = piece("scale", 16, lambda b: 6 + b // 2, lambda b: 4 * (b % 2), 4)
    ss = piece("scale", 16, lambda b: 4 + b // 8, lambda b: b % 8, 1, dst=4)
    sel = piece("sel", 16, lambda b: 2 + b // 8, lambda b: b % 8, 1)
    return dict(bits=3, group_size=1, block_size=16, block_bytes=110, row_header_bytes=0,
                super_d=True, scale_bits=5, scale_kind="odd_signed", scale_offset=0,
                grids=tables.IQ3NL, pieces=(ql, qh, sl, ss, sel))


def _iq3_ks():
    # [row f16 d] extra u16 (scale high bits 0..7, sel 8..15) | scales[4] | qs[64] | qh[32]
    ql = piece("q", 256, lambda w: 6 + 32 * (w // 128) + w % 32, lambda w: 2 * ((w // 32) % 4), 2)
    qh = piece("q", 256, lambda w: 70 + w % 32, lambda w: w // 32, 1, dst=2)
    sl = piece("scale", 8, lambda b: 2 + b % 4, lambda b: 4 * (b // 4), 4)
    sh = piece("scale", 8, lambda b: 0, lambda b: b, 1, dst=4)
    sel = piece("sel", 8, lambda b: 1, lambda b: b, 1)
    return dict(bits=3, group_size=1, block_size=32, block_bytes=102, row_header_bytes=2,
                super_d=False, scale_bits=5, scale_kind="offset", scale_offset=16,
                grids=tables.IQ3NL, pieces=(ql, qh, sl, sh, sel))


def _iq4_k():
    # d f16 | extra u16 | scales_h[4] (2 bits/block) | scales_l[8] | qs[128] (4-bit)
    q = piece("q", 256, lambda w: 16 + 16 * (w // 32) + w % 16, lambda w: 4 * ((w // 16) % 2), 4)
    sl = piece("scale", 16, lambda b: 8 + b // 2, lambda b: 4 * (b % 2), 4)
    sh = piece("scale", 16, lambda b: 4 + b // 4, lambda b: 2 * (b % 4), 2, dst=4)
    sel = piece("sel", 16, lambda b: 2 + b // 8, lambda b: b % 8, 1)
    return dict(bits=4, group_size=1, block_size=16, block_bytes=144, row_header_bytes=0,
                super_d=True, scale_bits=6, scale_kind="offset", scale_offset=32,
                grids=tables.IQ4K, pieces=(q, sl, sh, sel))


def _iq5_k():
    # d f16 | extra u16 | scales_h[4] | scales_l[8] | qs[128] (4-bit) | qh[32] (1 bit)
    # Within 64 weights: quarter k = (w % 64) // 16 takes nibble k // 2 of qs[16*(k%2) + w%16].
    qlo = piece("q", 256, lambda w: 16 + 32 * (w // 64) + 16 * ((w // 16) % 2) + w % 16,
                lambda w: 4 * ((w // 32) % 2), 4)
    qhi = piece("q", 256, lambda w: 144 + 16 * ((w // 16) % 2) + w % 16,
                lambda w: 2 * (w // 64) + (w // 32) % 2, 1, dst=4)
    sl = piece("scale", 16, lambda b: 8 + b // 2, lambda b: 4 * (b % 2), 4)
    sh = piece("scale", 16, lambda b: 4 + b // 4, lambda b: 2 * (b % 4), 2, dst=4)
    sel = piece("sel", 16, lambda b: 2 + b // 8, lambda b: b % 8, 1)
    return dict(bits=5, group_size=1, block_size=16, block_bytes=176, row_header_bytes=0,
                super_d=True, scale_bits=6, scale_kind="offset", scale_offset=32,
                grids=tables.IQ5NL, pieces=(qlo, qhi, sl, sh, sel))


def _iq6_k():
    # d f16 | extra u16 | scales[16] (int8) | qs[128] (4-bit) | qh[64] (2 bits)
    qlo = piece("q", 256, lambda w: 20 + 32 * (w // 64) + 16 * ((w // 16) % 2) + w % 16,
                lambda w: 4 * ((w // 32) % 2), 4)
    qhi = piece("q", 256, lambda w: 148 + 32 * (w // 128) + 16 * ((w // 16) % 2) + w % 16,
                lambda w: 4 * ((w // 64) % 2) + 2 * ((w // 32) % 2), 2, dst=4)
    sc = piece("scale", 16, lambda b: 4 + b, 0, 8)
    sel = piece("sel", 16, lambda b: 2 + b // 8, lambda b: b % 8, 1)
    return dict(bits=6, group_size=1, block_size=16, block_bytes=212, row_header_bytes=0,
                super_d=True, scale_bits=8, scale_kind="int8", scale_offset=0,
                grids=tables.iq6k_grid(), pieces=(qlo, qhi, sc, sel))


def _iq4_ks():
    # [row f32 d] scales[8] (bit 0 = sel, bits 1..7 = scale) | qs[128]
    q = piece("q", 256, lambda w: 8 + 16 * (w // 32) + w % 16, lambda w: 4 * ((w // 16) % 2), 4)
    sc = piece("scale", 8, lambda b: b, 1, 7)
    sel = piece("sel", 8, lambda b: b, 0, 1)
    return dict(bits=4, group_size=1, block_size=32, block_bytes=136, row_header_bytes=4,
                super_d=False, scale_bits=7, scale_kind="offset", scale_offset=127, scale_mul=2,
                grids=tables.IQ4K, pieces=(q, sc, sel))


def _iq5_ks():
    # [row f32 d] scales[8] | qs[128] (4-bit) | qh[32] (1 bit)
    qlo = piece("q", 256, lambda w: 8 + 32 * (w // 64) + w % 32, lambda w: 4 * ((w // 32) % 2), 4)
    qhi = piece("q", 256, lambda w: 136 + w % 32, lambda w: w // 32, 1, dst=4)
    sc = piece("scale", 8, lambda b: b, 1, 7)
    sel = piece("sel", 8, lambda b: b, 0, 1)
    return dict(bits=5, group_size=1, block_size=32, block_bytes=168, row_header_bytes=4,
                super_d=False, scale_bits=7, scale_kind="offset", scale_offset=127, scale_mul=2,
                grids=tables.IQ5NL, pieces=(qlo, qhi, sc, sel))


def _iq4_kss():
    # [row f32 d] 32 bytes per block of 32 = eight u16 words. Bit 0 of word k is bit k of the
    # packed scale byte (bit 0 = sel); the rest, Gray-decoded, are the 4-bit indices.
    q = piece("q", 256, lambda w: 16 * (w // 32) + w % 16, lambda w: 4 * ((w // 16) % 2), 4,
              source="xor16")
    scs = [piece("scale", 8, lambda b, k=k: 16 * b + 2 * k, 0, 1, dst=k - 1) for k in range(1, 8)]
    sel = piece("sel", 8, lambda b: 16 * b, 0, 1)
    return dict(bits=4, group_size=1, block_size=32, block_bytes=128, row_header_bytes=4,
                super_d=False, scale_bits=7, scale_kind="offset", scale_offset=127, scale_mul=2,
                grids=tables.IQ4K, pieces=(q, *scs, sel))


def _iq1_kt():
    # [row f32 d] sh[8] (4-bit scale | 4 high index bits) | ql[32] | qh[16] (two nibbles)
    ql = piece("q", 32, lambda g: 8 + g, 0, 8)
    qh = piece("q", 32, lambda g: 40 + 4 * ((g // 4) % 4) + g % 4, lambda g: 4 * (g // 16), 4, dst=8)
    qs = piece("q", 32, lambda g: g // 4, lambda g: 4 + g % 4, 1, dst=12)
    sc = piece("scale", 8, lambda b: b, 0, 4)
    return dict(bits=13, group_size=8, block_size=32, block_bytes=56, row_header_bytes=4,
                super_d=False, scale_bits=4, scale_kind="lut4", scale_offset=0, grids=None,
                trellis=Trellis(offsets=(4096,)), pieces=(ql, qh, qs, sc))


def _kt16(abs_values):
    # scales[4] (two 4-bit scales) | 32 little-endian u16 indices, one per group of 8
    lo = piece("q", 32, lambda g: 4 + 2 * g, 0, 8)
    hi = piece("q", 32, lambda g: 5 + 2 * g, 0, 8, dst=8)
    sc = piece("scale", 8, lambda b: b % 4, lambda b: 4 * (b // 4), 4)
    return lo, hi, sc


def _iq2_kt():
    return dict(bits=16, group_size=8, block_size=32, block_bytes=68, row_header_bytes=4,
                super_d=False, scale_bits=4, scale_kind="lut4", scale_offset=0, grids=None,
                trellis=Trellis(offsets=(4096,)), pieces=_kt16(False))


def _iq3_kt():
    # ... then qh[32]: sign of weight w is bit w // 32 of qh[w % 32]; the grid is |trellis|.
    sign = piece("sign", 256, lambda w: 68 + w % 32, lambda w: w // 32, 1)
    return dict(bits=16, group_size=8, block_size=32, block_bytes=100, row_header_bytes=4,
                super_d=False, scale_bits=4, scale_kind="raw", scale_offset=0, grids=None,
                trellis=Trellis(offsets=(4096,), abs_values=True), pieces=(*_kt16(True), sign))


def _iq4_kt():
    # [row f32 d] 8 u32 block words (bit 0 sel, bits 1..7 scale, 8..31 three index bits per
    # group) | ql[64] | qh[32] (two nibbles); groups of 4, g = 8*block + k.
    ql = piece("q", 64, lambda g: 32 + g, 0, 8)
    qh = piece("q", 64, lambda g: 96 + g % 32, lambda g: 4 * (g // 32), 4, dst=8)
    top = [piece("q", 64, lambda g, k=k: 4 * (g // 8) + (8 + 3 * (g % 8) + k) // 8,
                 lambda g, k=k: (8 + 3 * (g % 8) + k) % 8, 1, dst=12 + k) for k in range(3)]
    sc = piece("scale", 8, lambda b: 4 * b, 1, 7)
    sel = piece("sel", 8, lambda b: 4 * b, 0, 1)
    return dict(bits=15, group_size=4, block_size=32, block_bytes=128, row_header_bytes=4,
                super_d=False, scale_bits=7, scale_kind="offset", scale_offset=64, grids=None,
                trellis=Trellis(offsets=(4096, 4096 + 32768)), pieces=(ql, qh, *top, sc, sel))


_BUILDERS = {
    # name: (ggml type id, layout builder)
    "iq2_k": (137, _iq2_k),
    "iq3_k": (138, _iq3_k),
    "iq4_k": (139, _iq4_k),
    "iq5_k": (140, _iq5_k),
    "iq6_k": (141, _iq6_k),
    "iq4_ks": (144, _iq4_ks),
    "iq2_ks": (145, _iq2_ks),
    "iq4_kss": (146, _iq4_kss),
    "iq5_ks": (152, _iq5_ks),
    "iq2_kt": (153, _iq2_kt),
    "iq3_kt": (154, _iq3_kt),
    "iq4_kt": (155, _iq4_kt),
    "iq3_ks": (156, _iq3_ks),
    "iq2_kl": (157, _iq2_kl),
    "iq1_kt": (158, _iq1_kt),
}


def _make(name: str, ggml_type: int, fields: dict) -> TypeDescriptor:
    fields = dict(fields)
    fields.setdefault("trellis", None)
    fields["pieces"] = tuple(p for p in fields["pieces"] if p is not None)
    return TypeDescriptor(name=name, ggml_type=ggml_type, **fields)


_REGISTRY: dict[str, TypeDescriptor] = {}


def register(desc: TypeDescriptor) -> TypeDescriptor:
    """Adds a descriptor to the registry; names and type ids must be unique."""
    if desc.name in _REGISTRY:
        raise ValueError(f"type {desc.name!r} is already registered")
    if any(d.ggml_type == desc.ggml_type for d in _REGISTRY.values()):
        raise ValueError(f"ggml type id {desc.ggml_type} is already registered")
    _REGISTRY[desc.name] = desc
    return desc


for _name, (_tid, _build) in _BUILDERS.items():
    register(_make(_name, _tid, _build()))


def types() -> tuple[str, ...]:
    """Names of all supported IQK types, ordered by ggml type id."""
    return tuple(sorted(_REGISTRY, key=lambda n: _REGISTRY[n].ggml_type))


def descriptor(name) -> TypeDescriptor:
    """The descriptor of an IQK type, by name (``"iq4_k"``, case-insensitive) or ggml type id."""
    if isinstance(name, TypeDescriptor):
        return name
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        for d in _REGISTRY.values():
            if d.ggml_type == int(name):
                return d
        raise ValueError(f"unknown IQK ggml type id {int(name)}; known: "
                         f"{sorted(d.ggml_type for d in _REGISTRY.values())}")
    if isinstance(name, str) and name.lower() in _REGISTRY:
        return _REGISTRY[name.lower()]
    raise ValueError(f"unknown IQK type {name!r}; known: {', '.join(types())}")


def is_iqk_type_id(type_id: int) -> bool:
    return any(d.ggml_type == int(type_id) for d in _REGISTRY.values())


def row_bytes(name, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` weights of type ``name``, row header included."""
    return descriptor(name).row_bytes(n_per_row)
