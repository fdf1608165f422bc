"""Quantization searches, one per IQK type (or family of types sharing a search).

A search is a function ``search(x, weights) -> raw`` where ``x`` is float32 ``[rows, n]``
(``n`` a multiple of 256, already validated), ``weights`` the float32 ``[n]`` importance vector
or ``None`` and ``raw`` the uint8 ``[rows, row_bytes]`` rows ik_llama.cpp would decode. Modules
register their searches with :func:`register_search`; :func:`iqk_jax.quantize` dispatches.
"""

from __future__ import annotations

import importlib
from typing import Callable

_SEARCHES: dict[str, Callable] = {}
# Modules that register searches; imported lazily so ``import iqk_jax`` stays cheap.
_MODULES = ("iqk_jax.quant.kquants", "iqk_jax.quant.ksquants")


def register_search(*names: str):
    """Decorator: registers ``fn`` as the search of each type in ``names``."""
    def deco(fn):
        for n in names:
            if n in _SEARCHES:
                raise ValueError(f"a search for {n!r} is already registered")
            _SEARCHES[n] = fn
        return fn
    return deco


def _load():
    for m in _MODULES:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m:
                raise


def search_for(name: str) -> Callable:
    _load()
    if name not in _SEARCHES:
        raise NotImplementedError(
            f"no quantizer for {name!r} yet (quantizers exist for: {', '.join(sorted(_SEARCHES))})")
    return _SEARCHES[name]


def quantizable_types() -> tuple[str, ...]:
    _load()
    from iqk_jax import registry
    return tuple(t for t in registry.types() if t in _SEARCHES)
