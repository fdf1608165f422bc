"""CPU benchmark of the llvm target against XLA's own float32 dot, same run, same shapes.

Prints, per IQK type, GEMV (W 32768x4096, batch 1) and GEMM (W 4096x4096, 512 activation rows)
times of ``iqk_jax.cpu.runtime.matmul`` next to ``x @ W.T`` in float32 by XLA, as speed-up
ratios (XLA time / llvm time, > 1 means faster than XLA f32). The weights are random packed
bytes with valid scales (the kernels' speed does not depend on the values).

Usage::

    python experiments/bench_cpu.py [--types iq4_k,iq2_k] [--threads 2] [--reps 10]
        [--skip-gemm] [--skip-gemv]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _random_rows(desc, rows, n, rng):
    from iqk_jax import testing
    return testing.random_rows(desc, rows, n, seed=int(rng.integers(1 << 31)), scale=0.01)

def _time(fn, reps):
    """(median wall seconds, median process CPU seconds) of ``reps`` calls after warm-up.

    CPU seconds (all threads of this process) are reported beside wall time because the
    machine may be shared: under contention wall time mostly measures the scheduler, while
    CPU time still measures the work each implementation does.
    """
    fn().block_until_ready()  # compile + warm up
    fn().block_until_ready()
    ts, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn().block_until_ready()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return float(np.median(ts)), float(np.median(cs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="", help="comma-separated type names (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-gemv", action="store_true")
    ap.add_argument("--gemv-shape", default="32768x4096")
    ap.add_argument("--gemm-shape", default="4096x4096x512")
    args = ap.parse_args(argv)
    # XLA's CPU thread pool follows the same budget as our kernels.
    os.environ["IQK_JAX_CPU_THREADS"] = str(args.threads)
    import jax
    import jax.numpy as jnp
    import iqk_jax
    from iqk_jax.cpu import runtime

    names = [t for t in args.types.split(",") if t] or list(iqk_jax.types())
    rng = np.random.default_rng(0)
    print(f"host: {os.cpu_count()} CPUs visible, threads={args.threads}, jax {jax.__version__}, "
          f"devices {jax.devices()}")

    def xla_f32(rows, n, m):
        w = jnp.asarray(rng.standard_normal((rows, n), dtype=np.float32))
        x = jnp.asarray(rng.standard_normal((m, n), dtype=np.float32))
        # dot_general contracting the last dims of both: XLA's fastest form of x @ W.T (a
        # literal ``x @ w.T`` can make XLA materialise the transpose).
        f = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
        return _time(lambda: f(x, w), args.reps)

    def ours(name, rows, n, m):
        desc = iqk_jax.descriptor(name)
        raw = jnp.asarray(_random_rows(desc, rows, n, rng))
        x = jnp.asarray(rng.standard_normal((m, n), dtype=np.float32))
        f = jax.jit(lambda x, raw: runtime.matmul(x, raw, desc, (rows, n)))
        return _time(lambda: f(x, raw), args.reps)

    for label, shape, skip in (("GEMV", args.gemv_shape, args.skip_gemv),
                               ("GEMM", args.gemm_shape, args.skip_gemm)):
        if skip:
            continue
        dims = [int(v) for v in shape.split("x")]
        rows, n = dims[0], dims[1]
        m = dims[2] if len(dims) > 2 else 1
        base, base_cpu = xla_f32(rows, n, m)
        print(f"\n{label} W {rows}x{n}, x {m}x{n}: XLA f32 {base * 1e3:8.2f} ms wall, "
              f"{base_cpu * 1e3:8.2f} ms CPU")
        print(f"{'type':8s} {'llvm ms':>9s} {'x XLA f32':>10s} {'CPU ms':>9s} {'x XLA CPU':>10s}")
        for name in names:
            t, c = ours(name, rows, n, m)
            print(f"{name:8s} {t * 1e3:9.2f} {base / t:10.2f} {c * 1e3:9.2f} {base_cpu / c:10.2f}",
                  flush=True)
        again, again_cpu = xla_f32(rows, n, m)
        print(f"XLA f32 again at the end: {again * 1e3:.2f} ms wall, {again_cpu * 1e3:.2f} ms CPU "
              f"(drift check)")


if __name__ == "__main__":
    main()
