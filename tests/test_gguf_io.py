"""GGUF I/O against ik_llama.cpp's own files in ../shared/conformance/gguf."""

import os
import struct

import numpy as np
import pytest

import iqk_jax
from iqk_jax import gguf_io, spec
from iqk_jax.gguf_io import GGUFError, load_gguf, save_gguf
from iqk_jax.qarray import QArray

from conftest import CONFORMANCE, needs_conformance

GGUF_DIR = CONFORMANCE / "gguf"
FILES = [f"tiny-{t}.gguf" for t in iqk_jax.types()] + ["tiny-iq4_k-mix.gguf"]

pytestmark = needs_conformance


def _dense(t):
    if isinstance(t, QArray):
        return t.dequantize_np()
    return np.asarray(t, dtype=np.float32)


@pytest.fixture(scope="module")
def reference():
    return load_gguf(GGUF_DIR / "tiny-f32.gguf")


def _weighted_rel_err(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


@pytest.mark.parametrize("fname", FILES)
def test_load_dequantizes_like_spec_and_close_to_f32(fname, reference):
    meta, tensors = load_gguf(GGUF_DIR / fname)
    _, ref = reference
    assert list(tensors) == list(ref)
    assert meta["general.architecture"] == "llama"
    n_iqk = 0
    for name, t in tensors.items():
        want = np.asarray(ref[name], np.float32)
        if isinstance(t, QArray):
            n_iqk += 1
            raw = np.asarray(t.raw)
            np.testing.assert_array_equal(
                t.dequantize_np(), spec.dequantize(raw, t.type, t.shape[-1]).reshape(t.shape))
            assert t.shape == want.shape
            # The error the type predicts: relative RMS error shrinks ~2x per extra bit; the
            # bound is generous (random weights, no imatrix) but catches any layout slip,
            # which gives errors of order 1.
            bound = 2.2 * 2.0 ** (-iqk_jax.descriptor(t.type).bpw)
            err = _weighted_rel_err(t.dequantize_np(), want)
            assert err < bound, f"{name} ({t.type}): relative RMS error {err:.4f} > {bound:.4f}"
        else:
            got = np.asarray(t, np.float32)
            assert got.shape == want.shape
            if got.dtype == want.dtype and not isinstance(t, gguf_io.GGMLArray):
                np.testing.assert_array_equal(got, want)
            else:
                assert _weighted_rel_err(got, want) < 0.02
    assert n_iqk >= 14


@pytest.mark.parametrize("fname", FILES)
def test_roundtrip_is_byte_identical(fname, tmp_path):
    src = GGUF_DIR / fname
    meta, tensors = load_gguf(src)
    out = tmp_path / "out.gguf"
    save_gguf(out, tensors, meta)
    meta2, tensors2 = load_gguf(out)
    assert dict(meta2) == dict(meta)
    assert list(tensors2) == list(tensors)
    for name in tensors:
        a, b = tensors[name], tensors2[name]
        assert type(a) is type(b)
        ra = a.raw if isinstance(a, (QArray, gguf_io.GGMLArray)) else a
        rb = b.raw if isinstance(b, (QArray, gguf_io.GGMLArray)) else b
        np.testing.assert_array_equal(np.asarray(ra), np.asarray(rb), err_msg=name)
    # ik_llama.cpp's own file and ours agree byte for byte: offsets, alignment, row headers.
    assert out.read_bytes() == src.read_bytes()


def test_written_offsets_are_aligned_and_sized(tmp_path):
    import gguf
    rng = np.random.default_rng(0)
    tensors = {}
    for i, t in enumerate(iqk_jax.types()):
        rows = 3 + i
        raw = rng.integers(0, 256, (rows, iqk_jax.row_bytes(t, 512)), dtype=np.uint8)
        tensors[f"w.{t}"] = QArray(raw, t, (rows, 512))
    tensors["norm"] = np.ones(7, np.float32)
    out = tmp_path / "mixed.gguf"
    save_gguf(out, tensors, {"general.architecture": "llama", "general.name": "t"})
    r = gguf_io._IQKReader(out, "r")
    starts = sorted((t.data_offset, t.n_bytes, t.name) for t in r.tensors)
    for (o, n, name), nxt in zip(starts, starts[1:] + [(os.path.getsize(out), 0, "")]):
        assert o % 32 == 0, name
        assert o + n <= nxt[0], name
    _, back = load_gguf(out)
    for k, v in tensors.items():
        if isinstance(v, QArray):
            np.testing.assert_array_equal(back[k].raw, v.raw)


def test_truncated_file_names_tensor(tmp_path):
    data = (GGUF_DIR / "tiny-iq4_ks.gguf").read_bytes()
    p = tmp_path / "trunc.gguf"
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match="truncated"):
        load_gguf(p)
    p.write_bytes(data[:20])
    with pytest.raises(GGUFError, match="trunc"):
        load_gguf(p)


def _patch_first_tensor_type(data: bytes, old: int, new: int) -> bytes:
    # The tensor-info record stores the type id as a u32 right after the dims; find the
    # first record of type ``old`` by scanning for "blk." names.
    meta_end = data.index(b"blk.")
    i = data.index(struct.pack("<I", old), meta_end)
    return data[:i] + struct.pack("<I", new) + data[i + 4:]


def test_unknown_type_id_names_tensor(tmp_path):
    data = (GGUF_DIR / "tiny-iq4_k.gguf").read_bytes()
    p = tmp_path / "badtype.gguf"
    p.write_bytes(_patch_first_tensor_type(data, 139, 250))
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\..*250"):
        load_gguf(p)


def test_row_length_not_multiple_of_256(tmp_path):
    # Rewrite ne0 of the first IQK tensor from 256 to 128 (and ne1 doubled, so sizes agree).
    meta, tensors = load_gguf(GGUF_DIR / "tiny-iq4_k.gguf")
    data = (GGUF_DIR / "tiny-iq4_k.gguf").read_bytes()
    name = next(k for k, v in tensors.items() if isinstance(v, QArray) and v.shape[-1] == 256)
    rows = tensors[name].shape[0]
    key = name.encode()
    i = data.index(key) + len(key) + 4
    assert struct.unpack_from("<QQ", data, i) == (256, rows)
    p = tmp_path / "badrow.gguf"
    p.write_bytes(data[:i] + struct.pack("<QQ", 128, rows * 2) + data[i + 16:])
    with pytest.raises(GGUFError, match=f"{name}.*multiple of 256"):
        load_gguf(p)


def test_wrong_raw_length_on_save_names_tensor(tmp_path):
    q = QArray(np.zeros((2, iqk_jax.row_bytes("iq4_k", 256)), np.uint8), "iq4_k", (2, 256))
    q.raw = q.raw[:, :-1]  # corrupt after construction
    with pytest.raises(GGUFError, match="'bad'"):
        save_gguf(tmp_path / "x.gguf", {"bad": q})
    assert not any(tmp_path.iterdir()), "nothing may be left behind"


def test_save_is_atomic_on_failure(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"previous contents")

    class Boom:
        shape = (2, 2)
        dtype = np.dtype(object)

        def __array__(self, *a, **k):
            raise RuntimeError("boom while writing")

    with pytest.raises(Exception):
        save_gguf(out, {"ok": np.ones(4, np.float32), "bad": Boom()})
    assert out.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_missing_file():
    with pytest.raises(GGUFError, match="no such"):
        load_gguf("/nonexistent/file.gguf")
