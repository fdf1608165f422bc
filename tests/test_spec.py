"""The numpy spec against ik_llama.cpp's own dequantization, bit for bit."""

import numpy as np
import pytest

import iqk_jax
from iqk_jax import spec

from conftest import SETS, VARIANTS, needs_conformance, vectors

CASES = [(t, s, v) for t in iqk_jax.types() for s in SETS for v in VARIANTS]


def block_mismatch_report(got: np.ndarray, want: np.ndarray, max_show: int = 5) -> str:
    """Describes mismatching 256-weight blocks, like gguf-py's quant tests do."""
    g = got.reshape(got.shape[0], -1, 256).view(np.uint32)
    w = want.reshape(want.shape[0], -1, 256).view(np.uint32)
    bad = np.argwhere((g != w).any(axis=-1))
    lines = [f"{len(bad)} of {g.shape[0] * g.shape[1]} blocks differ"]
    for r, b in bad[:max_show]:
        k = int(np.argmax(g[r, b] != w[r, b]))
        lines.append(f"  row {r} block {b}: first at weight {k}: got {got[r, b * 256 + k]!r} "
                     f"want {want[r, b * 256 + k]!r}")
    return "\n".join(lines)


@needs_conformance
@pytest.mark.parametrize("name,set_name,variant", CASES)
def test_dequantize_bit_exact(name, set_name, variant):
    v = vectors(name)
    q, want = v[f"{set_name}.{variant}.q"], v[f"{set_name}.{variant}.deq"]
    got = spec.dequantize(q, name, want.shape[1])
    assert got.dtype == np.float32 and got.shape == want.shape
    same = got.view(np.uint32) == want.view(np.uint32)
    assert same.all(), block_mismatch_report(got, want)


@needs_conformance
@pytest.mark.parametrize("name", iqk_jax.types())
def test_unpack_pack_roundtrip(name):
    d = iqk_jax.descriptor(name)
    q = vectors(name)["real.imatrix.q"]
    n = (q.shape[1] - d.row_header_bytes) // d.block_bytes * 256
    row_d, blocks = spec.split_rows(q, d, n)
    packed = spec.pack(spec.unpack(blocks, d), d, blocks.shape[:2])
    if d.super_d:
        packed[..., :2] = blocks[..., :2]
    hdr = None if row_d is None else np.ascontiguousarray(q[:, :d.row_header_bytes]).view(d.header_dtype)[:, 0]
    np.testing.assert_array_equal(spec.assemble_rows(hdr, packed, d), q)


@pytest.mark.parametrize("name", iqk_jax.types())
def test_random_fields_roundtrip_and_decode(name):
    """Any field values pack and unpack losslessly and decode to the formula."""
    d = iqk_jax.descriptor(name)
    rng = np.random.default_rng(d.ggml_type)
    lead = (3, 2)
    f = {"q": rng.integers(0, 1 << d.bits, lead + (d.n_groups,)),
         "scale": rng.integers(0, 1 << d.scale_bits, lead + (d.n_blocks,))}
    if d.pieces_of("sel"):
        f["sel"] = rng.integers(0, d.n_selectors, lead + (d.n_blocks,))
    if d.pieces_of("sign"):
        f["sign"] = rng.integers(0, 2, lead + (256,))
    if any(p.source == "xor16" for p in d.pieces):
        # Gray-coded words: only patterns whose decoded bit 0 is clear exist; make them so.
        words = spec._gray_encode16(rng.integers(0, 1 << 16, lead + (d.block_bytes // 2,)).astype(np.uint16) & 0xFFFE)
        raw = np.ascontiguousarray(words).view(np.uint8).reshape(lead + (d.block_bytes,))
        f["q"] = spec.unpack(raw, d)["q"]
    blocks = spec.pack(f, d, lead)
    if d.super_d:
        blocks[..., :2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    back = spec.unpack(blocks, d)
    for k in f:
        np.testing.assert_array_equal(back[k], f[k], err_msg=k)
    row_d = np.full(lead[0], 0.25, np.float32)
    y = spec.dequantize_blocks(row_d, blocks, d)
    dd = 0.5 if d.super_d else 0.25
    scale = d.scale_lut[f["scale"]].astype(np.float32) * np.float32(dd)
    sel = np.repeat(f.get("sel", np.zeros_like(f["scale"])), d.block_size // d.group_size, -1)
    vals = d.grid_values[sel, f["q"]].reshape(lead + (256,))
    want = np.repeat(scale, d.block_size, -1) * vals
    if "sign" in f:
        want = np.where(f["sign"] == 1, -want, want)
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("name", iqk_jax.types())
def test_bad_raw_input_errors(name):
    rb = iqk_jax.row_bytes(name, 512)
    with pytest.raises(ValueError, match=name):
        spec.dequantize(np.zeros((2, rb - 1), np.uint8), name, 512)
    with pytest.raises(TypeError, match="uint8"):
        spec.dequantize(np.zeros((2, rb), np.int8), name, 512)
    with pytest.raises(ValueError, match="multiple of 256"):
        spec.dequantize(np.zeros((2, rb), np.uint8), name, 500)
    with pytest.raises(ValueError, match="whole number"):
        spec.dequantize(np.zeros(rb * 2 + 3, np.uint8), name, 512)


def test_pack_rejects_out_of_range_fields():
    d = iqk_jax.descriptor("iq4_k")
    f = {"q": np.full((1, 256), 16), "scale": np.zeros((1, 16), int), "sel": np.zeros((1, 16), int)}
    with pytest.raises(ValueError, match="'q'"):
        spec.pack(f, d, (1,))


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(iqk_jax.types()), data=st.data())
def test_every_packed_bit_has_a_meaning(name, data):
    """unpack -> pack reproduces *any* super-block: the layout uses every bit exactly once."""
    d = iqk_jax.descriptor(name)
    blob = data.draw(st.binary(min_size=2 * d.block_bytes, max_size=2 * d.block_bytes))
    blocks = np.frombuffer(blob, np.uint8).reshape(1, 2, d.block_bytes).copy()
    packed = spec.pack(spec.unpack(blocks, d), d, (1, 2))
    if d.super_d:
        packed[..., :2] = blocks[..., :2]
    np.testing.assert_array_equal(packed, blocks)
