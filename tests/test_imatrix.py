"""Importance-matrix readers: legacy .dat and GGUF."""

import struct

import gguf
import numpy as np
import pytest

from iqk_jax.imatrix import ImatrixError, load_imatrix

from conftest import REPO


def write_legacy(path, entries, last_call=10, dataset="train.txt"):
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, (ncall, sums) in entries.items():
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, len(sums)))
            f.write(np.asarray(sums, "<f4").tobytes())
        f.write(struct.pack("<ii", last_call, len(dataset)) + dataset.encode())


def test_legacy_divides_by_calls(tmp_path):
    p = tmp_path / "im.dat"
    write_legacy(p, {"blk.0.ffn_down.weight": (4, [4.0, 8.0, 0.0]), "x": (0, [1.0, 2.0])})
    m = load_imatrix(p)
    np.testing.assert_allclose(m["blk.0.ffn_down.weight"], [1.0, 2.0, 0.0])
    np.testing.assert_allclose(m["x"], [1.0, 2.0])


def test_gguf_format(tmp_path):
    p = tmp_path / "im.gguf"
    w = gguf.GGUFWriter(str(p), "imatrix")
    w.add_tensor("blk.0.ffn_down.weight.in_sum2", np.array([[6.0, 3.0, 9.0]], np.float32))
    w.add_tensor("blk.0.ffn_down.weight.counts", np.array([[3.0]], np.float32))
    w.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", np.array([[2.0, 4.0], [9.0, 3.0]], np.float32))
    w.add_tensor("blk.0.ffn_up_exps.weight.counts", np.array([[2.0, 3.0]], np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    m = load_imatrix(p)
    np.testing.assert_allclose(m["blk.0.ffn_down.weight"], [2.0, 1.0, 3.0])
    np.testing.assert_allclose(m["blk.0.ffn_up_exps.weight"], [[1.0, 2.0], [3.0, 1.0]])


def test_truncated_and_bad_files(tmp_path):
    p = tmp_path / "im.dat"
    write_legacy(p, {"a.weight": (1, [1.0] * 64)})
    data = p.read_bytes()
    p.write_bytes(data[:40])
    with pytest.raises(ImatrixError, match="truncated.*a.weight"):
        load_imatrix(p)
    p.write_bytes(struct.pack("<i", 0))
    with pytest.raises(ImatrixError, match="no entries"):
        load_imatrix(p)
    with pytest.raises(ImatrixError, match="no such"):
        load_imatrix(tmp_path / "missing.dat")
    write_legacy(p, {"n.weight": (1, [1.0, float("nan")])})
    with pytest.raises(ImatrixError, match="NaN"):
        load_imatrix(p)


def test_real_gemma_imatrix():
    p = REPO.parent / "shared" / "real" / "gemma-3-270m.imatrix.dat"
    if not p.is_file():
        pytest.skip("shared/real not present")
    m = load_imatrix(p)
    assert len(m) == 108
    assert m["blk.0.ffn_down.weight"].shape == (2048,)
    assert m["blk.0.attn_output.weight"].shape == (1024,)
    assert all((v >= 0).all() for v in m.values())
