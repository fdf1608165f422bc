"""GGUF reading and writing for IQK tensors, built on the ``gguf`` package.

Mainline gguf-py does not know the IQK type ids (``GGMLQuantizationType(144)`` raises) nor their
per-row headers (its sizes are ``n_elements / block_size * type_size``). Rather than parse GGUF by
hand, this module subclasses ``GGUFReader`` and ``GGUFWriter`` and only takes over the tensor
records whose type id is in the IQK registry; everything else (header, metadata, other tensor
types, alignment) stays gguf-py's.

Invariants:
  * an IQK tensor with ggml dims ``(ne0, ne1, ...)`` becomes a :class:`QArray` of shape
    ``(..., ne1, ne0)`` (numpy order) whose rows are the file's rows, byte for byte;
  * every tensor's data range is checked against the file size before it is read;
  * ``save_gguf`` writes to a temporary file in the target directory and renames it, so a
    crash never leaves a half-written file under the target name.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Mapping

import gguf
import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.gguf_reader import ReaderTensor

from iqk_jax import registry
from iqk_jax.qarray import QArray

# gguf-py's writer logs every file it opens at INFO; under absl (our CLIs) that floods stdout
# with the temporary file's name. Its warnings still show.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)

# Keys gguf-py's reader synthesises from the file header; they are not metadata.
_PSEUDO_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


class GGUFError(ValueError):
    """A GGUF file or tensor that cannot be read or written; the message names which."""


class GGMLArray(np.ndarray):
    """A non-IQK tensor as gguf-py reads or dequantizes it, remembering its packed form.

    Behaves as the float (or integer) numpy array; ``ggml_type`` and ``raw`` keep the original
    encoding so that ``save_gguf`` can write a quantized tensor (e.g. Q6_K) back unchanged.
    """

    ggml_type: int
    raw: np.ndarray | None

    def __new__(cls, values: np.ndarray, ggml_type: int, raw: np.ndarray | None):
        obj = np.asarray(values).view(cls)
        obj.ggml_type = int(ggml_type)
        obj.raw = raw
        return obj

    def __array_finalize__(self, obj):
        # Views and results of arithmetic do not carry the packed bytes: they no longer match.
        self.ggml_type = getattr(obj, "ggml_type", None) if obj is not None else None
        self.raw = None


class GGUFMetadata(dict):
    """Metadata values by key, plus the GGUF value type of each key (``.value_types``).

    Carrying the types lets a read -> write round trip keep, e.g., a UINT32 a UINT32.
    """

    def __init__(self, *args, value_types: Mapping[str, tuple] | None = None, **kw):
        super().__init__(*args, **kw)
        self.value_types = dict(value_types or {})


class _IQKReader(GGUFReader):
    """GGUFReader that builds IQK tensors itself and checks every tensor against the file size."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        file_size = int(self.data.shape[0])
        iqk, other, order = [], [], []
        for field in fields:
            _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
            name = str(bytes(name_data), encoding="utf-8")
            order.append(name)
            tid = int(raw_dtype[0])
            if registry.is_iqk_type_id(tid):
                iqk.append(field)
                continue
            # Checked here so gguf-py never sees an unknown id or reads past the end of the file.
            try:
                t = gguf.GGMLQuantizationType(tid)
            except ValueError:
                raise GGUFError(f"tensor {name!r}: unknown ggml type id {tid} "
                                f"(neither a ggml type nor an IQK type)") from None
            bs, ts = gguf.GGML_QUANT_SIZES[t]
            n = int(np.prod(dims))
            if n % bs:
                raise GGUFError(f"tensor {name!r}: {n} elements is not a multiple of the "
                                f"{t.name} block size {bs}")
            self._check_range(name, start_offs + int(offset_tensor[0]), n // bs * ts, file_size)
            other.append(field)
        super()._build_tensors(start_offs, other)
        built = {t.name: t for t in self.tensors}
        for field in iqk:
            t = self._build_iqk(start_offs, field, file_size)
            built[t.name] = t
        self.tensors = [built[n] for n in order]

    @staticmethod
    def _check_range(name, offset, nbytes, file_size):
        if offset + nbytes > file_size:
            raise GGUFError(f"tensor {name!r}: data is truncated: needs {nbytes} bytes at offset "
                            f"{offset}, but the file has only {file_size} bytes")

    def _build_iqk(self, start_offs, field, file_size) -> ReaderTensor:
        _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
        name = str(bytes(name_data), encoding="utf-8")
        desc = registry.descriptor(int(raw_dtype[0]))
        ne = [int(v) for v in dims]
        if ne[0] % registry.QK_K:
            raise GGUFError(f"tensor {name!r} ({desc.name}): row length {ne[0]} is not a "
                            f"multiple of {registry.QK_K}")
        rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
        rb = desc.row_bytes(ne[0])
        data_offs = int(start_offs + int(offset_tensor[0]))
        self._check_range(name, data_offs, rows * rb, file_size)
        lead = tuple(reversed(ne[1:])) or (1,)
        data = self._get(data_offs, np.uint8, rows * rb).reshape(*lead, rb)
        return ReaderTensor(name=name, tensor_type=desc.ggml_type, shape=dims,
                            n_elements=int(np.prod(ne)), n_bytes=rows * rb,
                            data_offset=data_offs, data=data, field=field)


def _field_value(field) -> Any:
    v = field.contents()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def load_gguf(path) -> tuple[GGUFMetadata, dict[str, Any]]:
    """Reads a GGUF file, IQK tensors included.

    Args:
      path: file path.

    Returns:
      ``(metadata, tensors)``: metadata values by key (a :class:`GGUFMetadata` that also keeps
      each key's GGUF value type) and tensors by name in file order: IQK tensors as
      :class:`QArray` (numpy ``raw``, rows in ggml order, shape ``(..., rows, n_per_row)``),
      F32/F16/BF16/integer tensors as numpy arrays, other ggml quantized types dequantized to
      float32 by gguf-py (as :class:`GGMLArray`, which remembers the packed bytes).

    Raises:
      GGUFError: missing, truncated or malformed file, unknown type id, bad row length;
        the message names the file and the tensor.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        reader = _IQKReader(path, "r")
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    except (ValueError, IndexError, TypeError, OSError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt header: {e})") from None
    meta = GGUFMetadata()
    for key, field in reader.fields.items():
        if key in _PSEUDO_KEYS:
            continue
        meta[key] = _field_value(field)
        types = field.types
        meta.value_types[key] = (types[0], types[-1] if types[0] == GGUFValueType.ARRAY else None)
    tensors: dict[str, Any] = {}
    for t in reader.tensors:
        tid = int(t.tensor_type)
        if registry.is_iqk_type_id(tid):
            desc = registry.descriptor(tid)
            raw = np.array(t.data)  # copy out of the memmap so the file can be closed/replaced
            shape = tuple(reversed([int(v) for v in t.shape]))
            if len(shape) == 1:
                shape = (1,) + shape
            tensors[t.name] = QArray(raw, desc.name, shape)
        else:
            qt = gguf.GGMLQuantizationType(tid)
            data = np.array(t.data)
            if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                      gguf.GGMLQuantizationType.F64, gguf.GGMLQuantizationType.I8,
                      gguf.GGMLQuantizationType.I16, gguf.GGMLQuantizationType.I32,
                      gguf.GGMLQuantizationType.I64):
                tensors[t.name] = data
            else:
                try:
                    values = gguf.quants.dequantize(data, qt)
                except NotImplementedError:
                    raise GGUFError(f"{path}: tensor {t.name!r}: gguf-py cannot dequantize "
                                    f"{qt.name}") from None
                tensors[t.name] = GGMLArray(values, tid, data)
    return meta, tensors


class _IQKWriter(GGUFWriter):
    """GGUFWriter that accepts IQK type ids for uint8 row data (row headers included)."""

    def add_tensor_info(self, name, tensor_shape, tensor_dtype, tensor_nbytes, raw_dtype=None):
        if raw_dtype is not None and registry.is_iqk_type_id(int(raw_dtype)):
            # tensor_shape is the logical numpy shape; sizes come from the descriptor, which
            # counts the row headers gguf-py's GGML_QUANT_SIZES cannot express.
            desc = registry.descriptor(int(raw_dtype))
            rows = int(np.prod(tensor_shape[:-1])) if len(tensor_shape) > 1 else 1
            expect = rows * desc.row_bytes(int(tensor_shape[-1]))
            if expect != tensor_nbytes:
                raise GGUFError(f"tensor {name!r} ({desc.name}): {tensor_nbytes} bytes of data but "
                                f"shape {tuple(tensor_shape)} needs {expect}")
            if any(name in t for t in self.tensors):
                raise GGUFError(f"duplicate tensor name {name!r}")
            self.tensors[-1][name] = gguf.gguf_writer.TensorInfo(
                shape=tuple(int(s) for s in tensor_shape), dtype=int(raw_dtype), nbytes=tensor_nbytes)
            return
        super().add_tensor_info(name, tensor_shape, tensor_dtype, tensor_nbytes, raw_dtype)


def _infer_vtype(value) -> tuple:
    if isinstance(value, (list, tuple)):
        if not value:
            raise GGUFError("empty arrays cannot be stored in GGUF metadata")
        return GGUFValueType.ARRAY, _infer_vtype(value[0])[0]
    if isinstance(value, np.ndarray):
        return _infer_vtype(value.tolist())
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, (int, np.integer)):
        return (GGUFValueType.INT32 if -2**31 <= int(value) < 2**31 else GGUFValueType.INT64), None
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, (str, bytes)):
        return GGUFValueType.STRING, None
    raise GGUFError(f"cannot store metadata value of type {type(value).__name__}")


def _tensor_record(name: str, t) -> tuple[np.ndarray, tuple, int | None]:
    """(data to write, numpy shape to record, raw ggml type id or None) for one tensor."""
    if isinstance(t, QArray):
        raw = np.ascontiguousarray(np.asarray(t.raw))
        desc = registry.descriptor(t.type)
        expect = desc.row_bytes(t.shape[-1])
        if raw.dtype != np.uint8 or raw.shape[-1] != expect or \
                int(np.prod(raw.shape[:-1])) != int(np.prod(t.shape[:-1])):
            raise GGUFError(f"tensor {name!r} ({t.type}): raw bytes {raw.shape} {raw.dtype} do not "
                            f"match shape {t.shape} ({expect} bytes per row)")
        return raw, tuple(t.shape), desc.ggml_type
    if isinstance(t, GGMLArray) and t.raw is not None and t.ggml_type is not None:
        qt = gguf.GGMLQuantizationType(t.ggml_type)
        return np.ascontiguousarray(t.raw), tuple(t.shape), qt
    arr = np.asarray(t)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype not in (np.float32, np.float16, np.int8, np.int16, np.int32, np.int64):
        if arr.dtype.name == "bfloat16":
            return (np.ascontiguousarray(arr).view(np.uint8).reshape(*arr.shape[:-1], -1),
                    tuple(arr.shape), gguf.GGMLQuantizationType.BF16)
        raise GGUFError(f"tensor {name!r}: unsupported dtype {arr.dtype}")
    return np.ascontiguousarray(arr), tuple(arr.shape), None


def save_gguf(path, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
    """Writes a GGUF file that ik_llama.cpp loads, atomically.

    Args:
      path: destination; written as a temporary file in the same directory, then renamed.
      tensors: name -> :class:`QArray` (written with its IQK type id and row headers),
        :class:`GGMLArray` with packed bytes (written back in its original type) or a numpy
        array (F32/F16/BF16/integers).
      metadata: key -> value; a :class:`GGUFMetadata` keeps its value types, other values get
        inferred types. ``general.architecture`` defaults to ``llama``; ``general.alignment``
        sets the data alignment.

    Raises:
      GGUFError: a tensor whose bytes do not match its shape, an unstorable value.
    """
    path = os.fspath(path)
    vtypes = dict(getattr(metadata, "value_types", None) or {})
    metadata = dict(metadata or {})
    arch = metadata.get("general.architecture", "llama")
    records = [(name, *_tensor_record(name, t)) for name, t in tensors.items()]

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=directory)
    os.close(fd)
    try:
        w = _IQKWriter(tmp, arch)
        if "general.alignment" in metadata:
            w.data_alignment = int(metadata["general.alignment"])
        for key, value in metadata.items():
            if key == "general.architecture":
                continue
            vtype, sub = vtypes.get(key) or _infer_vtype(value)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            w.add_key_value(key, value, vtype, sub_type=sub)
        for name, data, shape, raw_type in records:
            # IQK records pass their logical shape; gguf-py derives the others from byte shapes.
            iqk = raw_type is not None and registry.is_iqk_type_id(int(raw_type))
            w.add_tensor(name, data, raw_shape=shape if iqk else None, raw_dtype=raw_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
