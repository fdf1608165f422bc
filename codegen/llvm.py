"""The ``llvm`` target: CPU kernels emitted as LLVM IR from type descriptors.

Everything here is derived from a :class:`iqk_jax.registry.TypeDescriptor`; no function is
written for one type. For one (type, kernel) the emitter builds, with ``llvmlite.ir``'s builder,
a module holding:

* ``iqk_kernel(xq, xd, xs, raw, out, m, rows, n, r0, r1)``, one of
  - ``dequant``: packed rows ``[r0, r1)`` -> float32, bit-exact with
    :func:`iqk_jax.spec.dequantize` (``float32(d * float32(scale)) * value`` as two separate
    ``fmul`` without fast-math flags, so LLVM may neither contract them into an FMA nor
    reassociate; the sign of iq3_kt is applied to the product, as the spec does);
  - ``gemv`` / ``gemm``: ``out[i, r] = sum_k x[i, k] * W[r, k]`` with the activations quantized
    to int8 per 256-wide block by :func:`iqk_jax.cpu.runtime.quantize_activations` (error bound
    in that module). Weights decode to int8 grid values and integer block scales; products are
    summed in integers (``pmaddubsw``/``pmaddwd`` with AVX2, plain vector integer ops elsewhere)
    and turned into float once per 256-weight super-block, so within a super-block the sum is
    exact. ``gemv`` (one activation row) decodes each super-block in registers and, for grid
    pairs that differ by a constant, looks up grid 0 only and adds ``shift * sel * scale *
    sum(x over the block)`` per block; ``gemm`` decodes ``GEMM_RB`` weight rows at a time
    (each once per call) into a scratch buffer and multiplies pairs of them with tiles of
    activation rows, so each activation load serves two weight rows. On AVX2, grids
    with |value| <= 64 (iq2/iq3) multiply ``value`` by ``x + 128`` as an unsigned byte (no
    ``psignb``) and start each super-block's sum at ``-128 * sum(value * scale)``, which the
    decode computes once per weight row: the integer result is the same.
* ``iqk_worker(job)``: a pthread entry point running the kernel on chunks of rows that it claims
  from a counter shared by all workers of the call (dynamic split: threads finish together).
* ``iqk_handler(call_frame)``: the XLA FFI handler (``XLA_FFI_Error* (*)(XLA_FFI_CallFrame*)``,
  struct offsets taken from ctypes mirrors of ``xla/ffi/api/c_api.h``). It answers XLA's metadata
  query, checks every operand (count, kind, dtype, rank, dims against each other, raw row bytes
  against the descriptor, null data) before any load, returns an ``INVALID_ARGUMENT`` FFI error
  on mismatch, then runs ``iqk_threads`` workers (the calling thread is one; a thread that cannot
  be created is replaced by an inline worker call) that share the weight rows chunk by chunk.

How a descriptor becomes code: each :class:`~iqk_jax.registry.Piece` becomes, for a run of up to
32 elements (a whole super-block for trellis indices), one small vector load covering the bytes
the piece reads, a constant ``shufflevector`` putting byte ``byte[e]`` in lane ``e``, a per-lane
constant shift (a bit test for 1-bit pieces, 32-bit lanes for short fields: x86 has no per-byte
variable shift) and a mask, then a shift to ``dst`` and an ``or`` into the field. Pieces that are
whole bytes of little-endian words at a fixed stride load as one vector of words. Grid values
come from byte-shuffle lookups (``pshufb``: every non-trellis grid is a small table of integers;
iq6_k's non-integer grid is looked up as float32 for dequantization and rounded for the integer
matmul, which its error bound accounts for). Trellis types evaluate their generator as
``seed * multiplier**j`` (mod 2**32) per lane, so a group's values fill lanes in weight order.
Block scales go through the descriptor's ``scale_lut`` (affine and int8 tables in arithmetic,
others by lookup).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

import numpy as np

from iqk_jax import registry
from iqk_jax.registry import QK_K, TypeDescriptor

KERNELS = ("dequant", "gemv", "gemm")

try:  # llvmlite is a declared dependency, but the target must degrade, not fail, without it.
    import llvmlite.binding as _llvm
    from llvmlite import ir
    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - exercised only where llvmlite is missing
    _llvm = ir = None
    _IMPORT_ERROR = e

# Rows of activations the gemm kernel multiplies per decoded weight chunk (register tile), and
# activation rows per cache tile (GEMM_MB rows of int8 activations stay in L2 while a range of
# weight rows streams past).
GEMM_TILE = 4
GEMM_MB = 128
# Weight rows decoded together into the scratch buffer (each is decoded once per call, not
# once per activation tile; GEMM_RB rows of scratch stay in L2 across the tiles).
GEMM_RB = 8
# Weight rows per register tile (GEMM_NW x GEMM_TILE int32 accumulators; each activation
# load is used GEMM_NW times).
GEMM_NW = 2
MAX_THREADS = 64
# Row chunks per thread that the workers of one call claim dynamically (see emit_handler).
CHUNKS_PER_THREAD = 32
# The gemm scratch per super-block: 256 int8 values at 0, their 256 absolute values at 256
# (with ``unsigned_x``: instead 8 int32 lanes of -128 * sum(value * scale)), 8 x 16 int16
# expanded block scales at 512, the float factor at 768; padded to 32.
_SCRATCH_SB = 800


# ------------------------------------------------------------------------------------------
# Host
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Host:
    """The CPU the kernels are compiled for (part of every cache key).

    Attributes:
      triple: LLVM target triple of this process.
      cpu: LLVM's name of the host CPU (``znver3``).
      features: LLVM feature string (``+avx2,+ssse3,...``).
    """

    triple: str
    cpu: str
    features: str

    def has(self, feature: str) -> bool:
        """Whether LLVM reports ``+feature`` for this CPU."""
        return f"+{feature}" in self.features.split(",")

    @property
    def x86(self) -> bool:
        """Whether this is an x86 target (the only one with explicit intrinsics here)."""
        return self.triple.startswith(("x86_64", "i686", "i386"))

    @property
    def avx2(self) -> bool:
        """AVX2: 32-byte pshufb, pmaddubsw and pmaddwd are used."""
        return self.x86 and self.has("avx2")

    @property
    def ssse3(self) -> bool:
        """SSSE3: 16-byte pshufb table lookups are used."""
        return self.x86 and self.has("ssse3")


@functools.lru_cache(maxsize=None)
def host() -> Host:
    """The host as llvmlite sees it; raises if llvmlite cannot target this CPU."""
    if _llvm is None:
        raise RuntimeError(f"llvmlite is not importable: {_IMPORT_ERROR}")
    _llvm.initialize_native_target()
    _llvm.initialize_native_asmprinter()
    feats = _llvm.get_host_cpu_features().flatten()
    return Host(_llvm.get_process_triple(), _llvm.get_host_cpu_name(), feats)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether llvmlite can JIT for this CPU and the FFI runtime pieces are present.

    False (never an exception) where llvmlite is missing, the native target cannot be
    initialised, or the pointer size is not 64 bits (the FFI struct layouts assume it).
    """
    try:
        h = host()
        if ctypes.sizeof(ctypes.c_void_p) != 8:
            return False
        _llvm.Target.from_triple(h.triple)
        # The handler spawns its workers with pthreads and the gemm kernel uses malloc; both
        # must resolve in this process for the JIT to link.
        proc = ctypes.CDLL(None)  # what the JIT linker sees: the process's global symbols
        if not all(hasattr(proc, sym) for sym in ("pthread_create", "pthread_join",
                                                  "malloc", "free")):
            return False
        import jax.ffi  # noqa: F401  (the FFI entry points must exist)
        if not (hasattr(jax.ffi, "ffi_call") and hasattr(jax.ffi, "register_ffi_target")):
            return False
        return _smoke_test(h)
    except Exception:
        return False


def _smoke_test(h: Host) -> bool:
    """JIT a tiny function for the host CPU and run it: the whole toolchain works here."""
    i64 = ir.IntType(64)
    mod = ir.Module("iqk_smoke")
    mod.triple = h.triple
    fn = ir.Function(mod, ir.FunctionType(i64, [i64]), "iqk_smoke")
    b = ir.IRBuilder(fn.append_basic_block())
    b.ret(b.mul(fn.args[0], ir.Constant(i64, 3)))
    tm = _llvm.Target.from_triple(h.triple).create_target_machine(
        cpu=h.cpu, features=h.features, opt=0, codemodel="jitdefault")
    llmod = _llvm.parse_assembly(str(mod))
    engine = _llvm.create_mcjit_compiler(llmod, tm)
    engine.finalize_object()
    f = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(engine.get_function_address("iqk_smoke"))
    ok = f(14) == 42
    _SMOKE.append(engine)  # the engine owns the code; keep it for the process
    return ok


_SMOKE: list = []


# ------------------------------------------------------------------------------------------
# FFI C ABI (xla/ffi/api/c_api.h), mirrored in ctypes so offsets come from the platform ABI
# ------------------------------------------------------------------------------------------

class _ExtBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                ("next", ctypes.c_void_p)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion),
                ("traits", ctypes.c_uint32), ("state_type_id", ctypes.c_int64)]


class _MetadataExt(ctypes.Structure):
    _fields_ = [("extension_base", _ExtBase), ("metadata", ctypes.c_void_p)]


class _Args(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.c_void_p), ("args", ctypes.c_void_p)]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.c_void_p), ("names", ctypes.c_void_p),
                ("attrs", ctypes.c_void_p)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("api", ctypes.c_void_p), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int),
                ("args", _Args), ("rets", _Args), ("attrs", _Attrs), ("future", ctypes.c_void_p)]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("data", ctypes.c_void_p), ("rank", ctypes.c_int64),
                ("dims", ctypes.c_void_p)]


class _Api(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("api_version", _ApiVersion), ("internal_api", ctypes.c_void_p),
                ("error_create", ctypes.c_void_p)]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


def _off(struct, *path) -> int:
    off = 0
    for name in path:
        f = getattr(struct, name)
        off += f.offset
        struct = dict(struct._fields_)[name]
    return off


_FFI_EXT_METADATA = 1
_FFI_STAGE_EXECUTE = 3
_FFI_BUFFER = 1
_FFI_INVALID_ARGUMENT = 3
FFI_DTYPES = {"s8": 2, "s16": 3, "u8": 6, "f32": 11}
# XLA_FFI_STRUCT_SIZE(struct, last_field): offset of the last field plus its size.
_ERRARGS_SIZE = _ErrorCreateArgs.errc.offset + ctypes.sizeof(ctypes.c_int)
_APIVER_SIZE = _ApiVersion.minor_version.offset + ctypes.sizeof(ctypes.c_int)


# ------------------------------------------------------------------------------------------
# IR helpers
# ------------------------------------------------------------------------------------------

def _types():
    return (ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64),
            ir.FloatType())


def _vec(t, n):
    return ir.VectorType(t, n)


def _cvec(t, values):
    return ir.Constant(_vec(t, len(values)), [int(v) for v in values])


class _Fn:
    """An IR function under construction with a builder and small structured helpers."""

    def __init__(self, em: "_Emitter", name: str, ret, args, internal=True):
        self.em = em
        self.fn = ir.Function(em.module, ir.FunctionType(ret, args), name)
        if internal:
            self.fn.linkage = "internal"
        self.entry = self.fn.append_basic_block("entry")
        self.b = ir.IRBuilder(self.entry)

    def var(self, ty, init=None, name=""):
        """A stack slot in the entry block (promoted to SSA by mem2reg)."""
        with self.b.goto_block(self.entry):
            if self.entry.instructions:
                self.b.position_before(self.entry.instructions[0])
            slot = self.b.alloca(ty, name=name)
        if init is not None:
            self.b.store(init, slot)
        return slot

    def loop(self, start, stop, body, step=1):
        """``for i in range(start, stop, step): body(i)`` on i64 values (step > 0)."""
        b = self.b
        i64 = ir.IntType(64)
        pre = b.block
        head = self.fn.append_basic_block("loop")
        blk = self.fn.append_basic_block("body")
        done = self.fn.append_basic_block("done")
        b.branch(head)
        b.position_at_end(head)
        i = b.phi(i64)
        i.add_incoming(start, pre)
        b.cbranch(b.icmp_signed("<", i, stop), blk, done)
        b.position_at_end(blk)
        body(i)
        nxt = b.add(i, ir.Constant(i64, step) if isinstance(step, int) else step)
        i.add_incoming(nxt, b.block)
        b.branch(head)
        b.position_at_end(done)

    def if_then(self, cond, then):
        """``if cond: then()``; ``then`` may end its block with a return."""
        b = self.b
        blk = self.fn.append_basic_block("then")
        done = self.fn.append_basic_block("endif")
        b.cbranch(cond, blk, done)
        b.position_at_end(blk)
        then()
        if not b.block.is_terminated:
            b.branch(done)
        b.position_at_end(done)


class _Emitter:
    """Builds one module (kernel + FFI handler) for one descriptor and kernel kind."""

    def __init__(self, desc: TypeDescriptor, kernel: str, h: Host):
        self.desc = desc
        self.kernel = kernel
        self.host = h
        self.module = ir.Module(name=f"iqk_{desc.name}_{kernel}")
        self.module.triple = h.triple
        self.I1, self.I8, self.I16, self.I32, self.I64, self.F32 = _types()
        self.P8 = self.I8.as_pointer()
        self._decls: dict[str, ir.Function] = {}
        self._globals: dict[str, ir.GlobalVariable] = {}
        grid = desc.grid_values
        self.int_grid = bool(np.all(grid == np.round(grid)))
        self.trellis = desc.trellis is not None
        # Grid pairs that differ by one integer constant (every IQK pair with integer values):
        # the matmul kernels look up grid 0 only and add ``shift * sel * scale * sum(x)`` per
        # block from precomputed activation block sums, saving a lookup and a blend per 32
        # weights.
        # Checked on the integer values the matmuls use (iq6_k's grid is rounded there; its
        # rounded pair differs by exactly 1).
        # gemm with small grids multiplies v by x + 128 (unsigned) instead of |v| by
        # sign(v) * x: one instruction (psignb) less per 32 products and activation row. Safe
        # when no pmaddubsw pair sum can saturate: with 0 <= x + 128 <= 255 (|x| <= 127) and
        # |v| <= vmax, a pair sum is at most 2 * 255 * vmax <= 32767, i.e. vmax <= 64 (iq2/iq3
        # grids: 31 and 63). Sign-folded values keep their magnitude, so the grid bound holds.
        # The offset is removed exactly in integers (see emit_gemm). Trellis values are not
        # table values and may reach 126, so they keep the sign trick.
        self.vmax = int(np.abs(np.round(grid)).max())
        self.unsigned_x = bool(h.avx2 and not self.trellis and 2 * 255 * self.vmax <= 32767)
        self.shift = None
        if not self.trellis and desc.n_selectors == 2:
            diff = np.unique(np.round(grid[1]) - np.round(grid[0]))
            if diff.size == 1:
                self.shift = int(diff[0])

    # ----- declarations ----------------------------------------------------------------
    def decl(self, name, ret, args):
        """Declares (once) an external function or LLVM intrinsic."""
        if name not in self._decls:
            self._decls[name] = ir.Function(self.module, ir.FunctionType(ret, args), name)
        return self._decls[name]

    def const_array(self, name, ty, values):
        """An internal constant global array (a lookup table)."""
        if name not in self._globals:
            arr = ir.ArrayType(ty, len(values))
            g = ir.GlobalVariable(self.module, arr, name)
            g.global_constant = True
            g.linkage = "internal"
            if isinstance(ty, ir.FloatType):
                g.initializer = ir.Constant(arr, [float(v) for v in values])
            else:
                g.initializer = ir.Constant(arr, [int(v) for v in values])
            self._globals[name] = g
        return self._globals[name]

    def cstring(self, text: str):
        """A NUL-terminated internal constant string (FFI error messages)."""
        key = "str" + str(len(self._globals))
        data = bytearray(text.encode() + b"\0")
        arr = ir.ArrayType(self.I8, len(data))
        g = ir.GlobalVariable(self.module, arr, f"msg.{len(self._globals)}")
        g.global_constant = True
        g.linkage = "internal"
        g.initializer = ir.Constant(arr, data)
        self._globals[key] = g
        return g

    # ----- field extraction from pieces ------------------------------------------------
    def _gather(self, f: _Fn, sb, p, elems):
        """<len(elems) x i8>: byte ``p.byte[e]`` of the piece's source for each element."""
        b = f.b
        I8, I16, I32 = self.I8, self.I16, self.I32
        byts = [p.byte[e] for e in elems]
        lo, hi = min(byts), max(byts)
        n = len(elems)
        if p.source == "xor16":
            lo, hi = lo & ~1, hi | 1
        span = hi - lo + 1
        if span > 64 and p.source == "raw":
            # Widely scattered bytes (a few block scales): scalar loads beat a huge vector.
            v = ir.Constant(_vec(I8, n), None)
            for lane, off in enumerate(byts):
                x = b.load(b.gep(sb, [ir.Constant(self.I64, off)]), align=1)
                v = b.insert_element(v, x, ir.Constant(I32, lane))
            return v
        ptr = b.gep(sb, [ir.Constant(self.I64, lo)])
        if p.source == "raw":
            src = b.load(b.bitcast(ptr, _vec(I8, span).as_pointer()), align=1)
        else:
            # Gray-decoded 16-bit words: w' = w & ~1; w' ^= w' >> 1 (the spec's ``xor16``).
            nw = span // 2
            w = b.load(b.bitcast(ptr, _vec(I16, nw).as_pointer()), align=1)
            w = b.and_(w, _cvec(I16, [0xFFFE] * nw))
            w = b.xor(w, b.lshr(w, _cvec(I16, [1] * nw)))
            src = b.bitcast(w, _vec(I8, span))
        mask = _cvec(I32, [x - lo for x in byts])
        return b.shuffle_vector(src, ir.Constant(src.type, None), mask)

    def _word_pieces(self, name, elems):
        """Pieces of ``name`` that are whole bytes of little-endian words at a fixed stride.

        Returns (first byte, stride, word bytes, pieces) when, for the given elements, the
        pieces whose bits are whole bytes (shift 0, 8 bits, dst a multiple of 8) read bytes
        ``first + stride * i + dst / 8`` and tile ``dst`` from 0 up: those load as one vector
        of 16/32-bit words instead of one byte gather per piece. None otherwise.
        """
        ps = [p for p in self.desc.pieces_of(name)
              if p.source == "raw" and p.nbits == 8 and not any(p.shift[e] for e in elems)
              and p.dst % 8 == 0]
        ps.sort(key=lambda p: p.dst)
        if len(ps) not in (2, 4) or [p.dst for p in ps] != list(range(0, 8 * len(ps), 8)):
            return None
        base = [ps[0].byte[e] for e in elems]
        stride = base[1] - base[0] if len(base) > 1 else len(ps)
        if stride != len(ps) or any(base[i] != base[0] + stride * i for i in range(len(base))):
            return None
        if any(p.byte[e] != ps[0].byte[e] + k for k, p in enumerate(ps) for e in elems):
            return None
        return base[0], stride, len(ps), ps

    def field(self, f: _Fn, sb, name, elems, ty):
        """<len(elems) x ty>: the packed integer ``name`` for each element index."""
        b = f.b
        n = len(elems)
        acc = None
        pieces = self.desc.pieces_of(name)
        words = self._word_pieces(name, elems) if ty.width >= 16 else None
        if words is not None and 8 * words[2] > ty.width:
            words = None
        if words is not None:
            first, _, nbytes, wps = words
            wt = ir.IntType(8 * nbytes)
            ptr = b.gep(sb, [ir.Constant(self.I64, first)])
            acc = b.load(b.bitcast(ptr, _vec(wt, n).as_pointer()), align=1)
            if wt.width < ty.width:
                acc = b.zext(acc, _vec(ty, n))
            pieces = [p for p in pieces if p not in wps]
        for p in pieces:
            v = self._gather(f, sb, p, elems)
            sh = [p.shift[e] for e in elems]
            if len(set(sh)) > 1 and p.nbits == 1:
                # A single bit at a per-lane position: test it instead of shifting (x86 has
                # no per-lane byte shift).
                hit = b.icmp_unsigned("!=", b.and_(v, _cvec(self.I8, [1 << x for x in sh])),
                                      ir.Constant(v.type, None))
                w = b.zext(hit, _vec(ty, n))
                if p.dst:
                    w = b.shl(w, _cvec(ty, [p.dst] * n))
                acc = w if acc is None else b.or_(acc, w)
                continue
            if len(set(sh)) > 1 and n <= 16 and ty is not self.I8:
                # x86 has no per-lane byte shift; short fields shift faster as 32-bit lanes.
                w = b.lshr(b.zext(v, _vec(self.I32, n)), _cvec(self.I32, sh))
                w = b.and_(w, _cvec(self.I32, [p.mask] * n))
                if ty is not self.I32:
                    w = b.trunc(w, _vec(ty, n))
                if p.dst:
                    w = b.shl(w, _cvec(ty, [p.dst] * n))
                acc = w if acc is None else b.or_(acc, w)
                continue
            if any(sh):
                v = b.lshr(v, _cvec(self.I8, sh))
            if p.nbits < 8:
                v = b.and_(v, _cvec(self.I8, [p.mask] * n))
            if ty is not self.I8:
                v = b.zext(v, _vec(ty, n))
            if p.dst:
                v = b.shl(v, _cvec(ty, [p.dst] * n))
            acc = v if acc is None else b.or_(acc, v)
        if acc is None:  # a field the type does not have (sel of single-grid types)
            acc = ir.Constant(_vec(ty, n), None)
        return acc

    # ----- table lookups ------------------------------------------------------------------
    def lookup_i8(self, f: _Fn, idx, table, name):
        """<n x i8> ``table[idx]`` for an <n x i8> index vector (values in [0, len(table))).

        Uses ``pshufb`` (16 entries per shuffle, a select chain for larger tables) where the
        host has it; otherwise a scalar load per lane from a constant array.
        """
        b = f.b
        I8, I32 = self.I8, self.I32
        n = idx.type.count
        table = [int(v) for v in table]
        if (self.host.ssse3 and len(table) <= 128 and n <= 32):
            width = 32 if (n > 16 and self.host.avx2) else 16
            if n > width:  # 32 lanes without AVX2: two halves
                lo = self.lookup_i8(f, b.shuffle_vector(idx, idx, _cvec(I32, range(16))),
                                    table, name)
                hi = self.lookup_i8(f, b.shuffle_vector(idx, idx, _cvec(I32, range(16, 32))),
                                    table, name)
                return b.shuffle_vector(lo, hi, _cvec(I32, range(32)))
            v = idx
            if n != width:
                v = b.shuffle_vector(idx, ir.Constant(idx.type, None),
                                     _cvec(I32, [i if i < n else n for i in range(width)]))
            vt = _vec(I8, width)
            if width == 32:
                fn = self.decl("llvm.x86.avx2.pshuf.b", vt, [vt, vt])
            else:
                fn = self.decl("llvm.x86.ssse3.pshuf.b.128", vt, [vt, vt])
            ntab = (len(table) + 15) // 16
            low = v if ntab == 1 else b.and_(v, _cvec(I8, [15] * width))
            hi4 = None if ntab == 1 else b.lshr(v, _cvec(I8, [4] * width))
            res = None
            for t in range(ntab):
                chunk = (table[16 * t:16 * t + 16] + [0] * 16)[:16]
                r = b.call(fn, [_cvec(I8, chunk * (width // 16)), low])
                if res is None:
                    res = r
                else:
                    hit = b.icmp_unsigned("==", hi4, _cvec(I8, [t] * width))
                    res = b.select(hit, r, res)
            if n != width:
                res = b.shuffle_vector(res, res, _cvec(I32, range(n)))
            return res
        g = self.const_array(name, I8, table)
        out = ir.Constant(_vec(I8, n), None)
        for lane in range(n):
            i = b.zext(b.extract_element(idx, ir.Constant(I32, lane)), self.I64)
            x = b.load(b.gep(g, [ir.Constant(self.I64, 0), i]))
            out = b.insert_element(out, x, ir.Constant(I32, lane))
        return out

    def block_scales(self, f: _Fn, sb):
        """<n_blocks x i32>: the decoded integer block scales ``scale_lut[packed]``."""
        b = f.b
        d = self.desc
        nb = d.n_blocks
        u = self.field(f, sb, "scale", list(range(nb)), self.I32)
        lut = d.scale_lut.astype(np.int64)
        ar = np.arange(lut.size, dtype=np.int64)
        a = int(lut[1] - lut[0]) if lut.size > 1 else 0
        if np.array_equal(lut, a * ar + lut[0]):  # affine: mul * u - offset
            if a != 1:
                u = b.mul(u, _cvec(self.I32, [a] * nb))
            return b.add(u, _cvec(self.I32, [int(lut[0])] * nb)) if lut[0] else u
        if lut.size == 256 and np.array_equal(lut, ar.astype(np.uint8).view(np.int8)):
            return b.sext(b.trunc(u, _vec(self.I8, nb)), _vec(self.I32, nb))
        if lut.min() >= -128 and lut.max() <= 127:
            u8 = b.trunc(u, _vec(self.I8, nb))
            return b.sext(self.lookup_i8(f, u8, lut, "scale_lut"), _vec(self.I32, nb))
        g = self.const_array("scale_lut32", self.I32, lut)
        out = ir.Constant(_vec(self.I32, nb), None)
        for lane in range(nb):
            i = b.zext(b.extract_element(u, ir.Constant(self.I32, lane)), self.I64)
            out = b.insert_element(out, b.load(b.gep(g, [ir.Constant(self.I64, 0), i])),
                                   ir.Constant(self.I32, lane))
        return out

    # ----- grid values -----------------------------------------------------------------
    def _grid_index(self, f: _Fn, sb, w0, use_sel=True):
        """<32 x i8> flat index ``((sel << bits | q) * group_size + w % group_size)``."""
        b = f.b
        d = self.desc
        ws = list(range(w0, w0 + 32))
        q = self.field(f, sb, "q", [w // d.group_size for w in ws], self.I8)
        if d.n_selectors > 1 and use_sel:
            sel = self.field(f, sb, "sel", [w // d.block_size for w in ws], self.I8)
            q = b.or_(q, b.shl(sel, _cvec(self.I8, [d.bits] * 32)))
        if d.group_size > 1:
            q = b.mul(q, _cvec(self.I8, [d.group_size] * 32))
            q = b.or_(q, _cvec(self.I8, [w % d.group_size for w in ws]))
        return q

    def _trellis_seeds(self, f: _Fn, sb, groups):
        """<len(groups) x i32>: ``q + offset[sel]`` of the given groups of a super-block.

        Indices are gathered in 16-bit lanes (they have <= 16 bits), then widened.
        """
        b = f.b
        d = self.desc
        t = d.trellis
        ng = len(groups)
        I32 = self.I32
        qt = self.I16 if d.bits <= 16 else I32
        x = self.field(f, sb, "q", list(groups), qt)
        if qt is not I32:
            x = b.zext(x, _vec(I32, ng))
        offs = list(t.offsets)
        if len(offs) == 1:
            return b.add(x, _cvec(I32, [offs[0]] * ng))
        sel = self.field(f, sb, "sel", [g * d.group_size // d.block_size for g in groups], I32)
        off = _cvec(I32, [offs[0]] * ng)
        for k in range(1, len(offs)):
            hit = b.icmp_unsigned("==", sel, _cvec(I32, [k] * ng))
            off = b.select(hit, _cvec(I32, [offs[k]] * ng), off)
        return b.add(x, off)

    def _trellis_values(self, f: _Fn, sb, w0, nw, seeds=None):
        """<nw x i8>: trellis generator values of weights [w0, w0+nw) (nw * gs-aligned)."""
        b = f.b
        d = self.desc
        gs = d.group_size
        t = d.trellis
        I32 = self.I32
        ng = nw // gs
        g0 = w0 // gs
        if seeds is None:
            x = self._trellis_seeds(f, sb, range(g0, g0 + ng))
        else:
            x = b.shuffle_vector(seeds, seeds, _cvec(I32, range(g0, g0 + ng)))
        # Step j of the generator is x0 * multiplier**j (mod 2**32), so each value is one
        # multiply of the seed by a constant: a group's values fill 32-bit lanes in weight
        # order, with no serial chain and no transpose.
        per = max(1, 8 // gs)
        lanes = per * gs
        pows = [pow(t.multiplier, j + 1, 1 << 32) for j in range(gs)]
        mult = _cvec(I32, [pows[l % gs] for l in range(lanes)])
        vals = []
        for v0 in range(0, ng, per):
            xs = b.shuffle_vector(x, x, _cvec(I32, [v0 + l // gs for l in range(lanes)]))
            s = b.and_(b.mul(xs, mult), _cvec(I32, [0x3F3F3F3F] * lanes))
            if self.host.avx2 and lanes == 8:
                v32, v16, v8 = _vec(self.I8, 32), _vec(self.I16, 16), _vec(I32, 8)
                maddubs = self.decl("llvm.x86.avx2.pmadd.ub.sw", v16, [v32, v32])
                madd = self.decl("llvm.x86.avx2.pmadd.wd", v8, [v16, v16])
                pair = b.call(maddubs, [b.bitcast(s, v32), _cvec(self.I8, [1] * 32)])
                tot = b.call(madd, [pair, _cvec(self.I16, [1] * 16)])
            else:
                # Each byte is <= 63, so the top byte of s * 0x01010101 is the byte sum.
                tot = b.lshr(b.mul(s, _cvec(I32, [0x01010101] * lanes)), _cvec(I32, [24] * lanes))
            vals.append(b.sub(tot, _cvec(I32, [126] * lanes)))
        while len(vals) > 1:
            vals = [b.shuffle_vector(vals[k], vals[k + 1],
                                     _cvec(I32, range(2 * vals[k].type.count)))
                    for k in range(0, len(vals), 2)]
        vals = b.trunc(vals[0], _vec(self.I8, nw))
        if t.abs_values:
            absf = self.decl(f"llvm.abs.v{nw}i8", _vec(self.I8, nw), [_vec(self.I8, nw), self.I1])
            vals = b.call(absf, [vals, ir.Constant(self.I1, 0)])
        return vals

    def values_i8(self, f: _Fn, sb, fold_sign: bool, grid0_only: bool = False):
        """Eight <32 x i8> chunks of integer grid values of one super-block.

        Non-integer grids (iq6_k) are rounded to the nearest integer here; only the matmul
        kernels use this for them (their error bound includes the rounding).
        With ``fold_sign`` the per-weight sign field is applied (v -> -v). With ``grid0_only``
        (types with ``self.shift``) every weight is looked up in grid 0.
        """
        b = f.b
        d = self.desc
        chunks = []
        if self.trellis:
            unit = max(32, 8 * d.group_size)
            # Indices stored as plain words load for the whole super-block at once; bit-packed
            # ones gather per unit (fewer live registers).
            seeds = None
            if self._word_pieces("q", list(range(d.n_groups))) is not None:
                seeds = self._trellis_seeds(f, sb, range(d.n_groups))
            for w0 in range(0, QK_K, unit):
                v = self._trellis_values(f, sb, w0, unit, seeds)
                for k in range(unit // 32):
                    lanes = _cvec(self.I32, range(32 * k, 32 * k + 32))
                    chunks.append(b.shuffle_vector(v, v, lanes))
        else:
            g = d.grid_values[:1] if grid0_only else d.grid_values
            table = np.round(g.reshape(-1)).astype(np.int64)
            for w0 in range(0, QK_K, 32):
                idx = self._grid_index(f, sb, w0, use_sel=not grid0_only)
                tname = "grid0_i8" if grid0_only else "grid_i8"
                chunks.append(self.lookup_i8(f, idx, table, tname))
        if fold_sign and d.pieces_of("sign"):
            for k in range(len(chunks)):
                s = self.field(f, sb, "sign", list(range(32 * k, 32 * k + 32)), self.I8)
                neg = b.icmp_unsigned("!=", s, ir.Constant(s.type, None))
                chunks[k] = b.select(neg, b.neg(chunks[k]), chunks[k])
        return chunks

    # ----- scalars ---------------------------------------------------------------------
    def half_to_float(self, f: _Fn, h16):
        """Exact fp16 -> fp32 in integer ops (independent of F16C and of DAZ/FTZ modes)."""
        b = f.b
        I32 = self.I32
        h = b.zext(h16, I32)
        c = lambda v: ir.Constant(I32, v)  # noqa: E731
        sign = b.shl(b.and_(h, c(0x8000)), c(16))
        e = b.and_(b.lshr(h, c(10)), c(0x1F))
        m = b.and_(h, c(0x3FF))
        normal = b.or_(b.shl(b.add(e, c(112)), c(23)), b.shl(m, c(13)))
        infnan = b.or_(c(0x7F800000), b.shl(m, c(13)))
        ctlz = self.decl("llvm.ctlz.i32", I32, [I32, self.I1])
        k = b.sub(b.call(ctlz, [m, ir.Constant(self.I1, 0)]), c(21))  # shift to bring top bit to 10
        sub_m = b.and_(b.shl(m, k), c(0x3FF))
        sub_e = b.sub(c(113), k)
        subn = b.or_(b.shl(sub_e, c(23)), b.shl(sub_m, c(13)))
        is_e0 = b.icmp_unsigned("==", e, c(0))
        is_m0 = b.icmp_unsigned("==", m, c(0))
        mag = b.select(b.icmp_unsigned("==", e, c(31)), infnan, normal)
        mag = b.select(is_e0, b.select(is_m0, c(0), subn), mag)
        return b.bitcast(b.or_(sign, mag), self.F32)

    def load_d(self, f: _Fn, ptr, header_bytes):
        """The float32 scale at ``ptr``: fp16 (2 bytes) or fp32 (4 bytes), unaligned."""
        b = f.b
        if header_bytes == 2:
            h = b.load(b.bitcast(ptr, self.I16.as_pointer()), align=1)
            if self.host.x86 and self.host.has("f16c"):
                # vcvtph2ps: exact for every half, subnormals included, whatever MXCSR says.
                return b.fpext(b.bitcast(h, ir.HalfType()), self.F32)
            return self.half_to_float(f, h)
        return b.load(b.bitcast(ptr, self.F32.as_pointer()), align=1)

    def hsum(self, f: _Fn, v):
        """Sum of a float vector's lanes in a fixed pairwise order (deterministic)."""
        b = f.b
        n = v.type.count
        while n > 1:
            h = n // 2
            lo = b.shuffle_vector(v, v, _cvec(self.I32, range(h)))
            hi = b.shuffle_vector(v, v, _cvec(self.I32, range(h, n)))
            v = b.fadd(lo, hi)
            n = h
        return b.extract_element(v, ir.Constant(self.I32, 0))

    def splat(self, f: _Fn, x, n):
        """<n x type(x)> with every lane ``x``."""
        b = f.b
        v = b.insert_element(ir.Constant(_vec(x.type, n), None), x, ir.Constant(self.I32, 0))
        return b.shuffle_vector(v, v, _cvec(self.I32, [0] * n))

    # ----- kernels ---------------------------------------------------------------------
    def kernel_args(self):
        """(xq, xd, xs, raw, out, m, rows, n, r0, r1): one signature for all kernels."""
        P8, PF, I64 = self.P8, self.F32.as_pointer(), self.I64
        return [P8, PF, self.I16.as_pointer(), P8, PF, I64, I64, I64, I64, I64]

    def _shift_correction(self, f: _Fn, sb, scales):
        """<n_blocks x i16> ``shift * scale`` for blocks on grid 1, 0 for blocks on grid 0.

        |shift * scale| <= 5 * 128 fits int16 with room for the block sums it multiplies.
        """
        b = f.b
        nb = self.desc.n_blocks
        sel = self.field(f, sb, "sel", list(range(nb)), self.I8)
        c = b.mul(b.trunc(scales, _vec(self.I16, nb)), _cvec(self.I16, [self.shift] * nb))
        on = b.icmp_unsigned("!=", sel, ir.Constant(sel.type, None))
        return b.select(on, c, ir.Constant(c.type, None))

    def _apply_correction(self, f: _Fn, corr, xs_ptr):
        """<8 x i32>: corr[b] * xs[b] in 8 lanes (xs: int16 block sums of x), pair-summed."""
        b = f.b
        nb = self.desc.n_blocks
        I16, I32 = self.I16, self.I32
        xs = b.load(b.bitcast(xs_ptr, _vec(I16, nb).as_pointer()), align=2)
        if self.host.has("sse2") and nb in (8, 16) and (nb == 8 or self.host.avx2):
            # pmaddwd: products of int16 pairs summed into int32 (|.| <= 2 * 640 * 4064).
            name = "llvm.x86.avx2.pmadd.wd" if nb == 16 else "llvm.x86.sse2.pmadd.wd"
            madd = self.decl(name, _vec(I32, nb // 2), [_vec(I16, nb)] * 2)
            p = b.call(madd, [corr, xs])
        else:
            p = b.mul(b.sext(corr, _vec(I32, nb)), b.sext(xs, _vec(I32, nb)))
        while p.type.count > 8:
            h = p.type.count // 2
            p = b.add(b.shuffle_vector(p, p, _cvec(I32, range(h))),
                      b.shuffle_vector(p, p, _cvec(I32, range(h, 2 * h))))
        if p.type.count < 8:
            p = b.shuffle_vector(p, ir.Constant(p.type, None),
                                 _cvec(I32, [i if i < p.type.count else p.type.count
                                             for i in range(8)]))
        return p

    def emit_dequant(self):
        """The dequantization kernel: rows [r0, r1) of raw -> float32 out."""
        d = self.desc
        f = _Fn(self, "iqk_kernel", self.I32, self.kernel_args(), internal=False)
        b = f.b
        _, _, _, raw, out, _, _, n, r0, r1 = f.fn.args
        I64, I32, F32 = self.I64, self.I32, self.F32
        nsb = b.sdiv(n, ir.Constant(I64, QK_K))
        hb = d.row_header_bytes
        rb = b.add(b.mul(nsb, ir.Constant(I64, d.block_bytes)), ir.Constant(I64, hb))
        table = d.grid_values.reshape(-1)
        gtab = None if self.int_grid else self.const_array("grid_f32", F32, table)
        has_sign = bool(d.pieces_of("sign"))

        def row_body(r):
            row = b.gep(raw, [b.mul(r, rb)])
            drow = self.load_d(f, row, hb) if hb else None
            orow = b.gep(out, [b.mul(r, n)])

            def sb_body(s):
                sb = b.gep(row, [b.add(ir.Constant(I64, hb),
                                       b.mul(s, ir.Constant(I64, d.block_bytes)))])
                dd = self.load_d(f, sb, 2) if d.super_d else drow
                sc = b.sitofp(self.block_scales(f, sb), _vec(F32, d.n_blocks))
                # float32(d * float32(scale)): its own rounding, as the spec does it.
                dl = b.fmul(self.splat(f, dd, d.n_blocks), sc)
                dst = b.gep(orow, [b.mul(s, ir.Constant(I64, QK_K))])
                if self.int_grid:
                    chunks = self.values_i8(f, sb, fold_sign=False)
                for k in range(QK_K // 32):
                    if self.int_grid:
                        v32 = chunks[k]
                    else:
                        idx32 = self._grid_index(f, sb, 32 * k)
                    sgn = None
                    if has_sign:
                        sgn = self.field(f, sb, "sign", list(range(32 * k, 32 * k + 32)), self.I8)
                    for j in range(4):
                        lanes = _cvec(I32, range(8 * j, 8 * j + 8))
                        if self.int_grid:
                            fv = b.sitofp(b.shuffle_vector(v32, v32, lanes), _vec(F32, 8))
                        else:
                            fv = ir.Constant(_vec(F32, 8), None)
                            ix = b.shuffle_vector(idx32, idx32, lanes)
                            for lane in range(8):
                                i = b.zext(b.extract_element(ix, ir.Constant(I32, lane)), I64)
                                x = b.load(b.gep(gtab, [ir.Constant(I64, 0), i]))
                                fv = b.insert_element(fv, x, ir.Constant(I32, lane))
                        w0 = 32 * k + 8 * j
                        blk = b.shuffle_vector(dl, dl, _cvec(I32, [w0 // d.block_size] * 8))
                        y = b.fmul(blk, fv)
                        if sgn is not None:
                            sj = b.shuffle_vector(sgn, sgn, lanes)
                            neg = b.icmp_unsigned("!=", sj, ir.Constant(sj.type, None))
                            y = b.select(neg, b.fneg(y), y)
                        p = b.bitcast(b.gep(dst, [ir.Constant(I64, w0)]), _vec(F32, 8).as_pointer())
                        b.store(y, p, align=4)

            f.loop(ir.Constant(I64, 0), nsb, sb_body)

        f.loop(r0, r1, row_body)
        b.ret(ir.Constant(self.I32, 0))
        return f.fn

    def _dot_chunk(self, f: _Fn, v, av, xv, s16):
        """<8 x i32> of sum over pairs of lanes of v * xv * scale (AVX2 or generic)."""
        b = f.b
        I8, I16, I32 = self.I8, self.I16, self.I32
        if self.host.avx2:
            v32, v16, v8 = _vec(I8, 32), _vec(I16, 16), _vec(I32, 8)
            psign = self.decl("llvm.x86.avx2.psign.b", v32, [v32, v32])
            maddubs = self.decl("llvm.x86.avx2.pmadd.ub.sw", v16, [v32, v32])
            madd = self.decl("llvm.x86.avx2.pmadd.wd", v8, [v16, v16])
            # |v| (unsigned) * (x with v's sign): the product v * x with an unsigned operand,
            # as pmaddubsw wants; pair sums <= 2 * 127 * 127 never saturate.
            p = b.call(maddubs, [av, b.call(psign, [xv, v])])
            return b.call(madd, [p, s16])
        p = b.mul(b.sext(v, _vec(I32, 32)), b.sext(xv, _vec(I32, 32)))
        p16 = b.add(b.shuffle_vector(p, p, _cvec(I32, range(0, 32, 2))),
                    b.shuffle_vector(p, p, _cvec(I32, range(1, 32, 2))))
        p16 = b.mul(p16, b.sext(s16, _vec(I32, 16)))
        return b.add(b.shuffle_vector(p16, p16, _cvec(I32, range(0, 16, 2))),
                     b.shuffle_vector(p16, p16, _cvec(I32, range(1, 16, 2))))

    def _udot_chunk(self, f: _Fn, u, v, s16):
        """<8 x i32>: ``pmaddwd(pmaddubsw(u, v), s16)``, u read as unsigned bytes (AVX2 only).

        Callers guarantee that no pair sum ``u[2j] * v[2j] + u[2j+1] * v[2j+1]`` leaves int16
        (``pmaddubsw`` would saturate); see :attr:`unsigned_x`.
        """
        b = f.b
        v32, v16, v8 = _vec(self.I8, 32), _vec(self.I16, 16), _vec(self.I32, 8)
        maddubs = self.decl("llvm.x86.avx2.pmadd.ub.sw", v16, [v32, v32])
        madd = self.decl("llvm.x86.avx2.pmadd.wd", v8, [v16, v16])
        return b.call(madd, [b.call(maddubs, [u, v]), s16])

    def _abs8(self, f: _Fn, v):
        absf = self.decl("llvm.abs.v32i8", _vec(self.I8, 32), [_vec(self.I8, 32), self.I1])
        return f.b.call(absf, [v, ir.Constant(self.I1, 0)])

    def _scale_pairs(self, f: _Fn, sc16):
        """<16 x i16> A with A[8h + k] = scale of the block of weight 32k + 16h.

        Chunk k's per-pair scales are then lane k of each 128-bit half of A: an in-lane
        shuffle (one ``pshufb``) instead of a cross-lane one per chunk.
        """
        bs = self.desc.block_size
        return f.b.shuffle_vector(sc16, sc16, _cvec(self.I32, [(32 * (j % 8) + 16 * (j // 8)) // bs
                                                               for j in range(16)]))

    def _scale_lanes(self, f: _Fn, pairs, k):
        """<16 x i16>: the block scale of each weight pair of chunk k (from _scale_pairs)."""
        return f.b.shuffle_vector(pairs, pairs, _cvec(self.I32, [8 * (l // 8) + k
                                                                 for l in range(16)]))

    def emit_gemv(self):
        """The register-only matmul kernel (decodes per activation row; for m == 1)."""
        d = self.desc
        f = _Fn(self, "iqk_kernel", self.I32, self.kernel_args(), internal=False)
        b = f.b
        xq, xd, xs, raw, out, m, rows, n, r0, r1 = f.fn.args
        I64, I32, F32 = self.I64, self.I32, self.F32
        nsb = b.sdiv(n, ir.Constant(I64, QK_K))
        nbt = b.sdiv(n, ir.Constant(I64, d.block_size))
        hb = d.row_header_bytes
        rb = b.add(b.mul(nsb, ir.Constant(I64, d.block_bytes)), ir.Constant(I64, hb))
        facc = f.var(_vec(F32, 8))

        def x_body(i):
            xrow = b.gep(xq, [b.mul(i, n)])
            xdrow = b.gep(xd, [b.mul(i, nsb)])
            xsrow = b.gep(xs, [b.mul(i, nbt)])

            def row_body(r):
                row = b.gep(raw, [b.mul(r, rb)])
                b.store(ir.Constant(_vec(F32, 8), None), facc)

                def sb_body(s):
                    sb = b.gep(row, [b.add(ir.Constant(I64, hb),
                                           b.mul(s, ir.Constant(I64, d.block_bytes)))])
                    chunks = self.values_i8(f, sb, fold_sign=True,
                                            grid0_only=self.shift is not None)
                    scales = self.block_scales(f, sb)
                    sc16 = self._scale_pairs(f, b.trunc(scales, _vec(self.I16, d.n_blocks)))
                    xsb = b.gep(xrow, [b.mul(s, ir.Constant(I64, QK_K))])
                    acc = None
                    if self.shift is not None:
                        acc = self._apply_correction(
                            f, self._shift_correction(f, sb, scales),
                            b.gep(xsrow, [b.mul(s, ir.Constant(I64, d.n_blocks))]))
                    for k, v in enumerate(chunks):
                        xv = b.load(b.bitcast(b.gep(xsb, [ir.Constant(I64, 32 * k)]),
                                              _vec(self.I8, 32).as_pointer()), align=1)
                        av = self._abs8(f, v) if self.host.avx2 else None
                        t = self._dot_chunk(f, v, av, xv, self._scale_lanes(f, sc16, k))
                        acc = t if acc is None else b.add(acc, t)
                    fac = b.load(b.gep(xdrow, [s]))
                    if d.super_d:
                        fac = b.fmul(self.load_d(f, sb, 2), fac)
                    part = b.fmul(b.sitofp(acc, _vec(F32, 8)), self.splat(f, fac, 8))
                    b.store(b.fadd(b.load(facc), part), facc)

                f.loop(ir.Constant(I64, 0), nsb, sb_body)
                tot = self.hsum(f, b.load(facc))
                if hb:
                    tot = b.fmul(tot, self.load_d(f, row, hb))
                b.store(tot, b.gep(out, [b.add(b.mul(i, rows), r)]))

            f.loop(r0, r1, row_body)

        f.loop(ir.Constant(I64, 0), m, x_body)
        b.ret(ir.Constant(self.I32, 0))
        return f.fn

    def emit_gemm(self):
        """The scratch-buffer matmul kernel.

        Loop order: blocks of GEMM_RB weight rows (decoded once into scratch), then tiles of
        GEMM_MB activation rows (kept in cache across the block), then GEMM_NW weight rows x
        GEMM_TILE activation rows per register tile. Per super-block the int32 sums are exact
        (see ``unsigned_x`` and ``_dot_chunk`` for the 16-bit bounds), so results do not depend
        on the tiling or the thread split.
        """
        d = self.desc
        f = _Fn(self, "iqk_kernel", self.I32, self.kernel_args(), internal=False)
        b = f.b
        # xs (activation block sums) is not needed: gemm decodes with the full grid.
        xq, xd, _, raw, out, m, rows, n, r0, r1 = f.fn.args
        I8, I16, I64, F32 = self.I8, self.I16, self.I64, self.F32
        nsb = b.sdiv(n, ir.Constant(I64, QK_K))
        hb = d.row_header_bytes
        rb = b.add(b.mul(nsb, ir.Constant(I64, d.block_bytes)), ir.Constant(I64, hb))
        malloc = self.decl("malloc", self.P8, [I64])
        free = self.decl("free", ir.VoidType(), [self.P8])
        row_sb = b.mul(nsb, ir.Constant(I64, _SCRATCH_SB))  # scratch bytes per weight row
        scratch = b.call(malloc, [b.mul(row_sb, ir.Constant(I64, GEMM_RB))])
        ok = b.icmp_unsigned("!=", scratch, ir.Constant(self.P8, None))
        v32t, v16t = _vec(I8, 32), _vec(I16, 16)
        faccs = [f.var(_vec(F32, 8)) for _ in range(GEMM_TILE * GEMM_NW)]
        ibv = f.var(I64)
        ux = self.unsigned_x

        def decode_row(row, scratch):
            def sb_body(s):
                sb = b.gep(row, [b.add(ir.Constant(I64, hb),
                                       b.mul(s, ir.Constant(I64, d.block_bytes)))])
                dst = b.gep(scratch, [b.mul(s, ir.Constant(I64, _SCRATCH_SB))])
                # Decoding is amortized over a tile of activation rows here, so the full grid
                # lookup is used (no grid-shift correction in the inner loop).
                chunks = self.values_i8(f, sb, fold_sign=True)
                scales = self.block_scales(f, sb)
                sc16 = self._scale_pairs(f, b.trunc(scales, _vec(I16, d.n_blocks)))
                corr = None
                for k, v in enumerate(chunks):
                    s16 = self._scale_lanes(f, sc16, k)
                    vals = ((0, v),) if ux else ((0, v), (256, self._abs8(f, v)))
                    for off, val in vals:
                        b.store(val, b.bitcast(b.gep(dst, [ir.Constant(I64, off + 32 * k)]),
                                               v32t.as_pointer()), align=1)
                    b.store(s16, b.bitcast(b.gep(dst, [ir.Constant(I64, 512 + 32 * k)]),
                                           v16t.as_pointer()), align=1)
                    if ux:
                        # 128 * sum(v * scale) over the chunk (pair sums 128 * 2 * 64 fit int16).
                        c = self._udot_chunk(f, _cvec(I8, [-128] * 32), v, s16)
                        corr = c if corr is None else b.add(corr, c)
                if ux:
                    b.store(b.neg(corr), b.bitcast(b.gep(dst, [ir.Constant(I64, 256)]),
                                                   _vec(self.I32, 8).as_pointer()), align=1)
                dsb = self.load_d(f, sb, 2) if d.super_d else ir.Constant(F32, 1.0)
                b.store(dsb, b.bitcast(b.gep(dst, [ir.Constant(I64, 768)]), F32.as_pointer()))
            f.loop(ir.Constant(I64, 0), nsb, sb_body)

        def dot_rows(rs, i0, tile, drs, srs):
            """out[i0 + t, rs[j]] for t < tile: len(rs) weight rows share each x load."""
            nw = len(rs)
            xrows = [b.gep(xq, [b.mul(b.add(i0, ir.Constant(I64, t)), n)]) for t in range(tile)]
            xdrows = [b.gep(xd, [b.mul(b.add(i0, ir.Constant(I64, t)), nsb)]) for t in range(tile)]
            fa = [[faccs[j * GEMM_TILE + t] for t in range(tile)] for j in range(nw)]
            for j in range(nw):
                for t in range(tile):
                    b.store(ir.Constant(_vec(F32, 8), None), fa[j][t])

            def ld(p, off, ty):
                return b.load(b.bitcast(b.gep(p, [ir.Constant(I64, off)]), ty.as_pointer()),
                              align=1)

            def sb_body(s):
                srcs = [b.gep(sr, [b.mul(s, ir.Constant(I64, _SCRATCH_SB))]) for sr in srs]
                xoff = b.mul(s, ir.Constant(I64, QK_K))
                accs = [[None] * tile for _ in range(nw)]
                if ux:
                    # Start from -128 * sum(v * scale): the sum over (x + 128) * v * scale
                    # below then ends exactly at sum(x * v * scale).
                    for j in range(nw):
                        accs[j] = [ld(srcs[j], 256, _vec(self.I32, 8))] * tile
                for k in range(8):
                    vs = [ld(src, 32 * k, v32t) for src in srcs]
                    avs = [None if ux else ld(src, 256 + 32 * k, v32t) for src in srcs]
                    s16s = [ld(src, 512 + 32 * k, v16t) for src in srcs]
                    for t in range(tile):
                        xp = b.gep(xrows[t], [b.add(xoff, ir.Constant(I64, 32 * k))])
                        xv = b.load(b.bitcast(xp, v32t.as_pointer()), align=1)
                        if ux:
                            # x + 128 as an unsigned byte: flipping the top bit.
                            xu = b.xor(xv, _cvec(I8, [-128] * 32))
                        for j in range(nw):
                            if ux:
                                p = self._udot_chunk(f, xu, vs[j], s16s[j])
                            else:
                                p = self._dot_chunk(f, vs[j], avs[j], xv, s16s[j])
                            accs[j][t] = p if accs[j][t] is None else b.add(accs[j][t], p)
                for j in range(nw):
                    dsb = ld(srcs[j], 768, F32)
                    for t in range(tile):
                        fac = b.fmul(dsb, b.load(b.gep(xdrows[t], [s])))
                        part = b.fmul(b.sitofp(accs[j][t], _vec(F32, 8)), self.splat(f, fac, 8))
                        b.store(b.fadd(b.load(fa[j][t]), part), fa[j][t])

            f.loop(ir.Constant(I64, 0), nsb, sb_body)
            for j in range(nw):
                for t in range(tile):
                    tot = self.hsum(f, b.load(fa[j][t]))
                    if drs[j] is not None:
                        tot = b.fmul(tot, drs[j])
                    b.store(tot, b.gep(out, [b.add(b.mul(b.add(i0, ir.Constant(I64, t)), rows),
                                                   rs[j])]))

        def block_body(rb0):
            # GEMM_RB weight rows are decoded once, then meet every activation-row tile.
            rend = b.add(rb0, ir.Constant(I64, GEMM_RB))
            rend = b.select(b.icmp_signed("<", rend, r1), rend, r1)

            def slot(r):
                return b.gep(scratch, [b.mul(b.sub(r, rb0), row_sb)])

            f.loop(rb0, rend, lambda r: decode_row(b.gep(raw, [b.mul(r, rb)]), slot(r)))

            def tile_body(ib):
                iend = b.add(ib, ir.Constant(I64, GEMM_MB))
                iend = b.select(b.icmp_signed("<", iend, m), iend, m)

                def rows_body(r, nw):
                    rs = [b.add(r, ir.Constant(I64, j)) for j in range(nw)]
                    drs = [self.load_d(f, b.gep(raw, [b.mul(q, rb)]), hb) if hb else None
                           for q in rs]
                    srs = [slot(q) for q in rs]
                    b.store(ib, ibv)
                    # Full register tiles first, then single leftover rows.
                    full = b.sub(iend, ib)
                    full = b.sub(full, b.srem(full, ir.Constant(I64, GEMM_TILE)))
                    f.loop(ib, b.add(ib, full), lambda i: dot_rows(rs, i, GEMM_TILE, drs, srs),
                           step=GEMM_TILE)
                    f.loop(b.add(ib, full), iend, lambda i: dot_rows(rs, i, 1, drs, srs))

                # Weight rows in groups of GEMM_NW (each x load serves all), then leftovers.
                cnt = b.sub(rend, rb0)
                fullr = b.add(rb0, b.sub(cnt, b.srem(cnt, ir.Constant(I64, GEMM_NW))))
                f.loop(rb0, fullr, lambda r: rows_body(r, GEMM_NW), step=GEMM_NW)
                f.loop(fullr, rend, lambda r: rows_body(r, 1))

            f.loop(ir.Constant(I64, 0), m, tile_body, step=GEMM_MB)

        def run():
            f.loop(r0, r1, block_body, step=GEMM_RB)
            b.call(free, [scratch])

        f.if_then(ok, run)
        # Status 1: no scratch memory; the handler turns it into an FFI error.
        b.ret(b.select(ok, ir.Constant(self.I32, 0), ir.Constant(self.I32, 1)))
        return f.fn

    # ----- FFI handler ---------------------------------------------------------------------
    def emit_handler(self, kernel_fn):
        """The FFI entry point ``iqk_handler`` plus its thread worker and thread-count global."""
        d = self.desc
        I8, I32, I64, P8 = self.I8, self.I32, self.I64, self.P8
        nthreads = ir.GlobalVariable(self.module, I32, "iqk_threads")
        nthreads.initializer = ir.Constant(I32, 1)
        # job: xq, xd, xs, raw, out, m, rows, n, r0, r1, status, counter address, chunk
        # (13 x 8 bytes). Every job of a call shares one counter: workers claim chunks of
        # rows from it until [r0, r1) is used up.
        job_t = ir.ArrayType(I64, 13)
        wk = _Fn(self, "iqk_worker", P8, [P8])
        wb = wk.b
        jp = wb.bitcast(wk.fn.args[0], I64.as_pointer())
        vals = [wb.load(wb.gep(jp, [ir.Constant(I64, k)])) for k in range(10)]
        ptr_types = self.kernel_args()[:5]
        args = [wb.inttoptr(vals[k], ptr_types[k]) for k in range(5)] + vals[5:8]
        counter = wb.inttoptr(wb.load(wb.gep(jp, [ir.Constant(I64, 11)])), I64.as_pointer())
        chunk = wb.load(wb.gep(jp, [ir.Constant(I64, 12)]))
        wstatus = wk.var(I64, ir.Constant(I64, 0))
        # Dynamic split: a static one leaves a core idle whenever the other thread is slowed
        # (a shared machine, frequency or cache differences): measured 2-core GEMM went from
        # ~1.86 to ~1.96 cores busy over the call's wall time.
        # Each output element is still computed by one kernel call over the same row, so
        # results do not depend on which thread takes which chunk.
        loop_bb = wk.fn.append_basic_block("claim")
        body_bb = wk.fn.append_basic_block("claimed")
        done_bb = wk.fn.append_basic_block("drained")
        wb.branch(loop_bb)
        wb.position_at_end(loop_bb)
        c0 = wb.add(vals[8], wb.atomic_rmw("add", counter, chunk, "monotonic"))
        wb.cbranch(wb.icmp_signed("<", c0, vals[9]), body_bb, done_bb)
        wb.position_at_end(body_bb)
        c1 = wb.add(c0, chunk)
        c1 = wb.select(wb.icmp_signed("<", c1, vals[9]), c1, vals[9])
        status = wb.call(kernel_fn, args + [c0, c1])
        wb.store(wb.or_(wb.load(wstatus), wb.zext(status, I64)), wstatus)
        wb.branch(loop_bb)
        wb.position_at_end(done_bb)
        wb.store(wb.load(wstatus), wb.gep(jp, [ir.Constant(I64, 10)]))
        wb.ret(ir.Constant(P8, None))

        f = _Fn(self, "iqk_handler", P8, [P8], internal=False)
        b = f.b
        cf = f.fn.args[0]

        def at(base, off, ty):
            return b.load(b.bitcast(b.gep(base, [ir.Constant(I64, off)]), ty.as_pointer()))

        def fail(msg):
            api = at(cf, _CallFrame.api.offset, P8)
            create = at(api, _Api.error_create.offset, P8)
            fty = ir.FunctionType(P8, [P8])
            a = f.var(ir.ArrayType(I64, 4))
            ap = b.bitcast(a, P8)
            g = self.cstring(f"iqk_jax llvm {self.kernel} ({d.name}): {msg}")
            def sto(off, v, ty):
                b.store(v, b.bitcast(b.gep(ap, [ir.Constant(I64, off)]), ty.as_pointer()))
            sto(_ErrorCreateArgs.struct_size.offset, ir.Constant(I64, _ERRARGS_SIZE), I64)
            sto(_ErrorCreateArgs.extension_start.offset, ir.Constant(P8, None), P8)
            sto(_ErrorCreateArgs.message.offset, b.bitcast(g, P8), P8)
            sto(_ErrorCreateArgs.errc.offset, ir.Constant(I32, _FFI_INVALID_ARGUMENT), I32)
            b.ret(b.call(b.bitcast(create, fty.as_pointer()), [ap]))

        def check(bad, msg):
            f.if_then(bad, lambda: fail(msg))

        # 1. Metadata query: report the runtime's own API version, no traits, and return.
        ext = at(cf, _CallFrame.extension_start.offset, P8)

        def metadata():
            etype = at(ext, _ExtBase.type.offset, I32)

            def fill():
                md = at(ext, _MetadataExt.metadata.offset, P8)
                api = at(cf, _CallFrame.api.offset, P8)
                base = _Metadata.api_version.offset
                def st(off, v, ty):
                    b.store(v, b.bitcast(b.gep(md, [ir.Constant(I64, off)]), ty.as_pointer()))
                st(base + _ApiVersion.struct_size.offset, ir.Constant(I64, _APIVER_SIZE), I64)
                st(base + _ApiVersion.extension_start.offset, ir.Constant(P8, None), P8)
                for fld in ("major_version", "minor_version"):
                    off = getattr(_ApiVersion, fld).offset
                    st(base + off, at(api, _Api.api_version.offset + off, I32), I32)
                st(_Metadata.traits.offset, ir.Constant(I32, 0), I32)
                b.ret(ir.Constant(P8, None))

            f.if_then(b.icmp_unsigned("==", etype, ir.Constant(I32, _FFI_EXT_METADATA)), fill)

        f.if_then(b.icmp_unsigned("!=", ext, ir.Constant(P8, None)), metadata)
        stage = at(cf, _CallFrame.stage.offset, I32)
        f.if_then(b.icmp_unsigned("!=", stage, ir.Constant(I32, _FFI_STAGE_EXECUTE)),
                  lambda: b.ret(ir.Constant(P8, None)))

        # 2. Operands: count and kind.
        if self.kernel == "dequant":
            arg_specs = [("raw", "u8")]
        else:
            arg_specs = [("xq", "s8"), ("xd", "f32"), ("xs", "s16"), ("raw", "u8")]
        na = len(arg_specs)
        a_off = _CallFrame.args.offset
        r_off = _CallFrame.rets.offset
        check(b.icmp_signed("!=", at(cf, a_off + _Args.size.offset, I64), ir.Constant(I64, na)),
              f"expected {na} operand(s) ({', '.join(s for s, _ in arg_specs)})")
        check(b.icmp_signed("!=", at(cf, r_off + _Args.size.offset, I64), ir.Constant(I64, 1)),
              "expected exactly 1 result")
        atypes = at(cf, a_off + _Args.types.offset, P8)
        aptrs = at(cf, a_off + _Args.args.offset, P8)
        rtypes = at(cf, r_off + _Args.types.offset, P8)
        rptrs = at(cf, r_off + _Args.args.offset, P8)
        bufs = {}
        for k, (nm, dt) in enumerate(arg_specs + [("out", "f32")]):
            types, ptrs, kk = (atypes, aptrs, k) if k < na else (rtypes, rptrs, 0)
            check(b.icmp_unsigned("!=", at(types, 4 * kk, I32), ir.Constant(I32, _FFI_BUFFER)),
                  f"operand {nm} is not a buffer")
            buf = at(ptrs, 8 * kk, P8)
            check(b.icmp_unsigned("==", buf, ir.Constant(P8, None)), f"operand {nm} is null")
            check(b.icmp_unsigned("!=", at(buf, _Buffer.dtype.offset, I32),
                                  ir.Constant(I32, FFI_DTYPES[dt])),
                  f"operand {nm} must have dtype {dt}")
            check(b.icmp_signed("!=", at(buf, _Buffer.rank.offset, I64), ir.Constant(I64, 2)),
                  f"operand {nm} must have rank 2")
            dims = at(buf, _Buffer.dims.offset, P8)
            bufs[nm] = (at(buf, _Buffer.data.offset, P8), at(dims, 0, I64), at(dims, 8, I64))

        # 3. Dims against each other and the descriptor.
        def bad_dim(v):
            return b.icmp_signed("<", v, ir.Constant(I64, 0))
        for nm, (_, d0, d1) in bufs.items():
            check(b.or_(bad_dim(d0), bad_dim(d1)), f"operand {nm} has negative dims")
        raw_p, rows, rbytes = bufs["raw"]
        out_p, o0, o1 = bufs["out"]
        if self.kernel == "dequant":
            n = o1
            check(b.icmp_signed("!=", o0, rows), "out rows must equal raw rows")
            m = ir.Constant(I64, 1)
            xq_p = xd_p = xs_p = ir.Constant(P8, None)
        else:
            xq_p, m, n = bufs["xq"]
            xd_p, xd0, xd1 = bufs["xd"]
            check(b.icmp_signed("!=", xd0, m), "xd rows must equal xq rows")
            check(b.icmp_signed("!=", xd1, b.sdiv(n, ir.Constant(I64, QK_K))),
                  "xd must have n/256 columns")
            xs_p, xs0, xs1 = bufs["xs"]
            check(b.icmp_signed("!=", xs0, m), "xs rows must equal xq rows")
            check(b.icmp_signed("!=", xs1, b.sdiv(n, ir.Constant(I64, d.block_size))),
                  f"xs must have n/{d.block_size} columns")
            check(b.or_(b.icmp_signed("!=", o0, m), b.icmp_signed("!=", o1, rows)),
                  "out must be [x rows, weight rows]")
        check(b.icmp_signed("<=", n, ir.Constant(I64, 0)), "row length n must be positive")
        check(b.icmp_signed("!=", b.srem(n, ir.Constant(I64, QK_K)), ir.Constant(I64, 0)),
              "row length n must be a multiple of 256")
        want = b.add(b.mul(b.sdiv(n, ir.Constant(I64, QK_K)), ir.Constant(I64, d.block_bytes)),
                     ir.Constant(I64, d.row_header_bytes))
        check(b.icmp_signed("!=", rbytes, want),
              f"raw row bytes must be {d.row_header_bytes} + n/256 * {d.block_bytes}")
        nonempty = b.and_(b.icmp_signed(">", rows, ir.Constant(I64, 0)),
                          b.icmp_signed(">", m, ir.Constant(I64, 0)))
        nulls = b.or_(b.icmp_unsigned("==", raw_p, ir.Constant(P8, None)),
                      b.icmp_unsigned("==", out_p, ir.Constant(P8, None)))
        if self.kernel != "dequant":
            for p in (xq_p, xd_p, xs_p):
                nulls = b.or_(nulls, b.icmp_unsigned("==", p, ir.Constant(P8, None)))
        check(b.and_(nonempty, nulls), "null data pointer")
        f.if_then(b.xor(nonempty, ir.Constant(self.I1, 1)), lambda: b.ret(ir.Constant(P8, None)))

        # 4. Split the weight rows over threads; small problems stay on this thread.
        t = b.sext(b.load(nthreads), I64)
        t = b.select(b.icmp_signed("<", t, ir.Constant(I64, 1)), ir.Constant(I64, 1), t)
        t = b.select(b.icmp_signed(">", t, ir.Constant(I64, MAX_THREADS)),
                     ir.Constant(I64, MAX_THREADS), t)
        work = b.mul(b.mul(rows, n), m)
        t = b.select(b.icmp_signed("<", work, ir.Constant(I64, 1 << 16)), ir.Constant(I64, 1), t)
        t = b.select(b.icmp_signed(">", t, rows), rows, t)
        jobs = f.var(ir.ArrayType(job_t, MAX_THREADS))
        tids = f.var(ir.ArrayType(I64, MAX_THREADS))
        started = f.var(ir.ArrayType(I8, MAX_THREADS))
        ptrs = [xq_p, xd_p, xs_p, raw_p, out_p]
        zero = ir.Constant(I64, 0)

        def job(k):
            return b.gep(jobs, [zero, k])

        counter = f.var(I64, zero)
        # Chunks of about rows / (CHUNKS_PER_THREAD * t) rows, a multiple of GEMM_RB (the gemm
        # kernel's decode block), so the last chunk left to a thread is short.
        per = b.sdiv(rows, b.mul(t, ir.Constant(I64, CHUNKS_PER_THREAD)))
        per = b.mul(b.sdiv(b.add(per, ir.Constant(I64, GEMM_RB - 1)), ir.Constant(I64, GEMM_RB)),
                    ir.Constant(I64, GEMM_RB))
        per = b.select(b.icmp_signed("<", per, ir.Constant(I64, GEMM_RB)),
                       ir.Constant(I64, GEMM_RB), per)

        def fill(k):
            jp = b.bitcast(job(k), I64.as_pointer())
            vals = ([b.ptrtoint(p, I64) for p in ptrs] + [m, rows, n, zero, rows, zero,
                                                          b.ptrtoint(counter, I64), per])
            for j, v in enumerate(vals):
                b.store(v, b.gep(jp, [ir.Constant(I64, j)]))
        f.loop(zero, t, fill)
        fnp = ir.FunctionType(P8, [P8]).as_pointer()
        create = self.decl("pthread_create", I32, [I64.as_pointer(), P8, fnp, P8])
        join = self.decl("pthread_join", I32, [I64, P8.as_pointer()])

        def spawn(k):
            tid = b.gep(tids, [zero, k])
            jp = b.bitcast(job(k), P8)
            rc = b.call(create, [tid, ir.Constant(P8, None), wk.fn, jp])
            okk = b.icmp_signed("==", rc, ir.Constant(I32, 0))
            b.store(b.zext(okk, I8), b.gep(started, [zero, k]))
            # No thread (resource limits): do that share here instead of failing.
            f.if_then(b.xor(okk, ir.Constant(self.I1, 1)), lambda: b.call(wk.fn, [jp]))
        f.loop(ir.Constant(I64, 1), t, spawn)
        b.call(wk.fn, [b.bitcast(job(zero), P8)])

        def reap(k):
            st = b.load(b.gep(started, [zero, k]))
            f.if_then(b.icmp_unsigned("!=", st, ir.Constant(I8, 0)),
                      lambda: b.call(join, [b.load(b.gep(tids, [zero, k])),
                                            ir.Constant(P8.as_pointer(), None)]))
        f.loop(ir.Constant(I64, 1), t, reap)
        failed = f.var(I64, ir.Constant(I64, 0))

        def collect(k):
            st = b.load(b.gep(b.bitcast(job(k), I64.as_pointer()), [ir.Constant(I64, 10)]))
            b.store(b.or_(b.load(failed), st), failed)
        f.loop(zero, t, collect)
        check(b.icmp_unsigned("!=", b.load(failed), zero),
              "out of memory for the kernel's scratch buffer")
        b.ret(ir.Constant(P8, None))
        return f.fn

    def build(self):
        """The finished module: the kernel plus its worker and FFI handler."""
        body = {"dequant": self.emit_dequant, "gemv": self.emit_gemv, "gemm": self.emit_gemm}
        self.emit_handler(body[self.kernel]())
        return self.module


def _check(desc, kernel):
    desc = registry.descriptor(desc)
    if kernel not in KERNELS:
        raise ValueError(f"llvm target: unknown kernel {kernel!r}; expected one of {KERNELS}")
    return desc


def build_module(desc, kernel: str, h: Host | None = None):
    """The ``llvmlite.ir.Module`` of one (type, kernel) for host ``h`` (default: this CPU)."""
    desc = _check(desc, kernel)
    return _Emitter(desc, kernel, h or host()).build()


def emit(desc, kernel: str) -> str:
    """LLVM IR text of the ``kernel`` ("dequant" | "gemv" | "gemm") of type ``desc``.

    Deterministic for a given descriptor and host CPU (memoized per process: building the IR
    in Python costs a few hundred ms); contains the kernel ``iqk_kernel``, its thread worker
    and the FFI handler ``iqk_handler``.
    """
    desc = _check(desc, kernel)
    return _emit_cached(desc, kernel, host())


@functools.lru_cache(maxsize=None)
def _emit_cached(desc, kernel, h):
    return str(_Emitter(desc, kernel, h).build())


# ------------------------------------------------------------------------------------------
# Runtime entry points (the target contract); the machinery lives in iqk_jax.cpu.
# ------------------------------------------------------------------------------------------

def dequantize(raw, desc, shape, dtype=None):
    """Dequantizes packed rows with the JIT-compiled kernel, through an XLA FFI call.

    Args:
      raw: uint8 ``[rows, row_bytes]`` (jax or numpy array, may be a tracer).
      desc: descriptor or type name.
      shape: ``(rows, n_per_row)``.
      dtype: result dtype (default float32); the kernel computes float32 bit-exactly and
        casts once.
    """
    from iqk_jax.cpu import runtime
    return runtime.dequantize(raw, desc, shape, dtype)


def matmul(x2d, raw, desc, shape):
    """``x2d @ W.T`` (float32 ``[m, rows]``) for x2d float32/bf16 ``[m, n]``; see runtime."""
    from iqk_jax.cpu import runtime
    return runtime.matmul(x2d, raw, desc, shape)
