"""The main job on generated data: build a small model, quantize it to every IQK type that has a
quantizer, write it to GGUF, read it back, and report bpw, dequantization error and a matmul check.

Run as ``iqk-demo`` (or ``python -m iqk_jax.demo``). Everything it needs is generated here, so it
runs on a fresh machine with nothing but the package installed.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    """Defines the demo's flags (at run time, so imports never collide with other absl tools)."""
    flags.DEFINE_integer("rows", 256, "Rows of each generated weight matrix.")
    flags.DEFINE_integer("cols", 1024, "Columns (a multiple of 256).")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_list("types", [], "IQK types to run (default: all).")
    flags.DEFINE_string("out_dir", "", "Where to write the GGUF files (default: a temp dir).")


def _model(rows: int, cols: int, seed: int) -> dict[str, np.ndarray]:
    """A tiny 'model': Student-t weights (LLM-like tails) and an importance vector."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(5, size=(rows, cols)) * 0.02).astype(np.float32)
    imatrix = rng.gamma(2.0, 1.0, size=cols).astype(np.float32)
    return {"blk.0.ffn_down.weight": w, "imatrix": imatrix}


def main(argv):
    del argv
    # absl routes jax's INFO logs (e.g. "no TPU") to the console; the table is the output here.
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    import iqk_jax
    from iqk_jax import gguf_io, quant
    from iqk_jax.qarray import QArray

    model = _model(FLAGS.rows, FLAGS.cols, FLAGS.seed)
    w, imat = model["blk.0.ffn_down.weight"], model["imatrix"]
    names = FLAGS.types or list(iqk_jax.types())
    have = set(quant.quantizable_types())
    out_dir = FLAGS.out_dir or tempfile.mkdtemp(prefix="iqk-demo-")
    os.makedirs(out_dir, exist_ok=True)
    x = np.random.default_rng(FLAGS.seed + 1).standard_normal((4, FLAGS.cols)).astype(np.float32)
    try:
        from iqk_jax import ops
    except ImportError:  # the ops land with the generator
        ops = None

    print(f"model: {w.shape[0]}x{w.shape[1]} Student-t weights; GGUF files in {out_dir}")
    hdr = f"{'type':8} {'id':>4} {'bpw':>6} {'file bpw':>8} {'rmse':>10} {'w-rmse':>10} {'rel':>7} " \
          f"{'matmul err':>10} {'quant s':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name in names:
        d = iqk_jax.descriptor(name)
        if name not in have:
            print(f"{name:8} {d.ggml_type:>4} {d.bpw:6.3f}   (no quantizer for this type: "
                  f"dequantize/GGUF only)")
            continue
        t0 = time.perf_counter()
        q = iqk_jax.quantize(w, name, imatrix=imat)
        tq = time.perf_counter() - t0
        path = os.path.join(out_dir, f"demo-{name}.gguf")
        gguf_io.save_gguf(path, {"blk.0.ffn_down.weight": q},
                          {"general.architecture": "llama", "general.name": f"iqk-demo {name}"})
        _, back = gguf_io.load_gguf(path)
        qb = back["blk.0.ffn_down.weight"]
        assert isinstance(qb, QArray) and np.array_equal(np.asarray(qb.raw), np.asarray(q.raw))
        y = qb.dequantize_np()
        err = y - w
        rmse = float(np.sqrt(np.mean(err ** 2)))
        wrmse = float(np.sqrt(np.sum(imat * err ** 2) / np.sum(imat) / w.shape[0]))
        rel = rmse / float(np.sqrt(np.mean(w ** 2)))
        mm = "n/a"
        if ops is not None:
            got = np.asarray(ops.matmul(x, qb))
            ref = x @ y.T
            mm = f"{float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-30)):.1e}"
        file_bpw = 8 * (os.path.getsize(path)) / w.size
        print(f"{name:8} {d.ggml_type:>4} {d.bpw:6.3f} {file_bpw:8.3f} {rmse:10.3e} {wrmse:10.3e} "
              f"{rel:7.4f} {mm:>10} {tq:8.2f}")


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
