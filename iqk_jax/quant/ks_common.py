"""Array building blocks of the row-scaled IQK searches (iq2_ks, iq3_ks, iq4_ks, iq5_ks, iq4_kss,
iq2_kl).

All of these types share one shape of search, re-derived from ik_llama.cpp's per-row quantizers:

1. *Block pass.* Every block of 32 weights gets a float scale and a grid selector: a set of
   candidate inverse scales (spread around ``grid_min / block_max``, usually both signs, both
   grids of the pair) is tried, each candidate rounds the block to its grid and is scored by the weighted
   least-squares gain ``sumqx**2 / sumq2``; the best candidate's least-squares scale wins.
2. *Row pass.* A row scale ``d`` is derived from the block scales, every block scale becomes a
   small integer ``L`` (``d * L`` approximates it), the block is re-rounded with ``d * L`` and
   finally ``d`` is refitted by least squares over the whole row.

Everything is written as array code over all blocks of all rows at once (fixed shapes, no data
dependent control flow), so the same jitted function runs on CPU and GPU and is deterministic.
Candidates are visited by ``lax.scan`` (one candidate's arrays live at a time) and the hot sums
are written as matrix-vector products (see :func:`lsum`).

Numerics: each row is first divided by a power of two close to its largest magnitude, so the
searches see values of order one whatever the input scale (1e-30 or 1e30 alike); the power of two
goes back into the row scale at the end. The search's decisions are invariant to that exact
rescaling (all scores are ratios of homogeneous sums) except for the "this block is zero"
threshold, which thereby becomes relative to the row's maximum; so this only removes
overflow/underflow.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from iqk_jax.registry import QK_K

BLOCK = 32                 # weights per block (all row-scaled types)
ZERO_BLOCK = 1e-16         # a block whose largest magnitude (row-normalised) is below is zero
_IMATRIX_EPS = 1e-9        # weight given to every column of an importance block that is unusable


# ----------------------------------------------------------------------------------------------
# Input preparation
# ----------------------------------------------------------------------------------------------

def row_normalise(x):
    """Splits ``x`` [R, n] into ``x / p`` and ``p``, ``p`` a power of two per row.

    ``p = 2**floor(log2(max|x|))`` (1 for all-zero rows), so ``max|x / p|`` is in [1, 2). Dividing
    by a power of two is exact unless the result is subnormal, which cannot happen for the
    largest entries that matter.
    """
    amax = jnp.max(jnp.abs(x), axis=-1)
    # frexp gives amax = m * 2**e with m in [0.5, 1): p = 2**(e - 1).
    _, e = jnp.frexp(jnp.where(amax > 0, amax, 1.0))
    e = e - 1
    # Scale in two steps so that neither factor overflows for extreme exponents.
    e1 = e // 2
    e2 = e - e1
    xn = x * jnp.ldexp(jnp.float32(1), -e1)[:, None] * jnp.ldexp(jnp.float32(1), -e2)[:, None]
    return xn, e


def denormalise(d, e):
    """``d * 2**e`` in float32 without intermediate overflow (the inverse of ``row_normalise``)."""
    e1 = e // 2
    e2 = e - e1
    return d * jnp.ldexp(jnp.float32(1), e1) * jnp.ldexp(jnp.float32(1), e2)


def usable_imatrix(x, imatrix):
    """float32 [R, n]: the importance per weight, with ik_llama.cpp's guard for degenerate blocks.

    A block of 32 whose importance is (nearly) all zero, or whose weights are (nearly) all zero,
    or where the two never overlap, carries no usable information; every weight of such a block
    gets the same small importance instead, so the block is still rounded sensibly.
    """
    R, n = x.shape
    qw = jnp.broadcast_to(imatrix.astype(jnp.float32)[None, :], (R, n))
    qw = qw.reshape(R, n // BLOCK, BLOCK)
    xb = x.reshape(R, n // BLOCK, BLOCK)
    lim = BLOCK * _IMATRIX_EPS * _IMATRIX_EPS
    ok = ((jnp.sum(qw * qw, -1) > lim) & (jnp.sum(xb * xb, -1) > lim)
          & (jnp.sum(qw * jnp.abs(xb), -1) > lim))
    return jnp.where(ok[..., None], qw, _IMATRIX_EPS).reshape(R, n)


def search_weights(xn, qw, sigma_factor: float, plain: str):
    """Importance of each weight for the search, [R, n] (row-normalised units).

    With an importance vector: ``qw * sqrt(sigma2 + x**2)``; without: ``plain`` selects the form
    (``"x2"``: ``x**2``; ``"x2+sigma"``: ``sigma2/4 + x**2``; ``"abs"``: ``|x|``). ``sigma2`` is
    ``sigma_factor * mean(x**2)`` over the 256-weight super-block.
    """
    R, n = xn.shape
    xs = xn.reshape(R, n // QK_K, QK_K)
    sigma2 = sigma_factor * jnp.mean(xs * xs, axis=-1, keepdims=True)
    if qw is not None:
        w = qw.reshape(xs.shape) * jnp.sqrt(sigma2 + xs * xs)
    elif plain == "x2":
        w = xs * xs
    elif plain == "x2+sigma":
        w = 0.25 * sigma2 + xs * xs
    elif plain == "abs":
        w = jnp.abs(xs)
    else:
        raise ValueError(f"unknown plain weighting {plain!r}")
    return w.reshape(R, n)


def block_max(xb):
    """(amax, signed max) over the last axis: the entry of largest magnitude, first on ties."""
    ax = jnp.abs(xb)
    i = jnp.argmax(ax, axis=-1)
    # select-and-sum instead of take_along_axis: gathers are slow on XLA:CPU
    hit = jnp.arange(xb.shape[-1]) == i[..., None]
    mx = jnp.sum(jnp.where(hit, xb, 0.0), axis=-1)
    return jnp.abs(mx), mx


# ----------------------------------------------------------------------------------------------
# Rounding to a scalar grid
# ----------------------------------------------------------------------------------------------

def round_to_grid(t, grid, labels=None):
    """Nearest grid value of ``t`` and its label; ties go to the upper value.

    Args:
      t: float32 array.
      grid: sorted grid values, numpy ``[K]`` or an array ``[..., K]`` broadcastable against
        ``t[..., None]`` (one grid per element, e.g. chosen by a selector).
      labels: numpy int ``[K]``, the label returned for each grid entry (default ``0..K-1``;
        a sub-grid passes the indices of its entries in the full grid).

    Branch free, no gathers (XLA:CPU gathers are slow), so it vectorises on CPU and GPU alike:
    a running sum of ``t >= midpoint`` comparisons. Grids of 16 or more values first pick a
    half with one comparison and then walk that half's midpoints (selected per element), about
    a third fewer operations than walking all K - 1 midpoints.
    """
    K = grid.shape[-1]
    labels = np.arange(K) if labels is None else np.asarray(labels)
    if isinstance(grid, np.ndarray):
        g = [np.float32(v) for v in grid.astype(np.float32)]
    else:
        gj = jnp.asarray(grid, jnp.float32)
        g = [gj[..., k] for k in range(K)]
    mids = [0.5 * (g[k] + g[k + 1]) for k in range(K - 1)]
    steps = [g[k + 1] - g[k] for k in range(K - 1)]
    dlab = [int(labels[k + 1] - labels[k]) for k in range(K - 1)]
    if K < 16:
        val = jnp.broadcast_to(jnp.asarray(g[0], jnp.float32), t.shape)
        lab = jnp.full(t.shape, int(labels[0]), jnp.int32)
        for mid, step, dl in zip(mids, steps, dlab):
            m = t >= mid
            val = val + jnp.where(m, step, 0.0)
            lab = lab + jnp.where(m, dl, 0)
        return val, lab
    h = K // 2
    hi = t >= mids[h - 1]
    val = jnp.where(hi, g[h], g[0])
    lab = jnp.where(hi, int(labels[h]), int(labels[0]))
    for k in range(h - 1):
        m = t >= jnp.where(hi, mids[h + k], mids[k])
        val = val + jnp.where(m, jnp.where(hi, steps[h + k], steps[k]), 0.0)
        if dlab[h + k] == dlab[k]:
            lab = lab + jnp.where(m, dlab[k], 0)
        else:
            lab = lab + jnp.where(m, jnp.where(hi, dlab[h + k], dlab[k]), 0)
    return val, lab


def scan_candidates(evaluate, cands, init):
    """Runs ``evaluate(cand) -> (gain, payload)`` over candidates, keeping the best per element.

    ``cands`` is a pytree of arrays with a leading candidate axis; ``gain`` an array (higher is
    better) and ``payload`` a pytree of arrays of matching leading shape. The first of equal
    gains wins, like the reference's strict ``>`` updates. A ``lax.scan`` keeps one candidate's
    arrays live at a time (memory O(weights), not O(weights x candidates)) and compiles the
    body once, which is both faster and far quicker to compile than a broadcast over candidates.

    Returns (best gain, best payload, index of the best candidate).
    """
    def body(carry, c):
        g, p, i = carry
        k = c[0]
        ng, np_ = evaluate(c[1])
        better = ng > g
        def keep(new, old):
            return jnp.where(better.reshape(better.shape + (1,) * (new.ndim - better.ndim)),
                             new, old)

        p = jax.tree_util.tree_map(keep, np_, p)
        return (jnp.where(better, ng, g), p, jnp.where(better, k, i)), None

    n = jax.tree_util.tree_leaves(cands)[0].shape[0]
    g0, p0 = init
    i0 = jnp.zeros(g0.shape, jnp.int32)
    (g, p, i), _ = jax.lax.scan(body, (g0, p0, i0), (jnp.arange(n, dtype=jnp.int32), cands))
    return g, p, i


def scalar_block_pass(xb, wb, grids, numerators, grid_of, refine: int = 1):
    """Block pass over scalar grids: the best least-squares scale and grid of every block.

    Args:
      xb, wb: float32 [..., 32] weights and their importance.
      grids: numpy float32 [G, K], the grid pair.
      numerators: [C] (numpy or traced): candidate ``c`` rounds ``x * numerators[c] / block_max``
        to grid ``grid_of[c]`` (the sign of the numerator covers both signs of the scale).
      grid_of: numpy int [C].
      refine: extra alternations (round with the best scale, refit it) kept only if they raise
        the gain.

    Returns:
      (d [...], sel [...] int32, zero [...] bool): the block scale (0 for zero blocks), its grid
      and whether the block is treated as all zero.
    """
    amax, mx = block_max(xb)
    zero = amax < ZERO_BLOCK
    safe = jnp.where(zero, 1.0, mx)
    grids = np.asarray(grids, np.float32)

    def evaluate(c):
        num, g, gi = c
        t = xb * (num / safe)[..., None]
        val, _ = round_to_grid(t, g)
        wq = wb * val
        qx = lsum(wq * xb)
        q2 = lsum(wq * val)
        return gain_of(qx, q2), (qx, q2, jnp.broadcast_to(gi, qx.shape))

    grid_of = np.asarray(grid_of, np.int32)
    cands = (jnp.asarray(numerators, jnp.float32), jnp.asarray(grids[grid_of]),
             jnp.asarray(grid_of))
    z = jnp.zeros(xb.shape[:-1], jnp.float32)
    _, (bqx, bq2, sel), _ = scan_candidates(evaluate, cands,
                                            (z - 0.5, (z, z, jnp.zeros(z.shape, jnp.int32))))
    gsel = select_grid(grids, sel)                                    # [..., K]
    for _ in range(refine):
        d = weighted_refit(bqx, bq2, 0.0)
        ok = d != 0
        t = xb / jnp.where(ok, d, 1.0)[..., None]
        v, _ = round_to_grid(t, gsel[..., None, :])
        wq = wb * v
        qx = jnp.sum(wq * xb, -1)
        q2 = jnp.sum(wq * v, -1)
        better = ok & (gain_of(qx, q2) > gain_of(bqx, bq2))
        bqx = jnp.where(better, qx, bqx)
        bq2 = jnp.where(better, q2, bq2)
    d = jnp.where(zero, 0.0, weighted_refit(bqx, bq2, 0.0))
    zero = zero | (d == 0)
    return d, jnp.where(zero, 0, sel), zero


def lsum(a):
    """Sum over the last axis, written as a matrix-vector product.

    XLA:CPU emits a reduction whose operand is a long elementwise chain (the grid rounding) as
    one scalar loop; a dot instead lets the elementwise part vectorise on its own, which is
    several times faster here. ``HIGHEST`` keeps float32 accuracy on GPUs (no TF32).
    """
    return jnp.dot(a, jnp.ones((a.shape[-1],), a.dtype), precision=jax.lax.Precision.HIGHEST)


def select_grid(grids, sel):
    """The grid of each block, [..., K], from a selector [...] (selects, not a gather: XLA:CPU
    gathers are slow)."""
    out = jnp.broadcast_to(jnp.asarray(grids[0]), sel.shape + (grids.shape[-1],))
    for g in range(1, grids.shape[0]):
        out = jnp.where((sel == g)[..., None], jnp.asarray(grids[g]), out)
    return out


def gain_of(qx, q2):
    """Least-squares gain ``qx**2 / q2`` of a rounding (-1 where ``q2 <= 0``: never chosen)."""
    ok = q2 > 0
    return jnp.where(ok, qx * qx / jnp.where(ok, q2, 1.0), -1.0)


def block_candidates(v0s, ntry: int, step: float = 1.0, initial=(), signs=(1, -1)):
    """Numerators and grids of the usual candidate set.

    For every ``itry`` in ``-ntry..ntry`` (times ``step``) and every grid ``g`` with smallest value
    ``v0s[g]``: the inverse scale ``(itry + v0s[g]) / max`` times each of ``signs``. ``initial``
    adds (numerator, grid) pairs tried first (with the same signs).
    """
    nums, gs = [], []
    for num, g in initial:
        nums += [s * num for s in signs]
        gs += [g] * len(signs)
    for it in range(-ntry, ntry + 1):
        for g, v0 in enumerate(v0s):
            nums += [s * (it * step + v0) for s in signs]
            gs += [g] * len(signs)
    return np.asarray(nums, np.float32), np.asarray(gs, np.int32)


# ----------------------------------------------------------------------------------------------
# Row pass helpers
# ----------------------------------------------------------------------------------------------

def weighted_refit(sumqx, sumq2, fallback):
    """Least-squares row scale ``sumqx / sumq2`` (``fallback`` where ``sumq2 == 0``)."""
    return jnp.where(sumq2 > 0, sumqx / jnp.where(sumq2 > 0, sumq2, 1.0), fallback)


# ----------------------------------------------------------------------------------------------
# Packing (jnp twin of ``iqk_jax.spec.pack`` + ``assemble_rows``)
# ----------------------------------------------------------------------------------------------

def _byte_matrix(desc, source: str):
    """Static plan for one byte source: (field, element, dst, mask) per contribution and the 0/1
    matrix [contributions, block_bytes] that routes ``bits << shift`` to its byte."""
    contrib, rows = [], []
    for p in desc.pieces:
        if p.source != source:
            continue
        for e, (b, sh) in enumerate(zip(p.byte, p.shift)):
            contrib.append((p.field, e, p.dst, p.mask, sh))
            rows.append(b)
    m = np.zeros((len(rows), desc.block_bytes), np.float32)
    m[np.arange(len(rows)), rows] = 1.0
    return contrib, m


def _route(fields, desc, source, lead):
    contrib, m = _byte_matrix(desc, source)
    if not contrib:
        return None
    parts = []
    for f in dict.fromkeys(c[0] for c in contrib):
        sel = [c for c in contrib if c[0] == f]
        e = np.array([c[1] for c in sel])
        dst = jnp.asarray(np.array([c[2] for c in sel], np.int32))
        mask = jnp.asarray(np.array([c[3] for c in sel], np.int32))
        sh = jnp.asarray(np.array([c[4] for c in sel], np.int32))
        v = fields[f].reshape(lead + (-1,))[..., e]
        parts.append(((v >> dst) & mask) << sh)
    order = [i for f in dict.fromkeys(c[0] for c in contrib)
             for i, c in enumerate(contrib) if c[0] == f]
    bits = jnp.concatenate(parts, -1).astype(jnp.float32)
    # Every bit has exactly one source (the registry checks that pieces never overlap), so the
    # byte is the plain sum of its contributions: a 0/1 matrix product, exact in float32.
    out = jnp.dot(bits, jnp.asarray(m[np.asarray(order)]), precision=jax.lax.Precision.HIGHEST)
    return out.astype(jnp.int32)


def pack_rows(fields, d, desc):
    """uint8 [R, row_bytes]: the packed rows, bit-identical to ``spec.pack`` + ``assemble_rows``.

    Args:
      fields: int32 ``q``, ``scale`` and (where the type has one) ``sel`` arrays [R, S, n].
      d: the row scale [R] in the header dtype (None for types without a header).
      desc: the type descriptor.

    Fields must already fit their bits and, for iq4_kss, every 16-bit word's indices must have
    even parity (the searches guarantee both; ``spec.pack`` is the checking version).
    """
    R, S = fields["q"].shape[:2]
    lead = (R, S)
    raw = _route(fields, desc, "raw", lead)
    aux = _route(fields, desc, "xor16", lead)
    if aux is not None:
        # Inverse of the decoder's w ^ (w >> 1) on 16-bit words: a prefix XOR from the top bit.
        w = aux[..., 0::2] | (aux[..., 1::2] << 8)
        for s in (1, 2, 4, 8):
            w = w ^ (w >> s)
        words = jnp.stack([w & 0xFF, w >> 8], -1).reshape(aux.shape)
        raw = words if raw is None else raw | words
    body = raw.astype(jnp.uint8).reshape(R, S * desc.block_bytes)
    if not desc.row_header_bytes:
        return body
    hdr = jax.lax.bitcast_convert_type(d.astype(desc.header_dtype), jnp.uint8)
    return jnp.concatenate([hdr.reshape(R, desc.row_header_bytes), body], axis=1)
