"""The row-scaled quantizer searches (iq2_ks, iq3_ks, iq4_ks, iq5_ks, iq4_kss, iq2_kl).

Quality is judged against ik_llama.cpp's own quantization of the conformance inputs: per type,
over the 8 cases (4 sets x plain/imatrix), ``ratio = our weighted RMSE / ik's weighted_rmse``
must have median <= 1.00 and no case above 1.03.

Every test is parametrized over the types that have a row-scaled search, and most inputs are
[<=32, 1024] so that all tests of a type share one compiled search.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from iqk_jax import registry, spec
from iqk_jax.quant import ks_common, ksquants
from iqk_jax.quantize import quantize

from iqk_jax.testing import weighted_rmse
from conftest import SETS, VARIANTS, needs_conformance, vectors

TYPES = [t for t in registry.types() if t in ksquants.SEARCHES]
N = 1024
MEDIAN_MAX = 1.00
CASE_MAX = 1.03



def case_weights(inputs, set_name, variant):
    im = inputs[f"{set_name}.imatrix"]
    return (im, im) if variant == "imatrix" else (None, np.ones_like(im))


def search(name, x, imatrix=None):
    return np.asarray(ksquants._make_search(name)(np.asarray(x, np.float32), imatrix))


def decode(name, raw, n=N):
    return spec.dequantize(raw, name, n)


def rng(seed):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# Quality against ik_llama.cpp
# ----------------------------------------------------------------------------------------------


@needs_conformance
@pytest.mark.parametrize("name", TYPES)
def test_quality_vs_ik(name, inputs, manifest, record_property, capsys):
    rows, ratios = [], []
    for s in SETS:
        x = inputs[s]
        for var in VARIANTS:
            im, w = case_weights(inputs, s, var)
            raw = search(name, x, im)
            ours = weighted_rmse(x, decode(name, raw, x.shape[1]), w)
            ik = manifest["types"][name]["cases"][f"{s}.{var}"]["weighted_rmse"]
            ratios.append(ours / ik)
            rows.append(f"  {s + '.' + var:18s} ours {ours:12.6g}  ik {ik:12.6g}  "
                        f"ratio {ours / ik:.4f}")
    med, worst = float(np.median(ratios)), float(max(ratios))
    summary = f"  median {med:.4f} (limit {MEDIAN_MAX}), max {worst:.4f} (limit {CASE_MAX})"
    table = "\n".join([f"{name}: weighted RMSE vs ik_llama.cpp", *rows, summary])
    record_property(f"{name}_ratio_median", med)
    record_property(f"{name}_ratio_max", worst)
    with capsys.disabled():
        print("\n" + table)
    assert med <= MEDIAN_MAX and worst <= CASE_MAX, table


# ----------------------------------------------------------------------------------------------
# Format: the bytes decode, the jnp packer is the spec's packer, same input -> same bytes
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_bytes_decode_and_are_deterministic(name):
    x = rng(1).standard_normal((24, N)).astype(np.float32)
    im = rng(2).random(N).astype(np.float32) + 0.1
    a = search(name, x, im)
    b = search(name, x.copy(), im.copy())
    assert a.dtype == np.uint8 and a.shape == (24, registry.row_bytes(name, N))
    np.testing.assert_array_equal(a, b)
    y = decode(name, a)
    assert np.isfinite(y).all()
    # A real quantization, not noise: far below the signal (rms 1) for every type here.
    assert weighted_rmse(x, y, np.ones(N)) < 0.6


@pytest.mark.parametrize("name", TYPES)
def test_jnp_packer_matches_spec_pack(name):
    """The in-jit packer writes exactly what ``spec.pack`` + ``assemble_rows`` write."""
    x = (rng(3).standard_t(3, (20, N)) * 0.05).astype(np.float32)
    out = ksquants.search_fields(x, None, name)
    desc = registry.descriptor(name)
    fields = {k: out[k] for k in ("q", "scale", "sel")}
    blocks = spec.pack(fields, desc, out["q"].shape[:2])      # also checks iq4_kss parity
    np.testing.assert_array_equal(out["raw"], spec.assemble_rows(out["d"], blocks, desc))
    # and on ik's own fields, row headers included
    if name in ("iq4_kss", "iq2_kl"):
        raw = rng(4).integers(0, 256, (3, desc.row_bytes(N)), dtype=np.uint8)
        row_d, blk = spec.split_rows(raw, desc, N)
        f = spec.unpack(blk, desc)
        f = {k: f[k] for k in ("q", "scale", "sel")}
        got = np.asarray(ks_common.pack_rows(f, np.asarray(row_d).astype(desc.header_dtype), desc))
        if name == "iq2_kl":
            np.testing.assert_array_equal(got, raw)
        else:   # random bytes re-encode to the same decoded fields
            np.testing.assert_array_equal(spec.unpack(spec.split_rows(got, desc, N)[1], desc)["q"],
                                          f["q"])


@pytest.mark.parametrize("name", TYPES)
def test_public_quantize_dispatches_here(name):
    x = rng(5).standard_normal((8, N)).astype(np.float32)
    qa = quantize(x, name)
    np.testing.assert_array_equal(np.asarray(qa.raw), search(name, x))


# ----------------------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_zero_rows_and_blocks(name):
    x = rng(6).standard_normal((4, N)).astype(np.float32)
    x[0] = 0.0                      # an all-zero row
    x[1, 256:512] = 0.0             # an all-zero super-block
    x[2, 32:64] = 0.0               # an all-zero block of 32
    raw = search(name, x)
    y = decode(name, raw)
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_array_equal(raw[0], 0)
    # zero blocks decode to (nearly) zero: at most one grid step of the row's scale
    assert np.abs(y[1, 256:512]).max() <= 0.05 * np.abs(x[1]).max()
    assert np.abs(y[2, 32:64]).max() <= 0.05 * np.abs(x[2]).max()
    assert weighted_rmse(x[1:], y[1:], np.ones(N)) < 0.6


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1e3])
def test_scale_invariance(name, scale):
    """Tiny and large magnitudes quantize like unit ones (relative error), or to zero where the
    header's fp16 cannot hold the scale (then the error is below the values themselves)."""
    x = rng(7).standard_normal((4, N)).astype(np.float32)
    ref = weighted_rmse(x, decode(name, search(name, x)), np.ones(N))
    xs = (x * np.float32(scale)).astype(np.float32)
    y = decode(name, search(name, xs))
    assert np.isfinite(y).all()
    err = weighted_rmse(xs, y, np.ones(N)) / scale
    hdr = registry.descriptor(name).header_dtype
    if np.finfo(hdr).tiny * 100 < scale / 127 ** 2:
        assert err == pytest.approx(ref, rel=0.02)
    else:
        assert err <= 1.0 + 1e-6


@pytest.mark.parametrize("name", TYPES)
def test_huge_values(name):
    x = rng(8).standard_normal((2, N)).astype(np.float32) * np.float32(1e30)
    if registry.descriptor(name).row_header_bytes == 2:
        with pytest.raises(ValueError, match="row scale"):
            search(name, x)
        return
    y = decode(name, search(name, x))
    assert np.isfinite(y).all()
    assert weighted_rmse(x, y, np.ones(N)) < 0.6e30


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("height", [50.0, 0.5])
def test_spike(name, height):
    """One large weight per row among small noise (rms 0.01)."""
    x = (rng(9).standard_normal((2, N)) * 0.01).astype(np.float32)
    x[0, 77] = height
    x[1, 600] = -height
    y = decode(name, search(name, x))
    assert np.isfinite(y).all()
    # the spike survives: the row scale follows the largest block ...
    assert y[0, 77] == pytest.approx(height, rel=0.1)
    assert y[1, 600] == pytest.approx(-height, rel=0.1)
    # ... and the blocks without it are still rounded: at a 50x spike properly; at a 5000x spike
    # (beyond what one row scale with <= 7-bit block scales can span: the smallest block scale
    # is then a grid step of ~1/100 of the spike) to about their own rms of 0.01, not garbage.
    rest = np.ones(N, bool)
    rest[64:96] = rest[576:608] = False
    err = weighted_rmse(x[:, rest], y[:, rest], np.ones(rest.sum()))
    assert err < (0.007 if height < 1 else 0.0125)


@pytest.mark.parametrize("name", TYPES)
def test_imatrix_with_zeros(name):
    x = rng(10).standard_normal((4, N)).astype(np.float32)
    im = rng(11).random(N).astype(np.float32)
    im[:64] = 0.0                     # whole blocks with no importance
    im[100:300:3] = 0.0               # scattered zeros
    y = decode(name, search(name, x, im))
    assert np.isfinite(y).all()
    # blocks without importance are still rounded sensibly (not left at garbage)
    assert weighted_rmse(x[:, :64], y[:, :64], np.ones(64)) < 0.6
    assert weighted_rmse(x, y, np.ones(N)) < 0.6


@pytest.mark.parametrize("name", TYPES)
def test_zero_columns_do_not_change_bytes(name):
    """Small inputs are padded with zero columns internally; that must not change any byte."""
    x = rng(12).standard_normal((5, N)).astype(np.float32)
    im = rng(13).random(N).astype(np.float32)
    wide = np.concatenate([x, np.zeros((5, 512), np.float32)], axis=1)
    imw = np.concatenate([im, np.ones(512, np.float32)])
    a = search(name, x, im)
    b = search(name, wide, imw)
    np.testing.assert_array_equal(b[:, :a.shape[1]], a)


def test_row_chunks_are_independent(monkeypatch):
    """Big inputs run in chunks of rows (zero-padded to whole chunks): same bytes as row by row.
    The chunking is type independent, so one cheap type is enough."""
    name, n = "iq3_ks", 1536          # [32, 1536]: the shape the quality test compiled
    x = rng(14).standard_normal((40, n)).astype(np.float32)
    small = np.concatenate([search(name, x[:20]), search(name, x[20:])])
    cfg = dataclasses.replace(ksquants.SEARCHES[name], max_weights=32 * n)
    monkeypatch.setitem(ksquants.SEARCHES, name, cfg)
    assert ksquants._padded_shape(cfg, 40, n) == (32, n)        # two chunks, the second padded
    np.testing.assert_array_equal(search(name, x), small)


@pytest.mark.parametrize("name", TYPES)
def test_round_to_grid_is_nearest_ties_up(name):
    grids = ksquants.SEARCHES[name].grids
    grids = grids.reshape(-1, grids.shape[-1]) if grids.ndim == 2 else np.unique(grids)[None]
    for g in grids:
        t = np.concatenate([rng(15).uniform(-150, 150, 2000), 0.5 * (g[1:] + g[:-1])])
        t = t.astype(np.float32)
        d = np.abs(t[:, None] - g[None, :])
        want = len(g) - 1 - np.argmin(d[:, ::-1], axis=1)            # nearest, upper on ties
        for grid in (g, jnp.asarray(g)):                               # constant and traced
            val, idx = ks_common.round_to_grid(jnp.asarray(t), grid)
            np.testing.assert_array_equal(np.asarray(idx), want)
            np.testing.assert_array_equal(np.asarray(val), g[want])


def test_search_descriptors_are_consistent():
    for name, cfg in ksquants.SEARCHES.items():
        desc = registry.descriptor(name)
        assert desc.row_header_bytes in (2, 4) and desc.block_size == ks_common.BLOCK
        assert cfg.pairs == (desc.group_size == 2)
    with pytest.raises(ValueError, match="row_map"):
        ksquants.KsSearch("iq4_ks", ntry=1, row_map="nope")
