"""Importance matrices as llama-imatrix writes them: the legacy ``.dat`` and the GGUF format.

Both store, per weight tensor, the sum over calibration tokens of the squared activation of
each input column, and how many tokens were summed; the importance is their quotient (the mean
squared activation). For stacked (MoE) tensors there is one vector per matrix.
"""

from __future__ import annotations

import os
import struct

import numpy as np


class ImatrixError(ValueError):
    """An importance-matrix file that cannot be read; the message names the file and entry."""


def _load_legacy(path: str) -> dict[str, np.ndarray]:
    data = open(path, "rb").read()
    pos = 0

    def take(fmt, what):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ImatrixError(f"{path}: truncated while reading {what} (offset {pos})")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1:
        raise ImatrixError(f"{path}: no entries (count {n_entries})")
    out = {}
    for i in range(n_entries):
        (name_len,) = take("<i", f"the name length of entry {i}")
        if not 0 < name_len < 4096:
            raise ImatrixError(f"{path}: entry {i} has an invalid name length {name_len}")
        name = bytes(take(f"<{name_len}s", f"the name of entry {i}")[0]).decode("utf-8")
        ncall, nval = take("<ii", f"the counts of entry {name!r}")
        if nval < 1:
            raise ImatrixError(f"{path}: entry {name!r} has {nval} values")
        if pos + 4 * nval > len(data):
            raise ImatrixError(f"{path}: truncated in the values of entry {name!r}")
        vals = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
        pos += 4 * nval
        # The file keeps sums; the importance is their mean over the ncall calls.
        out[name] = vals / ncall if ncall > 0 else vals.copy()
    return out


def _load_gguf(path: str) -> dict[str, np.ndarray]:
    import gguf
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises plain ValueError/IndexError on corrupt files
        raise ImatrixError(f"{path}: not a readable GGUF imatrix ({e})") from None
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, np.float32)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, np.float32).reshape(-1)
    if not sums:
        raise ImatrixError(f"{path}: GGUF file has no '<tensor>.in_sum2' entries: not an imatrix")
    out = {}
    for name, s in sums.items():
        if name not in counts:
            raise ImatrixError(f"{path}: entry {name!r} has in_sum2 but no counts")
        c = counts[name]
        s = s.reshape(c.shape[0], -1)  # [n_mat, n_per_row]
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(c[:, None] > 0, s / c[:, None], s)
        out[name] = (v[0] if v.shape[0] == 1 else v).astype(np.float32)
    return out


def load_imatrix(path) -> dict[str, np.ndarray]:
    """Reads an importance matrix, legacy ``.dat`` or GGUF (detected by the file's magic).

    Returns:
      tensor name -> float32 importance ``[n_per_row]`` (or ``[n_mat, n_per_row]`` for stacked
      tensors), already divided by the token count.

    Raises:
      ImatrixError: missing, truncated or malformed file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImatrixError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    table = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    for name, v in table.items():
        if not np.isfinite(v).all() or (v < 0).any():
            raise ImatrixError(f"{path}: entry {name!r} has NaN, Inf or negative values")
    return table
