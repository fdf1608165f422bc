"""The numpy dequantization spec: the one definition every kernel is tested against.

Bit-exact with ik_llama.cpp's ``dequantize_row_*``: each weight is computed as
``float32(d * float32(scale)) * value`` in float32, in that order, like the reference.

Rows are laid out as ik_llama.cpp writes them: ``[row header][super-block 0][super-block 1]...``.
Everything here is driven by :mod:`iqk_jax.registry` descriptors; nothing is per-type.
"""

from __future__ import annotations

import functools

import numpy as np

from iqk_jax import registry
from iqk_jax.registry import QK_K, TypeDescriptor


def _as_rows(raw, desc: TypeDescriptor, n_per_row: int) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"{desc.name}: raw rows must be uint8, got {raw.dtype}")
    rb = desc.row_bytes(n_per_row)
    if raw.ndim == 1:
        if raw.size % rb:
            raise ValueError(f"{desc.name}: {raw.size} raw bytes are not a whole number of "
                             f"{rb}-byte rows (n_per_row={n_per_row})")
        raw = raw.reshape(-1, rb)
    if raw.ndim != 2 or raw.shape[1] != rb:
        raise ValueError(f"{desc.name}: raw rows must be [rows, {rb}] for n_per_row={n_per_row}, "
                         f"got shape {raw.shape}")
    return raw


def split_rows(raw: np.ndarray, desc: TypeDescriptor, n_per_row: int):
    """Splits rows into (row_d float32 [rows] or None, super-blocks uint8 [rows, nsb, bytes])."""
    raw = _as_rows(raw, desc, n_per_row)
    hb = desc.row_header_bytes
    blocks = raw[:, hb:].reshape(raw.shape[0], n_per_row // QK_K, desc.block_bytes)
    row_d = None
    if hb:
        row_d = np.ascontiguousarray(raw[:, :hb]).view(desc.header_dtype)[:, 0].astype(np.float32)
    return row_d, blocks


def _xor16(blocks: np.ndarray) -> np.ndarray:
    """The Gray-decoded bytes of the 16-bit words: ``w' = w & ~1; w' ^= w' >> 1``."""
    w = np.ascontiguousarray(blocks).view("<u2") & np.uint16(0xFFFE)
    return (w ^ (w >> 1)).view(np.uint8).reshape(blocks.shape)


def unpack(blocks: np.ndarray, desc: TypeDescriptor) -> dict[str, np.ndarray]:
    """Gathers the packed integer fields of super-blocks ``[..., block_bytes]``.

    Returns:
      dict with ``q`` [..., n_groups], ``scale`` and ``sel`` [..., n_blocks] (packed values,
      not yet decoded through ``scale_lut``) and, if present, ``sign`` [..., 256]; int32.
    """
    sources = {"raw": blocks}
    out = {}
    for p in desc.pieces:
        if p.source not in sources:
            sources[p.source] = _xor16(blocks)
        src = sources[p.source]
        byte = np.asarray(p.byte)
        shift = np.asarray(p.shift, dtype=np.int32)
        v = ((src[..., byte].astype(np.int32) >> shift) & p.mask) << p.dst
        out[p.field] = out.get(p.field, 0) | v
    if "sel" not in out:
        out["sel"] = np.zeros(blocks.shape[:-1] + (desc.n_blocks,), dtype=np.int32)
    return out


def super_d(blocks: np.ndarray) -> np.ndarray:
    """The fp16 scale at the start of each super-block, as float32 [...]."""
    return np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)


def dequantize_blocks(row_d, blocks: np.ndarray, desc: TypeDescriptor) -> np.ndarray:
    """float32 [rows, nsb, 256] from super-blocks and (if the type has one) the row scale."""
    f = unpack(blocks, desc)
    d = super_d(blocks) if desc.super_d else np.broadcast_to(row_d[:, None], blocks.shape[:2])
    # dl = float32(d * float32(scale)): one float32 product, exactly as the reference.
    dl = d[..., None] * desc.scale_lut[f["scale"]].astype(np.float32)       # [r, nsb, nblk]
    vals = desc.grid_values[f["sel"][..., :, None].repeat(desc.block_size // desc.group_size, -1)
                            .reshape(f["q"].shape), f["q"]]                 # [r, nsb, ng, gs]
    vals = vals.reshape(blocks.shape[:2] + (QK_K,))
    y = np.repeat(dl, desc.block_size, axis=-1) * vals
    if "sign" in f:
        y = np.where(f["sign"] != 0, -y, y)
    return y.astype(np.float32)


def dequantize(raw, name, n_per_row: int) -> np.ndarray:
    """Dequantizes IQK rows exactly as ik_llama.cpp does.

    Args:
      raw: uint8 ``[rows, row_bytes]`` (or flat bytes of whole rows), row headers included.
      name: type name (``"iq4_k"``), ggml type id or descriptor.
      n_per_row: weights per row, a positive multiple of 256.

    Returns:
      float32 ``[rows, n_per_row]``.
    """
    desc = registry.descriptor(name)
    row_d, blocks = split_rows(raw, desc, n_per_row)
    return dequantize_blocks(row_d, blocks, desc).reshape(blocks.shape[0], n_per_row)


# ------------------------------------------------------------------------------------------
# Packing: the inverse of ``unpack``, used by the quantizer and by tests.
# ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _scatter_plan(name: str):
    """Per piece, element subsets whose target bytes are distinct (safe for fancy |=)."""
    desc = registry.descriptor(name)
    plan = []
    for p in desc.pieces:
        byte = np.asarray(p.byte)
        rank = np.zeros(len(byte), dtype=np.int64)
        seen: dict[int, int] = {}
        for i, b in enumerate(byte):
            rank[i] = seen.get(int(b), 0)
            seen[int(b)] = rank[i] + 1
        subsets = [np.nonzero(rank == r)[0] for r in range(int(rank.max()) + 1)]
        plan.append((p, [(idx, byte[idx], np.asarray(p.shift)[idx]) for idx in subsets]))
    return plan


def _gray_encode16(aux: np.ndarray) -> np.ndarray:
    """Inverse of ``_xor16`` on words: returns ``w`` (bit 0 clear) with ``w ^ (w >> 1) == aux``."""
    w = aux.astype(np.uint16)
    out = w & np.uint16(0x8000)
    for bit in range(14, -1, -1):
        prev = (out >> np.uint16(bit + 1)) & np.uint16(1)
        cur = ((w >> np.uint16(bit)) & np.uint16(1)) ^ prev
        out = out | (cur << np.uint16(bit))
    return out


def pack(fields: dict[str, np.ndarray], desc: TypeDescriptor, lead_shape) -> np.ndarray:
    """Packs integer fields (as :func:`unpack` returns them) into super-blocks.

    Args:
      fields: ``q``, ``scale`` and, where the type has them, ``sel``/``sign`` arrays of shape
        ``lead_shape + (n,)`` with packed (not decoded) values.
      desc: the type.
      lead_shape: leading shape, e.g. ``(rows, nsb)``.

    Returns:
      uint8 ``lead_shape + (block_bytes,)``; the fp16 ``d`` of ``super_d`` types is left zero.

    Raises:
      ValueError: a field value does not fit its bits, or (iq4_kss) an index pattern the Gray
        code cannot represent.
    """
    desc = registry.descriptor(desc)
    lead_shape = tuple(lead_shape)
    raw = np.zeros(lead_shape + (desc.block_bytes,), dtype=np.uint8)
    xor = None
    for p, subsets in _scatter_plan(desc.name):
        if p.field not in fields:
            if p.field == "sel":
                continue
            raise ValueError(f"{desc.name}: field {p.field!r} is required")
        v = np.asarray(fields[p.field]).astype(np.int64)
        dst = raw if p.source == "raw" else xor
        if p.source != "raw" and xor is None:
            xor = dst = np.zeros_like(raw)
        bits = ((v >> p.dst) & p.mask).astype(np.uint8)
        for idx, byte, shift in subsets:
            dst[..., byte] |= (bits[..., idx] << shift.astype(np.uint8)).astype(np.uint8)
    for f, width in (("q", desc.bits), ("scale", desc.scale_bits)):
        v = np.asarray(fields[f])
        if v.size and (v.min() < 0 or v.max() >= 1 << width):
            raise ValueError(f"{desc.name}: field {f!r} values must be in [0, {1 << width}), "
                             f"got [{v.min()}, {v.max()}]")
    if xor is not None:
        words = np.ascontiguousarray(xor).view("<u2")
        enc = _gray_encode16(words)
        if np.any((enc & 1) != 0):
            raise ValueError(f"{desc.name}: index pattern not representable (Gray code bit 0 set)")
        merged = np.ascontiguousarray(raw).view("<u2") | enc
        raw = merged.view(np.uint8).reshape(raw.shape)
    return raw


def assemble_rows(row_d, blocks: np.ndarray, desc: TypeDescriptor) -> np.ndarray:
    """uint8 ``[rows, row_bytes]`` from a row scale (or None) and super-blocks."""
    desc = registry.descriptor(desc)
    rows = blocks.shape[0]
    body = blocks.reshape(rows, -1)
    if not desc.row_header_bytes:
        return np.ascontiguousarray(body)
    hdr = np.asarray(row_d, dtype=desc.header_dtype).reshape(rows, 1).view(np.uint8)
    return np.concatenate([hdr, body], axis=1)
