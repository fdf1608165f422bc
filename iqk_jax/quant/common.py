"""Array building blocks shared by the IQK quantizer searches.

Every search here works on *position-major* blocks: a matrix cut into blocks of ``bs`` weights
is held as ``[bs, n_blocks]`` (weight position in the block first, block index last), so every
elementwise step is one long vectorized loop over blocks and per-block sums are a small matrix
product (:func:`block_sum`). Block ``nb`` of super-block ``sb`` is ``nb = sb * (256 // bs) + ib``
so per-super-block values are a free reshape of per-block ones.

Numerics: each super-block is multiplied by a power of two chosen from its largest magnitude
before the search (:func:`normalise_superblocks`). Multiplying by a power of two is exact, and
every decision of the searches is a comparison of ratios of homogeneous sums, so the chosen
indices and integer scales are those of the unscaled data; only overflow (``x**2`` of 1e30) and
underflow disappear. Thresholds that the reference applies to absolute magnitudes (all-zero
blocks, unusable importance blocks) are evaluated on the original values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from iqk_jax import registry, spec

ZERO_BLOCK = 1e-16      # a block whose largest magnitude is below this is quantized as zero
IMATRIX_EPS = 1e-9      # importance given to every weight of an unusable importance block
FP16_MAX = 65504.0


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------

def to_blocks(x, bs: int):
    """``[..., n]`` -> position-major blocks ``[bs, n_blocks]`` (blocks in row-major order)."""
    return x.reshape(-1, bs).T


def from_blocks(xt, shape):
    """Inverse of :func:`to_blocks`."""
    return xt.T.reshape(shape)


def block_sum(t):
    """Per-block sum of a position-major array ``[bs, nb]`` -> ``[nb]``.

    Written as a ``[1, bs] @ [bs, nb]`` product: the producer of ``t`` is computed once into a
    vectorized loop and the sum is a fast matrix-vector kernel. (A ``reduce`` over axis 0
    compiles to scalar code on CPU, ~10x slower; explicit per-row adds run fast but XLA
    duplicates the whole producer into each row slice, which multiplies compile time.)
    ``HIGHEST`` precision keeps float32 accumulation on GPUs (no TF32).
    """
    ones = jnp.ones((1, t.shape[0]), t.dtype)
    return jnp.dot(ones, t, precision=jax.lax.Precision.HIGHEST)[0]


def per_superblock(v, n_blocks_per_sb: int):
    """View a per-block vector ``[nb]`` as ``[n_sb, blocks_per_sb]``."""
    return v.reshape(-1, n_blocks_per_sb)


# ----------------------------------------------------------------------------------------------
# Input preparation
# ----------------------------------------------------------------------------------------------

def pow2_scale(amax):
    """Exponent ``e`` such that ``amax * 2**-e`` is in [1, 2) (``e = 0`` where ``amax == 0``)."""
    _, e = jnp.frexp(jnp.where(amax > 0, amax, 1.0))
    return (e - 1).astype(jnp.int32)


def ldexp_safe(v, e):
    """``v * 2**e`` in float32 without an intermediate overflow of the power of two."""
    e1 = e // 2
    e2 = e - e1
    return v * jnp.ldexp(jnp.float32(1), e1) * jnp.ldexp(jnp.float32(1), e2)


def normalise_superblocks(x):
    """Splits ``x`` ``[S, 256]`` into ``x * 2**-e`` and ``e`` ``[S]`` (see module docstring)."""
    e = pow2_scale(jnp.max(jnp.abs(x), axis=-1))
    return ldexp_safe(x, -e[:, None]), e


def usable_imatrix(x, imatrix, bs: int):
    """The importance actually used per weight, shaped like ``x`` ``[R, n]``.

    ``imatrix`` is ``[n]`` (one per column) or already ``[R, n]``. ik_llama.cpp replaces the
    importance of a whole block of ``bs`` weights by a tiny constant when the block's
    importance, its values, or their overlap is negligible (so that such a block is still
    fitted, by the search's value-based weighting, instead of dividing 0 by 0). Evaluated on
    the original (unnormalised) values; an overflow to inf only makes a test pass, which is the
    right answer for huge values.
    """
    R, n = x.shape
    xb = x.reshape(R, n // bs, bs)
    wb = jnp.broadcast_to(jnp.asarray(imatrix, jnp.float32).reshape(-1, n // bs, bs), xb.shape)
    thr = bs * IMATRIX_EPS * IMATRIX_EPS
    ok = ((jnp.sum(wb * wb, -1) > thr) & (jnp.sum(xb * xb, -1) > thr)
          & (jnp.sum(wb * jnp.abs(xb), -1) > thr))
    return jnp.where(ok[..., None], wb, jnp.float32(IMATRIX_EPS)).reshape(R, n)


def search_weights(xn, qw, sigma_mul: float, plain_sigma: float):
    """Importance of every weight for the search, per super-block ``[S, 256]``.

    With an importance vector ``qw`` (already passed through :func:`usable_imatrix`):
    ``qw * sqrt(sigma2 + x**2)``; without: ``plain_sigma * sigma2 + x**2``. ``sigma2`` is
    ``sigma_mul * mean(x**2)`` over the super-block. ``xn`` is the normalised input.
    """
    sigma2 = sigma_mul * jnp.mean(xn * xn, axis=-1, keepdims=True)
    if qw is not None:
        return qw * jnp.sqrt(sigma2 + xn * xn)
    return plain_sigma * sigma2 + xn * xn


# ----------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def grid_pair(name: str) -> np.ndarray:
    """float32 ``[n_selectors, 2**bits]`` scalar grid pair of a type (group size 1)."""
    g = registry.descriptor(name).grid_values
    if g.shape[-1] != 1:
        raise ValueError(f"{name}: grid_pair needs a scalar grid (group_size 1)")
    g = g[..., 0].astype(np.float32)
    if np.any(np.diff(g, axis=-1) <= 0):
        raise ValueError(f"{name}: grid values must be strictly increasing")
    return g


def grid_shift(grid: np.ndarray):
    """The constant offset ``grid[1] - grid[0]`` of a grid pair, or None if not constant."""
    if grid.shape[0] < 2:
        return None
    diff = grid[1] - grid[0]
    return float(diff[0]) if np.all(diff == diff[0]) else None


@functools.lru_cache(maxsize=None)
def _smooth_grid(values: tuple):
    """Polynomial description of a long grid that is a smooth function of its index.

    Returns ``(forward cubic coefficients, inverse polynomial coefficients, centre, half-width)``
    or None. The forward cubic must reproduce every grid value to 1e-3 (iq6_k's grid *is* a
    cubic); the inverse, fitted in ``u = (v - centre) / half_width``, must give the continuous
    index to within 0.1 over the grid's range, so rounding it lands within one of the nearest
    index and three neighbours always contain it.
    """
    g = np.asarray(values, np.float64)
    n = len(g)
    if n < 32:
        return None
    q = np.arange(n)
    fwd = np.polyfit(q, g, 3)
    if np.abs(np.polyval(fwd, q) - g).max() > 1e-3:
        return None
    qq = np.linspace(-0.5, n - 0.5, 8001)
    vv = np.polyval(fwd, qq)
    if np.any(np.diff(vv) <= 0):
        return None
    c, h = (vv.max() + vv.min()) / 2, (vv.max() - vv.min()) / 2
    for deg in range(5, 14):
        inv = np.polyfit((vv - c) / h, qq, deg)
        if np.abs(np.polyval(inv, (vv - c) / h) - qq).max() < 0.1:
            return fwd, inv, c, h
    return None


def _horner(coef, u):
    acc = jnp.full(u.shape, np.float32(coef[0]), jnp.float32)
    for a in coef[1:]:
        acc = acc * u + np.float32(a)
    return acc


def _nearest_one(v, g: np.ndarray, want_index: bool):
    smooth = _smooth_grid(tuple(float(t) for t in g))
    if smooth is not None:
        # ~30 flops instead of a 63-step compare chain: estimate the index from the inverse
        # polynomial, then pick the nearest of three neighbours whose values come from the
        # forward cubic (within 1e-3 of the table; only exact midpoint ties can differ).
        fwd, inv, c, h = smooth
        n = len(g)
        vc = jnp.clip(v, np.float32(g[0]), np.float32(g[-1]))
        q0 = jnp.clip(jnp.round(_horner(inv, (vc - np.float32(c)) * np.float32(1 / h))),
                      1, n - 2)
        gm, gc, gp = (_horner(fwd, q0 + o) for o in (-1.0, 0.0, 1.0))
        up1 = vc >= (gm + gc) * np.float32(0.5)
        up2 = vc >= (gc + gp) * np.float32(0.5)
        val = jnp.where(up2, gp, jnp.where(up1, gc, gm))
        idx = None
        if want_index:
            idx = q0.astype(jnp.int32) - 1 + up1.astype(jnp.int32) + up2.astype(jnp.int32)
        return idx, val
    mids = (g[1:] + g[:-1]) * np.float32(0.5)
    val = jnp.full(v.shape, g[0], jnp.float32)
    idx = jnp.zeros(v.shape, jnp.int32) if want_index else None
    for k in range(len(mids)):
        up = v >= mids[k]
        val = jnp.where(up, g[k + 1], val)
        if want_index:
            idx = idx + up.astype(jnp.int32)
    return idx, val


def nearest(v, grid: np.ndarray, sel=None, want_index: bool = False):
    """Nearest grid value of every element of ``v`` (ties go to the larger value).

    Args:
      v: float array.
      grid: float32 ``[n_sel, n_values]`` increasing grids (a static numpy constant).
      sel: optional int array broadcastable to ``v`` picking the grid; grid 0 if None.
      want_index: also return the index.

    Compare-all against the static midpoints: ``n_values - 1`` compare/selects per element,
    which XLA fuses and vectorizes (measured faster on CPU than a table gather for up to 64
    values). When the second grid is the first plus a constant (true of every IQK pair) the
    selected grid is handled by shifting ``v`` instead of selecting midpoints per element.
    """
    if sel is None or grid.shape[0] == 1:
        idx, val = _nearest_one(v, grid[0], want_index)
    else:
        shift = grid_shift(grid)
        if shift is not None:
            off = sel.astype(jnp.float32) * np.float32(shift)
            idx, val = _nearest_one(v - off, grid[0], want_index)
            val = val + off
        else:
            i0, v0 = _nearest_one(v, grid[0], want_index)
            i1, v1 = _nearest_one(v, grid[1], want_index)
            s = sel != 0
            val = jnp.where(s, v1, v0)
            idx = jnp.where(s, i1, i0) if want_index else None
    return (idx, val) if want_index else val


def signed_absmax(t):
    """Per block of ``[bs, nb]``: the entry of largest magnitude, with its sign (first on ties
    between equal magnitudes of one sign; the positive one when +a and -a both occur)."""
    hi = jnp.max(t, axis=0)
    lo = jnp.min(t, axis=0)
    return jnp.where(hi >= -lo, hi, lo)


def first_signed_absmax(v, axis=-1):
    """The entry of largest magnitude along ``axis`` (first occurrence), keeping its sign."""
    i = jnp.argmax(jnp.abs(v), axis=axis, keepdims=True)
    return jnp.take_along_axis(v, i, axis=axis).squeeze(axis)


# ----------------------------------------------------------------------------------------------
# Block search: best scale and grid for each block
# ----------------------------------------------------------------------------------------------

def lsq(xt, wt, q):
    """``(sum w q x, sum w q^2)`` per block for values ``q`` (all ``[bs, nb]``)."""
    wq = wt * q
    return block_sum(wq * xt), block_sum(wq * q)


def scan_block_scales(xt, wt, bmax, grid: np.ndarray, ntry: int, step: float):
    """Best least-squares scale and grid per block over candidate inverse scales.

    For every grid ``g`` of the pair and every ``itry`` in ``[-ntry, ntry]`` the inverse scale
    ``(itry * step + g[0]) / bmax`` maps the block onto the grid; both it and its negation are
    tried (a block scale may have either sign). Each candidate rounds every weight to the
    nearest grid value ``q`` and is scored by the weighted least-squares gain
    ``(sum w q x)^2 / sum w q^2``; the best candidate's scale ``sum w q x / sum w q^2`` wins
    (first best on ties, in the loop order: ``itry`` ascending, then grid, then + before -).

    Args:
      xt, wt: ``[bs, nb]`` position-major values and weights.
      bmax: ``[nb]`` signed largest-magnitude entry per block (any nonzero where irrelevant).
      grid: ``[n_sel, n_values]`` grid pair.

    Returns:
      ``(d [nb], sel int32 [nb])``; ``d == 0`` where no candidate had a positive ``sum w q^2``.
    """
    nsel = grid.shape[0]
    nb = xt.shape[1]
    shift = grid_shift(grid)
    g0 = jnp.asarray(grid[:, 0], jnp.float32)
    # One loop step per (itry, grid, sign) keeps the compare chain compiled once. Grid s is
    # grid 0 plus shift*s when the pair is a shifted copy (all IQK pairs), else both are
    # evaluated and the selected one kept.

    def body(i, carry):
        bqx, bq2, bsel = carry
        itry = (i // (2 * nsel) - ntry).astype(jnp.float32) * jnp.float32(step)
        s = (i // 2) % nsel
        sign = jnp.where(i % 2 == 0, jnp.float32(1), jnp.float32(-1))
        inv = (itry + g0[s]) / bmax
        al = sign * (xt * inv)
        if shift is not None or nsel == 1:
            q = nearest(al, grid, jnp.broadcast_to(s, al.shape) if nsel > 1 else None)
        else:
            q = jnp.where(s == 0, nearest(al, grid[:1]), nearest(al, grid[1:]))
        qx, q2 = lsq(xt, wt, q)
        # gain comparison without division: qx^2/q2 > bqx^2/bq2 (q2, bq2 >= 0)
        better = (q2 > 0) & ((bq2 == 0) | (qx * qx * bq2 > bqx * bqx * q2))
        return (jnp.where(better, qx, bqx), jnp.where(better, q2, bq2),
                jnp.where(better, s, bsel))

    # bq2 == 0 marks "no candidate yet": the first one with a positive sum w q^2 wins.
    init = (jnp.zeros(nb, jnp.float32), jnp.zeros(nb, jnp.float32), jnp.zeros(nb, jnp.int32))
    bqx, bq2, bsel = jax.lax.fori_loop(0, (2 * ntry + 1) * nsel * 2, body, init)
    d = jnp.where(bq2 > 0, bqx / jnp.where(bq2 > 0, bq2, 1), 0.0)
    return d, bsel


def refit_block_scale(xt, wt, d, sel, grid: np.ndarray):
    """One more least-squares pass: re-round each block with ``1/d`` and refit ``d``."""
    ok = d != 0
    inv = jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0)
    q = nearest(xt * inv, grid, sel[None, :])
    qx, q2 = lsq(xt, wt, q)
    return jnp.where(ok & (q2 > 0), qx / jnp.where(q2 > 0, q2, 1), d)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def to_fp16_bits(d):
    """float32 -> fp16 (round to nearest even, saturated to the finite range) as uint16 bits."""
    d = jnp.clip(d, -FP16_MAX, FP16_MAX)
    return jax.lax.bitcast_convert_type(d.astype(jnp.float16), jnp.uint16)


def pack_superblocks(desc, fields: dict, d_bits=None) -> np.ndarray:
    """Packs per-super-block fields (numpy, ``[S, n]`` each) into ``[S, block_bytes]``.

    ``d_bits`` (uint16 ``[S]``) is written to the first two bytes of ``super_d`` types.
    """
    fields = {k: np.asarray(v) for k, v in fields.items()}
    S = next(iter(fields.values())).shape[0]
    blocks = spec.pack(fields, desc, (S,))
    if d_bits is not None:
        blocks[:, :2] = np.asarray(d_bits, dtype="<u2").reshape(S, 1).view(np.uint8)
    return blocks

