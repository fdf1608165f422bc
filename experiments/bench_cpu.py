"""CPU benchmark of the llvm target against XLA's own float32 dot, same run, same shapes.

Prints, per IQK type, GEMV (W 32768x4096, batch 1) and GEMM (W 4096x4096, 512 activation rows)
times of ``iqk_jax.cpu.runtime.matmul`` next to ``x @ W.T`` in float32 by XLA, as speed-up
ratios (XLA time / llvm time, > 1 means faster than XLA f32). The weights are random packed
bytes with valid scales (the kernels' speed does not depend on the values).

Method: the two alternate in short blocks (3 XLA calls, 3 of ours, ...; the fastest call of
each block counts) and each ratio is taken between neighbouring blocks, so slow drift in the
machine's speed (a shared VM's neighbours) cancels; the table gives the median of the paired
ratios and its spread (10th-90th percentile), beside the median block times. CPU seconds of
this process are reported too: under contention wall time measures the scheduler, CPU time
still measures the work.

Usage::

    python experiments/bench_cpu.py [--types iq4_k,iq2_k] [--threads 2] [--reps 10]
        [--skip-gemm] [--skip-gemv] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _random_rows(desc, rows, n, rng):
    from iqk_jax import testing
    return testing.random_rows(desc, rows, n, seed=int(rng.integers(1 << 31)), scale=0.01)


def _once(fn):
    t, c = time.perf_counter(), time.process_time()
    fn().block_until_ready()
    return time.perf_counter() - t, time.process_time() - c


def _paired(base, ours, reps, block=3):
    """Alternating blocks of timings of two callables; medians and paired-ratio percentiles.

    Each rep times ``block`` consecutive calls of ``base`` and then of ``ours`` and keeps the
    fastest call of each block: the first calls after a switch pay for the other kernel's
    cache footprint and for XLA's worker threads still spinning after its call, which would
    otherwise be charged to whichever side runs second.
    """
    for fn in (base, ours, base, ours):  # compile + warm up both
        fn().block_until_ready()
    rows = []
    for _ in range(reps):
        b = min((_once(base) for _ in range(block)), key=lambda r: r[0])
        o = min((_once(ours) for _ in range(block)), key=lambda r: r[0])
        rows.append(b + o)
    a = np.asarray(rows)
    # process_time() ticks coarsely: a block too short to register CPU time counts as 1 ns.
    wall, cpu = a[:, 0] / a[:, 2], a[:, 1] / np.maximum(a[:, 3], 1e-9)
    return {"xla_ms": 1e3 * float(np.median(a[:, 0])), "ours_ms": 1e3 * float(np.median(a[:, 2])),
            "ratio": float(np.median(wall)), "ratio_p10": float(np.percentile(wall, 10)),
            "ratio_p90": float(np.percentile(wall, 90)), "cpu_ratio": float(np.median(cpu))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="", help="comma-separated type names (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--skip-gemv", action="store_true")
    ap.add_argument("--gemv-shape", default="32768x4096")
    ap.add_argument("--gemm-shape", default="4096x4096x512")
    ap.add_argument("--json", default="", help="also write the results here")
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
    # dot_general contracting the last dims of both: XLA's fastest form of x @ W.T (a literal
    # ``x @ w.T`` can make XLA materialise the transpose).
    xla = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
    results = []
    for label, shape, skip in (("GEMV", args.gemv_shape, args.skip_gemv),
                               ("GEMM", args.gemm_shape, args.skip_gemm)):
        if skip:
            continue
        dims = [int(v) for v in shape.split("x")]
        rows, n = dims[0], dims[1]
        m = dims[2] if len(dims) > 2 else 1
        w = jnp.asarray(rng.standard_normal((rows, n), dtype=np.float32))
        x = jnp.asarray(rng.standard_normal((m, n), dtype=np.float32))
        print(f"\n{label} W {rows}x{n}, x {m}x{n} (ratio = XLA f32 time / llvm time, "
              f"paired; p10-p90 spread)")
        print(f"{'type':8s} {'XLA ms':>8s} {'llvm ms':>8s} {'ratio':>6s} {'p10':>5s} "
              f"{'p90':>5s} {'CPU ratio':>9s}")
        for name in names:
            desc = iqk_jax.descriptor(name)
            raw = jnp.asarray(_random_rows(desc, rows, n, rng))
            f = jax.jit(lambda x, raw, desc=desc: runtime.matmul(x, raw, desc, (rows, n)))
            r = _paired(lambda: xla(x, w), lambda: f(x, raw), args.reps)
            r.update(kernel=label.lower(), type=name, shape=[rows, n, m])
            results.append(r)
            print(f"{name:8s} {r['xla_ms']:8.2f} {r['ours_ms']:8.2f} {r['ratio']:6.2f} "
                  f"{r['ratio_p10']:5.2f} {r['ratio_p90']:5.2f} {r['cpu_ratio']:9.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "jax": jax.__version__, "results": results},
                      fh, indent=1)


if __name__ == "__main__":
    main()
