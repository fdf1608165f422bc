"""``iqk-quantize``: quantize a model's weights to IQK types, in the spirit of llama-quantize.

Usage::

    iqk-quantize --input model-f32.gguf --output model-iq4_ks.gguf --type iq4_ks \\
        [--imatrix imatrix.dat] [--custom-q 'ffn_down=iq5_ks,attn_.*=iq4_k']

Input: a GGUF file (F32/F16/BF16 tensors, any type gguf-py can dequantize, or IQK tensors,
which are requantized) or a safetensors file. Output: a GGUF file, written atomically. Tensors
that are 1-D or whose rows are not a multiple of 256 stay as they are, and the summary says so.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    """Defines the CLI's flags; called by :func:`run` only, so importing the module (tests, the
    library) never collides with another tool's absl flags of the same name."""
    flags.DEFINE_string("input", None, "Input model: .gguf or .safetensors.")
    flags.DEFINE_string("output", None, "Output GGUF path.")
    flags.DEFINE_string("type", "iq4_ks", "Default IQK type for 2-D weights.")
    flags.DEFINE_string("imatrix", None, "Importance matrix (llama-imatrix legacy .dat or GGUF).")
    flags.DEFINE_list("custom_q", [], "Per-tensor rules 'regex=type' (first match wins); type may "
                      "be an IQK type, f32, f16, bf16 or any type gguf-py can quantize (q8_0, ...).")
    # llama-quantize users type --custom-q; absl names use underscores, so accept both.
    flags.DEFINE_alias("custom-q", "custom_q")
    flags.DEFINE_string("arch", "llama", "general.architecture for safetensors input.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_bool("dry_run", False, "Quantize and report, but write nothing.")


class QuantizeError(ValueError):
    """Bad command-line input; the message names the flag, file or tensor."""


def parse_rules(rules: list[str]) -> list[tuple[re.Pattern, str]]:
    """``['regex=type', ...]`` -> compiled rules; unknown types and bad regexes are errors."""
    out = []
    for r in rules:
        if "=" not in r:
            raise QuantizeError(f"--custom-q rule {r!r} is not 'regex=type'")
        pat, typ = r.rsplit("=", 1)
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise QuantizeError(f"--custom-q rule {r!r}: bad regex ({e})") from None
        out.append((rx, _check_type(typ.strip().lower(), f"--custom-q rule {r!r}")))
    return out


def _check_type(typ: str, where: str) -> str:
    import gguf

    import iqk_jax
    if typ in iqk_jax.types() or typ in ("f32", "f16", "bf16"):
        return typ
    try:
        gguf.GGMLQuantizationType[typ.upper()]
        return typ
    except KeyError:
        raise QuantizeError(f"{where}: unknown type {typ!r} (IQK types: "
                            f"{', '.join(iqk_jax.types())}; or f32, f16, bf16, q8_0, ...)") from None


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a safetensors file into numpy (bf16 via ml_dtypes, which numpy lacks natively).

    The format is an 8-byte little-endian header length, a JSON header of
    ``{name: {dtype, shape, data_offsets}}`` and the raw data; the ``safetensors`` package's numpy
    backend cannot return bfloat16, so the few lines are done here, with every range validated.
    """
    import ml_dtypes
    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8}
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QuantizeError(f"{path}: truncated safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise QuantizeError(f"{path}: safetensors header length {n} exceeds the file")
        header = json.loads(f.read(n))
    data = np.memmap(path, np.uint8, "r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = dtypes.get(info["dtype"])
        if dt is None:
            raise QuantizeError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if b > data.shape[0] or b - a != count * np.dtype(dt).itemsize:
            raise QuantizeError(f"{path}: tensor {name!r} data range [{a}, {b}) is truncated or "
                                f"does not match shape {info['shape']}")
        out[name] = np.asarray(data[a:b]).view(dt).reshape(info["shape"])
    return out


def read_model(path: str, arch: str = "llama"):
    """-> (metadata, {name: float/int ndarray or QArray or GGMLArray})."""
    if not os.path.isfile(path):
        raise QuantizeError(f"--input {path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from iqk_jax import gguf_io
        return gguf_io.load_gguf(path)
    if path.endswith(".safetensors"):
        return {"general.architecture": arch}, read_safetensors(path)
    raise QuantizeError(f"--input {path}: neither GGUF (magic) nor .safetensors")


def choose_type(name: str, default: str, rules) -> str:
    for rx, typ in rules:
        if rx.search(name):
            return typ
    return default


def _as_float(t) -> np.ndarray:
    from iqk_jax.qarray import QArray
    if isinstance(t, QArray):
        return t.dequantize_np()
    return np.asarray(t, dtype=np.float32)


def quantize_tensor(name, t, typ, imatrix):
    """-> (output tensor, note) for one tensor. Keeps it as is when it cannot be quantized."""
    import gguf

    import iqk_jax
    from iqk_jax import gguf_io
    from iqk_jax.qarray import QArray
    shape = tuple(t.shape)
    if len(shape) < 2:
        return t, "kept (1-D)"
    block = 256 if typ in iqk_jax.types() else (
        1 if typ in ("f32", "f16", "bf16") else gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[typ.upper()]][0])
    if shape[-1] % block:
        return t, f"kept (row length {shape[-1]} not a multiple of {block})"
    x = _as_float(t)
    if typ in iqk_jax.types():
        w = None
        if imatrix is not None:
            w = imatrix.get(name)
            if w is not None and w.shape[-1] != shape[-1]:
                raise QuantizeError(f"--imatrix: entry {name!r} has {w.shape[-1]} columns, tensor "
                                    f"has {shape[-1]}")
        rows = x.reshape(-1, shape[-1])
        if w is not None and w.ndim == 2:  # one importance vector per stacked matrix
            per = rows.shape[0] // w.shape[0]
            raws = [iqk_jax.quantize(rows[i * per:(i + 1) * per], typ, w[i]).raw
                    for i in range(w.shape[0])]
            raw = np.concatenate([np.asarray(r) for r in raws])
        else:
            raw = np.asarray(iqk_jax.quantize(rows, typ, w).raw)
        q = QArray(raw.reshape(*shape[:-1], raw.shape[-1]), typ, shape)
        return q, "imatrix" if w is not None else ""
    if typ == "f32":
        return x, ""
    if typ == "f16":
        return x.astype(np.float16), ""
    qt = gguf.GGMLQuantizationType[typ.upper()]
    try:
        packed = gguf.quants.quantize(x, qt)
    except (NotImplementedError, ValueError) as e:
        raise QuantizeError(f"tensor {name!r}: gguf-py cannot quantize to {typ} ({e})") from None
    return gguf_io.GGMLArray(gguf.quants.dequantize(packed, qt), int(qt), packed), ""


def _bpw(t) -> float:
    from iqk_jax import gguf_io
    from iqk_jax.qarray import QArray
    if isinstance(t, QArray):
        return t.bpw
    if isinstance(t, gguf_io.GGMLArray) and t.raw is not None:
        return 8 * t.raw.nbytes / max(1, t.size)
    return 8 * np.asarray(t).dtype.itemsize


def run_quantize(inp: str, out: str | None, default: str, imatrix_path: str | None,
                 rules: list[str], progress: bool = True, dry_run: bool = False, stream=None,
                 arch: str = "llama"):
    """The CLI's work, callable from Python. Returns the summary rows."""
    stream = stream or sys.stdout
    from iqk_jax import gguf_io, imatrix as imx
    default = _check_type(default.lower(), "--type")
    compiled = parse_rules(rules)
    if out is None and not dry_run:
        raise QuantizeError("--output is required (or --dry_run)")
    meta, tensors = read_model(inp, arch)
    imat = imx.load_imatrix(imatrix_path) if imatrix_path else None
    result, summary = {}, []
    items = list(tensors.items())
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(int(np.prod(t.shape)) for _, t in items), unit="w", unit_scale=True,
                   desc="quantizing", file=sys.stderr)
    t_all = time.perf_counter()
    for name, t in items:
        typ = choose_type(name, default, compiled)
        t0 = time.perf_counter()
        q, note = quantize_tensor(name, t, typ, imat)
        dt = time.perf_counter() - t0
        result[name] = q
        shown_type = getattr(q, "type", None) or (typ if q is not t else _type_name(t))
        err = float("nan")
        if q is not t and len(t.shape) >= 2:
            ref = _as_float(t)
            got = _as_float(q)
            err = float(np.sqrt(np.mean((got - ref) ** 2) / max(np.mean(ref ** 2), 1e-30)))
        summary.append((name, shown_type, tuple(t.shape), _bpw(q), err, dt, note))
        if bar is not None:
            bar.update(int(np.prod(t.shape)))
    if bar is not None:
        bar.close()
    meta = dict(meta) if not hasattr(meta, "value_types") else meta
    meta["general.quantized_by"] = "iqk-jax"
    if imatrix_path:
        meta["quantize.imatrix.file"] = os.path.basename(imatrix_path)
        meta["quantize.imatrix.entries_count"] = len(imat)
    if not dry_run:
        gguf_io.save_gguf(out, result, meta)
    _print_summary(summary, time.perf_counter() - t_all, out if not dry_run else None, stream)
    return summary


def _type_name(t) -> str:
    from iqk_jax import gguf_io
    if isinstance(t, gguf_io.GGMLArray) and t.ggml_type is not None:
        import gguf
        return gguf.GGMLQuantizationType(t.ggml_type).name.lower()
    return str(np.asarray(t).dtype)


def _print_summary(rows, seconds, out, stream):
    w = max([len(r[0]) for r in rows] + [6])
    print(f"{'tensor':{w}} {'type':8} {'shape':>14} {'bpw':>7} {'rel.err':>9} {'s':>6}  note",
          file=stream)
    total_w = total_bits = 0
    for name, typ, shape, bpw, err, dt, note in rows:
        n = int(np.prod(shape))
        total_w += n
        total_bits += bpw * n
        e = "-" if err != err else f"{err:.5f}"
        print(f"{name:{w}} {typ:8} {str(shape):>14} {bpw:7.3f} {e:>9} {dt:6.2f}  {note}", file=stream)
    print(f"total: {total_w} weights, {total_bits / max(total_w, 1):.3f} bpw, {seconds:.1f} s"
          + (f", written to {out}" if out else " (dry run, nothing written)"), file=stream)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.input:
        raise app.UsageError("--input is required")
    try:
        run_quantize(FLAGS.input, FLAGS.output, FLAGS.type, FLAGS.imatrix, FLAGS.custom_q,
                     progress=FLAGS.progress, dry_run=FLAGS.dry_run, arch=FLAGS.arch)
    except (QuantizeError, ValueError) as e:
        print(f"iqk-quantize: error: {e}", file=sys.stderr)
        return 2
    return 0


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
