"""iqk-quantize: the model quantizer CLI, end to end on ik_llama.cpp's tiny model."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import iqk_jax
from iqk_jax import gguf_io, quant
from iqk_jax.cli import quantize as cli
from iqk_jax.qarray import QArray

from conftest import CONFORMANCE, needs_conformance

TINY = CONFORMANCE / "gguf" / "tiny-f32.gguf"


def _src():
    return gguf_io.load_gguf(TINY)


@needs_conformance
@pytest.mark.parametrize("typ", quant.quantizable_types())
def test_quantizes_tiny_model_to_type(typ, tmp_path):
    out = tmp_path / f"tiny-{typ}.gguf"
    rows = cli.run_quantize(str(TINY), str(out), typ, None, [], progress=False)
    meta, tensors = gguf_io.load_gguf(out)
    _, src = _src()
    assert list(tensors) == list(src)
    n_q = 0
    for name, t in tensors.items():
        s = np.asarray(src[name])
        if s.ndim == 1:
            np.testing.assert_array_equal(np.asarray(t), s)
            continue
        assert isinstance(t, QArray) and t.type == typ
        n_q += 1
        # The CLI writes exactly what the library's quantize gives for the source tensor.
        want = iqk_jax.quantize(s, typ).raw
        np.testing.assert_array_equal(np.asarray(t.raw), np.asarray(want), err_msg=name)
    assert n_q >= 14
    assert meta["general.architecture"] == "llama"
    assert {r[0] for r in rows} == set(src)


@needs_conformance
def test_custom_rules_imatrix_and_kept_tensors(tmp_path, capsys):
    types = quant.quantizable_types()
    if len(types) < 2:
        pytest.skip("needs two quantizable IQK types")
    a, b = types[0], types[-1]
    _, src = _src()
    imat_path = tmp_path / "im.dat"
    names = [k for k, v in src.items() if np.asarray(v).ndim == 2]
    with open(imat_path, "wb") as f:
        f.write(struct.pack("<i", len(names)))
        rng = np.random.default_rng(0)
        for k in names:
            n = np.asarray(src[k]).shape[1]
            f.write(struct.pack("<i", len(k)) + k.encode() + struct.pack("<ii", 2, n))
            f.write((rng.random(n) * 2).astype("<f4").tobytes())
    out = tmp_path / "mixed.gguf"
    cli.run_quantize(str(TINY), str(out), a, str(imat_path), [r"ffn_down=" + b], progress=False)
    meta, tensors = gguf_io.load_gguf(out)
    from iqk_jax.imatrix import load_imatrix
    im = load_imatrix(imat_path)
    for name, t in tensors.items():
        if not isinstance(t, QArray):
            continue
        assert t.type == (b if "ffn_down" in name else a), name
        want = iqk_jax.quantize(np.asarray(src[name]), t.type, im[name]).raw
        np.testing.assert_array_equal(np.asarray(t.raw), np.asarray(want), err_msg=name)
    assert meta["quantize.imatrix.entries_count"] == len(names)
    text = capsys.readouterr().out
    assert "kept (1-D)" in text and "total:" in text


def _write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for k, v in tensors.items():
        b = np.ascontiguousarray(v).tobytes()
        header[k] = {"dtype": {"float32": "F32", "float16": "F16"}[v.dtype.name],
                     "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_safetensors_input_keeps_odd_rows(tmp_path, capsys):
    rng = np.random.default_rng(1)
    src = {"w.weight": rng.standard_normal((8, 512)).astype(np.float16),
           "odd.weight": rng.standard_normal((4, 100)).astype(np.float32),
           "norm.weight": np.ones(512, np.float32)}
    p = tmp_path / "m.safetensors"
    _write_safetensors(p, src)
    out = tmp_path / "m.gguf"
    cli.run_quantize(str(p), str(out), "q8_0", None, [], progress=False)
    _, t = gguf_io.load_gguf(out)
    np.testing.assert_array_equal(t["odd.weight"], src["odd.weight"])
    assert isinstance(t["w.weight"], gguf_io.GGMLArray)
    np.testing.assert_allclose(t["w.weight"], src["w.weight"].astype(np.float32), atol=0.02)
    text = capsys.readouterr().out
    assert "not a multiple of 32" in text and "kept (1-D)" in text


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(cli.QuantizeError, match="unknown type 'iq9_k'"):
        cli.run_quantize(str(TINY), str(tmp_path / "o.gguf"), "iq9_k", None, [], progress=False)
    with pytest.raises(cli.QuantizeError, match="not 'regex=type'"):
        cli.parse_rules(["ffn_down"])
    with pytest.raises(cli.QuantizeError, match="bad regex"):
        cli.parse_rules(["(=iq4_k"])
    with pytest.raises(cli.QuantizeError, match="no such file"):
        cli.run_quantize(str(tmp_path / "none.gguf"), str(tmp_path / "o.gguf"), "f16", None, [],
                         progress=False)
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", 10 ** 9))
    with pytest.raises(cli.QuantizeError, match="exceeds"):
        cli.run_quantize(str(p), str(tmp_path / "o.gguf"), "f16", None, [], progress=False)
    assert not (tmp_path / "o.gguf").exists()


@needs_conformance
def test_command_line_entry_point(tmp_path):
    out = tmp_path / "o.gguf"
    r = subprocess.run([sys.executable, "-m", "iqk_jax.cli.quantize", f"--input={TINY}",
                        f"--output={out}", "--type=f16", "--noprogress",
                        "--custom-q=attn_q=f32,ffn_.*=q8_0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "total:" in r.stdout and out.is_file()
    _, t = gguf_io.load_gguf(out)
    assert np.asarray(t["blk.0.attn_q.weight"]).dtype == np.float32
    assert isinstance(t["blk.0.ffn_up.weight"], gguf_io.GGMLArray)
    assert np.asarray(t["blk.0.attn_k.weight"]).dtype == np.float16
    r = subprocess.run([sys.executable, "-m", "iqk_jax.cli.quantize", f"--input={TINY}",
                        f"--output={out}", "--type=nope", "--noprogress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown type 'nope'" in r.stderr
