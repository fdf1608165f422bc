"""Issue rate of the instructions the llvm target's int8 matmuls are built from, beside f32 FMA.

Why this exists: whether int8 products can beat XLA's float32 dot on a given x86 CPU depends on
how many ``pmaddubsw`` / ``pmaddwd`` / ``psignb`` the core issues per cycle, relative to FMA. This
script JIT-compiles (llvmlite, as the kernels are) loops of ten independent chains of each
instruction mix, so throughput rather than latency bounds them, and prints the time per step and
the implied multiply-adds per cycle *relative to f32 FMA* (the clock cancels):

* ``fma``: one 8-lane f32 FMA = 8 multiply-adds (XLA's float32 dot);
* ``maddubs+maddwd``: 32 int8 products summed to int32 lanes with per-pair int16 scales (the
  unsigned-activation gemm path, iq2/iq3 grids);
* ``psign+maddubs+maddwd``: the same plus the sign transfer (signed grids: iq4/iq5/iq6, trellis).

Measured on the 2-core AMD EPYC (Zen 3) CI machine: all four instructions issue twice per cycle
and the three integer ones share two pipes, so ``maddubs+maddwd`` gives 2.0x and
``psign+maddubs+maddwd`` about 1.4x the multiply-adds per cycle of FMA. That is the ceiling of
the gemm kernels against an FMA-bound f32 GEMM on such a CPU (XLA runs at ~85% of FMA peak).

Usage::

    python experiments/cpu_throughput.py [--steps 20000000]
"""

from __future__ import annotations

import argparse
import ctypes
import time

# Each mix: (vector type of a chain, the IR of one step from %a{i} to %a{i}n, products per step).
_ONE_I8 = "<32 x i8> <" + ", ".join(["i8 3"] * 32) + ">"
_ONE_I16 = "<16 x i16> <" + ", ".join(["i16 3"] * 16) + ">"
_MIXES = {
    "fma": ("<8 x float>", 8,
            "  %a{i}n = call <8 x float> @llvm.fma.v8f32(<8 x float> %a{i}, <8 x float> <"
            + ", ".join(["float 1.0"] * 8) + ">, <8 x float> <" + ", ".join(["float 0.5"] * 8)
            + ">)"),
    "maddubs+maddwd": ("<32 x i8>", 32,
                       "  %p{i} = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %a{i}, "
                       + _ONE_I8 + ")\n  %q{i} = call <8 x i32> @llvm.x86.avx2.pmadd.wd("
                       "<16 x i16> %p{i}, " + _ONE_I16 + ")\n"
                       "  %a{i}n = bitcast <8 x i32> %q{i} to <32 x i8>"),
    "psign+maddubs+maddwd": ("<32 x i8>", 32,
                             "  %g{i} = call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> %a{i}, "
                             + _ONE_I8 + ")\n  %p{i} = call <16 x i16> "
                             "@llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %g{i}, " + _ONE_I8 + ")\n"
                             "  %q{i} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %p{i}, "
                             + _ONE_I16 + ")\n  %a{i}n = bitcast <8 x i32> %q{i} to <32 x i8>"),
}
_DECLS = """
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8>, <32 x i8>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
"""
_CHAINS = 10


def _module(ty: str, step: str) -> str:
    phis = "\n".join(f"  %a{i} = phi {ty} [ zeroinitializer, %entry ], [ %a{i}n, %loop ]"
                     for i in range(_CHAINS))
    body = "\n".join(step.format(i=i) for i in range(_CHAINS))
    stores = "\n".join(f"  %o{i} = getelementptr {ty}, {ty}* %out, i64 {i}\n"
                       f"  store {ty} %a{i}n, {ty}* %o{i}, align 1" for i in range(_CHAINS))
    return _DECLS + f"""
define void @run(i64 %n, {ty}* %out) {{
entry:
  br label %loop
loop:
  %k = phi i64 [ 0, %entry ], [ %kn, %loop ]
{phis}
{body}
  %kn = add i64 %k, 1
  %more = icmp slt i64 %kn, %n
  br i1 %more, label %loop, label %done
done:
{stores}
  ret void
}}
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20_000_000)
    args = ap.parse_args(argv)
    import llvmlite.binding as llvm
    from iqk_codegen import llvm as em
    from iqk_jax.cpu import runtime
    h = em.host()  # also initializes LLVM's native target
    if not h.avx2:
        raise SystemExit(f"needs AVX2 (host {h.cpu} has no avx2)")
    per_product = {}
    keep = []
    for name, (ty, products, step) in _MIXES.items():
        mod = llvm.parse_assembly(_module(ty, step))
        mod.verify()
        # The kernels' own target machine settings; one per engine (the engine owns it, and
        # sharing one frees it twice at exit).
        ee = llvm.create_mcjit_compiler(mod, runtime._target_machine(h))
        ee.finalize_object()
        keep.append(ee)
        fn = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p)(
            ee.get_function_address("run"))
        buf = ctypes.create_string_buffer(32 * _CHAINS)
        fn(10_000, buf)
        best = min(_timed(fn, args.steps, buf) for _ in range(3))
        ns = 1e9 * best / (args.steps * _CHAINS)
        per_product[name] = ns / products
        print(f"{name:22s} {ns:6.3f} ns per step ({products:2d} multiply-adds), "
              f"{per_product['fma'] / per_product[name]:4.2f}x FMA's multiply-adds per cycle",
              flush=True)


def _timed(fn, steps, buf):
    t = time.perf_counter()
    fn(steps, buf)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
