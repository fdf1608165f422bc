"""Quantizer searches of the row-scaled IQK types: iq2_ks, iq3_ks, iq4_ks, iq5_ks, iq4_kss, iq2_kl.

Re-derived from ik_llama.cpp's per-row quantizers and vectorised: each type is a
:class:`KsSearch` descriptor (frozen dataclass) read by one generic search made of a few jitted
stages (see :mod:`iqk_jax.quant.ks_common` for the shape of the search). What differs:

* the block pass's candidate inverse scales: ``2 * ntry + 1`` numerators ``v0 + k * step``
  around the grid minimum ``v0`` (divided by the block's signed maximum), for each grid of the
  pair and each sign. With an importance vector the same count spans a wider range
  (``im_step``): scales that clip an unimportant block maximum then pay off. iq2_ks uses the
  half-step fan of ik_llama.cpp's fast iq2_ks search instead of its exhaustive partition search
  (same or better error on the conformance sets at a fraction of the work); iq4_kss tries the
  positive sign only (as ik_llama.cpp effectively does: its negative-sign candidates are pruned
  with the wrong sign and rarely win, and trying them properly over-fits the plain ``x**2``
  weights);
* how the row scale follows from the block scales (``row_map``): ``odd127`` (7-bit odd block
  scales ``2u - 127``, row scale ``max|scale| / 127``), ``signed16``/``signed32`` (row scale
  ``-scale_of_max / 16`` (32), block integers in ``[-16, 15]`` (``[-32, 31]``)) or ``qx16``
  (a weighted least-squares 5-bit quantization of all block scales of the row, iq2_ks);
* the importance weights without imatrix (``plain``), the ``sigma2`` factor and the factor on
  the refitted row scale (``fudge``), all as the reference has them;
* iq4_kss: every 16-bit word of four 4-bit indices must have an even number of set bits (the
  format's Gray code drops one bit); rounding takes, per word, the cheapest representable
  pattern (exact, where the reference nudges one index by at most 2);
* iq2_kl: the grid is 2-D (one 5-bit index per pair of weights); rounding is an exact weighted
  nearest-point search over the 32 points (the reference rounds each coordinate and then checks
  8 listed neighbours), and block candidates are ranked by their error at their own scale, the
  winner then refined by least squares.

Beyond the reference the row pass tries, for every block, the integer scale on either side of
the rounded one and both grids of the pair, keeps the one with the least weighted error, refits
the row scale and repeats (``row_iters``); the stored (header-rounded) row scale is used for the
final rounding, so the bytes decode to exactly what the search scored.

Each search returns the packed rows, ``uint8 [rows, row_bytes]``, as ik_llama.cpp writes them
(row header included); same input, same bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import jax
import jax.numpy as jnp

from iqk_jax import registry
from iqk_jax.quant import register_search
from iqk_jax.quant import ks_common as kc
from iqk_jax.registry import QK_K

BLOCK = kc.BLOCK
_EVEN4 = np.array([i for i in range(16) if bin(i).count("1") % 2 == 0])
_ODD4 = np.array([i for i in range(16) if bin(i).count("1") % 2 == 1])


@dataclasses.dataclass(frozen=True)
class KsSearch:
    """How one row-scaled type is searched.

    Attributes:
      name: the IQK type.
      ntry: block pass candidates per grid and sign: ``2 * ntry + 1`` inverse scales.
      step: spacing of the candidate numerators (grid units).
      sigma_factor: ``sigma2 = sigma_factor * mean(x**2)`` of the super-block.
      plain: importance form without imatrix (see ``ks_common.search_weights``).
      row_map: ``odd127``, ``signed16``, ``signed32`` or ``qx16`` (see module docstring).
      fudge: factor on the refitted row scale (ik_llama.cpp's tuned values).
      row_iters: rounds of (choose block integers and grids, refit the row scale).
      block_refine: extra alternations in the block pass.
      initial: extra (numerator, grid) candidates tried first in the block pass.
      parity: iq4_kss's even-popcount constraint on words of four indices.
      pairs: iq2_kl's 2-D grid.
      max_weights: weights per jitted chunk of rows (bounds the memory of the search).
      im_step: candidate spacing used instead of ``step`` when an importance vector is given
        (same number of candidates, wider span: with importance weights, scales that clip an
        unimportant block maximum pay off; without, they do not).
      neighbours: when the row pass also tries the block integers next to the rounded one:
        ``always``, ``imatrix`` (only with an importance vector) or ``never``. Without an
        importance vector the search weights are ``x**2``-like, and optimising them harder
        trades plain RMSE for error on the largest weights.
      reround: whether the final rounding uses the stored row scale (else the last iteration's).
      block_parity: iq4_kss: whether block pass candidates are rounded under the parity rule.
      signs: the signs of the candidate inverse scales in the block pass.
    """

    name: str
    ntry: int
    step: float = 1.0
    sigma_factor: float = 2.0
    plain: str = "x2"
    row_map: str = "odd127"
    fudge: float = 1.0
    row_iters: int = 2
    block_refine: int = 1
    initial: tuple = ()
    parity: bool = False
    pairs: bool = False
    max_weights: int = 1 << 20
    neighbours: str = "always"
    reround: bool = True
    block_parity: bool = True
    signs: tuple = (1, -1)
    im_step: float | None = None

    def __post_init__(self):
        if self.row_map not in ("odd127", "signed16", "signed32", "qx16"):
            raise ValueError(f"{self.name}: unknown row_map {self.row_map!r}")
        if self.neighbours not in ("always", "imatrix", "never"):
            raise ValueError(f"{self.name}: unknown neighbours {self.neighbours!r}")
        if self.ntry < 0 or self.row_iters < 1 or self.block_refine < 0:
            raise ValueError(f"{self.name}: ntry/block_refine must be >= 0 and row_iters >= 1")

    @property
    def desc(self):
        return registry.descriptor(self.name)

    @property
    def grids(self) -> np.ndarray:
        """float32 [G, K] (scalar grids) or [1, 32, 2] (iq2_kl)."""
        g = self.desc.grid_values
        return g[..., 0] if g.shape[-1] == 1 else g


SEARCHES = {
    s.name: s for s in (
        KsSearch("iq2_ks", ntry=13, step=0.5, im_step=1.2, sigma_factor=1.5, plain="x2+sigma",
                 row_map="qx16", fudge=1.03, initial=((22.0, 0),)),
        KsSearch("iq3_ks", ntry=5, im_step=2.5, row_map="signed16"),
        KsSearch("iq4_ks", ntry=5, step=1.4, im_step=3.6),
        KsSearch("iq5_ks", ntry=3, step=1.5, im_step=6.0, neighbours="imatrix", row_iters=1),
        KsSearch("iq4_kss", ntry=7, im_step=2.5, parity=True, fudge=1.01, signs=(1,)),
        KsSearch("iq2_kl", ntry=5, im_step=2.0, sigma_factor=2.25, plain="abs", row_map="signed32",
                 fudge=1.025, pairs=True, max_weights=1 << 18),
    )
}


# ----------------------------------------------------------------------------------------------
# Rounding a block for a given scale
# ----------------------------------------------------------------------------------------------

def _round_scalar(xb, wb, dl, grid):
    """Indices and values of ``xb`` [..., 32] rounded to ``grid`` ([K]) at scale ``dl`` [...]."""
    ok = dl != 0
    t = xb * jnp.where(ok, 1.0 / jnp.where(ok, dl, 1.0), 0.0)[..., None]
    val, idx = kc.round_to_grid(t, grid)
    return idx, val


def _round_parity(xb, wb, dl, grid):
    """Like ``_round_scalar`` under iq4_kss's rule: each word of 4 indices has even popcount.

    Word ``k`` of a block holds weights ``2k, 2k+1, 2k+16, 2k+17``. Per weight the nearest
    even-popcount and odd-popcount indices are found (sub-grids of 8 values); each weight takes
    the cheaper one (weighted error at scale ``dl``), and a word left with odd parity switches the
    weight whose switch costs least: the cheapest representable rounding of the word.

    Args:
      xb, wb: [..., 32]; dl: scale [...] broadcastable to ``xb.shape[:-1]``; grid: [K] or
        [..., K] values (one grid per block).
    """
    ok = dl != 0
    t = xb * jnp.where(ok, 1.0 / jnp.where(ok, dl, 1.0), 0.0)[..., None]
    g = grid[..., None, :] if grid.ndim > 1 else grid
    ve, ie = kc.round_to_grid(t, g[..., _EVEN4], labels=_EVEN4)
    vo, io = kc.round_to_grid(t, g[..., _ODD4], labels=_ODD4)
    dlx = dl[..., None]
    ce = wb * jnp.square(xb - dlx * ve)
    co = wb * jnp.square(xb - dlx * vo)
    odd = co < ce
    lead = odd.shape[:-1]
    # [..., 32] -> [..., 2, 8, 2]: (half h, word k, byte j) of weight 16h + 2k + j.
    o4 = odd.reshape(lead + (2, 8, 2))
    c4 = jnp.abs(ce - co).reshape(lead + (2, 8, 2))
    par = (o4[..., 0, :, 0] ^ o4[..., 0, :, 1] ^ o4[..., 1, :, 0] ^ o4[..., 1, :, 1])   # [..., 8]
    # The cheapest switch per word, first of equals (order j0h0, j1h0, j0h1, j1h1).
    elems = [c4[..., 0, :, 0], c4[..., 0, :, 1], c4[..., 1, :, 0], c4[..., 1, :, 1]]
    best = elems[0]
    pick = jnp.zeros(best.shape, jnp.int32)
    for i in range(1, 4):
        lt = elems[i] < best
        best = jnp.where(lt, elems[i], best)
        pick = jnp.where(lt, i, pick)
    flips = [par & (pick == i) for i in range(4)]
    flip = jnp.stack([jnp.stack([flips[0], flips[1]], -1), jnp.stack([flips[2], flips[3]], -1)], -3)
    odd = odd ^ flip.reshape(lead + (32,))
    return jnp.where(odd, io, ie), jnp.where(odd, vo, ve)


@functools.lru_cache(maxsize=None)
def _pair_grid():
    """iq2_kl's 2-D grid as (V, ij, pts): the sorted coordinate values V [8], for every point
    the indices (i, j) of its two coordinates in V, and the points [32, 2]."""
    pts = registry.descriptor("iq2_kl").grid_values[0]
    V = np.unique(pts)
    ij = tuple((int(np.searchsorted(V, a)), int(np.searchsorted(V, b))) for a, b in pts)
    return V, ij, pts


def _pair_split(xb, wb):
    """(x1, x2, w1, w2) [..., 16]: the two weights of every pair and their importances.

    A tiny extra importance breaks exact ties (zero importance) toward the point nearest in
    both coordinates.
    """
    eps = 1e-6 * jnp.mean(wb, -1, keepdims=True) + 1e-30
    w = wb + eps
    return xb[..., 0::2], xb[..., 1::2], w[..., 0::2], w[..., 1::2]


def _round_pairs(pairs, inv, full: bool):
    """Best grid point per pair at inverse scale ``inv`` [...] (iq2_kl).

    At scale ``d = 1 / inv`` the weighted error of a pair rounded to point (g1, g2) is
    ``w1 (x1 - d g1)**2 + w2 (x2 - d g2)**2 = const - d**2 (f1(g1) + f2(g2))`` with
    ``f(g) = g (2 inv w x - w g)``: separable, so the 8 values of f per coordinate are computed
    once and each of the 32 points costs one add and one max.

    Returns ``M`` [..., 16], the per-pair maximum of ``f1 + f2`` (so the block error at that
    scale is ``sum(w x**2) - d**2 * sum(M)``), and with ``full`` also (index, g1, g2) of the
    best point (first on ties), else None.
    """
    V, ij, _ = _pair_grid()
    x1, x2, w1, w2 = pairs
    a1 = 2.0 * inv[..., None] * w1 * x1
    a2 = 2.0 * inv[..., None] * w2 * x2
    f1 = [float(v) * (a1 - w1 * float(v)) for v in V]
    f2 = [float(v) * (a2 - w2 * float(v)) for v in V]
    if not full:
        # max over points of f1[i] + f2[j] = max over i of f1[i] + max over that i's j of f2[j];
        # the inner maxima share a balanced tree of pairwise maxima (~40% fewer operations).
        js_of = {}
        for i, j in ij:
            js_of.setdefault(i, []).append(j)
        memo = {}

        def max_of(js):
            if js not in memo:
                h = len(js) // 2
                memo[js] = f2[js[0]] if len(js) == 1 else _fmax(max_of(js[:h]), max_of(js[h:]))
            return memo[js]

        best = None
        for i, js in js_of.items():
            sc = f1[i] + max_of(tuple(sorted(js)))
            best = sc if best is None else _fmax(best, sc)
        return best, None
    _, _, pts = _pair_grid()
    best = f1[ij[0][0]] + f2[ij[0][1]]
    bi = jnp.zeros(best.shape, jnp.int32)
    g1 = jnp.full(best.shape, float(pts[0, 0]), jnp.float32)
    g2 = jnp.full(best.shape, float(pts[0, 1]), jnp.float32)
    for g, (i, j) in enumerate(ij[1:], 1):
        sc = f1[i] + f2[j]
        up = sc > best
        bi = jnp.where(up, g, bi)
        g1 = jnp.where(up, float(pts[g, 0]), g1)
        g2 = jnp.where(up, float(pts[g, 1]), g2)
        best = jnp.where(up, sc, best)
    return best, (bi, g1, g2)


def _fmax(a, b):
    # a compare and a select: cheaper than jnp.maximum's NaN-propagating form (no NaNs here)
    return jnp.where(a > b, a, b)


def _pair_sums(pairs, best):
    """(sum w x g, sum w g**2) over the last axis for the chosen points ``best = (idx, g1, g2)``
    of ``_round_pairs(..., full=True)``."""
    x1, x2, w1, w2 = pairs
    _, g1, g2 = best
    qx = kc.lsum(w1 * x1 * g1 + w2 * x2 * g2)
    q2 = kc.lsum(w1 * g1 * g1 + w2 * g2 * g2)
    return qx, q2


def _safe_inv(d):
    ok = d != 0
    return jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------
# Block pass
# ----------------------------------------------------------------------------------------------

def _numerators(cfg: KsSearch, v0s, initial, use_imatrix):
    """Candidate numerators (traced: they depend on ``use_imatrix``) and their grids (numpy)."""
    nums, gof = kc.block_candidates(v0s, cfg.ntry, cfg.step, initial, cfg.signs)
    if cfg.im_step is None:
        return jnp.asarray(nums), gof
    nums_im, gof_im = kc.block_candidates(v0s, cfg.ntry, cfg.im_step, initial, cfg.signs)
    assert (gof == gof_im).all()
    return jnp.where(use_imatrix, jnp.asarray(nums_im), jnp.asarray(nums)), gof


def _block_pass(cfg: KsSearch, xb, wb, use_imatrix):
    """Best float scale and grid per block: (d, sel, zero), each [R, NB]."""
    grids = cfg.grids
    if cfg.pairs:
        return _block_pass_pairs(cfg, xb, wb, use_imatrix)
    v0s = [float(g[0]) for g in grids]
    nums, gof = _numerators(cfg, v0s, cfg.initial, use_imatrix)
    if not (cfg.parity and cfg.block_parity):
        return kc.scalar_block_pass(xb, wb, grids, nums, gof, refine=cfg.block_refine)
    # iq4_kss: candidates are rounded under the parity rule at the candidate's own scale.
    amax, mx = kc.block_max(xb)
    zero = amax < kc.ZERO_BLOCK
    safe = jnp.where(zero, 1.0, mx)

    def evaluate(c):
        num, g, gi = c
        _, val = _round_parity(xb, wb, safe / num, g)
        wq = wb * val
        qx = kc.lsum(wq * xb)
        q2 = kc.lsum(wq * val)
        return kc.gain_of(qx, q2), (qx, q2, jnp.broadcast_to(gi, qx.shape))

    z = jnp.zeros(xb.shape[:-1], jnp.float32)
    _, (bqx, bq2, sel), _ = kc.scan_candidates(
        evaluate, (nums, jnp.asarray(grids[gof]), jnp.asarray(gof)),
        (z - 0.5, (z, z, jnp.zeros(z.shape, jnp.int32))))
    d = jnp.where(zero, 0.0, kc.weighted_refit(bqx, bq2, 0.0))
    zero = zero | (d == 0)
    sel = jnp.where(zero, 0, sel)
    return d, sel, zero


def _block_pass_pairs(cfg: KsSearch, xb, wb, use_imatrix):
    """iq2_kl block pass: candidates ranked by their error at their own scale, then the winner
    alternates (best points, least-squares scale) ``1 + block_refine`` times."""
    amax, mx = kc.block_max(xb)
    zero = amax < kc.ZERO_BLOCK
    safe = jnp.where(zero, 1.0, mx)
    # iq2_kl's points are pairs of values of the first 3-bit grid; candidates fan out from its
    # most negative value like the scalar types.
    V, _, _ = _pair_grid()
    nums, _ = _numerators(cfg, [float(V[0])], ((-float(V[0]), 0),), use_imatrix)
    pairs = _pair_split(xb, wb)

    def evaluate(num):
        inv = num / safe
        m, _ = _round_pairs(pairs, inv, full=False)
        return kc.lsum(m) / (inv * inv), inv   # d**2 * sum(M): the error reduction

    z = jnp.zeros(xb.shape[:-1], jnp.float32)
    _, inv, _ = kc.scan_candidates(evaluate, nums, (z - jnp.inf, z + 1.0))

    def refine(_, d):
        _, best = _round_pairs(pairs, _safe_inv(d), full=True)
        qx, q2 = _pair_sums(pairs, best)
        return kc.weighted_refit(qx, q2, d)

    d = jax.lax.fori_loop(0, 1 + cfg.block_refine, refine, 1.0 / inv)
    d = jnp.where(zero, 0.0, d)
    zero = zero | (d == 0)
    return d, jnp.zeros(d.shape, jnp.int32), zero


# ----------------------------------------------------------------------------------------------
# Row pass
# ----------------------------------------------------------------------------------------------

def _int_range(cfg: KsSearch):
    """(lo, hi) of the packed block-scale integer, and its decoder to the signed multiplier."""
    if cfg.row_map == "odd127":
        return 0, 127, lambda u: 2.0 * u - 127.0
    if cfg.row_map == "signed32":
        return 0, 63, lambda u: u - 32.0
    return 0, 31, lambda u: u - 16.0


def _initial_row_scale(cfg: KsSearch, dblk, sw):
    """Row scale from the block scales [R, NB] (sw: summed importance per block)."""
    amax, mx = kc.block_max(dblk)
    if cfg.row_map == "odd127":
        return amax / 127.0
    if cfg.row_map == "signed16":
        return -mx / 16.0
    if cfg.row_map == "signed32":
        return -mx / 32.0
    # qx16: weighted least-squares fit of integers in [-16, 15] to the block scales, over the
    # inverse scales -(16 + 0.1 k) / max, k in -9..9.
    safe = jnp.where(amax > 0, mx, 1.0)
    ks = np.array([0] + [k for k in range(-9, 10) if k], np.float32)
    inv = -(16.0 + 0.1 * jnp.asarray(ks))[None, :] / safe[:, None]            # [R, 19]
    l = jnp.clip(jnp.round(inv[..., None] * dblk[:, None, :]), -16, 15)      # [R, 19, NB]
    slx = jnp.sum(sw[:, None, :] * dblk[:, None, :] * l, -1)
    sl2 = jnp.sum(sw[:, None, :] * l * l, -1)
    best = jnp.argmax(kc.gain_of(slx, sl2), -1)      # first of equal gains, like the reference
    bx = jnp.take_along_axis(slx, best[:, None], -1)[:, 0]
    b2 = jnp.take_along_axis(sl2, best[:, None], -1)[:, 0]
    return jnp.where(amax > 0, kc.weighted_refit(bx, b2, 0.0), 0.0)


def _nearest_int(cfg: KsSearch, dblk, d):
    """The packed block-scale integer nearest to ``dblk / d`` (d [R], dblk [R, NB])."""
    lo, hi, _ = _int_range(cfg)
    ok = d != 0
    r = dblk * jnp.where(ok, 1.0 / jnp.where(ok, d, 1.0), 0.0)[:, None]
    if cfg.row_map == "odd127":
        u = jnp.round(0.5 * (r + 127.0))
    elif cfg.row_map == "signed32":
        u = jnp.round(r) + 32.0
    else:
        u = jnp.round(r) + 16.0
    return jnp.clip(u, lo, hi)


def _choose_blocks(cfg: KsSearch, xb, wb, dblk, d, use_imatrix):
    """For row scale ``d``: per block the best (integer u, grid, indices) around round(dblk/d).

    Candidates: the integer nearest to ``dblk / d`` and (see ``KsSearch.neighbours``) its two
    neighbours, each with every grid of the pair; the least weighted error wins (the nearest
    integer and grid 0 on ties).

    Returns (u [R, NB], sel [R, NB], idx [R, NB, 32 or 16], sumqx [R], sumq2 [R]) where the sums
    are over the row with ``q = L(u) * grid_value`` (the least-squares refit's terms).
    """
    lo, hi, dec = _int_range(cfg)
    u0 = _nearest_int(cfg, dblk, d)
    G = 1 if cfg.pairs else cfg.grids.shape[0]
    steps = [0.0] if cfg.neighbours == "never" else [0.0, -1.0, 1.0]
    dd = d[:, None]

    if cfg.pairs:
        pairs = _pair_split(xb, wb)

        def evaluate(c):
            delta, _ = c
            u = jnp.clip(u0 + delta, lo, hi)
            dl = dd * dec(u)
            m, _ = _round_pairs(pairs, _safe_inv(dl), full=False)
            # error - sum(w x**2) = -dl**2 sum(M) (0 when dl == 0)
            return dl * dl * kc.lsum(m), u

        z = jnp.zeros(dblk.shape, jnp.float32)
        deltas = jnp.asarray(np.asarray(steps, np.float32))
        if cfg.neighbours == "imatrix":     # (same shapes: neighbours collapse onto delta 0)
            deltas = jnp.where(use_imatrix, deltas, 0.0)
        cands = (deltas, jnp.zeros(deltas.shape, jnp.int32))
        _, u, _ = kc.scan_candidates(evaluate, cands, (z - jnp.inf, z))
        L = dec(u)
        dl = dd * L
        _, best = _round_pairs(pairs, _safe_inv(dl), full=True)
        idx = best[0]
        qx, q2 = _pair_sums(pairs, best)
        return u, jnp.zeros(u.shape, jnp.int32), idx, jnp.sum(L * qx, -1), jnp.sum(L * L * q2, -1)

    rounder = _round_parity if cfg.parity else _round_scalar

    def evaluate(c):
        delta, g, gi = c
        u = jnp.clip(u0 + delta, lo, hi)
        L = dec(u)
        dl = dd * L
        idx, val = rounder(xb, wb, dl, g)
        wv = wb * val
        qx = kc.lsum(wv * xb)
        q2 = kc.lsum(wv * val)
        # weighted error minus sum(w x**2): -2 dl qx + dl**2 q2
        gain = dl * (2.0 * qx - dl * q2)
        return gain, (u, jnp.broadcast_to(gi, u.shape), idx, L * qx, L * L * q2)

    z = jnp.zeros(dblk.shape, jnp.float32)
    zi = jnp.zeros(dblk.shape, jnp.int32)
    init = (z - jnp.inf, (z, zi, jnp.zeros(dblk.shape + (BLOCK,), jnp.int32), z, z))

    def scan_over(steps_):
        g_of = np.tile(np.arange(G, dtype=np.int32), len(steps_))
        cands = (jnp.asarray(np.repeat(np.asarray(steps_, np.float32), G)),
                 jnp.asarray(cfg.grids[g_of]), jnp.asarray(g_of))
        return kc.scan_candidates(evaluate, cands, init)[1]

    if cfg.neighbours == "imatrix":
        # Without an importance vector only the rounded integer is tried (a third of the work).
        u, sel, idx, bqx, bq2 = jax.lax.cond(use_imatrix, lambda: scan_over(steps),
                                             lambda: scan_over(steps[:1]))
    else:
        u, sel, idx, bqx, bq2 = scan_over(steps)
    return u, sel, idx, jnp.sum(bqx, -1), jnp.sum(bq2, -1)


# Stages that depend on a few parameters only are shared between types (one compilation each).

@functools.partial(jax.jit, static_argnames=("sigma_factor", "plain"))
def _prepare(x, imatrix, use_imatrix, sigma_factor, plain):
    """Row-normalised weights and their search importance, as blocks [R, NB, 32]; and the
    row exponents [R]."""
    R, n = x.shape
    xn, e = kc.row_normalise(x)
    w_im = kc.search_weights(xn, kc.usable_imatrix(x, imatrix), sigma_factor, plain)
    w_pl = kc.search_weights(xn, None, sigma_factor, plain)
    w = jnp.where(use_imatrix, w_im, w_pl)
    return xn.reshape(R, n // BLOCK, BLOCK), w.reshape(R, n // BLOCK, BLOCK), e


@jax.jit
def _refit(d, sqx, sq2, fudge):
    """The least-squares row scale (times ``fudge``); rows with ``d == 0`` stay zero."""
    return jnp.where(d != 0, kc.weighted_refit(sqx, sq2, d) * fudge, 0.0)


@functools.partial(jax.jit, static_argnames=("hdr",))
def _store(d, e, hdr):
    """(stored header value, the scale it means in row-normalised units).

    The header holds ``d * 2**e`` rounded to its dtype; the final rounding uses exactly that
    value (0 where it overflowed: such rows are reported as an error)."""
    d_store = kc.denormalise(d, e).astype(hdr)
    ds = d_store.astype(jnp.float32)
    d_eff = jnp.where(jnp.isfinite(ds), kc.denormalise(ds, -e), 0.0)
    return d_store, d_eff


@functools.lru_cache(maxsize=None)
def _stages(name: str):
    """The jitted stages of one type's search (compiled once per input shape).

    The search runs as a few separately jitted stages driven from Python, so the row pass's
    rounding stage -- called ``row_iters + 1`` times -- is compiled once, and the presence of an
    importance vector is a traced flag rather than a second compilation.
    """
    cfg = SEARCHES[name]
    hdr = np.dtype(cfg.desc.header_dtype).name

    # A stage of its own: XLA compiles the candidate scan several times slower when the weight
    # computation sits in the same program.
    @jax.jit
    def block_pass(xb, wb, use_imatrix):
        dblk, _, _ = _block_pass(cfg, xb, wb, use_imatrix)
        return dblk, _initial_row_scale(cfg, dblk, jnp.sum(wb, -1))

    @jax.jit
    def choose(xb, wb, dblk, d, use_imatrix):
        return _choose_blocks(cfg, xb, wb, dblk, d, use_imatrix)

    @jax.jit
    def finish(u, sel, idx, d_eff, d_store):
        R, NB = u.shape
        S = NB * BLOCK // QK_K
        live = (d_eff != 0)[:, None]
        f = {"q": jnp.where(live[..., None], idx, 0).astype(jnp.int32).reshape(R, S, -1),
             "scale": jnp.where(live, u, 0).astype(jnp.int32).reshape(R, S, -1),
             "sel": jnp.where(live, sel, 0).astype(jnp.int32).reshape(R, S, -1)}
        ok = jnp.isfinite(d_store.astype(jnp.float32))
        d_out = jnp.where(ok & (d_eff != 0), d_store, jnp.zeros_like(d_store))
        return dict(f, d=d_out, raw=kc.pack_rows(f, d_out, cfg.desc), finite=ok)

    def run(x, imatrix, use_imatrix):
        xb, wb, e = _prepare(x, imatrix, use_imatrix, cfg.sigma_factor, cfg.plain)
        dblk, d = block_pass(xb, wb, use_imatrix)
        fudge = jnp.float32(cfg.fudge)
        for it in range(cfg.row_iters):
            u, sel, idx, sqx, sq2 = choose(xb, wb, dblk, d, use_imatrix)
            d = _refit(d, sqx, sq2, fudge)
        d_store, d_eff = _store(d, e, hdr)
        if cfg.reround:
            u, sel, idx, _, _ = choose(xb, wb, dblk, d_eff, use_imatrix)
        return finish(u, sel, idx, d_eff, d_store)

    return run


# Small inputs are padded to one of these widths (zero columns) and to 32 rows, so that small
# matrices of different shapes share one compiled search: for them compiling costs far more than
# searching. Zero super-blocks add nothing to any row statistic or least-squares sum (their
# importance is zero), so padding never changes the bytes of the real columns.
_SMALL_WIDTHS = (1536, 3072)
_SMALL_ROWS = 32


def _padded_shape(cfg: KsSearch, R: int, n: int):
    """(rows per call, padded width) for an [R, n] input."""
    if R <= _SMALL_ROWS and n <= _SMALL_WIDTHS[-1]:
        return _SMALL_ROWS, min(w for w in _SMALL_WIDTHS if w >= n)
    per = max(1, cfg.max_weights // n)
    return min(per, -(-R // _SMALL_ROWS) * _SMALL_ROWS), n


def search_fields(x, imatrix, name: str) -> dict:
    """Runs the search of ``name`` on x [R, n].

    Returns numpy arrays: the packed fields ``q``/``scale``/``sel`` [R, n // 256, ...], the row
    scale ``d`` [R] (header dtype), the packed rows ``raw`` uint8 [R, row_bytes] and ``finite``
    [R] (False where the row scale overflowed its header dtype).

    Rows are processed in chunks of at most ``max_weights`` weights, padded with zero rows to a
    multiple of 32 (or to a whole chunk) so that few distinct shapes get compiled; padding rows
    and columns are dropped from the result.
    """
    cfg = SEARCHES[name]
    desc = cfg.desc
    run = _stages(name)
    x = np.asarray(x, np.float32)
    R, n = x.shape
    rows, width = _padded_shape(cfg, R, n)
    use = imatrix is not None
    im = np.ones(width, np.float32)
    if use:
        im[:n] = np.asarray(imatrix, np.float32)
    im, flag = jnp.asarray(im), jnp.asarray(use)
    pad = (-R) % rows
    xp = np.zeros((R + pad, width), np.float32)
    xp[:R, :n] = x
    outs = [{k: np.asarray(v) for k, v in run(jnp.asarray(xp[s:s + rows]), im, flag).items()}
            for s in range(0, R + pad, rows)]
    out = {k: np.concatenate([o[k] for o in outs])[:R] for k in outs[0]}
    S = n // QK_K
    for k in ("q", "scale", "sel"):
        out[k] = out[k][:, :S]
    out["raw"] = out["raw"][:, :desc.row_bytes(n)]
    return out


def _make_search(name: str):
    def search(x, imatrix):
        x = np.asarray(x, np.float32)
        out = search_fields(x, imatrix, name)
        if not out["finite"].all():
            r = int(np.argmin(out["finite"]))
            hdr = registry.descriptor(name).header_dtype.__name__
            raise ValueError(
                f"{name}: row {r} (max |x| = {float(np.abs(x[r]).max()):.3g}) needs a row scale "
                f"beyond the range of its {hdr} row header; scale the tensor down or use a type "
                f"with a float32 row scale (iq4_ks, iq5_ks, iq4_kss)")
        return out["raw"]
    search.__name__ = f"search_{name}"
    search.__doc__ = (f"{name} rows as ik_llama.cpp writes them (uint8 [rows, row_bytes]) from "
                      f"x float32 [rows, n] and an optional importance vector [n].")
    return search


for _name in SEARCHES:
    register_search(_name)(_make_search(_name))
