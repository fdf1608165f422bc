"""Quantizer searches of the super-block-scaled IQK types: iq2_k, iq3_k, iq4_k, iq5_k, iq6_k.

These types share one layout: a 256-weight super-block has an fp16 scale ``d``, sixteen
blocks of 16 weights each with a small integer scale ``ls`` and a grid selector bit, and one
grid index per weight; weight ``w`` decodes as ``d * ls[block] * grid[sel[block]][q[w]]``.
The search, re-derived from ik_llama.cpp's per-type quantizers, runs in stages, each as array
code over every block of every row at once (jitted, fixed shapes, deterministic). Stages 1-3
are the reference's algorithm (with ``refine=False`` the bytes are ik_llama.cpp's for nearly
every super-block); stages 4-5 are ours and only ever lower the search's weighted error:

1. *Importance.* ``qw * sqrt(sigma2 + x^2)`` with an importance vector, else a value-based
   weight (``x^2``, or ``sigma2/4 + x^2``), ``sigma2`` a multiple of the super-block's mean
   square (the multiples differ per type and follow the reference).
2. *Block scales.* Each block gets the float scale and grid that maximise the weighted
   least-squares gain ``(sum w q x)^2 / sum w q^2``: iq2_k tries every split of the sorted
   block into four runs (an exhaustive search, cheap with prefix sums), the others try a fan of
   inverse scales around ``grid[0] / block_max`` with both signs and both grids, optionally
   followed by one refit.
3. *Super-block scale.* ``d`` is derived from the block scales (largest one mapped to the end
   of the integer range; iq2_k fits it by weighted least squares over a small fan), each block
   scale is rounded to an integer ``ls``, every weight is re-rounded with ``d * ls``.
4. *Super-block scale choice.* The reference ends with the least-squares ``d`` (times a
   fixed 1-3 % stretch for iq2_k/iq3_k). We try a few multiples of it, each with the indices
   re-rounded for the *fp16-rounded* ``d`` the decoder will see, and keep the one with the
   smallest weighted error; the reference's own choice is one of the candidates.
5. *Block polish.* With that ``d``, each block tries its neighbouring packed scales and the
   other grid of the pair (decoded through the registry's ``scale_lut``), keeping the lowest
   weighted error; ``d`` is then refitted once more and kept only where it helps.

The searches' error is the importance-weighted one (stage 1's weights), as in the reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from iqk_jax import registry, spec
from iqk_jax.quant import register_search
from iqk_jax.quant import common as C
from iqk_jax.registry import QK_K

BS = 16            # weights per block for every type in this module
NBLK = QK_K // BS  # blocks per super-block


@dataclasses.dataclass(frozen=True)
class KSearch:
    """How one super-block-scaled type is searched.

    Attributes:
      name: the type.
      sigma_mul: ``sigma2 = sigma_mul * mean(x^2)`` over the super-block.
      plain_sigma: without importance, weight ``plain_sigma * sigma2 + x^2``.
      block_search: ``"splits"`` (exhaustive over sorted runs, 4-value grids) or ``"scan"``.
      ntry, step: scan candidates ``(itry * step + grid[0]) / max``, ``|itry| <= ntry``.
      refit: one more least-squares pass on each block scale after the scan.
      super_scale: ``"lsq"`` (iq2_k), ``"odd"`` (iq3_k), ``"max"`` (the rest).
      nmax: integer scale range of ``"max"``: ``d = -max_scale / nmax``, ``ls`` in
        ``[-nmax, lmax]``.
      lmax: upper end of ``ls`` for ``"max"``.
      stretch: the reference's final multiplier of the refitted ``d``.
      refine_mults: multiples of the refitted ``d`` tried in stage 4 (``stretch`` is added).
    """

    name: str
    sigma_mul: float
    plain_sigma: float
    block_search: str
    ntry: int = 0
    step: float = 1.0
    refit: bool = False
    super_scale: str = "max"
    nmax: int = 32
    lmax: int = 31
    stretch: float = 1.0
    refine_mults: tuple[float, ...] = (0.98, 0.99, 1.0, 1.01, 1.02, 1.03, 1.04)

    def __post_init__(self):
        if self.block_search not in ("splits", "scan"):
            raise ValueError(f"{self.name}: block_search must be 'splits' or 'scan'")
        if self.super_scale not in ("lsq", "odd", "max"):
            raise ValueError(f"{self.name}: unknown super_scale {self.super_scale!r}")
        desc = registry.descriptor(self.name)
        if desc.block_size != BS or not desc.super_d or desc.group_size != 1:
            raise ValueError(f"{self.name}: kquants handles super-block-scaled types with blocks "
                             f"of {BS} and scalar grids")
        if desc.bits > 8 or desc.scale_bits > 8:
            raise ValueError(f"{self.name}: fields are shipped as bytes; bits and scale_bits "
                             f"must be <= 8")


SEARCHES = {
    "iq2_k": KSearch("iq2_k", 1.5, 0.25, "splits", super_scale="lsq", nmax=8, lmax=7,
                     stretch=1.030),
    "iq3_k": KSearch("iq3_k", 1.5, 0.25, "scan", ntry=3, step=2.0, refit=True,
                     super_scale="odd", stretch=1.01),
    "iq4_k": KSearch("iq4_k", 2.0, 0.0, "scan", ntry=7, step=1.0),
    "iq5_k": KSearch("iq5_k", 2.0, 0.25, "scan", ntry=5, step=1.0, refit=True),
    "iq6_k": KSearch("iq6_k", 2.0, 0.25, "scan", ntry=5, step=1.0, refit=True, nmax=127,
                     lmax=127),
}


# ----------------------------------------------------------------------------------------------
# Stage 2 for iq2_k: exhaustive search over splits of the sorted block into four runs
# ----------------------------------------------------------------------------------------------

def _split_triples(n: int) -> np.ndarray:
    """All ``(i1, i2, i3)`` with ``0 <= i1 <= i2 <= i3 < n``: run boundaries of four runs."""
    return np.array([(a, b, c) for a in range(n) for b in range(a, n) for c in range(b, n)],
                    dtype=np.int32)


def splits_block_scales(xt, wt, grid: np.ndarray, group: int = 16):
    """Best scale and grid per block for 4-value grids, searched exhaustively.

    With the block sorted, the nearest-value rounding for any scale assigns contiguous runs of
    the sorted weights to the four grid values (or to them in reverse order for a negative
    scale). Every split into four runs (empty runs allowed, the last non-empty), for both grids
    and both orders, is scored by the least-squares gain from prefix sums, so this finds the
    global optimum of the block's weighted fit over all scales.

    Returns ``(d [nb], sel int32 [nb])``.
    """
    n = xt.shape[0]
    # Sort each block (a sort along the minor axis of [nb, n]), carrying the weights along.
    keys, vals = jax.lax.sort((xt.T, wt.T), dimension=1, num_keys=1)
    # Prefix sums S[k] = sum_{j<k} as one [n+1, n] lower-triangular product (no scan).
    tri = jnp.asarray(np.tril(np.ones((n + 1, n), np.float32), -1))
    hi = jax.lax.Precision.HIGHEST
    SX = jnp.dot(tri, (keys * vals).T, precision=hi)   # [n+1, nb] prefix sums of w*x
    SW = jnp.dot(tri, vals.T, precision=hi)            # [n+1, nb] prefix sums of w
    if grid.shape[1] != 4:
        raise ValueError("splits_block_scales handles 4-value grids (four runs)")
    # Per split, the runs take the grid's values in order (positive scale) or reversed
    # (negative scale); candidates go grid 0, grid 1, reversed 0, reversed 1, the reference's
    # order, so ties resolve as there. With S the prefix sums, sum w q x over runs
    # [0,i1) [i1,i2) [i2,i3) [i3,n) is a0*S[i1] + a1*S[i2] + a2*S[i3] + v3*S[n] with
    # a_k = v_k - v_(k+1); sum w q^2 likewise with squared values.
    variants = [(s, grid[s]) for s in range(grid.shape[0])]
    variants += [(s, grid[s][::-1]) for s in range(grid.shape[0])]
    coef = []
    for s, v in variants:
        v = v.astype(np.float32)
        v2 = v * v
        coef.append((s, (v[0] - v[1], v[1] - v[2], v[2] - v[3]),
                     (v2[0] - v2[1], v2[1] - v2[2], v2[2] - v2[3]),
                     v[3] * SX[n], v2[3] * SW[n]))   # loop-invariant last-run terms

    triples = _split_triples(n)
    ng = -(-len(triples) // group)
    pad = ng * group - len(triples)
    # Padding repeats the last split: identical score, never strictly better.
    tab = jnp.asarray(np.concatenate([triples, np.repeat(triples[-1:], pad, 0)]).reshape(
        ng, group, 3))

    def body(g, carry):
        bqx, bq2, bsel = carry
        t = tab[g]
        for k in range(group):
            rows_x = [jax.lax.dynamic_index_in_dim(SX, t[k, r], keepdims=False) for r in range(3)]
            rows_w = [jax.lax.dynamic_index_in_dim(SW, t[k, r], keepdims=False) for r in range(3)]
            for s, a, b, cx, c2 in coef:
                qx = a[0] * rows_x[0] + a[1] * rows_x[1] + a[2] * rows_x[2] + cx
                q2 = b[0] * rows_w[0] + b[1] * rows_w[1] + b[2] * rows_w[2] + c2
                # gain qx^2/q2 > bqx^2/bq2 without a division; the start (0, 1) is beaten by
                # any candidate with qx != 0, and q2 == 0 implies qx == 0 (all weights >= 0).
                better = qx * qx * bq2 > bqx * bqx * q2
                bqx = jnp.where(better, qx, bqx)
                bq2 = jnp.where(better, q2, bq2)
                bsel = jnp.where(better, s, bsel)
        return bqx, bq2, bsel

    nb = xt.shape[1]
    init = (jnp.zeros(nb, jnp.float32), jnp.ones(nb, jnp.float32), jnp.zeros(nb, jnp.int32))
    bqx, bq2, bsel = jax.lax.fori_loop(0, ng, body, init)
    bq2 = jnp.where(bqx != 0, bq2, 0.0)
    d = jnp.where(bq2 > 0, bqx / jnp.where(bq2 > 0, bq2, 1), 0.0)
    return d, bsel


# ----------------------------------------------------------------------------------------------
# Stage 3: super-block scale and integer block scales
# ----------------------------------------------------------------------------------------------

def _lsq_int_scale(s, w, nmax: int):
    """Weighted least-squares fit ``s ~ d * l`` with integers ``l`` in ``[-nmax, nmax-1]``.

    ``s`` and ``w`` are ``[n, S]`` (position-major over super-blocks). Tries the inverse scales
    ``-(nmax + k/10) / max`` for ``|k| <= 9`` (the largest value mapped near ``-nmax``) and
    keeps the best gain. Returns ``d [S]`` (0 where all ``s`` are 0).
    """
    smax = C.signed_absmax(s)
    ok = smax != 0
    smax = jnp.where(ok, smax, 1.0)
    bx = jnp.zeros_like(smax)
    b2 = jnp.zeros_like(smax)
    for k in [0] + [k for k in range(-9, 10) if k != 0]:
        inv = -(nmax + np.float32(0.1) * k) / smax
        l = jnp.clip(jnp.round(inv * s), -nmax, nmax - 1)
        lx = C.block_sum(w * s * l)
        l2 = C.block_sum(w * l * l)
        if k == 0:
            bx, b2 = lx, l2
            continue
        better = (l2 > 0) & (lx * lx * b2 > bx * bx * l2)
        bx = jnp.where(better, lx, bx)
        b2 = jnp.where(better, l2, b2)
    return jnp.where(ok & (b2 > 0), bx / jnp.where(b2 > 0, b2, 1), 0.0)


def super_scale(cfg: KSearch, scales, sw):
    """Super-block scale and integer block scales.

    Args:
      scales: ``[S, 16]`` float block scales (0 for skipped blocks).
      sw: ``[S, 16]`` summed search weight per block (iq2_k's fit weights).

    Returns:
      ``(d [S], ls int32 [S, 16] signed integer scale, packed int32 [S, 16], ok bool [S])``;
      ``ok`` is False where the super-block is quantized as zero.
    """
    if cfg.super_scale == "lsq":
        d = _lsq_int_scale(scales.T, sw.T, cfg.nmax)
        ok = d != 0
        inv = jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0)
        ls = jnp.clip(jnp.round(inv[:, None] * scales), -cfg.nmax, cfg.lmax).astype(jnp.int32)
        return d, ls, ls + cfg.nmax, ok
    if cfg.super_scale == "odd":
        amax = jnp.max(jnp.abs(scales), axis=-1)
        ok = amax > 0
        d = amax / 31
        inv = jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0)
        u = jnp.clip(jnp.round(0.5 * (inv[:, None] * jnp.abs(scales) - 1)), 0, 15).astype(jnp.int32)
        neg = scales < 0
        ls = (2 * u + 1) * jnp.where(neg, -1, 1)
        return d, ls, u | (neg.astype(jnp.int32) << 4), ok
    smax = C.first_signed_absmax(scales)
    ok = smax != 0
    d = -smax / cfg.nmax
    inv = jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0)
    ls = jnp.clip(jnp.round(inv[:, None] * scales), -cfg.nmax, cfg.lmax).astype(jnp.int32)
    if registry.descriptor(cfg.name).scale_kind == "int8":
        packed = ls & 0xFF
    else:
        packed = ls + cfg.nmax
    return d, ls, packed, ok


# ----------------------------------------------------------------------------------------------
# The whole search
# ----------------------------------------------------------------------------------------------

def _round_weights(xt, dl, sel, grid):
    """Indices and values of every weight for per-block step ``dl`` ``[nb]`` (0 -> index 0)."""
    ok = dl != 0
    inv = jnp.where(ok, 1.0 / jnp.where(ok, dl, 1.0), 0.0)
    idx, val = C.nearest(xt * inv[None, :], grid, sel[None, :], want_index=True)
    idx = jnp.where(ok[None, :], idx, 0)
    return idx, val


def _sb_sum(v):
    return C.per_superblock(v, NBLK).sum(axis=-1)


@functools.partial(jax.jit, static_argnames=("name",))
def search_fields(xs, qw, use_qw, refine, name: str):
    """The jitted search over super-blocks.

    Args:
      xs: float32 ``[S, 256]`` super-blocks (rows of the matrix cut into 256s).
      qw: float32 ``[S, 256]`` importance of every weight (any values when unused).
      use_qw: bool scalar: whether ``qw`` is used.
      refine: bool scalar: run stages 4-5 (off: the reference algorithm's own result).
      name: the type.

    The two flags are traced, so every variant of a type shares one compiled program.

    Returns:
      dict with ``q`` uint8 ``[S, 256]``, ``scale`` and ``sel`` uint8 ``[S, 16]`` (packed
      values) and ``d`` uint16 ``[S]`` (fp16 bits).
    """
    cfg = SEARCHES[name]
    grid = C.grid_pair(name)
    S = xs.shape[0]
    # Thresholds on original magnitudes (see common.py).
    bamax = jnp.max(jnp.abs(xs.reshape(S, NBLK, BS)), axis=-1).reshape(-1)   # [nb]
    qw = C.usable_imatrix(xs, qw, BS)
    xn, e = C.normalise_superblocks(xs)
    w = jnp.where(use_qw, C.search_weights(xn, qw, cfg.sigma_mul, cfg.plain_sigma),
                  C.search_weights(xn, None, cfg.sigma_mul, cfg.plain_sigma))
    xt = C.to_blocks(xn, BS)     # [16, nb]
    wt = C.to_blocks(w, BS)
    live = bamax >= C.ZERO_BLOCK

    # Stage 2: block scales.
    if cfg.block_search == "splits":
        d_blk, sel = splits_block_scales(xt, wt, grid)
    else:
        bmax = C.signed_absmax(xt)
        bmax = jnp.where(live & (bmax != 0), bmax, 1.0)
        d_blk, sel = C.scan_block_scales(xt, wt, bmax, grid, cfg.ntry, cfg.step)
        if cfg.refit:
            d_blk = C.refit_block_scale(xt, wt, d_blk, sel, grid)
    d_blk = jnp.where(live, d_blk, 0.0)
    sel = jnp.where(live & (d_blk != 0), sel, 0)

    # Stage 3: super-block scale, integer block scales, re-rounding.
    sw = C.per_superblock(C.block_sum(wt), NBLK)
    d_sb, ls, packed, ok = super_scale(cfg, C.per_superblock(d_blk, NBLK), sw)
    lsf = ls.astype(jnp.float32)
    dl = (d_sb[:, None] * lsf).reshape(-1)
    idx, val = _round_weights(xt, dl, sel, grid)
    q = val * lsf.reshape(-1)[None, :]
    has = (dl != 0)[None, :]
    qx = _sb_sum(C.block_sum(jnp.where(has, wt * q * xt, 0.0)))
    q2 = _sb_sum(C.block_sum(jnp.where(has, wt * q * q, 0.0)))
    d_fit = jnp.where(q2 > 0, qx / jnp.where(q2 > 0, q2, 1), d_sb)
    d_out = _fp16_round_norm(np.float32(cfg.stretch) * d_fit, e)

    # Stage 4: multiples of the refit, each judged with the indices re-rounded for the
    # fp16 value the decoder will see; the reference's own choice is the first candidate.
    # With ``refine`` off the loop runs zero steps and stage 3's result stands.
    mults = jnp.asarray([cfg.stretch] + [m for m in cfg.refine_mults if m != cfg.stretch],
                        jnp.float32)

    def cand(dm):
        dlm = (dm[:, None] * lsf).reshape(-1)
        idx_m, val_m = _round_weights(xt, dlm, sel, grid)
        r = xt - dlm[None, :] * val_m
        return idx_m, _sb_sum(C.block_sum(wt * r * r))

    def body(i, carry):
        d_best, idx_best, err_best = carry
        # candidate 0 is the reference's own choice (stretch * refit)
        dm = jnp.where(i == 0, d_out, _fp16_round_norm(mults[i] * d_fit, e))
        idx_m, err = cand(dm)
        better = err < err_best
        bb = jnp.repeat(better, NBLK)[None, :]
        return (jnp.where(better, dm, d_best), jnp.where(bb, idx_m, idx_best),
                jnp.where(better, err, err_best))

    init = (d_out, idx, jnp.full((S,), jnp.inf, jnp.float32))
    steps = jnp.where(refine, mults.shape[0], 0)
    d_out, idx, _ = jax.lax.fori_loop(0, steps, body, init)

    # Stage 5: per block, try the neighbouring packed scales and the other grid with the
    # chosen d, keep the lowest weighted error; then refit d by least squares once more,
    # re-round for its fp16 value and keep that only where it lowers the super-block error.
    # Candidate (0, 0) is the current state and ties keep it, so nothing gets worse.
    desc = registry.descriptor(name)
    lut = jnp.asarray(desc.scale_lut, jnp.float32)
    nscale = 1 << desc.scale_bits
    pk = packed.reshape(-1)
    dqb = jnp.repeat(d_out, NBLK)
    combos = jnp.asarray([(0, 0), (-1, 0), (1, 0), (0, 1), (-1, 1), (1, 1)], jnp.int32)
    nsel = grid.shape[0]

    def polish(i, carry):
        pk_b, sel_b, idx_b, err_b = carry
        dlt, flip = combos[i, 0], combos[i, 1]
        p = pk + dlt
        sl = jnp.where(flip == 1, (sel + 1) % nsel, sel)
        valid = (p >= 0) & (p < nscale) & ((flip == 0) | (nsel > 1))
        dlm = dqb * lut[jnp.clip(p, 0, nscale - 1)]
        idx_m, val_m = _round_weights(xt, dlm, sl, grid)
        r = xt - dlm[None, :] * val_m
        err = C.block_sum(wt * r * r)
        better = valid & (err < err_b)
        return (jnp.where(better, p, pk_b), jnp.where(better, sl, sel_b),
                jnp.where(better[None, :], idx_m, idx_b), jnp.where(better, err, err_b))

    init = (pk, sel, idx, jnp.full(pk.shape, jnp.inf, jnp.float32))
    pk2, sel2, idx2, _ = jax.lax.fori_loop(0, jnp.where(refine, combos.shape[0], 0), polish,
                                           init)
    l2 = lut[pk2]
    _, val2 = _round_weights(xt, dqb * l2, sel2, grid)   # values of idx2
    q = val2 * l2[None, :]
    qx = _sb_sum(C.block_sum(wt * q * xt))
    q2 = _sb_sum(C.block_sum(wt * q * q))
    d_ref = _fp16_round_norm(jnp.where(q2 > 0, qx / jnp.where(q2 > 0, q2, 1), d_out), e)
    dlr = jnp.repeat(d_ref, NBLK) * l2
    idx3, val3 = _round_weights(xt, dlr, sel2, grid)
    r3 = xt - dlr[None, :] * val3
    err3 = _sb_sum(C.block_sum(wt * r3 * r3))
    r2 = xt - (dqb * l2)[None, :] * val2
    err2 = _sb_sum(C.block_sum(wt * r2 * r2))
    use3 = refine & (err3 < err2)
    d_out = jnp.where(use3, d_ref, d_out)
    # With ``refine`` off both loops ran zero steps, so idx2/sel2/pk2 are stage 3's values.
    idx = jnp.where(jnp.repeat(use3, NBLK)[None, :], idx3, idx2)
    sel = sel2
    packed = pk2.reshape(S, NBLK)

    d_bits = C.to_fp16_bits(C.ldexp_safe(d_out, e))
    okb = jnp.repeat(ok, NBLK)
    idx = jnp.where(okb[None, :], idx, 0)
    # Every packed field of these types fits a byte (q <= 6 bits, scale <= 8): ship uint8.
    return {
        "q": C.from_blocks(idx, (S, QK_K)).astype(jnp.uint8),
        "scale": jnp.where(ok[:, None], packed, 0).astype(jnp.uint8),
        "sel": jnp.where(ok[:, None], C.per_superblock(sel, NBLK), 0).astype(jnp.uint8),
        "d": jnp.where(ok, d_bits, jnp.uint16(0)),
    }


def _fp16_round_norm(d, e):
    """``d`` (normalised units) rounded as the fp16 of ``d * 2**e`` will decode, back in
    normalised units (so candidate scales are judged with the precision the decoder sees)."""
    full = jnp.clip(C.ldexp_safe(d, e), -C.FP16_MAX, C.FP16_MAX)
    return C.ldexp_safe(full.astype(jnp.float16).astype(jnp.float32), -e)


CHUNK = 4096        # super-blocks per compiled call for large inputs (1M weights)
MIN_BUCKET = 256    # smallest padded size, so small inputs share compiled programs


def bucket(S: int) -> int:
    """Padded super-block count of one call: a power of two up to ``CHUNK``."""
    return min(CHUNK, max(MIN_BUCKET, 1 << max(0, S - 1).bit_length()))


def run_search(name: str, x, imatrix=None, refine: bool = True) -> dict:
    """Runs the jitted search of ``name`` over ``x`` ``[R, n]`` in fixed-size chunks.

    Super-blocks are padded with zeros up to :func:`bucket` sizes (zero super-blocks quantize
    to zero and are dropped), so every input shape reuses a handful of compiled programs and
    memory stays bounded for any matrix size. Returns numpy fields as :func:`search_fields`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    R, n = x.shape
    xs = x.reshape(-1, QK_K)
    S = xs.shape[0]
    if imatrix is not None:
        qw = np.broadcast_to(np.asarray(imatrix, np.float32).reshape(1, n // QK_K, QK_K),
                             (R, n // QK_K, QK_K)).reshape(-1, QK_K)
    else:
        qw = None
    use = imatrix is not None
    outs = []
    for s0 in range(0, S, CHUNK):
        m = min(CHUNK, S - s0)
        B = bucket(m)
        xc = np.zeros((B, QK_K), np.float32)
        xc[:m] = xs[s0:s0 + m]
        wc = np.ones((B, QK_K), np.float32)
        if qw is not None:
            wc[:m] = qw[s0:s0 + m]
        # Dispatch every chunk before fetching any: the device works while the host pads.
        outs.append((m, search_fields(xc, wc, use, bool(refine), name)))
    fields = {}
    for m, o in outs:
        o = jax.device_get(o)
        for k, v in o.items():
            fields.setdefault(k, []).append(np.asarray(v)[:m])
    return {k: np.concatenate(v) for k, v in fields.items()}


def _search(name: str):
    desc = registry.descriptor(name)

    def search(x, imatrix, refine: bool = True):
        R, n = np.shape(x)
        f = run_search(name, x, imatrix, refine)
        blocks = C.pack_superblocks(desc, {k: f[k] for k in ("q", "scale", "sel")}, f["d"])
        return spec.assemble_rows(None, blocks.reshape(R, n // QK_K, -1), desc)

    search.__name__ = f"search_{name}"
    search.__doc__ = (f"{name} search: float32 [rows, n] (+ importance [n] or None) -> uint8 "
                      f"[rows, row_bytes] as ik_llama.cpp decodes it.")
    return search


for _name in SEARCHES:
    register_search(_name)(_search(_name))
