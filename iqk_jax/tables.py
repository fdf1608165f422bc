"""Non-linear value grids of the IQK family.

These numbers are format constants: a GGUF file written by ik_llama.cpp only decodes to the
right floats with exactly these grids, so they are data, not a design choice. Each grid comes as
a *pair* (``[0]`` and ``[1]``); a per-block bit in the packed data picks one. The second grid of a
pair is the first shifted by a small constant, which lets the quantizer move the grid's zero
crossing per block for free.
"""

from __future__ import annotations

import numpy as np

# 2-bit grid pair (iq2_k, iq2_ks).
IQ2NL = ((-31, -13, 1, 17), (-26, -8, 6, 22))

# 3-bit grid pair (iq3_k, iq3_ks).
IQ3NL = ((-63, -40, -23, -10, 1, 13, 28, 47), (-59, -36, -19, -6, 5, 17, 32, 51))

# 4-bit grid pair (iq4_k, iq4_ks, iq4_kss; the first half also decodes trellis block scales).
IQ4K = (
    (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113),
    (-123, -100, -79, -61, -45, -31, -18, -6, 5, 17, 29, 42, 57, 73, 93, 117),
)

# 5-bit grid pair (iq5_k, iq5_ks).
IQ5NL = (
    (-126, -114, -103, -92, -83, -74, -65, -57, -50, -43, -36, -30, -24, -18, -12, -6,
     -1, 5, 11, 17, 23, 29, 36, 43, 51, 59, 68, 77, 87, 97, 109, 121),
    (-124, -112, -101, -90, -81, -72, -63, -55, -48, -41, -34, -28, -22, -16, -10, -4,
     1, 7, 13, 19, 25, 31, 38, 45, 53, 61, 70, 79, 89, 99, 111, 123),
)

# iq2_kl: a 5-bit index picks a *pair* of int8 values (a 2-D grid of 32 points). Stored as
# (first, second) per point.
_IQ2KL_PACKED = (
    0xe9c1, 0x0dc1, 0xc1d8, 0xf6d8, 0x0dd8, 0x2fd8, 0xd8e9, 0xe9e9, 0x01e9, 0x0de9, 0x1ce9,
    0xc1f6, 0x01f6, 0x0df6, 0x2ff6, 0xe901, 0xf601, 0x0101, 0x0d01, 0x1c01, 0xd80d, 0xe90d,
    0xf60d, 0x010d, 0x0d0d, 0xc11c, 0xe91c, 0x011c, 0x1c1c, 0x2f1c, 0xe92f, 0x0d2f,
)


def _s8(b: int) -> int:
    return b - 256 if b >= 128 else b


IQ2KL = (tuple((_s8(v & 0xFF), _s8(v >> 8)) for v in _IQ2KL_PACKED),)

# iq6_k: the 6-bit grid is a cubic in the index, evaluated in float32 in this exact order
# (A + q*(B + q*(-C + q*D))), plus 1.0 for the second grid of the pair.
IQ6K_POLY = (-127.0, 6.2568, 0.11218, 0.0011972)
IQ6K_SHIFT = 1.0


def iq6k_grid() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The iq6_k grid pair as float32-exact Python floats.

    ik_llama.cpp is built with FMA contraction on x86-64 (GCC's default), so the cubic is
    evaluated as a chain of fused multiply-adds; the conformance vectors pin that choice.
    """
    a, b, c, d = (np.float32(v) for v in IQ6K_POLY)
    q = np.arange(64, dtype=np.float32)
    # Fused multiply-add in float64 then one rounding to float32 is exact for float32 inputs
    # (the product of two float32 fits in a float64 mantissa), so this is a true FMA.
    t = (q.astype(np.float64) * d.astype(np.float64) - c.astype(np.float64)).astype(np.float32)
    t = (q.astype(np.float64) * t.astype(np.float64) + b.astype(np.float64)).astype(np.float32)
    t = (q.astype(np.float64) * t.astype(np.float64) + a.astype(np.float64)).astype(np.float32)
    g0 = tuple(float(v) for v in t)
    g1 = tuple(float(np.float32(v) + np.float32(IQ6K_SHIFT)) for v in t)
    return g0, g1
