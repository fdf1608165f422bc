"""Quantizer benchmark: speed and quality of every registered search vs ik_llama.cpp.

For each type with a search registered in ``iqk_jax.quant`` prints

* Mweights/s of ``search(x, imatrix)`` on a random gaussian ``[rows, n]`` matrix (steady state:
  one warm-up call compiles, then the best and the median of ``--repeats`` timed calls, bytes
  included), next to ik_llama.cpp's single-thread figure;
* Mweights per CPU-second (all threads of this process), the figure to hold against a
  single-thread one when other jobs share the cores (wall time then mostly measures them);
* the quality ratios ``our weighted RMSE / ik's weighted_rmse`` over the 8 conformance cases
  (median and max; the bar is median <= 1.00, max <= 1.03).

Usage::

    python experiments/bench_quantize.py                      # all types, 512x4096
    python experiments/bench_quantize.py --types iq4_k,iq2_k --rows 256 --repeats 5
    python experiments/bench_quantize.py --no-quality         # speed only

The machine may be shared: run it a couple of times and read the best column.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import numpy as np

from iqk_jax import quant, spec
from iqk_jax.testing import weighted_rmse

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFORMANCE = REPO.parent / "shared" / "conformance"
SETS = ("gaussian", "heavy", "edge", "real")
VARIANTS = ("plain", "imatrix")

# ik_llama.cpp's single-thread quantization speed on this machine class (Mweights/s).
IK_SINGLE_THREAD = {
    "iq2_k": 2.1, "iq3_k": 4.4, "iq4_k": 2.7, "iq5_k": 2.9, "iq6_k": 2.0, "iq4_ks": 3.5,
    "iq2_ks": 0.8, "iq5_ks": 3.2, "iq3_ks": 3.8, "iq4_kss": 1.1, "iq2_kl": 3.2,
}


def speed(name, rows, n, repeats, imatrix):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    im = rng.uniform(0.1, 2.0, n).astype(np.float32) if imatrix else None
    search = quant.search_for(name)
    t0 = time.perf_counter()
    np.asarray(search(x, im))
    first = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        np.asarray(search(x, im))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    w = rows * n / 1e6
    return w / min(times), w / statistics.median(times), w / min(cpu), first


def quality(name):
    manifest = json.loads((CONFORMANCE / "manifest.json").read_text())["types"][name]["cases"]
    inputs = np.load(CONFORMANCE / "inputs.npz")
    search = quant.search_for(name)
    ratios = {}
    for s in SETS:
        x = inputs[s]
        for v in VARIANTS:
            im = inputs[f"{s}.imatrix"] if v == "imatrix" else None
            y = spec.dequantize(np.asarray(search(x, im)), name, x.shape[1])
            w = im if im is not None else np.ones(x.shape[1])
            ratios[f"{s}.{v}"] = weighted_rmse(x, y, w) / manifest[f"{s}.{v}"]["weighted_rmse"]
    return ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="",
                    help="comma-separated types (default: all with a search)")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--imatrix", action="store_true", help="time the importance-weighted search")
    ap.add_argument("--no-quality", action="store_true", help="skip the conformance ratios")
    ap.add_argument("--cases", action="store_true", help="also print every case's ratio")
    args = ap.parse_args()

    types = [t for t in args.types.split(",") if t] or list(quant.quantizable_types())
    do_quality = not args.no_quality and (CONFORMANCE / "manifest.json").is_file()
    print(f"matrix {args.rows}x{args.n}, {'imatrix' if args.imatrix else 'plain'}, "
          f"best/median of {args.repeats} after a warm-up call")
    hdr = (f"{'type':8s} {'Mw/s best':>9s} {'median':>7s} {'Mw/cpu-s':>8s} {'ik 1-thr':>8s} "
           f"{'speedup':>7s} {'1st call s':>10s}")
    if do_quality:
        hdr += f" {'ratio med':>9s} {'max':>6s}"
    print(hdr)
    for t in types:
        try:
            best, med, per_cpu, first = speed(t, args.rows, args.n, args.repeats, args.imatrix)
        except Exception as e:  # report and go on: one broken search must not hide the rest
            print(f"{t:8s} search failed: {type(e).__name__}: {e}", flush=True)
            continue
        ik = IK_SINGLE_THREAD.get(t)
        line = (f"{t:8s} {best:9.2f} {med:7.2f} {per_cpu:8.2f} {ik if ik else float('nan'):8.1f} "
                f"{best / ik if ik else float('nan'):7.2f} {first:10.1f}")
        if do_quality:
            r = quality(t)
            vals = list(r.values())
            line += f" {statistics.median(vals):9.4f} {max(vals):6.4f}"
        print(line, flush=True)
        if do_quality and args.cases:
            print("         " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
