"""Benchmarks the IQK matmul targets against dense bf16 on the current JAX device.

GEMV (decode, batch 1): effective bandwidth = packed weight bytes / time, reported as a fraction
of the device's measured copy bandwidth (read + write of a large buffer), beside a dense bf16
GEMV of the same shape. GEMM (prefill, batch ``--gemm_m``): TFLOP/s = 2*m*rows*n / time, beside
a dense bf16 GEMM.

Runs anywhere: on a GPU it benchmarks the pallas and xla targets (the pallas kernels compiled for
the GPU); on CPU it benchmarks xla and llvm, skips the Pallas part (interpret mode measures
nothing useful) and defaults to a smaller shape.

    python experiments/bench_gpu.py                         # 4096 x 14336 on GPU
    python experiments/bench_gpu.py --types=iq4_k,iq2_ks --json=/tmp/bench.json
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from iqk_jax import ops, registry, testing
from iqk_jax.qarray import QArray
from iqk_codegen import targets

FLAGS = flags.FLAGS
flags.DEFINE_integer("rows", None, "weight rows (default 4096 on GPU, 1024 on CPU)")
flags.DEFINE_integer("n", None, "weight row length, a multiple of 256 (default 14336 / 4096)")
flags.DEFINE_integer("gemm_m", None, "GEMM batch (default 512 on GPU, 64 on CPU)")
flags.DEFINE_list("types", None, "IQK types (default: all)")
flags.DEFINE_list("targets", None, "targets (default: pallas,xla on GPU; llvm,xla on CPU)")
flags.DEFINE_integer("iters", 10, "timed iterations (median reported)")
flags.DEFINE_string("json", None, "also write the results here")


def _time(fn, *args, iters: int) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth(iters: int) -> float:
    """Bytes/s of a large elementwise read + write (the device's practical HBM/DRAM bandwidth)."""
    nbytes = (1 << 30) if jax.default_backend() != "cpu" else (1 << 27)
    a = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda v: v + 1.0)
    return 2 * nbytes / _time(f, a, iters=iters)


def random_q(name: str, rows: int, n: int, seed: int = 0) -> QArray:
    """Random packed rows with finite scales: timing does not depend on the values."""
    return testing.random_qarray(name, rows, n, seed, scale=0.01)

def main(argv):
    del argv
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    rows = FLAGS.rows or (1024 if on_cpu else 4096)
    n = FLAGS.n or (4096 if on_cpu else 14336)
    m = FLAGS.gemm_m or (64 if on_cpu else 512)
    types = FLAGS.types or list(registry.types())
    tlist = FLAGS.targets or (["llvm", "xla"] if on_cpu else ["pallas", "xla"])
    runnable = []
    for t in tlist:
        if t == "pallas" and on_cpu:
            print("skipping pallas: no GPU (interpret mode is not a benchmark)")
        elif not targets.get(t).available():
            print(f"skipping {t}: not available here")
        else:
            runnable.append(t)
    iters = FLAGS.iters
    print(f"device: {jax.devices()[0].device_kind} ({backend}); weight {rows} x {n}, "
          f"GEMM batch {m}")
    bw = copy_bandwidth(iters)
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s")
    rng = np.random.default_rng(0)
    x1 = jnp.asarray(rng.standard_normal((1, n)), jnp.bfloat16)
    xm = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((rows, n)) * 0.02, jnp.bfloat16)
    dense = jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32))
    t_gemv = _time(dense, x1, w, iters=iters)
    t_gemm = _time(dense, xm, w, iters=iters)
    flops = 2.0 * m * rows * n
    results = {"device": jax.devices()[0].device_kind, "backend": backend, "rows": rows, "n": n,
               "gemm_m": m, "copy_GBps": bw / 1e9,
               "bf16": {"gemv_us": t_gemv * 1e6, "gemv_bw_frac": 2 * rows * n / t_gemv / bw,
                        "gemm_tflops": flops / t_gemm / 1e12},
               "types": {}}
    print(f"{'type':<9} {'target':<7} {'bpw':>6} {'gemv us':>9} {'GB/s':>8} {'of copy':>8} "
          f"{'gemm TFLOP/s':>13}")
    print(f"{'bf16':<9} {'dense':<7} {16.0:>6.2f} {t_gemv * 1e6:>9.1f} "
          f"{2 * rows * n / t_gemv / 1e9:>8.1f} {2 * rows * n / t_gemv / bw:>8.1%} "
          f"{flops / t_gemm / 1e12:>13.3f}")
    for name in types:
        q = random_q(name, rows, n)
        for t in runnable:
            mm = jax.jit(lambda x, q, t=t: ops.matmul(x, q, target=t))
            try:
                tv = _time(mm, x1, q, iters=iters)
                tm = _time(mm, xm, q, iters=iters)
            except Exception as e:  # report and go on: one failing kernel should not hide the rest
                print(f"{name:<9} {t:<7} failed: {type(e).__name__}: {e}")
                continue
            gbps = q.nbytes / tv
            results["types"].setdefault(name, {})[t] = {
                "bpw": q.bpw, "gemv_us": tv * 1e6, "gemv_GBps": gbps / 1e9,
                "gemv_bw_frac": gbps / bw, "gemm_tflops": flops / tm / 1e12}
            print(f"{name:<9} {t:<7} {q.bpw:>6.2f} {tv * 1e6:>9.1f} {gbps / 1e9:>8.1f} "
                  f"{gbps / bw:>8.1%} {flops / tm / 1e12:>13.3f}")
    if FLAGS.json:
        with open(FLAGS.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
