"""JIT compilation, caching and XLA FFI registration of the llvm CPU kernels.

Kernels are compiled once per (descriptor, kernel, host CPU, host features) and process; the
machine code must outlive every XLA executable that calls it, so compiled engines are never
freed. Each call splits the weight rows over ``threads()`` pthreads (``IQK_JAX_CPU_THREADS``,
default: the CPUs this process may run on); results do not depend on the thread count.

Why int8 activations for the matmuls: every IQK weight is ``d * integer scale * small integer``
(|value| <= 127), so with int8 activations a whole 256-weight super-block is an exact integer
dot product: ``pmaddubsw`` does 32 multiply-adds per instruction and the float work drops to one
conversion per super-block. A float path needs a widening, an int->float conversion and an
FMA per 8 weights after the same decode (by instruction count roughly 3x the arithmetic of the
integer path; not built here). The cost is an activation rounding error, bounded below and
checked by the tests. On AVX2 without VNNI the ceiling of the integer path against f32 FMA is
set by how many multiplies the core issues: ``experiments/cpu_throughput.py`` measures, on the
Zen 3 CI machine, 2.0x FMA's multiply-adds per cycle for ``pmaddubsw + pmaddwd`` (the
unsigned-activation path of iq2/iq3 grids) and 1.4x with the ``psignb`` that signed grids need
(the three share two pipes); the gemm kernels reach 1.1-1.2x XLA f32, which runs near FMA peak.
GEMV gains more because XLA's f32 GEMV is memory-bound at 4 bytes per weight and these kernels
read 0.25-0.85 bytes per weight.

Error bounds (``y`` = this module's matmul, ``W`` = :func:`iqk_jax.spec.dequantize` of the
weights, float64 reference ``x @ W.T``):

==============  ==================================================================================
dequantize      bit-exact float32 (same bits as the spec, NaN payloads and signed zeros included)
matmul, all     ``|y - x W^T| <= sum_s (dx[i, s] / 2) * sum_{k in s} |W[r, k]|
types             + 1e-5 * (|x| |W|^T)[i, r]``
matmul, iq6_k   the above ``+ 0.5 * sum_k |x[i, k]| * |dl(r, k)|`` (its grid is rounded to
                integers; ``dl`` = float block scale ``d * scale``)
matmul vs the   ``<= 1e-5 * (|x| |W|^T) + 1e-6`` (exact integer sums; only the per-super-block
int8 model      float32 scaling and accumulation round; iq6_k's model uses its rounded grid)
==============  ==================================================================================

Activation quantization: each activation row is split into 256-wide blocks; block ``s`` of row
``i`` gets ``dx = max|x| / 127`` and ``xq = round(x / dx)`` (int8, |xq| <= 127), so
``|x - dx * xq| <= dx / 2`` elementwise (plus the float rounding of ``x / dx``, below 2**-23
relative, covered by the 1e-5 term). The 1e-5 term also covers float32 accumulation: partial
sums are exact integers per super-block, so only ~n/256 float multiply-adds round.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np

from iqk_jax import registry
from iqk_jax.registry import QK_K

_lock = threading.RLock()
_compiled: dict = {}
_registered: set = set()

# Activation rows up to which the register-only gemv kernel is used; above it, gemm (which
# decodes each weight row once per tile of activation rows: already cheaper at 2 rows).
GEMV_MAX_ROWS = 1
_threads_override: int | None = None


def threads() -> int:
    """Worker threads per call: :func:`set_threads`'s value, else ``IQK_JAX_CPU_THREADS``,
    else the CPUs this process may use."""
    if _threads_override is not None:
        return _threads_override
    env = os.environ.get("IQK_JAX_CPU_THREADS")
    if env:
        try:
            v = int(env)
        except ValueError:
            raise ValueError(f"IQK_JAX_CPU_THREADS must be an integer, got {env!r}") from None
        if v < 1:
            raise ValueError(f"IQK_JAX_CPU_THREADS must be >= 1, got {v}")
        return v
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class Compiled:
    """A JIT-compiled (type, kernel): the engine (kept alive) and its entry points."""

    def __init__(self, desc, kernel, engine, tm):
        self.desc = desc
        self.kernel = kernel
        self.engine = engine
        self.target_machine = tm
        self.handler = engine.get_function_address("iqk_handler")
        self._nthreads = engine.get_global_value_address("iqk_threads")
        self.set_threads(threads())

    def set_threads(self, n: int):
        """Sets the module's ``iqk_threads`` global (read by the handler on every call)."""
        ctypes.c_int32.from_address(self._nthreads).value = int(n)

    def asm(self) -> str:
        """Host assembly of the module (for inspection)."""
        from iqk_codegen import llvm as em
        import llvmlite.binding as llvm
        mod = llvm.parse_assembly(em.emit(self.desc, self.kernel))
        mod.data_layout = str(self.target_machine.target_data)
        _optimize(mod, self.target_machine)
        return self.target_machine.emit_assembly(mod)


def _target_machine(h=None):
    import llvmlite.binding as llvm
    from iqk_codegen import llvm as em
    h = h or em.host()
    target = llvm.Target.from_triple(h.triple)
    # Default float options: no fast-math, no unsafe FP; FMA fusion only where the IR asks.
    return target.create_target_machine(cpu=h.cpu, features=h.features, opt=3,
                                        reloc="default", codemodel="jitdefault")


def _optimize(mod, tm):
    import llvmlite.binding as llvm
    pto = llvm.create_pipeline_tuning_options(speed_level=2)
    pb = llvm.create_pass_builder(tm, pto)
    pm = pb.getModulePassManager()
    pm.run(mod, pb)


# Bump when the compile pipeline (optimization levels, passes) changes: part of the cache key.
_CACHE_FORMAT = "o3-s2-v1"


def cache_dir():
    """Where compiled object code is kept between processes, or None (caching off).

    ``IQK_JAX_CACHE_DIR`` (empty, ``0`` or ``off`` disable it), else
    ``$XDG_CACHE_HOME/iqk_jax/llvm`` or ``~/.cache/iqk_jax/llvm``.
    """
    d = os.environ.get("IQK_JAX_CACHE_DIR")
    if d is not None:
        return None if d.strip().lower() in ("", "0", "off", "none") else pathlib.Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "iqk_jax" / "llvm"


def _object_code(text: str, h, directory=None) -> bytes:
    """Host object code of an IR module, from the disk cache or freshly compiled.

    The cache key hashes the IR text, the host (triple, CPU, features) and the llvmlite/LLVM
    versions. Each file stores the SHA-256 of its object code in front of it and is checked
    before use, so a truncated or corrupted file is recompiled rather than loaded.
    """
    import llvmlite
    import llvmlite.binding as llvm
    directory = cache_dir() if directory is None else directory
    ident = (f"{_CACHE_FORMAT}|{llvmlite.__version__}|{llvm.llvm_version_info}|{h.triple}|"
             f"{h.cpu}|{h.features}\n{text}")
    path = None
    if directory is not None:
        path = pathlib.Path(directory) / (hashlib.sha256(ident.encode()).hexdigest() + ".o")
        try:
            blob = path.read_bytes()
            digest, obj = blob[:32], blob[32:]
            if obj and hashlib.sha256(obj).digest() == digest:
                return obj
        except OSError:
            pass
    mod = llvm.parse_assembly(text)
    mod.verify()
    tm = _target_machine(h)
    # The host's data layout, so the optimizer sees the real sizes and alignments.
    mod.data_layout = str(tm.target_data)
    _optimize(mod, tm)
    obj = bytes(tm.emit_object(mod))
    if path is not None:
        try:  # best effort: a read-only or full disk only costs the next process a compile
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(hashlib.sha256(obj).digest() + obj)
            os.replace(tmp, path)
        except OSError:
            pass
    return obj


def compiled(desc, kernel: str) -> Compiled:
    """Compiles (once per process, type, kernel and CPU) and returns the kernel module."""
    from iqk_codegen import llvm as em
    desc = registry.descriptor(desc)
    if not em.available():
        raise RuntimeError("llvm target is not available on this host (llvmlite cannot JIT here)")
    h = em.host()
    # The descriptor itself is the key (frozen, hashable): a custom descriptor that reuses a
    # registered name gets its own code.
    key = (desc, kernel, h.cpu, h.features)
    with _lock:
        c = _compiled.get(key)
        if c is None:
            import llvmlite.binding as llvm
            obj = _object_code(em.emit(desc, kernel), h)
            tm = _target_machine()
            empty = llvm.parse_assembly("")
            empty.triple = h.triple
            engine = llvm.create_mcjit_compiler(empty, tm)
            engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
            engine.finalize_object()
            c = Compiled(desc, kernel, engine, tm)
            _compiled[key] = c
        return c


def set_threads(n: int | None):
    """Sets the worker threads of every compiled kernel and of later ones (None: default)."""
    global _threads_override
    if n is not None and int(n) < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    with _lock:
        _threads_override = None if n is None else int(n)
        for c in _compiled.values():
            c.set_threads(threads())


def target_name(desc, kernel: str) -> str:
    """Registers (once) and returns the FFI target name of a compiled kernel."""
    c = compiled(desc, kernel)
    name = f"iqk_llvm_{kernel}_{c.desc.name}"
    try:
        registered = registry.descriptor(c.desc.name)
    except ValueError:
        registered = None
    if registered != c.desc:  # not the registry's own descriptor: a name of its own
        name += "_" + hashlib.sha1(repr(c.desc).encode()).hexdigest()[:12]
    with _lock:
        if name not in _registered:
            capsule = _capsule(c.handler)
            jax.ffi.register_ffi_target(name, capsule, platform="cpu", api_version=1)
            _registered.add(name)
    return name


def _capsule(address: int):
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    return new(ctypes.c_void_p(address), None, None)


# ------------------------------------------------------------------------------------------
# Trace-time validation and the jax-level calls
# ------------------------------------------------------------------------------------------

def _check_raw(raw, desc, shape, what):
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2:
        raise ValueError(f"{what}({desc.name}): shape must be (rows, n_per_row), got {shape}")
    rows, n = shape
    if rows < 0:
        raise ValueError(f"{what}({desc.name}): negative rows in shape {shape}")
    if n <= 0 or n % QK_K:
        raise ValueError(f"{what}({desc.name}): n_per_row={n} is not a positive multiple of {QK_K}")
    rb = desc.row_bytes(n)
    rshape = tuple(getattr(raw, "shape", ()))
    rdtype = getattr(raw, "dtype", None)
    if rdtype is None or np.dtype(rdtype) != np.uint8:
        raise TypeError(f"{what}({desc.name}): raw must be uint8, got {rdtype}")
    if rshape != (rows, rb):
        raise ValueError(f"{what}({desc.name}): raw has shape {rshape} but shape {shape} needs "
                         f"({rows}, {rb}) ({rb} bytes per row of {n} weights)")
    return rows, n


def dequantize(raw, desc, shape, dtype=None):
    """float ``[rows, n]`` from packed rows via the llvm kernel (bit-exact float32)."""
    desc = registry.descriptor(desc)
    dtype = jnp.float32 if dtype is None else dtype
    rows, n = _check_raw(raw, desc, shape, "dequantize")
    if rows == 0:
        return jnp.zeros((0, n), dtype)
    name = target_name(desc, "dequant")
    out = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((rows, n), jnp.float32),
                           vmap_method="sequential")(jnp.asarray(raw))
    return out if jnp.dtype(dtype) == jnp.float32 else out.astype(dtype)


@functools.partial(jax.jit, static_argnums=1)
def quantize_activations(x2d, block_size=32):
    """Per-256-block symmetric int8 activations.

    ``dx = max|x| / 127`` per block (0 for an all-zero block) and ``xq = round(x / dx)``,
    so ``|x - dx * xq| <= dx / 2``.

    Returns:
      (xq int8 ``[m, n]``, dx float32 ``[m, n/256]``, xs int16 ``[m, n/block_size]``: the sums
      of ``xq`` over each weight block, |xs| <= 32 * 127, used by the grid-shift correction).
    """
    m, n = x2d.shape
    xb = x2d.astype(jnp.float32).reshape(m, n // QK_K, QK_K)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    dx = amax / 127.0
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    xq = jnp.clip(jnp.round(xb * inv[..., None]), -127, 127).astype(jnp.int8)
    xs = xq.astype(jnp.int16).reshape(m, n // block_size, block_size).sum(-1, dtype=jnp.int16)
    return xq.reshape(m, n), dx.astype(jnp.float32), xs


def matmul(x2d, raw, desc, shape):
    """float32 ``[m, rows] = x2d @ W.T`` for x2d float32/bf16/f16 ``[m, n]`` via the llvm kernel.

    Activations are quantized to int8 per 256-block (see the module docstring for the bound).
    """
    desc = registry.descriptor(desc)
    rows, n = _check_raw(raw, desc, shape, "matmul")
    xs = tuple(getattr(x2d, "shape", ()))
    xdt = getattr(x2d, "dtype", None)
    if len(xs) != 2:
        raise ValueError(f"matmul({desc.name}): x must be 2-D [m, {n}], got shape {xs}")
    if xs[1] != n:
        raise ValueError(f"matmul({desc.name}): x has {xs[1]} columns but the weights have "
                         f"n_per_row={n}")
    if xdt is None or jnp.dtype(xdt) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                             jnp.dtype(jnp.float16)):
        raise TypeError(f"matmul({desc.name}): x must be float32, bfloat16 or float16, got {xdt}")
    m = xs[0]
    if m == 0 or rows == 0:
        return jnp.zeros((m, rows), jnp.float32)
    kernel = "gemv" if m <= GEMV_MAX_ROWS else "gemm"
    name = target_name(desc, kernel)
    xq, dx, xs = quantize_activations(jnp.asarray(x2d), desc.block_size)
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((m, rows), jnp.float32),
                            vmap_method="sequential")(xq, dx, xs, jnp.asarray(raw))
